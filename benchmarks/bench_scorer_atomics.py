"""The selection's scorer: atomic max of every program against read-before-atomic, by
candidates per program and warps (H200 A/B, one run).

The scorer folds each head's max |score| into Hq floats with atomic max, one per program,
head and query row; with small blocks thousands of programs hit the same addresses. This
times the whole selection (``select_scope``, CUDA-graph replay) of one Llama-3.1-8B layer
at each context for every combination, and checks that all give the same scope table.

    python benchmarks/bench_scorer_atomics.py --contexts 1M,4M
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_reattn.kernels as K  # noqa: E402
from bench_attention import OursDecode, Shape, bench_graph, fmt_tokens, parse_size  # noqa: E402

SC = importlib.import_module("sglang_reattn.kernels.score_chunks").__dict__
CONFIGS = ((16, 2), (32, 4), (64, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1M,4M")
    ap.add_argument("--rep", type=int, default=40)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    s = Shape()
    print(f"# bench_scorer_atomics on {torch.cuda.get_device_name(dev)}; selection of one "
          f"Llama-3.1-8B layer (top {s.topk}), CUDA-graph replay, us\n")
    cos, sin = K.rope_tables(s.scope, s.head_dim, base=500000.0, device=dev)
    saved = SC["SCORE_BLOCK_N"], SC["SCORE_WARPS"], SC["SCORE_CHECK_SCALE"]
    rows = []
    for ctx in (parse_size(c) for c in args.contexts.split(",")):
        ours = OursDecode(ctx, s, cos, sin, dev)
        first = None  # every setting must give the first one's table (same scores)
        row = {"ctx": ctx}
        for bn, warps in CONFIGS:
            for check in (False, True):
                SC["SCORE_BLOCK_N"], SC["SCORE_WARPS"], SC["SCORE_CHECK_SCALE"] = bn, warps, check
                table = ours.select()[0].clone()
                first = table if first is None else first
                same = torch.equal(table, first)
                t = bench_graph(ours.select, args.rep)
                row[(bn, warps, check)] = (t, same)
        rows.append(row)
        print(f"# {fmt_tokens(ctx)} done at {time.time() - t0:.0f} s: " + ", ".join(
            f"{k[0]}/{k[1]}/{'read' if k[2] else 'atomic'} {v[0] * 1e3:.1f} us"
            + ("" if v[1] else " (table differs)")
            for k, v in row.items() if k != "ctx" and isinstance(v[0], float)), flush=True)
        del ours
        torch.cuda.empty_cache()
    SC["SCORE_BLOCK_N"], SC["SCORE_WARPS"], SC["SCORE_CHECK_SCALE"] = saved
    head = [f"{bn} / {w}, {'read first' if c else 'atomic'}" for bn, w in CONFIGS
            for c in (False, True)]
    print("| context | " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * (len(head) + 1)) + " |")
    for r in rows:
        cells = []
        for bn, w in CONFIGS:
            for c in (False, True):
                t, same = r[(bn, w, c)]
                val = f"{t * 1e3:.1f}" if isinstance(t, float) else str(t)
                cells.append(val + ("" if same else " (table differs)"))
        print(f"| {fmt_tokens(r['ctx'])} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
