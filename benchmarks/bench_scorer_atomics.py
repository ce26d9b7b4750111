"""The selection's scorer, A/B on the H200 (one run): elementwise kernel by candidates per
program and warps, its head-max atomics against read-before-atomic, and the
matrix-product kernel (max(q, 0) . kmax + min(q, 0) . kmin on the tensor cores).

Times the whole selection (``select_scope``, CUDA-graph replay) of one Llama-3.1-8B layer
at each context, for a decode step (1 query row) and a prefill piece (16 voting rows), for
every setting, and checks that all settings give the first one's scope table.

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
from bench_attention import (  # noqa: E402
    OursDecode,
    Shape,
    bench_graph,
    fmt_tokens,
    knobs,
    parse_size,
)

SC = importlib.import_module("sglang_reattn.kernels.score_chunks").__dict__
KNOBS = ("SCORE_BLOCK_N", "SCORE_WARPS", "SCORE_CHECK_SCALE", "SCORE_DOT_MIN_ROWS",
         "SCORE_DOT_BLOCK_N", "SCORE_DOT_WARPS", "SCORE_DOT_WAVES")
NO_DOT = dict(SCORE_DOT_MIN_ROWS=1 << 20)
VARIANTS = (
    ("16/2 atomic", dict(SCORE_BLOCK_N=16, SCORE_WARPS=2, SCORE_CHECK_SCALE=False, **NO_DOT)),
    ("32/4 read", dict(SCORE_BLOCK_N=32, SCORE_WARPS=4, SCORE_CHECK_SCALE=True, **NO_DOT)),
    ("dot 32/4", dict(SCORE_DOT_MIN_ROWS=1, SCORE_DOT_BLOCK_N=32, SCORE_DOT_WARPS=4)),
    ("dot 64/4", dict(SCORE_DOT_MIN_ROWS=1, SCORE_DOT_BLOCK_N=64, SCORE_DOT_WARPS=4)),
    ("dot 128/8", dict(SCORE_DOT_MIN_ROWS=1, SCORE_DOT_BLOCK_N=128, SCORE_DOT_WARPS=8)),
)


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
          f"Llama-3.1-8B layer (top {s.topk}), CUDA-graph replay, us; defaults: "
          + ", ".join(f"{k}={SC[k]}" for k in KNOBS) + "\n")
    cos, sin = K.rope_tables(s.scope, s.head_dim, base=500000.0, device=dev)
    rows = []
    for ctx in (parse_size(c) for c in args.contexts.split(",")):
        ours = OursDecode(ctx, s, cos, sin, dev)
        for reps in (1, 16):
            q = torch.randn(reps, s.num_q_heads, s.head_dim, device=dev, dtype=s.dtype)

            def select(q=q, reps=reps, o=ours):
                return K.select_scope_triton(
                    q, o.cand, o.ncand, o.head_table, o.head_pages, o.local_table,
                    o.local_tokens, s.topk, s.chunk, o.kmin, o.kmax, None, "max", reps)[:2]
            first = None  # every setting must give the first one's table (same scores)
            row = {"ctx": ctx, "reps": reps}
            for label, values in VARIANTS:
                print(f"# {fmt_tokens(ctx)}, {reps} rows: {label}", flush=True)
                with knobs("score_chunks", **values):
                    table = select()[0].clone()
                    torch.cuda.synchronize()  # a fault names its variant
                    first = table if first is None else first
                    row[label] = (bench_graph(select, args.rep), torch.equal(table, first))
            rows.append(row)
            print(f"# {fmt_tokens(ctx)}, {reps} rows, at {time.time() - t0:.0f} s: " + ", ".join(
                f"{k} {v[0] * 1e3:.1f} us" + ("" if v[1] else " (table differs)")
                for k, v in row.items() if isinstance(v, tuple) and isinstance(v[0], float)),
                flush=True)
        del ours
        torch.cuda.empty_cache()
    head = [label for label, _ in VARIANTS]
    print("| context | query rows | " + " | ".join(head) + " |")
    print("| " + " | ".join(["---"] * (len(head) + 2)) + " |")
    for r in rows:
        cells = []
        for label in head:
            t, same = r[label]
            val = f"{t * 1e3:.1f}" if isinstance(t, float) else str(t)
            cells.append(val + ("" if same else " (table differs)"))
        print(f"| {fmt_tokens(r['ctx'])} | {r['reps']} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
