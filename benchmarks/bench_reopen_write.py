"""The first write into a reopened store, beside a reader: how long the reader's reads
stall, with the writer's map opened at twice the file's size (the default) against the
earlier opening at the file's size (`--at-file-size`), whose first write that needs a new
page grows the map.

    python benchmarks/bench_reopen_write.py [--chunks 2048] [--repeats 5] [--dir /tmp]

A store of `--chunks` synthetic chunks of the default model's block shapes (48 KiB blocks;
4 layers, to keep it small) is written once and copied before each repeat. Each repeat
reopens the copy as the writer, touches every block once (as a running engine has), starts
a thread reading 95 random blocks of one layer per call (a streamed layer's fill) with the
engine's interpreter switch interval, then writes one chunk on the main thread. Reported:
the longest read that overlapped the write, and the median read before it; median over
repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_reattn.engine.engine import SWITCH_INTERVAL_S  # noqa: E402
from sglang_reattn.kv_store import ChunkStore  # noqa: E402
from sglang_reattn.kv_store.synthetic import make_chain, tiny_fingerprint  # noqa: E402

FP = tiny_fingerprint(num_layers=4, num_kv_heads=3, head_dim=64, chunk_size=64,
                      dtype="bfloat16")
PICK = 95  # blocks a streamed layer's fill reads (the default model's scope at 1M tokens)


def build(path: str, n: int) -> list[str]:
    ids, parent = [], None
    with ChunkStore(path, FP, 64 << 30, codec="raw") as st:
        for a in range(0, n, 256):
            recs = make_chain(FP, min(256, n - a), seed=a, parent_id=parent)
            st.put_chunks(recs)
            parent = recs[-1].chunk_id
            ids += [r.chunk_id for r in recs]
    return ids


def once(src: str, work: str, ids: list[str], at_file_size: bool, seed: int):
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    st = ChunkStore(work, FP, 64 << 30, codec="raw")
    size = os.path.getsize(os.path.join(work, "data.mdb"))
    if at_file_size:  # (the Env's resize: it waits for transactions in flight)
        st._env._set_mapsize(size)
    mapped = st._env.map_size()
    out = np.ones((PICK, 2, 64, 3, 64), np.uint16)
    for a in range(0, len(ids), PICK):
        part = ids[a:a + PICK]
        for layer in range(FP["num_layers"]):
            st.get_kv_many(part, layer, out=out[:len(part)], parts=1)
    rng = np.random.default_rng(seed)
    reads: list[tuple[float, float]] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            pick = [ids[i] for i in rng.choice(len(ids), PICK, replace=False)]
            t = time.perf_counter()
            st.get_kv_many(pick, 1, out=out, parts=1)
            reads.append((t, time.perf_counter() - t))

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    st.put_chunks(make_chain(FP, 1, seed=10_000 + seed))
    t1 = time.perf_counter()
    time.sleep(0.1)
    stop.set()
    th.join()
    grew = st._env.map_size() > mapped
    st.close()
    during = [d for t, d in reads if t <= t1 and t + d >= t0]
    before = [d for t, d in reads if t + d < t0]
    return max(during), statistics.median(before), grew, mapped / size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        src = os.path.join(root, "src")
        ids = build(src, args.chunks)
        print(f"# {platform.node()}, {os.cpu_count()} CPUs; store of {args.chunks} chunks, "
              f"{os.path.getsize(os.path.join(src, 'data.mdb')) / 2**20:.0f} MiB; "
              f"median of {args.repeats}")
        print("| writer's map at open | map / file | first write grew the map | "
              "longest read beside it | median read before |")
        print("|---|---|---|---|---|")
        for at_file_size in (True, False):
            got = [once(src, os.path.join(root, "work"), ids, at_file_size, s)
                   for s in range(args.repeats)]
            worst = statistics.median(g[0] for g in got) * 1e3
            base = statistics.median(g[1] for g in got) * 1e3
            grew = sum(g[2] for g in got)
            label = "the file's size (before)" if at_file_size else "twice the file's size"
            print(f"| {label} | {got[0][3]:.1f} | {grew} of {args.repeats} | {worst:.1f} ms "
                  f"(each: {', '.join(f'{g[0] * 1e3:.1f}' for g in got)}) | {base:.2f} ms |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
