"""Capacity bound with LRU eviction of unpinned chunks, StoreFull, and map growth."""

from __future__ import annotations

import numpy as np
import pytest
from sglang_reattn.kv_store import ChunkStore, StoreFull
from sglang_reattn.kv_store.synthetic import make_chain, tiny_fingerprint


def chunk_bytes(tmp_path, fp) -> int:
    with ChunkStore(tmp_path / "probe", fp, 1 << 30) as s:
        recs = make_chain(fp, 4, seed=123)
        s.put_chunks(recs)
        return max(s.get_header(r.chunk_id).stored_bytes for r in recs)


def check_tree(s: ChunkStore) -> set[str]:
    """Every stored chunk's parent is stored too (no orphans); returns the ids."""
    heads = {h.chunk_id: h for h in s.iter_headers()}
    assert all(h.parent_id is None or h.parent_id in heads for h in heads.values())
    assert s.stats()["chunks"] == len(heads)
    assert s.stats()["bytes"] == sum(h.stored_bytes for h in heads.values())
    return set(heads)


def test_bound_holds_and_lru_order(tmp_path):
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    cap = 25 * per
    chains = [make_chain(fp, 10, seed=i) for i in range(8)]
    with ChunkStore(tmp_path / "s", fp, cap) as s:
        for chain in chains:
            s.put_chunks(chain)
            assert s.stats()["bytes"] <= cap
            check_tree(s)
        ids = check_tree(s)
        assert {r.chunk_id for r in chains[-1]} <= ids  # the newest chain is whole
        assert not ids & {r.chunk_id for r in chains[0]}  # the oldest is gone
        assert 20 <= len(ids) <= 25


def test_deepest_chunks_go_first(tmp_path):
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    a, b = make_chain(fp, 10, seed=1), make_chain(fp, 8, seed=2)
    with ChunkStore(tmp_path / "s", fp, 15 * per) as s:
        s.put_chunks(a)
        s.put_chunks(b)
        kept = s.has_many([r.chunk_id for r in a])
        assert kept == [True] * 7 + [False] * 3  # a's tail was cut, its prefix kept


def test_touch_protects(tmp_path):
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    a, b, c = (make_chain(fp, 5, seed=i) for i in range(3))
    with ChunkStore(tmp_path / "s", fp, 10 * per + per // 2) as s:
        s.put_chunks(a)
        s.put_chunks(b)
        s.touch([r.chunk_id for r in a])
        s.put_chunks(c)
        assert all(s.has_many([r.chunk_id for r in a]))
        assert not any(s.has_many([r.chunk_id for r in b]))


def test_a_pinned_chunk_touched_rejoins_the_lru_at_its_last_use(tmp_path):
    """A touch of a pinned chunk only records the time; unpinned, the chunk is as young as
    that touch, so an older unpinned chain goes first."""
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    a, b, c = (make_chain(fp, 5, seed=i) for i in range(3))
    with ChunkStore(tmp_path / "s", fp, 10 * per + per // 2) as s:
        s.put_chunks(a)
        s.put_context("a", a[-1].chunk_id, 5 * 64, pinned=True)
        s.put_chunks(b)
        s.touch([r.chunk_id for r in a])
        s.pin_context("a", False)
        assert check_tree(s) == {r.chunk_id for r in a + b}
        s.put_chunks(c)
        assert all(s.has_many([r.chunk_id for r in a]))
        assert not any(s.has_many([r.chunk_id for r in b]))
        assert s.touch(["00" * 32]) == 0


def test_pinned_survive_and_store_full(tmp_path):
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    a = make_chain(fp, 6, seed=1)
    with ChunkStore(tmp_path / "s", fp, 12 * per) as s:
        s.put_chunks(a)
        s.put_context("doc", a[-1].chunk_id, 6 * 64, pinned=True)
        for seed in range(2, 8):
            s.put_chunks(make_chain(fp, 4, seed=seed))
            assert s.stats()["bytes"] <= 12 * per
        assert all(s.has_many([r.chunk_id for r in a]))
        assert s.evict_to(0) > 0
        assert check_tree(s) == {r.chunk_id for r in a}  # only pinned chunks are left
        s.put_chunks(make_chain(fp, 6, seed=20))  # fills the store up again
        s.pin_context("doc")
        more = make_chain(fp, 7, seed=21)
        s.put_context("doc2", s.put_chunks(make_chain(fp, 1, seed=22))[-1], 64, pinned=True)
        before = s.stats()
        with pytest.raises(StoreFull) as e:
            s.put_chunks(more)
        msg = str(e.value)
        assert "full" in msg and "pinned" in msg and str(12 * per) in msg
        after = s.stats()
        assert after["bytes"] == before["bytes"] and after["chunks"] == before["chunks"]
        s.pin_context("doc", False)
        s.put_chunks(more)  # room again once the context is unpinned
        assert all(s.has_many([r.chunk_id for r in more]))


def test_batch_bigger_than_capacity(tmp_path):
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    with ChunkStore(tmp_path / "s", fp, 3 * per) as s, pytest.raises(StoreFull):
        s.put_chunks(make_chain(fp, 5))


def test_map_grows(tmp_path):
    fp = tiny_fingerprint(num_layers=2, num_kv_heads=4, head_dim=64, chunk_size=64)
    recs = make_chain(fp, 120)  # ~ 16 MiB of fp16 KV
    with ChunkStore(tmp_path, fp, 1 << 30, codec="raw", initial_map_size=1 << 20) as s:
        for i in range(0, len(recs), 10):
            s.put_chunks(recs[i : i + 10])
        st = s.stats()
        assert st["map_size"] > 8 << 20 and st["map_size"] <= st["max_map_size"]
    with ChunkStore(tmp_path, fp, readonly=True) as s:
        for r in recs[::7]:
            assert np.array_equal(s.get_kv(r.chunk_id, 1)[1], r.v[1])


def test_map_ceiling_is_store_full(tmp_path):
    fp = tiny_fingerprint(num_layers=2, num_kv_heads=4, head_dim=64, chunk_size=64)
    # capacity so large the bound never triggers, but the ceiling (2 x capacity + 64 MiB)
    # is below what a raw 75 MiB batch needs
    recs = make_chain(fp, 600)
    with ChunkStore(tmp_path, fp, 1 << 20, codec="raw", initial_map_size=1 << 20) as s:
        s.capacity = 1 << 40  # bypass the bound to reach the map ceiling
        with pytest.raises(StoreFull, match="ceiling"):
            s.put_chunks(recs)
        assert s.stats()["chunks"] == 0


def test_held_chunks_survive_eviction_until_released(tmp_path):
    """hold() keeps a chunk and its chain from this store's evictions (counted), writes
    nothing: once released, or in a store opened again (a restarted process), they go."""
    fp = tiny_fingerprint()
    per = chunk_bytes(tmp_path, fp)
    a = make_chain(fp, 6, seed=1)
    ids = [r.chunk_id for r in a]
    with ChunkStore(tmp_path / "s", fp, 10 * per) as s:
        s.put_chunks(a)
        s.hold([ids[3]])
        s.hold([ids[3], ids[5]])
        for seed in range(2, 8):  # other chains' writes evict least recently used chunks
            s.put_chunks(make_chain(fp, 3, seed=seed))
            assert s.stats()["bytes"] <= 10 * per
        assert all(s.has_many(ids))  # a's deepest held chunk protects the whole chain
        s.release([ids[5], ids[3]])
        assert s.held() == {ids[3]}
        s.evict_to(0)
        assert check_tree(s) == set(ids[:4])  # ids[3] still held once: it and its chain
        with pytest.raises(ValueError, match="not held"):
            s.release([ids[3], ids[4]])
        assert s.held() == {ids[3]}  # a failed release changes nothing
        s.hold([ids[0]])
        s.evict_to(0)
        assert check_tree(s) == set(ids[:4])
    with ChunkStore(tmp_path / "s", fp, 10 * per) as s:  # holds died with the object
        assert s.held() == set()
        s.evict_to(0)
        assert check_tree(s) == set()


def test_hold_waits_for_an_evicting_write_in_flight_not_for_other_writes(tmp_path,
                                                                         monkeypatch):
    """hold() returns while a write that removes nothing (a batch of last-used marks) is
    in flight, and waits for an evicting one of this object (which may have read the held
    set before the hold) to commit."""
    import threading

    from sglang_reattn.kv_store import _index as ix

    fp = tiny_fingerprint()
    a = make_chain(fp, 4, seed=1)
    ids = [r.chunk_id for r in a]

    def hold_during(s, name: str, write, chunk: str, wait: float) -> bool:
        """Whether s.hold([chunk]) is still waiting `wait` s after it started while
        `write` is inside the transaction's call of ix.`name` (held there until then)."""
        inside, go = threading.Event(), threading.Event()
        real = getattr(ix, name)

        def blocked(*args, **kw):
            inside.set()
            assert go.wait(20)
            return real(*args, **kw)

        monkeypatch.setattr(ix, name, blocked)
        writer = threading.Thread(target=write)
        hold = threading.Thread(target=s.hold, args=([chunk],))
        writer.start()
        try:
            assert inside.wait(20)
            hold.start()
            hold.join(wait)
            return hold.is_alive()
        finally:  # (nothing left in a transaction when the store closes)
            go.set()
            writer.join(20)
            hold.join(20)
            assert not writer.is_alive() and not hold.is_alive()
            monkeypatch.setattr(ix, name, real)

    with ChunkStore(tmp_path / "s", fp, 1 << 30) as s:
        s.put_chunks(a)
        # the marks' write is still open when the hold returns
        assert not hold_during(s, "set_touch", lambda: s.touch([ids[0]]), ids[1], 10)
        # an eviction in flight is waited for
        assert hold_during(s, "evict", lambda: s.evict_to(0), ids[2], 0.5)
        assert s.held() == {ids[1], ids[2]}
        # a put that evicts nothing is not waited for; one that evicts is
        more = make_chain(fp, 3, seed=2)
        assert not hold_during(s, "add_counter", lambda: s.put_chunks(more[:1]), ids[3], 10)
        s.release(list(s.held()))
    per = chunk_bytes(tmp_path, fp)
    with ChunkStore(tmp_path / "t", fp, 4 * per) as s:
        s.put_chunks(a)
        assert hold_during(s, "add_counter", lambda: s.put_chunks(more), ids[0], 0.5)
        assert s.held() == {ids[0]} and s.has(ids[0])  # (kept: held before the eviction)
        assert not s.has(ids[3])
        assert s.has(more[2].chunk_id) and s.stats()["bytes"] <= 4 * per
        # the lock taken elsewhere (an evict_to about to write): the put that must evict
        # waits for it, and then writes
        other = make_chain(fp, 2, seed=3)
        done = threading.Event()
        s._evict_lock.acquire()
        try:
            t = threading.Thread(target=lambda: (s.put_chunks(other), done.set()))
            t.start()
            assert not done.wait(0.3)
        finally:
            s._evict_lock.release()
        t.join(20)
        assert done.is_set() and s.has(other[1].chunk_id) and s.has(ids[0])
        assert s.stats()["bytes"] <= 4 * per
