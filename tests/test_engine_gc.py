"""The engine keeps long-lived objects out of the cyclic collector's way while requests
run (gc.freeze after a prefill step), and collects what it froze once idle."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from sglang_reattn import Engine
from sglang_reattn.engine import engine as engine_mod


class _Node:
    pass


def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(autouse=True)
def _restore_gc():
    yield
    gc.unfreeze()


def _others_collected() -> None:
    """Freezing is process-wide: another engine alive in this process (the session's
    default engine) that froze objects and is now idle would unfreeze and collect them,
    this test's cycle too, at its own GC_IDLE_S. Wait until no other engine has a
    collection pending (each thread's target is its engine's run method)."""
    others = [t._target.__self__ for t in threading.enumerate()
              if t.name == "engine" and getattr(t, "_target", None) is not None]
    assert _wait_for(lambda: not any(e.scheduler.gc_pending for e in others
                                     if getattr(e, "scheduler", None)), 15.0)


def test_prefill_freezes_and_idle_collects_what_was_frozen(tiny_llama, monkeypatch):
    # (long enough that a loaded machine does not reach it between two lines below)
    monkeypatch.setattr(engine_mod, "GC_IDLE_S", 3.0)
    _others_collected()
    gc.unfreeze()
    with Engine(tiny_llama, device="cpu", reattn_chunk_size=16, chunked_prefill_size=64,
                log_level="warning", disable_kv_store=True) as eng:
        cycle = _Node()
        cycle.me = cycle  # only the cyclic collector can free it
        ref = weakref.ref(cycle)
        out = eng.generate(input_ids=list(range(5, 40)),
                           sampling_params={"max_new_tokens": 3, "temperature": 0})
        assert len(out["output_ids"]) == 3
        # the prefill froze what existed, the cycle included: a collection now (well
        # before the engine has been idle GC_IDLE_S) skips it
        del cycle
        assert eng.scheduler.gc_pending and gc.get_freeze_count() > 0
        gc.collect()
        assert ref() is not None
        # idle for GC_IDLE_S: the engine unfreezes, collects, and freezes the survivors
        assert _wait_for(lambda: ref() is None, 8.0)
        assert _wait_for(lambda: not eng.scheduler.gc_pending, 8.0)
        assert gc.get_freeze_count() > 0  # the survivors (the engine's own state)
        # a request after the idle collection still works and freezes again
        out = eng.generate(input_ids=list(range(7, 30)),
                           sampling_params={"max_new_tokens": 2, "temperature": 0})
        assert len(out["output_ids"]) == 2 and eng.scheduler.gc_pending
    assert gc.get_freeze_count() == 0  # shutdown handed everything back to the collector
