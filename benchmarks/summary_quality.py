"""Which chunk summary picks the right chunks? Recall of each summary's top-k against an
oracle, on real keys and queries of the default model.

A long document (the pass-key prompt, or varied filler) is prefilled; then, for the final
query of the prompt at every layer, each candidate chunk gets
  - oracle: the softmax attention mass its tokens receive from the un-rotated query
    (position-agnostic, summed over query heads), i.e. what exact top-k attention would keep;
  - minmax: the Quest bound sum_d max(q_d min_d, q_d max_d), heads summed ("sum") or
    max-normalized per head then summed ("max");
  - mean: q . mean key.
We report recall@k = |summary top-k ∩ oracle top-k| / k, averaged over layers, and
whether the needle's chunk is selected (the pass-key task's whole point).

  python benchmarks/summary_quality.py --length 8192 --topk 16
"""

from __future__ import annotations

import argparse
import json
import random

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--topk", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from niah import build_prompt  # noqa: E402  (same prompts as benchmarks/niah.py)

    from sglang_reattn import Engine
    from sglang_reattn.kernels import chunk_scores, combine_head_scores

    eng = Engine(device=args.device, log_level="warning", disable_reattn=True,
                 context_length=args.length + 256, max_total_tokens=args.length + 4096)
    c = eng.pool.page_size
    captured: dict[int, torch.Tensor] = {}
    orig = eng.attn.forward

    def spy(layer_id, q, k, v, batch):
        captured[layer_id] = q[-1:].detach().clone()  # last query of the step, un-rotated
        return orig(layer_id, q, k, v, batch)

    eng.attn.forward = spy
    results = {}
    for trial in range(args.trials):
        rng = random.Random(trial)
        depth = 0.2 + 0.6 * rng.random()
        ids, key = build_prompt(eng.tokenizer, "passkey", args.length, depth, rng)
        eng.flush_cache()
        eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
        m = eng.scheduler.cache.match_prefix(ids)
        pages = m.pages  # full chunks of the prompt
        n_full = len(pages)
        # the needle's chunk: where the key's digits first appear
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        text_ids = eng.tokenizer.encode(needle)  # as build_prompt encodes it
        needle_pos = next(i for i in range(len(ids)) if ids[i:i + len(text_ids)] == text_ids)
        needle_chunk = needle_pos // c
        cand = torch.tensor([list(range(1, n_full - 1))], dtype=torch.int32)  # skip sink/last
        page_ids = torch.tensor(pages, dtype=torch.int32)
        num = torch.tensor([cand.shape[1]], dtype=torch.int32)
        for layer in range(eng.model_config.num_layers):
            q = captured[layer].float()  # [1, Hq, D]
            keys = eng.pool.k[layer][page_ids.long()].float()  # [n, C, Hkv, D]
            g = q.shape[1] // keys.shape[2]
            kk = keys.repeat_interleave(g, dim=2)  # [n, C, Hq, D]
            logits = torch.einsum("hd,nchd->hnc", q[0], kk) * q.shape[-1] ** -0.5
            mass = torch.softmax(logits.flatten(1), -1).view_as(logits).sum(-1).sum(0)  # [n]
            oracle = mass[cand[0].long()]
            kmin = keys.amin(1)
            kmax = keys.amax(1)
            kmean = keys.mean(1)
            table = torch.arange(len(pages), dtype=torch.int32)[cand.long()]
            s_mm = chunk_scores(q, table, num, kmin=kmin, kmax=kmax, per_head=True)
            s_mean = chunk_scores(q, table, num, kmean=kmean, per_head=True)
            variants = {"minmax/sum": combine_head_scores(s_mm, "sum")[0],
                        "minmax/max": combine_head_scores(s_mm, "max")[0],
                        "mean/sum": combine_head_scores(s_mean, "sum")[0],
                        "mean/max": combine_head_scores(s_mean, "max")[0]}
            for k in args.topk:
                top_o = set(oracle.topk(k).indices.tolist())
                needle_idx = needle_chunk - 1
                for name, s in variants.items():
                    top_s = set(s.topk(k).indices.tolist())
                    r = results.setdefault((name, k), {"recall": [], "needle": []})
                    r["recall"].append(len(top_o & top_s) / k)
                    r["needle"].append(needle_idx in top_s)
                r = results.setdefault(("oracle", k), {"recall": [], "needle": []})
                r["recall"].append(1.0)
                r["needle"].append(needle_idx in top_o)
    eng.shutdown()
    print(f"\ndefault model, pass-key prompt of {args.length} tokens, chunk {c}, {args.trials} "
          f"trials x {eng.model_config.num_layers} layers (last prompt query)")
    print("| summary / head combine | k | recall@k vs oracle | needle chunk selected |")
    print("|---|---|---|---|")
    for (name, k), r in sorted(results.items(), key=lambda x: (x[0][1], x[0][0])):
        rec = sum(r["recall"]) / len(r["recall"])
        ndl = sum(r["needle"]) / len(r["needle"])
        print(f"| {name} | {k} | {rec:.3f} | {ndl:.1%} of layers |")
    print(json.dumps({f"{n}@{k}": sum(r["recall"]) / len(r["recall"])
                      for (n, k), r in results.items()}))


if __name__ == "__main__":
    main()
