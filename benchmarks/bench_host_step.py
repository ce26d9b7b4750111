"""Host time of one graph decode step: everything the model runner does on the CPU around
the CUDA-graph replay (batch and scope-plan buffers, the graph call, the greedy pick),
with the replay itself stubbed out. On a GPU this time leaves the device idle between
steps at batch 1, so it bounds decode tokens/s from above; it needs no GPU to measure.

    python benchmarks/bench_host_step.py --contexts 32K 512K 1M      # tiny model, CPU

The context's pages are allocated and filled as in bench_e2e.py (tiny shape, 64-token
chunks, the 8,192-token scope of bench_e2e.py); the graphs are "captured" with the CPU
stand-in and their replay replaced by a no-op. Median of --repeats runs of --steps steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e as E2E  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", nargs="+", default=["32K", "512K", "1M"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from sglang_reattn import Engine

    contexts = [E2E.parse_size(c) for c in args.contexts]
    eng = Engine(E2E.model_dir("tiny"), load_format="dummy", device="cpu", dtype="float32",
                 log_level="warning", max_running_requests=4,
                 max_total_tokens=max(contexts) + 16384, chunked_prefill_size=2048,
                 disable_radix_cache=True, **E2E.SCOPE)
    runner = eng.runner
    eng._call(lambda: runner._capture(1))
    for g in runner.graphs.values():
        g.replay = lambda: None
    c = eng.pool.page_size
    print(f"# {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; tiny model, chunk {c}, scope 8,192 tokens\n")
    print("| context | host ms per decode step |\n|---|---|")
    for n in contexts:
        req = E2E.fill_context(eng, n)

        def run(k: int) -> float:
            return E2E.decode_tokens(eng, req, k) / k

        run(5)
        ms = statistics.median(run(args.steps) for _ in range(args.repeats)) * 1e3
        print(f"| {n // 1024:,}K | {ms:.3f} |", flush=True)
        eng.pool.free(req.pages)
    eng.shutdown()


if __name__ == "__main__":
    main()
