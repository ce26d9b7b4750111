"""Reads from a chunk store whose pages are not in the page cache, with LMDB's OS
readahead off (the store's setting) and on.

    python benchmarks/bench_cold_reads.py [--chunks 512] [--dir /tmp]

A synthetic store of `--chunks` chunks with the default model's shapes (30 layers, 3 KV
heads, head dim 64, 64-token chunks, bf16; raw codec) is written once. Before each
measurement its files are dropped from the page cache (posix_fadvise DONTNEED, which needs
no privileges), then: the K/V of 33 consecutive chunks in every layer (a streamed request's
sink and local window), of 62 random chunks in every layer (one question's selections),
and every chunk's summary (the bulk load of a streamed context); then the 33 chunks again
through `StoreTier.read_layers`, which reads layers ahead on reader threads, and 62 random
chunks per layer through `StoreTier.get_kv`, which splits one layer's read over them (and
the same warm: split, not split, and as the tier chooses: split only while reads take
major page faults). Median of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from sglang_reattn.engine.store_tier import READERS, StoreTier
from sglang_reattn.kv_store import ChunkStore, _env, synthetic
from sglang_reattn.layers.attention import KVPool


def drop_page_cache(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    fp = synthetic.tiny_fingerprint(num_layers=30, num_kv_heads=3, head_dim=64, chunk_size=64,
                                    dtype="bfloat16")
    root = tempfile.mkdtemp(prefix="bench_cold_", dir=args.dir)
    path = f"{root}/store"
    n = args.chunks
    try:
        s = ChunkStore(path, fp, codec="raw", capacity_bytes=64 << 30)
        recs = synthetic.make_chain(fp, n, seed=5)
        for i in range(0, n, 64):
            s.put_chunks(recs[i:i + 64])
        s.close()
        real_open = _env.lmdb.open
        rows = {}
        try:
            for readahead in (False, True):
                _env.lmdb.open = lambda *a, _r=readahead, **k: real_open(
                    *a, **dict(k, readahead=_r))
                times: dict[str, list[float]] = {}
                for rep in range(args.repeats):
                    s = ChunkStore(path, fp, readonly=True)
                    ids = [h.chunk_id for h in s.iter_headers()]
                    rng = np.random.default_rng(rep)
                    runs = {
                        "33 consecutive chunks x 30 layers": lambda: [
                            s.get_kv_many(ids[n // 5:n // 5 + 33], layer) for layer in range(30)],
                        "62 random chunks x 30 layers": lambda: [
                            s.get_kv_many([ids[i] for i in rng.choice(n, 62, replace=False)],
                                          layer) for layer in range(30)],
                        f"summaries of all {n} chunks": lambda: s.get_summaries(ids),
                    }
                    for name, run in runs.items():
                        drop_page_cache(path)
                        t = time.perf_counter()
                        run()
                        times.setdefault(name, []).append(time.perf_counter() - t)
                    s.close()
                    # the same 33 chunks as a load reads them: layers ahead on threads
                    pool = KVPool(30, 2, 64, 3, 64, torch.bfloat16, torch.device("cpu"))
                    drop_page_cache(path)
                    tier = StoreTier(path, fp, "0", "raw", pool, lambda p: None, readonly=True)
                    t = time.perf_counter()
                    for _ in tier.read_layers(ids[n // 5:n // 5 + 33]):
                        pass
                    name = f"33 consecutive chunks x 30 layers, {READERS} reader threads"
                    times.setdefault(name, []).append(time.perf_counter() - t)
                    tier.close()
                    # a question's selections as a streamed prefill fetches them: one layer
                    # at a time, each layer's read split over the reader threads
                    drop_page_cache(path)
                    tier = StoreTier(path, fp, "0", "raw", pool, lambda p: None, readonly=True)
                    t = time.perf_counter()
                    for layer in range(30):
                        tier.get_kv([ids[i] for i in rng.choice(n, 62, replace=False)], layer,
                                    split=True)
                    name = "62 random chunks x 30 layers, each layer split over reader threads"
                    times.setdefault(name, []).append(time.perf_counter() - t)
                    # warm (the page cache now holds them): split, and one read per layer
                    picks = [[ids[i] for i in rng.choice(n, 62, replace=False)]
                             for _ in range(30)]
                    for layer in range(30):
                        tier.get_kv(picks[layer], layer)
                    for name, split in (("split", True), ("one read per layer", False),
                                        ("the tier's choice", None)):
                        t = time.perf_counter()
                        for layer in range(30):
                            tier.get_kv(picks[layer], layer, split=split)
                        times.setdefault(f"62 random chunks x 30 layers, warm, {name}",
                                         []).append(time.perf_counter() - t)
                    tier.close()
                rows[readahead] = {k: statistics.median(v) for k, v in times.items()}
        finally:
            _env.lmdb.open = real_open
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# {platform.machine()} CPU, local disk; {n} chunks of the default model's shapes, "
          f"raw codec; page cache dropped before each read; median of {args.repeats}\n")
    print("| cold read | readahead off (the store's setting) | readahead on |\n|---|---|---|")
    for name in rows[False]:
        print(f"| {name} | {rows[False][name] * 1e3:.0f} ms | {rows[True][name] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
