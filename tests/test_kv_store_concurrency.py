"""Two reader processes read while one writer writes (and grows the map)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import traceback

import numpy as np
from sglang_reattn.kv_store import ChunkNotFound, ChunkStore
from sglang_reattn.kv_store.synthetic import kv_for, make_chain, summary_for, tiny_fingerprint

FP = tiny_fingerprint(num_layers=2, num_kv_heads=4, head_dim=64, chunk_size=64)


def reader(path: str, seed: int, stop, out) -> None:
    """Read random visible chunks until told to stop; report counts, or the error."""
    try:
        rng = random.Random(seed)
        verified = missing = 0
        with ChunkStore(path, FP, readonly=True) as s:
            map_before = s.stats()["map_size"]
            while not stop.is_set() or verified == 0:
                ids = [h.chunk_id for h in s.iter_headers(batch=64)]
                for cid in rng.sample(ids, min(len(ids), 20)):
                    layer = rng.randrange(FP["num_layers"])
                    try:
                        k, v = s.get_kv(cid, layer)
                        summ = s.get_summaries([cid])[0]
                    except ChunkNotFound:  # evicted by the writer since iter_headers
                        missing += 1
                        continue
                    wk, wv = kv_for(cid, FP)
                    assert np.array_equal(k, wk[layer]) and np.array_equal(v, wv[layer])
                    assert np.allclose(summ, summary_for(cid, FP), atol=0.05)
                    verified += 1
            out.put(("ok", verified, missing, map_before, s.stats()["map_size"]))
    except BaseException:  # noqa: BLE001 - any failure goes back to the test process
        out.put(("error", traceback.format_exc()))


def test_readers_during_writes(tmp_path):
    path = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    with ChunkStore(path, FP, 24 << 20, initial_map_size=1 << 20) as w:
        w.put_chunks(make_chain(FP, 2, seed=999))
        readers = [ctx.Process(target=reader, args=(path, i, stop, out)) for i in range(2)]
        for p in readers:
            p.start()
        for n in range(30):  # ~ 32 MiB raw in total: the map grows, and eviction runs
            w.put_chunks(make_chain(FP, 8, seed=n))
        final_map = w.stats()["map_size"]
        stop.set()
        results = [out.get(timeout=60) for _ in readers]
        for p in readers:
            p.join(timeout=30)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors[0]
    for _, verified, _missing, map_before, map_after in results:
        assert verified > 0
        assert map_before < final_map  # the map grew while the reader was open ...
        assert map_after > map_before  # ... and the reader followed it


def test_threads_share_one_store_while_the_map_grows(tmp_path):
    """Reader threads keep reading from the writer's own store while it grows its map."""
    import threading

    errors, verified = [], [0, 0]
    with ChunkStore(tmp_path, FP, 1 << 30, codec="raw", initial_map_size=1 << 20) as s:
        first = make_chain(FP, 4, seed=500)
        s.put_chunks(first)
        done = threading.Event()

        def read_loop(slot: int) -> None:
            try:
                while not done.is_set():
                    ids = [h.chunk_id for h in s.iter_headers(batch=32)]
                    for cid in ids[-8:] + [r.chunk_id for r in first]:
                        k, _ = s.get_kv(cid, 1)
                        assert np.array_equal(k, kv_for(cid, FP)[0][1])
                        verified[slot] += 1
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                errors.append(exc)

        threads = [threading.Thread(target=read_loop, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        map_before = s.stats()["map_size"]
        for n in range(20):
            s.put_chunks(make_chain(FP, 8, seed=n))
        done.set()
        for t in threads:
            t.join(timeout=60)
        assert s.stats()["map_size"] >= 16 * map_before  # it grew several times
    assert not errors, repr(errors[0])
    assert min(verified) > 0


def test_a_reopened_writer_maps_twice_its_file(tmp_path):
    """Reopened as the writer, a store maps twice its data file (address space only: the
    file keeps its size), so its first writes after a restart need no map growth (which
    waits for every transaction in flight); a reader maps the file as it is."""
    path = str(tmp_path / "s")
    with ChunkStore(path, FP, 1 << 30, codec="raw", initial_map_size=1 << 20) as s:
        for n in range(6):  # grown past the initial map
            s.put_chunks(make_chain(FP, 8, seed=700 + n))
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    assert size > 1 << 20
    with ChunkStore(path, FP, readonly=True) as r:
        assert r.stats()["map_size"] == size
    with ChunkStore(path, FP, 1 << 30, codec="raw", initial_map_size=1 << 20) as s:
        assert s.stats()["map_size"] == 2 * size
        assert os.path.getsize(os.path.join(path, "data.mdb")) == size
        s.put_chunks(make_chain(FP, 8, seed=800))  # new pages past the old end
        assert s.stats()["map_size"] == 2 * size
        assert size < os.path.getsize(os.path.join(path, "data.mdb")) < 2 * size


def writer(path: str, seed: int, n: int, out) -> None:
    """Write n chains of 4 chunks into a store other processes write too."""
    try:
        with ChunkStore(path, FP, 1 << 30, initial_map_size=1 << 20) as s:
            for i in range(n):
                s.put_chunks(make_chain(FP, 4, seed=seed * 1000 + i))
            out.put(("ok", s.stats()["map_size"]))
    except BaseException:  # noqa: BLE001 - any failure goes back to the test process
        out.put(("error", traceback.format_exc()))


def stuck_writer(path: str, ready) -> None:
    """Open a write transaction and hold it until killed."""
    with ChunkStore(path, FP, 1 << 30) as s:
        def hold(txn):
            txn.put(b"scratch", b"1", db=s.dbs.meta)
            ready.set()
            import time

            time.sleep(600)

        s._write(hold)


def test_writer_processes_share_a_store(tmp_path):
    """Several processes write one store at once (LMDB serializes their transactions,
    each follows the others' map growth); a writer killed inside its transaction does
    not block the others, and none of its transaction is visible."""
    import os
    import signal

    path = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with ChunkStore(path, FP, 1 << 30, initial_map_size=1 << 20) as mine:
        ready = ctx.Event()
        stuck = ctx.Process(target=stuck_writer, args=(path, ready))
        stuck.start()
        assert ready.wait(30)
        os.kill(stuck.pid, signal.SIGKILL)  # dies holding LMDB's writer mutex
        stuck.join()
        writers = [ctx.Process(target=writer, args=(path, i + 1, 12, out)) for i in range(2)]
        for p in writers:
            p.start()
        mine.put_chunks(make_chain(FP, 4, seed=7))  # this process writes meanwhile
        results = [out.get(timeout=120) for _ in writers]
        for p in writers:
            p.join(timeout=30)
        errors = [r[1] for r in results if r[0] != "ok"]
        assert not errors, errors[0]
        want = [r.chunk_id for i in (1, 2) for n in range(12)
                for r in make_chain(FP, 4, seed=i * 1000 + n)]
        want += [r.chunk_id for r in make_chain(FP, 4, seed=7)]
        assert all(mine.has_many(want)) and mine.stats()["chunks"] == len(want)
        for cid in want[::7]:
            k, v = mine.get_kv(cid, 1)
            wk, wv = kv_for(cid, FP)
            assert np.array_equal(k, wk[1]) and np.array_equal(v, wv[1])
        assert mine._read(lambda txn: txn.get(b"scratch", db=mine.dbs.meta)) is None


def grow_map(path: str) -> None:
    with ChunkStore(path, FP, 1 << 30, initial_map_size=1 << 20) as s:
        s.put_chunks(make_chain(FP, 8, seed=3))  # several MiB: the map grows past 1 MiB


def test_open_adopts_a_map_grown_since_the_environment_was_opened(tmp_path):
    """The open race seen in CI: another process grows the map between lmdb.open and the
    open_db transaction; opening adopts the new size instead of failing."""
    from sglang_reattn.kv_store._env import DB_NAMES, Env

    path = str(tmp_path / "store")
    env = Env(path, False, 1 << 20)
    try:
        p = mp.get_context("spawn").Process(target=grow_map, args=(path,))
        p.start()
        p.join(timeout=120)
        assert p.exitcode == 0
        small = env.env.info()["map_size"]
        dbs = env._open_dbs()  # the same step __init__ runs right after lmdb.open
        assert len(dbs) == len(DB_NAMES) and env.map_size() > small
    finally:
        env.close()
