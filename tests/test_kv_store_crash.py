"""Atomic publish: a writer killed with SIGKILL at random points never leaves half a chunk."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal

import numpy as np
from sglang_reattn.kv_store import ChunkStore, CorruptBlock
from sglang_reattn.kv_store.synthetic import kv_for, make_chain, summary_for, tiny_fingerprint

FP = tiny_fingerprint(num_layers=4, num_kv_heads=2, head_dim=32, chunk_size=32)
CAPACITY = 6 << 20  # small enough that eviction runs inside the killed transactions


def writer(path: str, seed: int, ready) -> None:
    """Write, touch, pin and delete until killed."""
    rng = random.Random(seed)
    with ChunkStore(path, FP, CAPACITY) as s:
        ready.set()
        n = 0
        while True:
            n += 1
            chain = make_chain(FP, rng.randint(5, 40), seed=seed * 100_000 + n)
            s.put_chunks(chain)
            s.touch([r.chunk_id for r in chain[: rng.randint(1, 5)]])
            if n % 3 == 0:
                s.put_context(f"ctx{n % 4}", chain[-1].chunk_id, len(chain) * 32, pinned=n % 2 == 0)
            if n % 5 == 0:
                s.delete(chain[len(chain) // 2].chunk_id)


def verify(path: str) -> int:
    """Every visible chunk is whole and reads back exactly; indexes agree with headers."""
    with ChunkStore(path, FP, CAPACITY) as s:
        heads = {h.chunk_id: h for h in s.iter_headers()}
        ids = sorted(heads)
        for layer in range(FP["num_layers"]):
            for i in range(0, len(ids), 256):
                k, v = s.get_kv_many(ids[i : i + 256], layer)  # CRC-checked
                for j, cid in enumerate(ids[i : i + 256]):
                    wk, wv = kv_for(cid, FP)
                    assert np.array_equal(k[j], wk[layer]) and np.array_equal(v[j], wv[layer])
        if ids:
            got = s.get_summaries(ids)
            want = np.stack([summary_for(c, FP) for c in ids])
            assert np.allclose(got, want, atol=0.05)
        st = s.stats()
        dbs = st["dbs"]
        assert dbs["kv"]["entries"] == FP["num_layers"] * len(ids), "orphan or missing KV blocks"
        assert dbs["summaries"]["entries"] == len(ids)
        assert dbs["lru"]["entries"] == sum(h.pin_count == 0 for h in heads.values())
        assert dbs["children"]["entries"] == sum(h.parent_id is not None for h in heads.values())
        assert all(h.parent_id is None or h.parent_id in heads for h in heads.values())
        assert st["chunks"] == len(ids)
        assert st["bytes"] == sum(h.stored_bytes for h in heads.values()) <= CAPACITY
        for c in s.list_contexts():
            assert c.last_chunk_id is None or c.last_chunk_id in heads
        return len(ids)


def test_sigkill_mid_write_20_times(tmp_path):
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "store")
    rng = random.Random(1234)
    seen = []
    for i in range(20):
        ready = ctx.Event()
        p = ctx.Process(target=writer, args=(path, i + 1, ready))
        p.start()
        assert ready.wait(30), "writer did not start"
        p.join(timeout=rng.uniform(0.0, 0.4))
        assert p.is_alive(), f"writer died early with exit code {p.exitcode}"
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        seen.append(verify(path))
    assert max(seen) > 0


def test_verify_catches_a_half_written_chunk(tmp_path):
    """The checker above can fail: drop one layer block behind the store's back."""
    import lmdb
    import pytest

    path = str(tmp_path / "store")
    chain = make_chain(FP, 3)
    with ChunkStore(path, FP, CAPACITY) as s:
        s.put_chunks(chain)
    assert verify(path) == 3
    env = lmdb.open(path, max_dbs=16)
    with env.begin(write=True) as txn:
        txn.delete(bytes.fromhex(chain[1].chunk_id) + b"\0\2", db=env.open_db(b"kv", txn=txn))
    env.close()
    with pytest.raises((AssertionError, CorruptBlock)):  # the block is missing
        verify(path)
