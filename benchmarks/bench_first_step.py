"""The first decode steps of a streamed request after its prefill: chunk-cache misses and
store reads per step, with and without reading the prefill's selection and runners-up into
the chunk cache before the first decode step (Scheduler._prefetch's `read`).

    python benchmarks/bench_first_step.py [--device cpu] [--tokens 16K] [--decode 6]

A document is prefilled into a fresh store (default model); then, per variant and repeat,
a new streamed engine (128-page chunk cache, pool capped to it plus the scope) answers the
same question over it. Without the read, the blocks the read-ahead thread had not brought
into the host tier yet miss in the first decode step. On CPU every streamed step runs
eagerly, so the step times here are not the H200's graph steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_stream as B  # noqa: E402

from sglang_reattn import Engine  # noqa: E402
from sglang_reattn.engine import stream_tier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", default="16K")
    ap.add_argument("--decode", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-pages", type=int, default=128)
    args = ap.parse_args()
    n, c = B.parse_size(args.tokens), 64
    root = tempfile.mkdtemp(prefix="bench_first_step_")
    common = dict(device=args.device, log_level="warning", kv_store_path=f"{root}/store",
                  chunked_prefill_size=2048, max_total_tokens=n + 8192,
                  context_length=n + 4096, reattn_chunk_size=c)
    prefetch = stream_tier.StreamTier.prefetch

    def without_read(self, hints, next_hints=(), read=False):
        return prefetch(self, hints, next_hints, False)

    rows = []
    try:
        with Engine(None, **common) as eng:
            vocab = eng.model_config.vocab_size
            doc, q = B.ids_of(n, 1, vocab), B.ids_of(24, 20, vocab)
            B.ttft(eng, doc + B.ids_of(24, 10, vocab))
            eng.store_tier.flush()
            scope = eng.reattn.scope_tokens
        stream = dict(common, kv_chunk_cache_pages=args.cache_pages,
                      kv_resident_max_tokens=scope,
                      max_total_tokens=args.cache_pages * c + scope + 2048 + 4 * c)
        for _ in range(args.repeats):
            for read in (False, True):
                stream_tier.StreamTier.prefetch = prefetch if read else without_read
                try:
                    with Engine(None, **stream) as eng:
                        rate = B.decode_rate(eng, doc + q, args.decode)
                        warmed = eng.stats()["stream_warmed_blocks"]
                finally:
                    stream_tier.StreamTier.prefetch = prefetch
                rows.append((read, [s.get("chunk_cache_misses", 0) for s in B.STEPS],
                             [s.get("stream_store_reads", 0) for s in B.STEPS],
                             [round(g * 1e3) for g in B.GAPS], warmed, rate))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ndefault model, {args.device}; document {n:,} tokens; chunk cache "
          f"{args.cache_pages} pages; {args.decode} tokens decoded per run")
    print("| read before the first decode step | chunk-cache misses per step | store reads "
          "per step | step ms | blocks read before it | tok/s |\n|---|---|---|---|---|---|")
    for read, misses, reads, gaps, warmed, rate in rows:
        print(f"| {'yes' if read else 'no'} | {misses} | {reads} | {gaps} | {warmed} | "
              f"{rate:.1f} |")


if __name__ == "__main__":
    main()
