"""The store's block checks on the read path: CRC-32 (format 2) against the `mix` check
(format 3), in memory and through ChunkStore reads, on one thread and on several.

    python benchmarks/bench_block_checks.py [--chunks 1024] [--picks 95] [--repeats 5]

Blocks have the default model's shape (3 KV heads, head dim 64, chunks of 64 tokens,
2-byte values: 48 KiB of K and V per layer); the store has its 30 layers. The figures:

- in memory, us per block: zlib.crc32 of one block at a time; the `mix` check of one block
  at a time (`codecs.mix_check`); and of runs of `--picks` blocks in one numpy pass
  (`codecs.mix_checks`, as `get_kv_many` checks them). On 1 thread and on 8, each thread
  taking its share; the interpreter's switch interval is the engine's (0.1 ms).
- store reads (page cache warm), ms, median of `--repeats`: a streamed question's 30
  layers of `--picks` random chunks each, one layer after the other (`get_kv_many`, as the
  TTFT's forward reads them), with a layer's checks on 1 thread (KV_PARTS, the default)
  and split over 4; and every chunk's summaries from their packs of 256 (`get_summaries`, as a
  streamed request's admission reads them).
Both stores hold the same chunks, one written with CRC-32 checks, one with `mix` checks.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_reattn.kv_store import ChunkStore, codecs, synthetic  # noqa: E402

LAYERS, HKV, D, C = 30, 3, 64, 64
BLOCK = 2 * C * HKV * D * 2
PACK = 256
SPLIT = 4  # the parts of a layer's read in the split row (KV_PARTS was 4 before format 3)


def per_block(fn, items: list, threads: int, blocks: int) -> float:
    """us per block of fn over `items` (holding `blocks` blocks), split over `threads`."""
    parts = [items[i::threads] for i in range(threads)]
    t = time.perf_counter()
    if threads == 1:
        fn(items)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(fn, parts))
    return (time.perf_counter() - t) / blocks * 1e6


def in_memory(n: int, picks: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng()
    rows = rng.integers(0, 256, (n, BLOCK), dtype=np.uint8)
    heads = rng.integers(0, 1 << 62, n, dtype=np.uint64)
    mv = [memoryview(rows[i]) for i in range(n)]
    body = [memoryview(b"\0" * 8 + rows[i].tobytes()) for i in range(n)]
    runs = [(rows[a:a + picks], heads[a:a + picks]) for a in range(0, n, picks)]

    def crc(bs):
        for b in bs:
            zlib.crc32(b)

    def mix_one(bs):
        for b in bs:
            codecs.mix_check(b)

    def mix_runs(parts):
        for r, h in parts:
            codecs.mix_checks(r, h)

    out = []
    for name, fn, items in (
            ("crc32, a block at a time", crc, mv),
            ("mix, a block at a time", mix_one, body),
            (f"mix, runs of {picks} blocks", mix_runs, runs)):
        got = []
        for threads in (1, 8):
            fn(items[:2])  # (warm: the weight table)
            got.append(per_block(fn, items, threads, n))
        out.append((name, *got))
    return out


def build(root: str, n: int, check: int) -> tuple[ChunkStore, list[str]]:
    fp = synthetic.tiny_fingerprint(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D,
                                    chunk_size=C)
    codecs.WRITE_CHECK = check
    try:
        store = ChunkStore(root, fp, capacity_bytes=64 << 30, codec="raw")
        ids: list[str] = []
        for first in range(0, n, PACK):
            recs = synthetic.make_chain(fp, min(PACK, n - first), seed=first,
                                        parent_id=ids[-1] if ids else None)
            store.put_chunks(recs)
            ids += [r.chunk_id for r in recs]
            store.pack_summaries(ids[first:])
    finally:
        codecs.WRITE_CHECK = codecs.CHECK_MIX
    for layer in range(LAYERS):  # page cache warm, every block read once
        store.get_kv_many(ids, layer)
    store.get_summaries(ids, dequantize=False)
    return store, ids


def timed_reads(store: ChunkStore, ids: list[str], picks: int, repeats: int, parts: int
                ) -> list[float]:
    rng = np.random.default_rng(0)
    out = np.empty((picks, 2, C, HKV, D), np.uint16)
    got = []
    for _ in range(repeats):
        sel = [[ids[j] for j in sorted(rng.choice(len(ids), picks, replace=False))]
               for _ in range(LAYERS)]
        t = time.perf_counter()
        for layer in range(LAYERS):
            store.get_kv_many(sel[layer], layer, out, parts)
        got.append((time.perf_counter() - t) * 1e3)
    return got


def timed_summaries(store: ChunkStore, ids: list[str], repeats: int) -> list[float]:
    got = []
    for _ in range(repeats):
        t = time.perf_counter()
        store.get_summaries(ids, dequantize=False)
        got.append((time.perf_counter() - t) * 1e3)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1024)
    ap.add_argument("--picks", type=int, default=95)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"))
    args = ap.parse_args()
    sys.setswitchinterval(1e-4)  # as the engine sets it with a disk tier
    print(f"# bench_block_checks: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; blocks of {BLOCK >> 10} KiB; {args.chunks} chunks x "
          f"{LAYERS} layers; {args.picks} picks a layer; median of {args.repeats}",
          flush=True)
    rows = [("| in memory, us per block | 1 thread | 8 threads |", "|---|---|---|")]
    for name, one, eight in in_memory(2048, args.picks):
        rows.append((f"| {name} | {one:.1f} | {eight:.1f} |",))
    table = ["| store read, ms | crc32 | mix | mix / crc32 |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        stores = {}
        for name, check in (("crc32", codecs.CHECK_CRC32), ("mix", codecs.CHECK_MIX)):
            t = time.perf_counter()
            stores[name] = build(f"{root}/{name}", args.chunks, check)
            print(f"# {name} store written and read once in {time.perf_counter() - t:.1f} s",
                  flush=True)
        for label, fn in (
                (f"{LAYERS} layers x {args.picks} blocks, checks on 1 thread",
                 lambda s, ids: timed_reads(s, ids, args.picks, args.repeats, 1)),
                (f"{LAYERS} layers x {args.picks} blocks, checks on {SPLIT} threads",
                 lambda s, ids: timed_reads(s, ids, args.picks, args.repeats, SPLIT)),
                (f"summaries of {args.chunks} chunks (packs of {PACK})",
                 lambda s, ids: timed_summaries(s, ids, args.repeats))):
            med = {name: statistics.median(fn(*stores[name])) for name in stores}
            table.append(f"| {label} | {med['crc32']:.1f} | {med['mix']:.1f} | "
                         f"{med['mix'] / med['crc32']:.2f} |")
        for s, _ in stores.values():
            s.close()
    print("\n".join(r for row in rows for r in row))
    print()
    print("\n".join(table))


if __name__ == "__main__":
    main()
