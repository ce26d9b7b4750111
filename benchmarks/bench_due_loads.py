"""The streamed first decode step's loads, alone: due loads and a replay's misses.

    python benchmarks/bench_due_loads.py [--device cuda] [--chunks 2048] [--repeats 7]

A streamed prompt's first decode step needs the chunks its last token selected (and 16
runners-up) in every layer's chunk cache before its graph replays: about 14 blocks per
layer of the default model after a 1M-token prompt (426 in 30 layers,
`stream_due_loads`), most in neither the host tier nor the chunk cache. A replay that
then misses loads what it missed (about 60 blocks over 20 layers) before the next.

This times those two loads on a synthetic store of the default model's block shapes
(30 layers, 3 KV heads, head dim 64, chunks of 64 tokens, 2-byte values: 48 KiB per
block), page cache warm, through `StreamTier.prefetch` (its due loads) and
`StreamTier._cache_in_many` (a replay's misses), each alone and while background work
that runs beside them in the engine holds the interpreter: the prefetch thread reading
blocks into the host tier and the store's writer marking chunks used. Median of
`--repeats`, each with fresh random picks and cold host tier and chunk cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_reattn.engine.store_tier import StoreTier  # noqa: E402
from sglang_reattn.engine.stream_tier import StreamTier  # noqa: E402
from sglang_reattn.kv_store import synthetic  # noqa: E402
from sglang_reattn.layers.attention import KVPool  # noqa: E402

LAYERS, HKV, D, C = 30, 3, 64, 64


def attn_stub(pool, slots: int, device):
    """What the tier uses of ReAttention: summary rows past the pool's and the page map."""
    from types import SimpleNamespace

    layers, pages, _, hkv, d = pool.k.shape
    return SimpleNamespace(
        num_virtual=slots, kmin=torch.zeros(layers, pages + slots, hkv, d, device=device),
        kmax=torch.zeros(layers, pages + slots, hkv, d, device=device),
        page_map=torch.full((layers, slots), -1, dtype=torch.int32, device=device),
        invalidate_rotated=lambda idx: None)


def build(root: str, n: int, device: torch.device, cache_pages: int):
    fp = synthetic.tiny_fingerprint(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D,
                                    chunk_size=C)
    pool = KVPool(LAYERS, cache_pages + 1, C, HKV, D, torch.float16, device)
    store = StoreTier(f"{root}/store", fp, "64GiB", "raw", pool, lambda p: None)
    t = time.perf_counter()
    ids: list[str] = []
    for first in range(0, n, 256):  # (a chain, written in pieces)
        recs = synthetic.make_chain(fp, min(256, n - first), seed=first,
                                    parent_id=ids[-1] if ids else None)
        store.store.put_chunks(recs)
        ids += [r.chunk_id for r in recs]
    print(f"# store: {n} chunks x {LAYERS} layers written in {time.perf_counter() - t:.1f} s",
          flush=True)
    tier = StreamTier(store, pool, attn_stub(pool, n, device), list(range(1, cache_pages + 1)),
                      1 << 30, prefetch=True)
    tier.attach(ids)
    for layer in range(LAYERS):  # page cache warm
        store.store.get_kv_many(ids, layer)
    return store, tier, ids


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Background:
    """Work the engine runs beside a first step: `reads` blocks queued for the prefetch
    thread (host tier) and the writer marking `touches` chunks used."""

    def __init__(self, tier, store, ids, rng, reads: int, touches: int) -> None:
        self.tier, self.store = tier, store
        self.hints = {}
        for layer in range(LAYERS):
            self.hints[layer] = [ids[i] for i in rng.choice(len(ids), reads // LAYERS,
                                                            replace=False)]
        self.touch_ids = [ids[i % len(ids)] for i in range(touches)]

    def start(self) -> threading.Thread:
        for layer, keys in self.hints.items():
            self.tier._q.put((layer, keys))
        th = threading.Thread(target=self.store.store.touch, args=(self.touch_ids, 1024))
        th.start()
        return th


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunks", type=int, default=2048)
    ap.add_argument("--cache-pages", type=int, default=256)
    ap.add_argument("--due", type=int, default=14, help="due blocks per layer")
    ap.add_argument("--misses", type=int, default=60, help="missed blocks, over 20 layers")
    ap.add_argument("--reads", type=int, default=1000, help="background block reads")
    ap.add_argument("--touches", type=int, default=16384, help="background marks")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also print the calling thread's profile (cProfile) of the loads "
                         "without background work")
    args = ap.parse_args()
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    device = torch.device(args.device)
    root = tempfile.mkdtemp(prefix="bench_due_", dir=args.dir)
    store, tier, ids = build(root, args.chunks, device, args.cache_pages)
    rng = np.random.default_rng(0)
    res: dict[str, list[float]] = {}

    def reset() -> None:
        tier.drain()
        sync(device)
        tier.cache.clear()
        tier.vmap[:] = -1
        tier.host.clear()

    def timed(label: str, busy: bool, load) -> None:
        """load() timed (to the device's end), with the background work running when
        `busy`, profiled when asked and not busy."""
        th = Background(tier, store, ids, rng, args.reads, args.touches).start() \
            if busy else None
        t = time.perf_counter()
        if prof and not busy:
            prof.enable()
        load()
        sync(device)
        if prof:
            prof.disable()
        res.setdefault(label + (", busy" if busy else ""), []).append(time.perf_counter() - t)
        if th:
            th.join()

    for rep in range(args.repeats):
        for busy in (False, True):
            # due loads: `due` chunks per layer, none cached
            reset()
            due = {layer: [ids[i] for i in rng.choice(len(ids), args.due, replace=False)]
                   for layer in range(LAYERS)}
            timed(f"due loads, {LAYERS * args.due} blocks", busy,
                  lambda: tier.prefetch([{}], [{}], [due]))
            # a replay's misses: `misses` blocks over 20 layers
            reset()
            layers = sorted(rng.choice(LAYERS, 20, replace=False).tolist())
            miss = {layer: [] for layer in layers}
            for j in range(args.misses):
                miss[layers[j % 20]].append(ids[int(rng.integers(len(ids)))])
            timed(f"a replay's misses, {args.misses} blocks in 20 layers", busy,
                  lambda: tier._cache_in_many({layer: list(dict.fromkeys(keys))
                                               for layer, keys in miss.items()}))
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"# bench_due_loads on {device.type} ({name}), {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; {args.chunks} chunks, blocks of 48 KiB; background: "
          f"{args.reads} prefetch reads and {args.touches} marks; median of {args.repeats}")
    print("| load | median ms | min ms | max ms |\n|---|---|---|---|")
    for key, xs in res.items():
        print(f"| {key} | {statistics.median(xs) * 1e3:.1f} | {min(xs) * 1e3:.1f} | "
              f"{max(xs) * 1e3:.1f} |")
    if prof:
        import pstats
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    tier.close()
    store.close()


if __name__ == "__main__":
    main()
