"""How well a streamed prompt's last token predicts its first decode steps' chunks.

    python benchmarks/bench_first_step.py [--tokens 16K] [--device cpu] [--steps 3]

A document is prefilled into a fresh store; a new engine (a restart) answers a question
over it streamed, decoding eagerly so that every layer's selection of every step is exact.
The prompt's last prefill piece selects for the whole piece (its last queries vote) and,
in each layer, for its last token alone with that token's runners-up ranked below
(`StreamTier.expect`). For each of the first decode steps this counts the virtual chunks
it selected that neither the piece's selection nor the last token's selection plus its
first R runners-up hold (what a load before the first step could not have spared), and
how many chunks that load would read, for several R. The engine's setting is R = 16
(`StreamTier.due_runners`), used where decode replays CUDA graphs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_stream import ids_of, parse_size  # noqa: E402

from sglang_reattn import Engine  # noqa: E402
from sglang_reattn.engine import stream_tier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="default: the embedded default model")
    ap.add_argument("--tokens", default="16K")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="decode steps to compare")
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temp dir)")
    args = ap.parse_args()
    n, c = parse_size(args.tokens), 64
    root = tempfile.mkdtemp(prefix="bench_first_step-", dir=args.dir)
    common = dict(device=args.device, log_level="warning", kv_store_path=f"{root}/store",
                  chunked_prefill_size=2048, max_total_tokens=n + 8192,
                  context_length=n + 4096, reattn_chunk_size=c)
    with Engine(args.model_path, **common) as eng:
        vocab = eng.model_config.vocab_size
        doc = ids_of(n, 1, vocab)
        eng.generate(input_ids=doc + ids_of(24, 10, vocab), sampling_params={"max_new_tokens": 1})
        eng.store_tier.flush()
        scope = eng.reattn.scope_tokens

    # per layer: the piece's selection, the last token's (selection, runners-up best
    # first), then each decode step's selection
    piece: dict[int, list[str]] = {}
    last: dict[int, tuple[list[str], list[str]]] = {}
    steps: list[dict[int, list[str]]] = []
    latest: dict[int, list[str]] = {}  # each layer's last resolved selection
    tier_cls = stream_tier.StreamTier
    real_expect, real_resolve = tier_cls.expect, tier_cls.resolve

    def virtual(tier, row: list[int]) -> list[str]:
        return [tier.chunk_of(p) for p in row if p >= tier.base]

    def expect(self, layer, rows, sel, nsel, runners=None):
        piece[layer] = latest[layer]  # (`expect` follows the piece's own `resolve`)
        last[layer] = (virtual(self, sel[0, : int(nsel[0])].tolist()),
                       virtual(self, runners[0].tolist()) if runners is not None else [])
        return real_expect(self, layer, rows, sel, nsel, runners)

    def resolve(self, layer, sel, nsel, runners=None):
        latest[layer] = picks = virtual(self, sel[0, : int(nsel[0])].tolist())
        if layer in last:  # a decode step after the piece
            if layer == 0:
                steps.append({})
            steps[-1][layer] = picks
        return real_resolve(self, layer, sel, nsel, runners)

    tier_cls.expect, tier_cls.resolve = expect, resolve
    stream = dict(common, kv_chunk_cache_pages=160, kv_host_cache_size="1GiB",
                  kv_resident_max_tokens=scope,
                  max_total_tokens=160 * c + scope + 2048 + 4 * c)
    try:
        with Engine(args.model_path, **stream) as eng:
            eng.runner.graphs = {}  # eager decode: each layer's selection as it runs
            eng.attn.stream.expect_next = True
            eng.generate(input_ids=doc + ids_of(24, 20, vocab),
                         sampling_params={"max_new_tokens": args.steps + 1,
                                          "temperature": 0, "ignore_eos": True})
    finally:
        tier_cls.expect, tier_cls.resolve = real_expect, real_resolve

    layers = sorted(last)
    print(f"# bench_first_step: {platform.platform()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; {args.model_path or 'default model'}, {args.device}; "
          f"document {n:,} tokens, chunk {c}, {len(layers)} layers")
    print(f"command: python benchmarks/bench_first_step.py --tokens {args.tokens} "
          f"--device {args.device} --steps {args.steps}\n")
    print("| decode step | virtual picks | not in the piece's selection | R runners-up | not in "
          "the piece's nor the last token's selection + R runners-up | chunks a load of the "
          "last token's selection + R runners-up reads |")
    print("|---|---|---|---|---|---|")
    for s, step in enumerate(steps[: args.steps], 1):
        total = sum(len(step[layer]) for layer in layers)
        outside = sum(len(set(step[layer]) - set(piece[layer])) for layer in layers)
        for r in (0, 8, 16, 32, 66):
            ahead = {layer: set(last[layer][0]) | set(last[layer][1][:r]) for layer in layers}
            missed = sum(len(set(step[layer]) - ahead[layer] - set(piece[layer]))
                         for layer in layers)
            loads = sum(len(ahead[layer] - set(piece[layer])) for layer in layers)
            print(f"| {s} | {total} | {outside} | {r} | {missed} | {loads} |")


if __name__ == "__main__":
    main()
