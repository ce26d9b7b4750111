"""The streaming tier: stored contexts longer than the KV pool, with only sink and local
pages resident and the selected chunks fetched per layer (chunk cache <- host <- LMDB)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from sglang_reattn import Engine
from sglang_reattn.engine.stream_tier import (
    ChunkCache,
    HostCache,
    StreamFault,
    StreamFull,
    StreamTier,
)
from sglang_reattn.errors import ContextTooLong, InvalidArgument
from sglang_reattn.kv_store import chunk_hashes

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
OPTS = dict(device="cpu", reattn_chunk_size=16, chunked_prefill_size=64, log_level="warning")
# The tiny model (512 trained positions) selects 18 of 47 middle chunks of DOC; a pool of
# 40 pages cannot hold DOC's 57, and a 24-page chunk cache forces misses and evictions.
SMALL = dict(max_total_tokens=640, kv_chunk_cache_pages=24, kv_host_cache_size="64KiB")
# a cache and host tier that hold a first decode step's due chunks
DUE_OPTS = dict(SMALL, kv_chunk_cache_pages=96, max_total_tokens=16 * 116,
                kv_host_cache_size="8MiB")


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


DOC, QUESTION = _ids(900, 1), _ids(5, 3)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, tiny_llama):
    """A store holding DOC, and the answer with everything resident (computed)."""
    store = str(tmp_path_factory.mktemp("stream") / "store")
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        want = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)["output_ids"]
        eng.store_tier.flush()
    return store, want


# ---------------------------------------------------------------------- host tier


class _RefLRU:
    """Plain reference: a list, least recently used first."""

    def __init__(self, cap: int) -> None:
        self.cap, self.items = cap, []  # [(key, size)]

    def get(self, key):
        for i, (k, s) in enumerate(self.items):
            if k == key:
                self.items.append(self.items.pop(i))
                return True
        return False

    def put(self, key, size):
        self.items = [(k, s) for k, s in self.items if k != key]
        if size > self.cap:
            return
        self.items.append((key, size))
        while sum(s for _, s in self.items) > self.cap:
            self.items.pop(0)


def test_host_cache_lru_by_bytes_matches_reference():
    rng = random.Random(0)
    cap = 4096
    cache, ref = HostCache(cap), _RefLRU(cap)
    values = {}
    for step in range(3000):
        key = (rng.randrange(12), rng.randrange(2))
        if rng.random() < 0.5:
            n = rng.choice([16, 64, 128, 300, 700])  # 700 float32 x2 > capacity: not kept
            k, v = torch.full((n,), float(step)), torch.full((n,), -float(step))
            kept = cache.put(key, k, v)
            ref.put(key, 8 * n)
            assert kept == (8 * n <= cap)
            if kept:
                values[key] = step
        else:
            got = cache.get(key)
            assert (got is not None) == ref.get(key)
            if got is not None:  # the value last put under this key, never another's
                assert got[0][0].item() == values[key] and got[1][0].item() == -values[key]
        assert cache.keys() == [k for k, _ in ref.items]
        assert cache.bytes == sum(s for _, s in ref.items) <= cap
    assert cache.hits and cache.misses and cache.evictions


# ---------------------------------------------------------------------- chunk cache


def test_chunk_cache_per_layer_mapping_matches_reference():
    rng = random.Random(1)
    pages = [7, 3, 11, 20, 5]
    layers = 3
    cache = ChunkCache(layers, pages)
    ref = [[] for _ in range(layers)]  # per layer: [(key, page)], least recently used first
    content = {}  # (layer, page) -> key written there (what a fill would copy)
    for _ in range(2000):
        layer = rng.randrange(layers)
        keys = [f"c{rng.randrange(9)}" for _ in range(rng.randrange(1, 5))]
        got, fills = cache.acquire(layer, keys)
        for key, page in fills:
            content[layer, page] = key
        # Every key reads the page that holds it in this layer; distinct keys, distinct pages.
        assert all(content[layer, p] == k for k, p in zip(keys, got))
        assert len(set(got)) == len(set(keys)) and set(got) <= set(pages)
        # Reference: hits move to the back; a miss takes an unused page, else evicts the
        # least recently used key not wanted by this call.
        lru = ref[layer]
        for key in keys:
            hit = [e for e in lru if e[0] == key]
            if hit:
                lru.remove(hit[0])
                lru.append(hit[0])
                continue
            used = {p for _, p in lru}
            free = [p for p in pages if p not in used]
            if free:
                page = dict(zip(keys, got))[key]
                assert page in free
            else:
                victim = next(e for e in lru if e[0] not in keys)
                lru.remove(victim)
                page = victim[1]
                assert dict(zip(keys, got))[key] == page
            lru.append((key, page))
        assert cache.keys(layer) == [k for k, _ in lru]
        probe = [f"c{rng.randrange(9)}" for _ in range(6)]
        assert cache.missing(layer, probe) == [k for k in probe if k not in dict(lru)]
    # Layers are independent: one page holds different chunks in different layers.
    assert any(len({content.get((lay, p)) for lay in range(layers)}) > 1 for p in pages)
    assert cache.hits and cache.misses and cache.evictions


def test_chunk_cache_refuses_a_selection_larger_than_itself():
    cache = ChunkCache(1, [1, 2])
    with pytest.raises(RuntimeError, match="smaller than one step's selection"):
        cache.acquire(0, ["a", "b", "c"])
    assert cache.keys(0) == []  # nothing of the failed call stays mapped
    pages, fills = cache.acquire(0, ["x", "y"])
    assert sorted(pages) == [1, 2] and [k for k, _ in fills] == ["x", "y"]


# ---------------------------------------------------------------------- engine


def test_streamed_context_equals_resident(stored, tiny_llama):
    store, want = stored
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:  # loaded whole, resident
        assert eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)[
            "output_ids"] == want
    outs = {}
    for prefetch in (True, False):
        with Engine(tiny_llama, kv_store_path=store, disable_kv_prefetch=not prefetch,
                    **SMALL, **OPTS) as eng:
            eng.attn.stream.layer_ahead = True  # (off by default; its accounting checked)
            pool_pages = eng.stats()["kv_pages_total"]
            assert pool_pages * 16 < len(DOC)  # DOC could never be resident
            out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
            s = eng.stats()
            outs[prefetch] = out["output_ids"]
            assert out["meta_info"]["cached_tokens"] == len(DOC) // 16 * 16
            # Only the sink chunk and the local window were loaded into pages; the 47
            # middle chunks were scored from their stored summaries, and so was the chunk
            # that left the local window while decoding (spilled: its page given back).
            assert s["store_chunks_loaded"] == 1 + 128 // 16
            assert s["stream_spilled_chunks"] == (905 + 11 - 128) // 16 - (905 - 128) // 16
            assert s["stream_summaries_loaded"] == 47 + s["stream_spilled_chunks"] == 48
            assert s["chunk_cache_misses"] > 0 and s["chunk_cache_hits"] > 0
            assert s["chunk_cache_evictions"] > 0
            # each block fetched once: on a miss, or before the first decode step (due);
            # read on a miss, or a layer ahead of it (each eager step's layers read the
            # next layer's blocks of their own picks: some are taken, some are not)
            assert s["stream_store_reads"] + s["host_cache_hits"] + s[
                "stream_layer_ahead_hits"] == s["chunk_cache_misses"] + s["stream_due_loads"]
            assert 0 < s["stream_layer_ahead_hits"] <= s["stream_layer_ahead_reads"]
            assert s["stream_due_loads"] == 0  # eager decode loads nothing ahead of it
            assert s["host_cache_bytes"] <= 64 << 10
            assert s["kv_pages_free"] == pool_pages - 24  # all but the cache given back
            assert s["stream_attached_chunks"] == 0
    assert outs[True] == want and outs[False] == want


def test_streamed_summaries_come_from_summary_packs(tiny_llama, tmp_path, monkeypatch):
    """A document prefilled into the store gets a summary pack per group of chunks from
    its root (8 here); a streamed request over it reads its middle chunks' summaries from
    those packs, in pieces (16 chunks here) that start where packs start, and answers as
    the resident engine did."""
    from sglang_reattn.engine import store_tier, stream_tier
    from sglang_reattn.kv_store import ChunkStore

    monkeypatch.setattr(store_tier, "SUMMARY_PACK", 8)
    monkeypatch.setattr(stream_tier, "SUMMARY_PIECE", 16)
    pieces = []
    read = store_tier.StoreTier.get_summaries
    monkeypatch.setattr(store_tier.StoreTier, "get_summaries",
                        lambda self, ids, **kw: pieces.append(len(ids)) or read(self, ids, **kw))
    store = str(tmp_path / "store")
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        want = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)["output_ids"]
        eng.store_tier.flush()
        assert eng.stats()["store_summary_packs"] == len(DOC) // 16 // 8 == 7
    served = []
    orig = ChunkStore._pack_rows

    def counted(self, txn, keys, i, lead=None):
        got = orig(self, txn, keys, i, lead)
        served.append(0 if got is None else len(got[0]))
        return got

    monkeypatch.setattr(ChunkStore, "_pack_rows", counted)
    packing = []  # the groups the writer was asked to pack (by their first chunk)
    pack = ChunkStore.pack_summaries
    monkeypatch.setattr(ChunkStore, "pack_summaries",
                        lambda self, ids: packing.append(ids[0]) or pack(self, ids))
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        assert eng.stats()["stream_summaries_loaded"] == 48
        eng.store_tier.flush()
    assert out["output_ids"] == want
    # of the document's 7 groups of 8 chunks, the 6 whose packs the admission read are not
    # packed again; the last (chunks 48..55, the local window's) is
    assert len(packing) == 1
    # the 47 middle chunks start at chunk 1 (after the sink), inside the first pack: all of
    # them from packs, read as chunks 1..15, 16..31 and 32..47 (then the chunk spilled
    # while decoding, alone)
    assert sum(served) == 47
    assert pieces == [15, 16, 16, 1]


def test_a_context_stored_without_packs_gets_them_when_streamed(stored, tiny_llama,
                                                               tmp_path, monkeypatch):
    """A context stored without summary packs (as by an older version) gets them, written
    behind, the first time it is streamed; the next restart reads its summaries from them
    and answers the same."""
    import shutil

    from sglang_reattn.engine import store_tier
    from sglang_reattn.kv_store import ChunkStore

    src, want = stored
    store = str(tmp_path / "copy")
    shutil.copytree(src, store)
    with ChunkStore(store, None) as s:
        assert s.stats()["dbs"]["packs"]["entries"] == 0  # (SUMMARY_PACK 256 > 56 chunks)
    monkeypatch.setattr(store_tier, "SUMMARY_PACK", 8)
    for restart in range(2):
        with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
            out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
            eng.store_tier.flush()
            s = eng.stats()
        assert out["output_ids"] == want
        # the first restart writes the 7 packs of the 56 stored chunks; the second finds them
        assert s["store_summary_packs"] == (7 if restart == 0 else 0)
    with ChunkStore(store, None) as s:
        assert s.stats()["dbs"]["packs"]["entries"] == 7
        keys = [bytes.fromhex(c) for c in chunk_hashes(DOC[: 56 * 16], 16)]
        got = s._read(lambda txn: len(s._pack_rows(txn, keys, 8)[0]))
        assert got == 8  # chunks 8..15 of the document, from one pack


def test_streamed_decode_in_the_graph_path_equals_resident(stored, tiny_llama):
    """Decode steps of a streamed context through the CUDA-graph path's static buffers
    (replayed eagerly on the CPU): the selection is mapped on the device through the page
    map, misses are fetched and the step replayed; the tokens equal the resident answer."""
    store, want = stored
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        eng._call(lambda: eng.runner._capture(2))
        assert {k for k in eng.runner.graphs if k[1] == "stream"} == {(1, "stream"),
                                                                      (2, "stream")}
        eng.attn.stream.expect_next = True  # as an engine that captured its graphs sets it
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
        assert out["output_ids"] == want
        assert s["stream_due_loads"] > 0
        # every decode step after the first token ran from the graph buffers; with a
        # 24-page cache for 18 selected of 47 chunks some steps missed and replayed
        assert s["stream_graph_steps"] + s["stream_graph_eager"] == GREEDY["max_new_tokens"] - 1
        assert 0 < s["stream_graph_replays"] and s["chunk_cache_evictions"] > 0
        assert s["stream_attached_chunks"] == 0


def test_a_graph_step_still_missing_after_the_replay_cap_runs_eagerly(stored, tiny_llama,
                                                                       monkeypatch):
    """With no replays allowed, every streamed graph step that missed runs eagerly: the
    tokens are the resident answer's and the counters add up."""
    from sglang_reattn.engine import model_runner

    monkeypatch.setattr(model_runner, "MAX_STREAM_REPLAYS", 0)
    store, want = stored
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        eng._call(lambda: eng.runner._capture(1))
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
    assert out["output_ids"] == want
    assert s["stream_graph_eager"] > 0 and s["stream_graph_replays"] == 0
    assert s["stream_graph_steps"] + s["stream_graph_eager"] == GREEDY["max_new_tokens"] - 1


def test_runners_up_are_loaded_ahead_and_save_replays(stored, tiny_llama):
    """Streamed graph decode with the runners-up (the chunks ranked just below each layer's
    top k) loaded ahead: the same tokens, prefetched blocks read by later steps, and fewer
    replays than without loading ahead (48 pages: room for the selection and 15 spares)."""
    store, want = stored
    opts = dict(SMALL, kv_chunk_cache_pages=48, max_total_tokens=16 * 68)
    got = {}
    for ahead in (False, True):
        with Engine(tiny_llama, kv_store_path=store, disable_kv_prefetch=not ahead, **opts,
                    **OPTS) as eng:
            eng._call(lambda: eng.runner._capture(1))
            assert eng.attn.spare == (15 if ahead else 0)
            out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
            assert out["output_ids"] == want
            got[ahead] = eng.stats()
    assert got[True]["stream_device_prefetches"] > 0 and got[True]["stream_prefetch_hits"] > 0
    assert got[False]["stream_prefetch_hits"] == 0
    assert got[True]["stream_graph_replays"] < got[False]["stream_graph_replays"]
    with Engine(tiny_llama, kv_store_path=store, kv_prefetch_runners=3, **opts, **OPTS) as eng:
        assert eng.attn.spare == 3  # (--kv-prefetch-runners)


def test_runners_up_loaded_before_replays_keep_the_answer(stored, tiny_llama):
    """Streamed graph decode loading runners-up before each replay (and only the first
    few after a step): the resident answer's tokens, and some blocks were loaded so."""
    store, want = stored
    opts = dict(SMALL, kv_chunk_cache_pages=48, max_total_tokens=16 * 68)
    with Engine(tiny_llama, kv_store_path=store, **opts, **OPTS) as eng:
        eng._call(lambda: eng.runner._capture(1))
        eng.attn.stream.replay_runners, eng.attn.stream.ahead_runners = 8, 4
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
    assert out["output_ids"] == want
    assert s["stream_replay_ahead"] > 0 and s["stream_graph_replays"] > 0


def test_the_last_tokens_chunks_are_loaded_before_the_first_decode_step(stored, tiny_llama,
                                                                        monkeypatch):
    """The prompt's last token selects on its own in each layer of its prefill piece (as
    the decode step after it will); those chunks and its first runners-up are loaded before
    that step: the first decode step misses fewer chunks, with the same answer."""
    store, want = stored
    first = {}
    for expect in (False, True):
        with Engine(tiny_llama, kv_store_path=store, **DUE_OPTS, **OPTS) as eng:
            tier = eng.attn.stream
            tier.expect_next = expect
            tier.layer_ahead = False  # (its reads run on reader threads, by design)
            misses = []
            run = eng.scheduler._run_decode

            def counted(reqs, run=run, tier=tier, misses=misses):
                before = tier.cache.misses
                run(reqs)
                misses.append(tier.cache.misses - before)

            eng.scheduler._run_decode = counted
            jobs = []
            read = tier.tier.get_kv
            tier.tier.get_kv = lambda *a, read=read, jobs=jobs, **k: (
                jobs.append(threading.current_thread().name), read(*a, **k))[1]
            out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
            s = eng.stats()
        assert out["output_ids"] == want
        assert (s["stream_due_loads"] > 0) == expect
        # every block read on the engine's thread (none on the store's reader threads)
        assert jobs and not any(name.startswith("kv-store-reader") for name in jobs)
        first[expect] = misses[0]
    assert first[True] < first[False]


def test_expected_chunks_become_the_rows_hints_and_due_loads():
    """`expect` (a prefill row whose next step decodes): its hint is the last token's
    selection and runners-up in place of the piece's, its due chunks that selection and
    the first `due_runners` runners-up; other rows keep their own selection as hint."""
    tier, _ = _tier_for_test()
    v = tier.attach([f"c{i}" for i in range(1, 8)])
    tier._selected = {0: [(0, "c1"), (1, "c2")]}
    tier.due_runners, tier.ahead_runners = 1, 3
    sel, nsel = np.array([[v[2], v[3], -1]]), np.array([2])
    tier.expect(0, [1], sel, nsel, np.array([[v[4], v[5], v[6], v[0]]]))
    hints, dues = tier.end_step(2)
    assert hints == [{0: ["c1"]}, {0: ["c3", "c4", "c5", "c6", "c7"]}]
    assert dues == [{}, {0: ["c3", "c4", "c5"]}]
    assert tier.end_step(2) == ([{}, {}], [{}, {}])  # consumed
    # due chunks load before the step; more than the cache holds (two requests' dues over
    # a two-page cache) load as many as fit instead of failing
    import queue

    tier._q = queue.Queue()  # (prefetching on, no thread: nothing reads the queue)
    tier.host = HostCache(1 << 20)
    for c in ("c3", "c4", "c5"):
        tier.host.put((c, 0), torch.full((4, 2, 8), float(c[1])), torch.zeros(4, 2, 8))
    tier.prefetch([], [], [{0: ["c3", "c4"]}, {0: ["c5"]}])
    assert [tier.cache.page_of(0, c) is not None for c in ("c3", "c4", "c5")] == [
        True, True, False]
    assert tier.stats["stream_due_loads"] == 2
    page = tier.cache.page_of(0, "c4")
    assert torch.equal(tier.pool.k[0, page], torch.full((4, 2, 8), 4.0))


def test_streaming_counts_misses_then_hits(stored, tiny_llama):
    store, want = stored
    big = dict(SMALL, kv_chunk_cache_pages=200, max_total_tokens=16 * 240,
               kv_resident_max_tokens=0)  # fits the pool, streamed by the budget
    with Engine(tiny_llama, kv_store_path=store, **big, **OPTS) as eng:
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        first = eng.stats()
        assert out["output_ids"] == want
        assert first["chunk_cache_misses"] > 0 and first["chunk_cache_evictions"] == 0
        # The same context again: every block is already in the chunk cache.
        again = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        second = eng.stats()
        assert again["output_ids"] == want
        assert second["chunk_cache_misses"] == first["chunk_cache_misses"]
        assert second["chunk_cache_hits"] > first["chunk_cache_hits"]
        assert second["stream_store_reads"] == first["stream_store_reads"]
        # The summaries were kept too (idle slots), not read again: the 47 middle chunks
        # and the one spilled while decoding.
        assert second["stream_summaries_loaded"] == first["stream_summaries_loaded"] == 48
        assert second["stream_summaries_reused"] == first["stream_summaries_reused"] + 48


@pytest.mark.parametrize("busy_steps", [1, 100])
def test_decode_spill_waits_for_the_writer_without_blocking(stored, tiny_llama, monkeypatch,
                                                            busy_steps):
    """A chunk leaving the local window while the writer is still busy with it stays in
    its page (the step does not wait) and is spilled by a later step once published; the
    answer is the same either way."""
    from sglang_reattn.engine.store_tier import StoreTier

    store, want = stored
    real = StoreTier.pending
    calls = []

    def pending(self, ids):
        calls.append(list(ids))
        return len(calls) <= busy_steps or real(self, ids)

    monkeypatch.setattr(StoreTier, "pending", pending)
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
    assert out["output_ids"] == want
    # asked again every step while busy, about the same chunk
    assert len(calls) == 2 if busy_steps == 1 else len(calls) > 2
    assert all(c == calls[0] for c in calls)
    # the one chunk that left the local window: spilled a step late, or never (still busy)
    assert s["stream_spilled_chunks"] == (1 if busy_steps == 1 else 0)


def test_loaded_chunks_are_marked_used_after_the_request(stored, tiny_llama, monkeypatch):
    """The last-used marks of a streamed request's chunks (attached and loaded at its
    admission) reach the writer once the engine is idle, not while the request runs."""
    from sglang_reattn.engine.store_tier import StoreTier

    store, want = stored
    queued = []  # (requests running or waiting, marks) each time marks went to the writer
    real = StoreTier.idle_work
    sched = None

    def idle_work(self, busy):
        n = len(self._touch_buf)
        real(self, busy)
        if n and not self._touch_buf and sched is not None:
            queued.append((len(sched.running) + len(sched.waiting), n))

    monkeypatch.setattr(StoreTier, "idle_work", idle_work)
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        sched = eng.scheduler
        assert eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)[
            "output_ids"] == want
        eng.store_tier.flush()
    assert queued and all(active == 0 for active, _ in queued)
    assert sum(n for _, n in queued) >= 47  # at least the 47 attached middle chunks


def test_streamed_output_depends_on_the_fetched_chunks(stored, tiny_llama, monkeypatch):
    """The equality above is not vacuous: chunks fetched as zeros change the answer."""
    store, want = stored
    real_write = StreamTier._write_pages

    def zero_write(self, layers, pages, kv):  # on demand and loaded ahead alike
        real_write(self, layers, pages, kv)
        idx = torch.tensor(layers), torch.tensor(pages)
        self.pool.k[idx] = 0.0
        self.pool.v[idx] = 0.0

    monkeypatch.setattr(StreamTier, "_write_pages", zero_write)
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
    assert out["output_ids"] != want


def test_prefetch_loads_the_previous_selection_into_the_host_tier(stored, tiny_llama):
    store, want = stored
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        assert eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)[
            "output_ids"] == want

        def check():
            tier = eng.stream_tier
            ids = tier.cache.keys(0)[:3] + tier.cache.keys(1)[:2]
            hint = {0: ids[:3], 1: ids[3:]}
            # Evict those blocks from both tiers, as other sequences would.
            for layer, keys in hint.items():
                tier.cache.forget(layer, keys)
            tier.host = HostCache(tier.host.capacity)
            before = tier.stats["stream_prefetch_reads"]
            tier.prefetch([hint])
            tier.drain()
            held = all((k, layer) in tier.host for layer, keys in hint.items() for k in keys)
            return held, tier.stats["stream_prefetch_reads"] - before

        held, reads = eng._call(check)
        assert held and reads == 5


def test_two_streamed_requests_take_turns(stored, tiny_llama):
    """One streamed sequence per step fits this cache: two alternate, same answers. With
    prefetch, the one to run next gets its previous selection back into the chunk cache
    (from the host tier) before its step."""
    store, want = stored
    other_q = _ids(7, 21)
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:
        want2 = eng.generate(input_ids=DOC + other_q, sampling_params=GREEDY)["output_ids"]
    stats = {}
    for prefetch in (False, True):
        with Engine(tiny_llama, kv_store_path=store, disable_kv_prefetch=not prefetch,
                    **dict(SMALL, max_total_tokens=16 * 60, kv_host_cache_size="4MiB"),
                    **OPTS) as eng:
            outs = eng.generate(input_ids=[DOC + QUESTION, DOC + other_q],
                                sampling_params=GREEDY)
            assert [o["output_ids"] for o in outs] == [want, want2]
            stats[prefetch] = eng.stats()
    assert stats[False]["stream_device_prefetches"] == 0
    assert stats[True]["stream_device_prefetches"] > 0
    # Blocks copied ahead were read by the step they were copied for.
    assert stats[True]["stream_prefetch_hits"] > 0


def test_corrupt_streamed_block_is_reported_and_recomputed(stored, tiny_llama, tmp_path):
    import shutil

    from sglang_reattn.testing import flip_kv_byte

    src, want = stored
    store = str(tmp_path / "store")
    shutil.copytree(src, store)
    big = dict(SMALL, max_total_tokens=16 * 120, kv_resident_max_tokens=0)
    with Engine(tiny_llama, kv_store_path=store, **big, **OPTS) as eng:
        eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        middle = set(chunk_hashes(DOC, 16)[1:48])  # virtual from admission on
        # a chunk the selection fetches
        bad = [k for k in eng.stream_tier.cache.keys(1) if k in middle][-1]
    flip_kv_byte(store, bad, 1)
    with Engine(tiny_llama, kv_store_path=store, **big, **OPTS) as eng:
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
        assert s["store_corrupt_blocks"] == 1 and s["stream_faults"] == 1
        assert out["output_ids"] == want  # never served: recomputed from the bad chunk
        eng.store_tier.flush()
        assert eng.store_tier.store.has_many([bad]) == [True]  # published again


def _copy_and_answer(stored, tiny_llama, tmp_path, params) -> tuple[str, list[int]]:
    """A private copy of the store holding DOC, and the all-resident answer to DOC +
    QUESTION under `params`."""
    import shutil

    store = str(tmp_path / "store")
    shutil.copytree(stored[0], store)
    with Engine(tiny_llama, **OPTS) as eng:
        want = eng.generate(input_ids=DOC + QUESTION, sampling_params=params)["output_ids"]
    return store, want


def test_streamed_chunks_survive_eviction_while_the_request_runs(stored, tiny_llama,
                                                                  tmp_path):
    """A bounded store evicts least recently used chunks as other requests write theirs;
    the chunks a running streamed request attached are held: never evicted under it (no
    fault, no recompute), same answer as all resident; released when it finishes."""
    long_gen = dict(GREEDY, max_new_tokens=48)
    store, want = _copy_and_answer(stored, tiny_llama, tmp_path, long_gen)
    others = [_ids(400, 40 + i) for i in range(4)]  # 100 chunks to write, > the capacity
    opts = dict(SMALL, max_total_tokens=16 * 200, kv_resident_max_tokens=0,
                kv_store_capacity=str(750_000))  # DOC (57 chunks) and about 25 more
    with Engine(tiny_llama, kv_store_path=store, **opts, **OPTS) as eng:
        st = eng.store_tier.store
        removed = st.removed_total()
        it = eng.generate(input_ids=DOC + QUESTION, sampling_params=long_gen, stream=True)
        got = next(it)["output_ids"]
        middle = st.held()
        assert len(middle) == 47  # the attached middle chunks, held while it runs
        # Other requests' chunks are written while the streamed one decodes.
        eng.generate(input_ids=others, sampling_params=dict(GREEDY, max_new_tokens=1))
        eng.store_tier.flush()
        assert st.removed_total() - removed > 20  # the capacity evicted chunks meanwhile
        assert all(st.has_many(sorted(middle))) and st.stats()["bytes"] <= 750_000
        for out in it:
            got = out["output_ids"]
        s = eng.stats()
        assert s["stream_faults"] == 0 and s["store_chunks_loaded"] == 1 + 128 // 16
        assert got == want
        assert st.held() == set()  # released with the request


def test_long_generation_of_a_streamed_request_spills_to_the_store(stored, tiny_llama,
                                                                    tmp_path):
    """A streamed request decodes far more tokens than its pool share holds: each chunk
    leaving its local window is written to the store and becomes a virtual page. The pool
    use stays bounded, the answer is the all-resident one."""
    import threading

    long_gen = dict(GREEDY, max_new_tokens=200)
    store, want = _copy_and_answer(stored, tiny_llama, tmp_path, long_gen)
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        total = eng.stats()["kv_pages_total"]
        share = total - 24  # the pool pages left beside the chunk cache
        # Sink, local window and prompt tail resident, plus the generation: too many.
        assert (1 + 128 // 16 + 1) * 16 + 200 > share * 16
        sched, pool, used = eng.scheduler, eng.pool, []
        step = sched.step

        def counting_step():
            out = step()
            used.append(total - 24 - pool.num_free)
            return out

        sched.step = counting_step
        box = []
        t = threading.Thread(target=lambda: box.append(
            eng.generate(input_ids=DOC + QUESTION, sampling_params=long_gen)), daemon=True)
        t.start()
        t.join(240)
        assert box, "the streamed request did not finish"
        s = eng.stats()
        assert box[0]["output_ids"] == want
        # Sink, local window, the chunk being filled and the next: never more.
        assert max(used) <= 1 + 128 // 16 + 2
        assert s["stream_spilled_chunks"] >= 200 // 16 - 1 and s["stream_faults"] == 0
        assert s["kv_pages_free"] == share and s["stream_attached_chunks"] == 0


def test_an_explicit_pool_is_kept_when_a_longer_context_streams(stored, tiny_llama):
    """With a disk tier, --max-total-tokens sizes the pool even under a longer
    --context-length (what the pool cannot hold is streamed), and the answer holds."""
    store, want = stored
    with Engine(tiny_llama, kv_store_path=store, context_length=100_000, **SMALL,
                **OPTS) as eng:
        assert eng.pool.num_pages == SMALL["max_total_tokens"] // 16 + 2
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY)
        assert out["output_ids"] == want and eng.stats()["stream_store_reads"] > 0


def test_streaming_flags_are_checked(tiny_llama, tmp_path):
    store = str(tmp_path / "store")
    with pytest.raises(InvalidArgument, match="at least --reattn-topk"):
        Engine(tiny_llama, kv_store_path=store, kv_chunk_cache_pages=4, **OPTS)
    with pytest.raises(InvalidArgument, match="leaves"):
        Engine(tiny_llama, kv_store_path=store, max_total_tokens=640,
               kv_chunk_cache_pages=30, **OPTS)
    for bad, match in ((dict(kv_chunk_cache_pages=-1), "non-negative"),
                       (dict(kv_host_cache_size="lots"), "--kv-host-cache-size"),
                       (dict(kv_resident_max_tokens=-5), "--kv-resident-max-tokens"),
                       (dict(kv_prefetch_runners=-1), "--kv-prefetch-runners"),
                       (dict(kv_chunk_cache_pages=32, disable_reattn=True), "--disable-reattn"),
                       (dict(kv_chunk_cache_pages=32, reattn_summary="mean"), "minmax")):
        with pytest.raises(InvalidArgument, match=match):
            Engine(tiny_llama, kv_store_path=store, **bad, **OPTS)
    # Without a disk tier the cache flag changes nothing.
    with Engine(tiny_llama, kv_chunk_cache_pages=32, **OPTS) as eng:
        assert eng.stream_tier is None


def test_streaming_flags_and_metrics_in_the_server():
    from sglang_reattn.server.args import build_parser, engine_args_from
    from sglang_reattn.server.metrics import ServerMetrics

    ns = build_parser().parse_args(["--kv-chunk-cache-pages", "64", "--kv-host-cache-size",
                                    "2GiB", "--kv-resident-max-tokens", "4096",
                                    "--disable-kv-prefetch", "--kv-prefetch-runners", "2"])
    args = engine_args_from(ns)
    assert (args.kv_chunk_cache_pages, args.kv_host_cache_size, args.kv_resident_max_tokens,
            args.disable_kv_prefetch, args.kv_prefetch_runners) == (64, "2GiB", 4096, True, 2)
    stats = {"chunk_cache_hits": 5, "chunk_cache_misses": 2, "host_cache_hits": 1,
             "host_cache_bytes": 4096, "stream_store_bytes": 8192}
    body = ServerMetrics("m", lambda: stats).render().decode()
    for key, value in stats.items():
        assert f'sglang_reattn:{key}{{model_name="m"}} {float(value)}' in body


@pytest.fixture(scope="module")
def long_doc(tiny_llama):
    """A 125-chunk document and its answer computed all resident (the default pool)."""
    doc = _ids(2000, 5)
    with Engine(tiny_llama, **OPTS) as eng:
        want = eng.generate(input_ids=doc + QUESTION, sampling_params=GREEDY)["output_ids"]
    return doc, want


def test_ingest_of_a_document_longer_than_the_pool(tmp_path, tiny_llama, long_doc):
    """Each ingest piece streams the pieces before it from the store: a 125-chunk document
    through a 40-page pool, answered like the same document computed all resident."""
    doc, want = long_doc
    store = str(tmp_path / "store")
    with Engine(tiny_llama, kv_store_path=store, **SMALL, **OPTS) as eng:
        assert eng.stats()["kv_pages_total"] * 16 < len(doc)
        info = eng.ingest("doc", input_ids=doc)
        assert info["stored_tokens"] == 2000 and info["complete"]
        out = eng.generate(input_ids=QUESTION, sampling_params=GREEDY, context="doc")
        assert out["meta_info"]["cached_tokens"] == 2000
        assert out["output_ids"] == want
        # Each piece reattached the pieces before it: summaries are read once per chunk.
        s = eng.stats()
        assert 0 < s["stream_summaries_loaded"] <= 125 < s["stream_summaries_reused"]


def test_prompt_longer_than_the_pool_spills_to_the_store(tmp_path, tiny_llama, long_doc):
    """One request, nothing stored: its completed middle chunks go to the store between
    prefill pieces and their pages are reused; same answer as all resident."""
    doc, want = long_doc
    with Engine(tiny_llama, kv_store_path=str(tmp_path / "store"), **SMALL, **OPTS) as eng:
        total = eng.stats()["kv_pages_total"]
        assert total * 16 < len(doc)
        out = eng.generate(input_ids=doc + QUESTION, sampling_params=GREEDY)
        s = eng.stats()
        assert out["output_ids"] == want and out["meta_info"]["cached_tokens"] == 0
        assert s["stream_spilled_chunks"] > 100 and s["kv_pages_free"] == total - 24
    with Engine(tiny_llama, kv_store_path=str(tmp_path / "ro"), max_total_tokens=640,
                **OPTS) as eng:  # no streaming tier: refused, as before
        with pytest.raises(ContextTooLong):
            eng.generate(input_ids=doc + QUESTION, sampling_params=GREEDY)


class _FakeStore:
    """get_summaries like ChunkStore's: int8 [n, L, 2, Hkv, D] and scales [n, L, 2, Hkv]
    (dequantize=False), dequantized value = chunk number."""

    def __init__(self, shape) -> None:
        self.shape, self.reads, self.gone = shape, [], set()

    def has_many(self, ids):
        return [c not in self.gone for c in ids]

    def get_summaries(self, ids, dequantize=True):
        assert not dequantize, "the tier dequantizes on the device"
        self.reads.append(list(ids))
        q = torch.ones((len(ids), self.shape[0], 2) + self.shape[1:], dtype=torch.int8)
        scales = torch.stack([torch.full((self.shape[0], 2, self.shape[1]), float(int(c[1:])))
                              for c in ids])
        return q.numpy(), scales.numpy()


class _FakeTier:
    def __init__(self, store) -> None:
        self.store, self.held = store, {}
        self._readers = None

    def _reader_pool(self):  # (the layer-ahead reads run on it)
        from concurrent.futures import ThreadPoolExecutor

        if self._readers is None:
            self._readers = ThreadPoolExecutor(2)
        return self._readers

    def touch(self, ids) -> None:
        pass

    def get_summaries(self, ids, pack_of_first=None):
        return self.store.get_summaries(ids, dequantize=False)

    def hold(self, ids) -> None:
        for c in ids:
            self.held[c] = self.held.get(c, 0) + 1

    def release(self, ids) -> None:
        for c in ids:
            assert self.held.get(c), f"{c} released but not held"
            self.held[c] -= 1
            if not self.held[c]:
                del self.held[c]


def _attn_stub(pool, slots: int):
    """ReAttention's part the tier uses: summary rows past the pool's, and the page map."""
    from types import SimpleNamespace

    layers, pages, _, hkv, d = pool.k.shape
    return SimpleNamespace(num_virtual=slots, kmin=torch.zeros(layers, pages + slots, hkv, d),
                           kmax=torch.zeros(layers, pages + slots, hkv, d),
                           page_map=torch.full((layers, slots), -1, dtype=torch.int32),
                           invalidate_rotated=lambda idx: None)


def _tier_for_test(slots: int = 8):
    from sglang_reattn.layers.attention import KVPool

    pool = KVPool(2, 10, 4, 2, 8, torch.float32, torch.device("cpu"))
    store = _FakeStore((2, 2, 8))
    return (StreamTier(_FakeTier(store), pool, _attn_stub(pool, slots), [8, 9], 0,
                       prefetch=False), store)


def test_a_failed_summary_piece_stops_the_read(monkeypatch):
    """Summaries read in pieces, one after the other: when a piece fails, `attach` raises
    without reading the pieces after it; nothing is attached or held, and the tier serves
    the next request."""
    from sglang_reattn.engine import stream_tier
    from sglang_reattn.kv_store import StoreError

    monkeypatch.setattr(stream_tier, "SUMMARY_PIECE", 2)
    tier, store = _tier_for_test()
    asked, plain = [], store.get_summaries

    def get(ids, dequantize=True):
        asked.append(list(ids))
        q, s = plain(ids, dequantize)
        if ids[0] == "c3":  # the second piece: another shape
            return q[:, :, :1], s[:, :, :1]
        return q, s

    store.get_summaries = get
    with pytest.raises(StoreError, match="shape differs"):
        tier.attach([f"c{i}" for i in range(1, 7)])
    assert asked == [["c1", "c2"], ["c3", "c4"]] and not tier.tier.held
    store.get_summaries = plain
    assert len(tier.attach([f"c{i}" for i in range(1, 7)])) == 6


def test_summary_slots_are_shared_and_kept_while_idle():
    tier, store = _tier_for_test()
    a = tier.attach(["c1", "c2", "c3"])
    b = tier.attach(["c2", "c3", "c4"])
    assert store.reads == [["c1", "c2", "c3"], ["c4"]]
    assert a[1:] == b[:2] and all(tier.is_virtual(p) for p in a + b)
    assert [tier.chunk_of(p) for p in b] == ["c2", "c3", "c4"]
    assert tier.attn.kmin[1, b[2]].unique().tolist() == [4.0]  # virtual page = its row
    tier.release(a)
    assert tier.counters()["stream_attached_chunks"] == 3  # c2, c3, c4 (c1 idle)
    assert tier.attach(["c1"]) == a[:1] and store.reads[-1] == ["c4"]  # reused
    tier.release(b + a[:1])
    assert tier.counters()["stream_attached_chunks"] == 0
    # Slot pressure reuses idle slots, least recently released first; past the fixed
    # number of slots, StreamFull and nothing attached.
    n = tier.attn.num_virtual
    fresh = tier.attach([f"c{i}" for i in range(100, 100 + n - 2)])
    assert len(set(fresh)) == n - 2 and max(fresh) < tier.base + n
    assert [tier.chunk_of(p) for p in tier.attach(["c3", "c1"])] == ["c3", "c1"]
    assert store.reads[-1] == ["c3"]  # c2 and c3 were the oldest idle ones: c3 reloaded
    with pytest.raises(StreamFull, match="kv-stream-max-tokens"):
        tier.attach(["c7"])
    assert tier.counters()["stream_attached_chunks"] == n and tier.tier.held.get("c7") is None
    tier.forget_idle()
    with pytest.raises(AssertionError, match="released twice"):
        tier.release(a[:1] * 3)


def test_attached_chunks_are_held_in_the_store_while_referenced():
    """A chunk is held (safe from the store's eviction) once, from its first reference to
    its last; an idle summary is reused only if its chunk is still stored."""
    tier, store = _tier_for_test()
    held = tier.tier.held
    a = tier.attach(["c1", "c2", "c2"])
    b = tier.attach(["c2", "c3"])
    assert held == {"c1": 1, "c2": 1, "c3": 1}
    tier.release(a)
    assert held == {"c2": 1, "c3": 1}  # c2 still referenced by b
    tier.release(b)
    assert held == {}
    tier.attach(["c1"])  # idle summary, still stored: reused, held again
    assert held == {"c1": 1} and store.reads == [["c1", "c2"], ["c3"]]
    store.gone.add("c2")  # evicted while idle (another process)
    with pytest.raises(StreamFault, match="c2"):
        tier.attach(["c3", "c2"])
    assert held == {"c1": 1}  # nothing of the failed call is held or attached
    assert tier.counters()["stream_attached_chunks"] == 1


def _fake_reads(kv: dict, value):
    """A stand-in for the store tier's get_kv (what a fill reads): block (c, layer) is K
    full of value(c, layer) and V zeros, remembered in `kv`, written into `out`."""
    def get_kv(ids, layer, out, split=None):
        for i, c in enumerate(ids):
            k, v = kv.setdefault((c, layer), (torch.full((4, 2, 8), value(c, layer)),
                                              torch.zeros(4, 2, 8)))
            out[i, 0], out[i, 1] = k.numpy(), v.numpy()
        return out[:, 0], out[:, 1]
    return get_kv


def test_page_map_follows_the_chunk_cache():
    """The host page map (slot -> chunk-cache page per layer) tracks fills, evictions,
    forgotten fills and freed slots; sync_map brings the device copy up to date; settle
    passes a selection whose chunks are all cached, and fetches the rest."""
    import numpy as np

    tier, _ = _tier_for_test(slots=4)
    kv = {}
    tier.tier.get_kv = _fake_reads(kv, lambda c, layer: float(int(c[1:])))
    v = tier.attach(["c1", "c2", "c3"])
    slot = [p - tier.base for p in v]
    assert (tier.vmap == -1).all()
    tier.resolve(1, np.array([[v[0], 5, v[1]]], dtype=np.int32), np.array([3]))
    p1, p2 = tier.cache.page_of(1, "c1"), tier.cache.page_of(1, "c2")
    assert tier.vmap[1, slot[0]] == p1 and tier.vmap[1, slot[1]] == p2
    assert (tier.vmap[0] == -1).all() and tier.vmap[1, slot[2]] == -1
    tier.sync_map()
    assert torch.equal(tier.attn.page_map, torch.from_numpy(tier.vmap))
    # c3 evicts the least recently used of layer 1 (c1), which now maps to nothing
    tier.resolve(1, np.array([[v[2], v[1]]], dtype=np.int32), np.array([2]))
    assert tier.vmap[1, slot[0]] == -1 and tier.vmap[1, slot[2]] == p1
    assert torch.equal(tier.pool.k[1, p1], torch.full((4, 2, 8), 3.0))
    # settle: layer 1's selection is cached, layer 0's is not: fetched, then it passes
    sel = np.full((2, 1, 2), -1, dtype=np.int64)
    sel[1, 0] = [v[1], v[2]]
    sel[0, 0] = [v[0], 7]
    hits = tier.cache.hits
    assert not tier.settle(sel)
    assert tier.vmap[0, slot[0]] >= 0 and tier.cache.hits == hits + 2
    assert tier.settle(sel) and tier.cache.hits == hits + 5
    tier.sync_map()
    assert torch.equal(tier.attn.page_map, torch.from_numpy(tier.vmap))
    # a freed (idle, then reused) slot forgets its pages in every layer
    tier.release(v)
    tier.forget_idle()
    assert (tier.vmap == -1).all()
    w = tier.attach(["c2"])  # still cached in both layers under its new slot
    assert tier.vmap[1, w[0] - tier.base] == p2


def test_runners_up_loaded_before_a_replay_and_after_a_step():
    """settle with runners-up: with `replay_runners`, a step that missed loads the first
    uncached runners-up of the layers above the lowest that missed (whose selection the
    replay may move), with their blocks; a later step reading one counts a prefetch hit.
    `ahead_runners` keeps only the first runners-up per layer as the step's hints."""
    tier, _ = _tier_for_test(slots=6)
    tier.cache = ChunkCache(2, [5, 6, 7, 8, 9], tier._on_cache)  # 5 pages per layer
    kv = {}
    tier.tier.get_kv = _fake_reads(kv, lambda c, layer: float(int(c[1:]) + 10 * layer))
    v = tier.attach([f"c{i}" for i in range(1, 7)])
    sel = np.array([[[v[0], -1]], [[v[1], -1]]])
    runners = np.array([[[v[2], v[3], v[4]]], [[v[2], v[3], v[4]]]])
    tier.replay_runners = 0
    assert not tier.settle(sel, runners)  # both layers missed: their picks, no runners-up
    assert tier.cache.page_of(1, "c3") is None and tier.stats["stream_replay_ahead"] == 0
    tier.cache.forget(0, ["c1"])
    tier.cache.forget(1, ["c2"])
    tier.replay_runners = 2
    assert not tier.settle(sel, runners)
    # layer 0 missed lowest: only layer 1's first two runners-up come in
    assert [tier.cache.page_of(0, c) is None for c in ("c3", "c4")] == [True, True]
    for c in ("c3", "c4"):
        page = tier.cache.page_of(1, c)
        assert page is not None and tier.vmap[1, v[int(c[1:]) - 1] - tier.base] == page
        assert torch.equal(tier.pool.k[1, page], kv[c, 1][0])
    assert tier.cache.page_of(1, "c5") is None and tier.stats["stream_replay_ahead"] == 2
    hits = tier.stats["stream_prefetch_hits"]
    assert tier.settle(np.array([[[v[0], -1]], [[v[1], v[2]]]]), runners)
    assert tier.stats["stream_prefetch_hits"] == hits + 1
    # the hints: uncached runners-up only, and with ahead_runners only the first ones
    assert tier.end_step(1) == ([{0: ["c3", "c4", "c5"], 1: ["c5"]}], [{}])
    tier.ahead_runners = 1
    tier.settle(np.array([[[v[0], -1]], [[v[1], v[2]]]]), runners)
    assert tier.end_step(1) == ([{0: ["c3"]}], [{}])


def test_a_demand_fill_reads_misses_into_staged_rows_and_copies_hits(synthetic_store_tier):
    """A demand fill: the blocks the host tier lacks are read from the store straight into
    the first rows of a staging buffer, the host tier's are copied after them; every page
    gets its own chunk's block, and nothing read on demand goes to the host tier."""
    from sglang_reattn.kv_store import synthetic

    store, ids = synthetic_store_tier(2, 12, 6, 4)
    fp, pool = store.store.fingerprint, store.pool
    tier = StreamTier(store, pool, _attn_stub(pool, 8), list(range(4, 12)), 1 << 20,
                      prefetch=False)
    tier.attach(ids)
    f16 = torch.float16
    for c in (ids[1], ids[4]):  # in the host tier: (K, V) negated, so a mix-up shows
        k, v = synthetic.kv_for(c, fp)
        tier.host.put((c, 1), -torch.from_numpy(k[1]).to(f16), -torch.from_numpy(v[1]).to(f16))
    want = [ids[4], ids[0], ids[1], ids[3], ids[2]]
    pages = tier._cache_in(1, want)
    for c, page in zip(want, pages):
        k, v = (torch.from_numpy(x[1]).to(f16) for x in synthetic.kv_for(c, fp))
        sign = -1 if c in (ids[1], ids[4]) else 1
        assert torch.equal(pool.k[1, page], sign * k) and torch.equal(pool.v[1, page], sign * v)
    assert tier.stats["stream_store_reads"] == 3 and tier.host.hits == 2
    assert len(tier.host) == 2  # the three read on demand were not kept there


def test_split_reads_fill_one_buffer_equal_to_plain_reads(synthetic_store_tier, monkeypatch):
    """StoreTier.get_kv split over reader threads writes each part's rows of one buffer
    (given or its own): K and V equal one plain read; a bad buffer is refused."""
    from sglang_reattn.engine import store_tier

    monkeypatch.setattr(store_tier, "SPLIT_MIN", 2)
    tier, ids = synthetic_store_tier(2, 4, 9, 3)
    ids = ids[::-1]
    want_k, want_v = tier.store.get_kv_many(ids, 1)
    out = torch.zeros(9, 2, 4, 2, 8, dtype=torch.float16)
    for given in (None, out.numpy()):
        k, v = tier.get_kv(ids, 1, given)
        assert (k == want_k).all() and (v == want_v).all()
    assert (out[:, 0].numpy() == want_k).all() and (out[:, 1].numpy() == want_v).all()
    with pytest.raises(ValueError):
        tier.store.get_kv_many(ids[:2], 1, np.zeros((2, 2, 4, 2, 7), np.float16))


def test_blocks_go_to_the_device_through_two_reused_staging_buffers(monkeypatch):
    """On CUDA, blocks are stacked (or read, on demand) into one of two pinned staging
    buffers, used in turn: a buffer is reused only after the event of its
    last copy (recorded once that copy is queued) and grown to the next power of two when
    too small, never allocated per copy; so are the pinned buffers of the pages' indices
    paired with them. Played here with pinning and events faked."""
    tier, _ = _tier_for_test()
    log, allocs = [], []

    class Event:
        def __init__(self, name):
            self.name = name

        def record(self):
            log.append(("record", self.name))

        def synchronize(self):
            log.append(("wait", self.name))

    empty = torch.empty

    def fake_empty(*shape, pin_memory=False, **kw):
        if pin_memory:
            allocs.append((shape[0], kw.get("dtype")))
        return empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    tier._pin = True
    tier._staged = [[None, Event("a"), None], [None, Event("b"), None]]
    gen = torch.Generator().manual_seed(5)

    def blocks(n):
        return [(torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen))
                for _ in range(n)]

    for i, (n, grew) in enumerate(((3, True), (2, True), (1, False), (5, True), (2, False))):
        kv, before = blocks(n), len(allocs)
        layers, pages = [i % 2 for i in range(n)], [8 + (i // 2) % 2 for i in range(n)]
        # a buffer grown inside a forward's inference mode is reused outside it (the first
        # write's, by the third)
        with torch.inference_mode(i == 0):
            tier._write_pages(layers, pages, tier._stack(kv))
        assert (len(allocs) > before) == grew
        # the last write to each (layer, page) holds that block's K and V
        for (layer, page), (k, v) in dict(zip(zip(layers, pages), kv)).items():
            assert torch.equal(tier.pool.k[layer, page], k)
            assert torch.equal(tier.pool.v[layer, page], v)
    # every size a power of two of whole elements: 3 blocks -> 4, 2 -> 2 (the other
    # buffer), 5 -> 8 (the second buffer again was too small)
    block = 2 * 4 * 2 * 8
    assert [n for n, dtype in allocs if dtype != torch.int64] == [4 * block, 2 * block,
                                                                  8 * block]
    # and the indices (layer and page of each block: 2n) beside them: 6 -> 8, 4, 10 -> 16
    assert [n for n, dtype in allocs if dtype == torch.int64] == [8, 4, 16]
    # each use waits for its buffer's last copy, then records the new one: a, b, a, b, a
    assert log == [(what, name) for name in "ababa" for what in ("wait", "record")]


def test_a_failed_fill_leaves_no_page_mapped():
    """A chunk-cache fill that fails after its pages were taken (a fetch, a copy) leaves
    none of them mapped: nothing later reads a page as a block it never received."""
    tier, _ = _tier_for_test(slots=4)
    v = tier.attach(["c1", "c2"])
    tier.host = HostCache(1 << 20)
    block = (torch.ones(4, 2, 8), torch.ones(4, 2, 8))
    tier.host.put(("c1", 0), *block)
    tier.host.put(("c2", 0), *block)

    def broken(*a, **k):
        raise RuntimeError("copy failed")

    tier._write_pages = broken
    with pytest.raises(RuntimeError, match="copy failed"):
        tier._to_device({0: ["c1", "c2"]})
    with pytest.raises(RuntimeError, match="copy failed"):
        tier.resolve(0, np.array([[v[0], v[1]]], dtype=np.int32), np.array([2]))
    assert [tier.cache.page_of(0, c) for c in ("c1", "c2")] == [None, None]
    assert (tier.vmap == -1).all() and not tier._loaded_ahead.any()
    del tier._write_pages  # working again: both pages can be taken and filled
    tier._to_device({0: ["c1", "c2"]})
    assert sorted(tier.cache.page_of(0, c) for c in ("c1", "c2")) == [8, 9]


def test_loads_ahead_run_while_the_graph_replays_keep_the_answer(stored, tiny_llama):
    """Loads ahead deferred into the next graph step (`defer_prefetch`: they run after its
    replay is launched, before its selection is read back): a chunk they map that the
    replay selected counts as a miss of it (the replay read the map before), so the tokens
    stay the resident answer's; blocks loaded so are read by later steps; the device page
    map, synced entry by entry, ends equal to the host's."""
    store, want = stored
    opts = dict(SMALL, kv_chunk_cache_pages=48, max_total_tokens=16 * 68)
    with Engine(tiny_llama, kv_store_path=store, **OPTS) as eng:  # resident
        ref = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY,
                           return_logprob=True)["meta_info"]["output_token_logprobs"]
    with Engine(tiny_llama, kv_store_path=store, **opts, **OPTS) as eng:
        eng._call(lambda: eng.runner._capture(1))
        tier = eng.attn.stream
        tier.expect_next = tier.defer_prefetch = True
        ran = []
        run = tier.run_deferred

        def spy(in_flight=False):
            ran.append(in_flight and tier._deferred is not None)
            run(in_flight)

        tier.run_deferred = spy
        out = eng.generate(input_ids=DOC + QUESTION, sampling_params=GREEDY,
                           return_logprob=True)
        s = eng.stats()
        eng._call(tier.sync_map)
        assert torch.equal(eng.attn.page_map.cpu(), torch.from_numpy(tier.vmap))
    assert out["output_ids"] == want
    got = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, *_ in got] == [t for _, t, *_ in ref]
    assert max(abs(a[0] - b[0]) for a, b in zip(got, ref)) < 1e-4
    assert sum(ran) >= GREEDY["max_new_tokens"] - 2  # each graph step ran the last's loads
    assert s["stream_device_prefetches"] > 0 and s["stream_prefetch_hits"] > 0
    assert s["stream_ahead_late"] > 0 and s["stream_graph_replays"] > 0


def test_a_decode_plan_refilled_only_where_it_changed_equals_a_full_fill(stored, tiny_llama):
    """The graph path's scope-plan buffers skip the rows they already hold: after every
    streamed and resident decode step they equal a fill from scratch (16-token chunks:
    the tables change every 16 steps, and twice in 24 tokens)."""
    from sglang_reattn.engine.model_runner import ModelRunner

    store, want = stored
    checked = []
    fill = ModelRunner._fill_plan

    def checked_fill(self, reqs, gbs, p, new=1):  # (new: the prefill graph's pieces too)
        fill(self, reqs, gbs, p, new)
        names = ("head_table", "cand_pages", "local_table", "head_pages", "num_cands",
                 "local_tokens")
        got = [getattr(p, n).clone() for n in names]
        self._filled.clear()
        fill(self, reqs, gbs, p, new)
        checked.append(all(torch.equal(a, getattr(p, n)) for a, n in zip(got, names)))

    params = dict(GREEDY, max_new_tokens=24)
    for kv in ({"kv_store_path": store, **SMALL}, {}):
        with Engine(tiny_llama, **kv, **OPTS) as eng:
            eng._call(lambda: eng.runner._capture(1))
            ModelRunner._fill_plan = checked_fill
            try:
                out = eng.generate(input_ids=DOC + QUESTION, sampling_params=params)
            finally:
                ModelRunner._fill_plan = fill
        assert out["output_ids"][:12] == want
    assert len(checked) >= 2 * 22 and all(checked)


def test_reads_ahead_wait_while_the_engine_thread_fills_the_cache(monkeypatch):
    """While the engine thread fills chunk-cache pages for the step it is about to run
    (`_fill_many`), the prefetch thread's next read ahead waits (at most
    PREFETCH_YIELD_S), so that it does not take the interpreter from that fill."""
    from sglang_reattn.engine import stream_tier

    tier, _ = _tier_for_test(slots=4)
    tier.layer_ahead = False  # (reads of the next layer run beside the fill, by design)
    v = tier.attach(["c1", "c2"])
    kv, seen = {}, []
    real = _fake_reads(kv, lambda c, layer: float(int(c[1:])))

    def get_kv(ids, layer, out, split=None):
        seen.append(tier._go.is_set())  # a read ahead would wait now
        return real(ids, layer, out, split)

    tier.tier.get_kv = get_kv
    tier.resolve(0, np.array([[v[0], v[1]]], dtype=np.int32), np.array([2]))
    assert seen == [False] and tier._go.is_set()  # cleared during the fill only
    fetched = []
    tier.fetch = lambda layer, keys: fetched.append((layer, keys))
    tier._go.clear()
    monkeypatch.setattr(stream_tier, "PREFETCH_YIELD_S", 5.0)
    th = threading.Thread(target=tier._prefetch_one, args=((1, ["c1"]),))
    th.start()
    th.join(0.2)
    assert th.is_alive() and fetched == []
    tier._go.set()
    th.join(5)
    assert fetched == [(1, ["c1"])]


def test_a_load_of_several_layers_leaves_out_a_layer_whose_read_fails():
    """A load ahead of several layers in one fill (`_load`, as before a first decode
    step): a layer whose store read fails keeps none of its pages mapped, and the others
    (read, and held by the host tier) get each chunk's own block; a fill that must not
    skip faults (a replay's misses) raises and maps nothing."""
    from sglang_reattn.kv_store import CorruptBlock

    tier, _ = _tier_for_test(slots=6)
    tier.cache = ChunkCache(2, [5, 6, 7, 8, 9], tier._on_cache)  # 5 pages per layer
    tier.attach([f"c{i}" for i in range(1, 7)])
    tier.host = HostCache(1 << 20)
    tier.host.put(("c6", 0), torch.full((4, 2, 8), 60.0), torch.zeros(4, 2, 8))
    kv = {}
    fake = _fake_reads(kv, lambda c, layer: float(int(c[1:]) + 10 * layer))

    def get_kv(ids, layer, out, split=None):
        if layer == 1:
            raise CorruptBlock(ids[0], layer, "kv", "checksum mismatch")
        return fake(ids, layer, out, split)

    tier.tier.get_kv = get_kv
    # (the failing layer first: its rows come first in the staging buffer)
    tier._load({1: ["c3", "c4"], 0: ["c1", "c2", "c6"]}, "stream_due_loads", faults=False)
    assert [tier.cache.page_of(1, c) for c in ("c3", "c4")] == [None, None]
    for c, value in (("c1", 1.0), ("c2", 2.0), ("c6", 60.0)):
        page = tier.cache.page_of(0, c)
        assert torch.equal(tier.pool.k[0, page], torch.full((4, 2, 8), value))
    assert tier.stats["stream_due_loads"] == 3
    assert tier.vmap[1].max() == -1 and (tier.vmap[0] >= 0).sum() == 3
    with pytest.raises(StreamFault):
        tier._cache_in_many({0: ["c5"], 1: ["c3"]})
    assert tier.cache.page_of(0, "c5") is None and tier.cache.page_of(1, "c3") is None


@pytest.mark.parametrize("ahead", [True, False])
def test_layer_ahead_reads_feed_the_next_layers_fill(ahead):
    """With `layer_ahead`, resolving a layer starts reading the next layer's blocks of the
    same chunks on a reader thread; the next layer's fill takes those it selected from
    there and reads only the others. The pages hold the stored blocks either way."""
    from sglang_reattn.layers.attention import KVPool

    pool = KVPool(3, 10, 4, 2, 8, torch.float32, torch.device("cpu"))
    store = _FakeStore((3, 2, 8))
    tier = StreamTier(_FakeTier(store), pool, _attn_stub(pool, 8), [6, 7, 8, 9], 0,
                      prefetch=False)
    tier.layer_ahead = ahead
    kv, reads = {}, []
    fake = _fake_reads(kv, lambda c, layer: 10.0 * layer + int(c[1:]))

    def get_kv(ids, layer, out, split=None):
        reads.append((layer, list(ids)))
        return fake(ids, layer, out, split)

    tier.tier.get_kv = get_kv
    v = tier.attach(["c1", "c2", "c3", "c4"])
    sel = lambda *js: np.array([[v[j] for j in js]], dtype=np.int32)  # noqa: E731
    out0 = tier.resolve(0, sel(0, 1), np.array([2]))
    out1 = tier.resolve(1, sel(1, 2), np.array([2]))
    tier.end_step(1)
    for layer, out, chunks in ((0, out0, (1, 2)), (1, out1, (2, 3))):
        for page, c in zip(out[0].tolist(), chunks):
            assert torch.equal(pool.k[layer, page], torch.full((4, 2, 8), 10.0 * layer + c))
            assert torch.equal(pool.v[layer, page], torch.zeros(4, 2, 8))
    stats = tier.counters()
    if ahead:  # layer 1 read c1, c2 ahead and took c2; layer 2 read c2, c3 ahead (unused)
        assert sorted(reads) == [(0, ["c1", "c2"]), (1, ["c1", "c2"]), (1, ["c3"]),
                                 (2, ["c2", "c3"])]
        assert stats["stream_layer_ahead_reads"] == 4
        assert stats["stream_layer_ahead_hits"] == 1
    else:
        assert reads == [(0, ["c1", "c2"]), (1, ["c2", "c3"])]
        assert stats["stream_layer_ahead_reads"] == stats["stream_layer_ahead_hits"] == 0
