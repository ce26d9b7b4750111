"""Correctness on a real GPU (what the CPU interpreter cannot show): every Triton kernel
against its torch reference on fresh random CUDA inputs, and the engine's GPU path
(Triton attention + CUDA-graph decode) against `transformers` on the same weights.

  python benchmarks/check_gpu.py            # prints one line per check, then a summary
"""

from __future__ import annotations

import os
import sys

import torch

from sglang_reattn import kernels as K

# CHECK_DEVICE=cpu with TRITON_INTERPRET=1 runs the same checks, small, on the interpreter.
DEV = os.environ.get("CHECK_DEVICE", "cuda")
SMALL = DEV != "cuda"


class Results(list):
    """(name, error, tolerance) rows, each printed as it is added: a run cut short by a time
    limit still shows the checks it finished (the table at the end repeats them)."""

    def append(self, row: tuple[str, float, float]) -> None:
        print(f"{row[0]}: error {row[1]:.2e}, tolerance {row[2]:.0e}", flush=True)
        super().append(row)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def paged(seq_lens, c, hkv, d, dtype, gen):
    n_pages = sum(-(-n // c) for n in seq_lens) + 1
    kc = torch.randn(n_pages, c, hkv, d, generator=gen, device=DEV).to(dtype)
    vc = torch.randn(n_pages, c, hkv, d, generator=gen, device=DEV).to(dtype)
    perm = torch.randperm(n_pages - 1, generator=gen, device=DEV) + 1
    width = max(-(-n // c) for n in seq_lens) + 1
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(seq_lens):
        p = -(-n // c)
        table[b, :p] = perm[used:used + p].int()
        used += p
    return kc, vc, table, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def check_kernels() -> list[tuple[str, float, float]]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    out = Results()
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 2e-2)):
        for hq, hkv, d, c in ((9, 3, 64, 64), (32, 8, 128, 64), (8, 8, 64, 16), (32, 4, 128, 128)):
            cos, sin = K.rope_tables(70000 if not SMALL else 2000, d, 10000.0, device=DEV)
            lens = [1, 37, 700, 65536 + 13] if not SMALL else [1, 37, 150]
            kc, vc, table, scope = paged(lens, c, hkv, d, dtype, gen)
            q = torch.randn(len(lens), hq, d, generator=gen, device=DEV).to(dtype)
            sm = d ** -0.5
            o = K.decode_attention_triton(q, kc, vc, table, scope, cos, sin, sm)
            r = K.decode_attention_ref(q, kc, vc, table, scope, cos, sin, sm)
            out.append((f"decode {dtype} hq{hq}/hkv{hkv} d{d} C{c}", rel_err(o, r), tol))
            qlens = [1, 37, 300, 129]
            plens = [5, 37, 700, 4000] if not SMALL else [5, 37, 400, 200]
            kc, vc, table, scope = paged(plens, c, hkv, d, dtype, gen)
            cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32,
                              device=DEV)
            q = torch.randn(sum(qlens), hq, d, generator=gen, device=DEV).to(dtype)
            o = K.prefill_attention_triton(q, kc, vc, table, scope, cu, max(qlens), cos, sin, sm)
            r = K.prefill_attention_ref(q, kc, vc, table, scope, cu, max(qlens), cos, sin, sm)
            out.append((f"prefill {dtype} hq{hq}/hkv{hkv} d{d} C{c}", rel_err(o, r), tol))
    # store_kv + summaries
    for dtype in (torch.float32, torch.bfloat16):
        c, hkv, d = 64, 8, 128
        pages = 40
        kc = torch.zeros(pages, c, hkv, d, device=DEV, dtype=dtype)
        vc = torch.zeros_like(kc)
        sums = [torch.zeros(pages, hkv, d, device=DEV) for _ in range(3)]
        kc2, vc2 = kc.clone(), vc.clone()
        sums2 = [s.clone() for s in sums]
        # Pages fill in order, as the engine writes them (store_kv folds new keys into
        # the page's running summary); one padding slot (-1) in the middle.
        slots = torch.cat([torch.arange(5 * c, 5 * c + 150), torch.tensor([-1]),
                           torch.arange(9 * c, 9 * c + 40), torch.arange(20 * c, 20 * c + 809)])
        slots = slots.to(DEV)
        k = torch.randn(1000, hkv, d, generator=gen, device=DEV).to(dtype)
        v = torch.randn(1000, hkv, d, generator=gen, device=DEV).to(dtype)
        K.store_kv_triton(k, v, kc, vc, slots, *sums)
        K.store_kv_ref(k, v, kc2, vc2, slots, *sums2)
        err = max(rel_err(kc, kc2), rel_err(vc, vc2), *(rel_err(a, b) for a, b in zip(sums, sums2)))
        out.append((f"store_kv+summaries {dtype}", err, 1e-5))
    # chunk scorer (raw scores; top-k ties may legitimately differ)
    for hq, hkv in ((32, 8), (9, 3)):
        d, pages, b, n = 128, 20000, 3, 16000
        if SMALL:
            pages, n = 300, 200
        kmin = torch.randn(pages, hkv, d, generator=gen, device=DEV) - 1
        kmax = kmin + torch.rand(pages, hkv, d, generator=gen, device=DEV) * 2
        kmean = (kmin + kmax) / 2
        q = torch.randn(b, hq, d, generator=gen, device=DEV).to(torch.bfloat16)
        cand = torch.randint(0, pages, (b, n), generator=gen, device=DEV, dtype=torch.int32)
        num = torch.tensor([n, n // 3, 1], dtype=torch.int32, device=DEV)
        for kw in (dict(kmin=kmin, kmax=kmax), dict(kmean=kmean)):
            s = K.chunk_scores_triton(q, cand, num, **kw, per_head=False)
            r = K.chunk_scores_ref(q, cand, num, **kw, per_head=False)
            fin = torch.isfinite(r)
            ok = bool(torch.equal(fin, torch.isfinite(s)))
            out.append((f"score_chunks {'minmax' if 'kmin' in kw else 'mean'} hq{hq}",
                        rel_err(s[fin], r[fin]) if ok else float("inf"), 1e-3))
    return out


def check_engine() -> list[tuple[str, float, float]]:
    from transformers import AutoModelForCausalLM

    from sglang_reattn import Engine

    prompts = ["The capital of France is", "def fibonacci(n):\n    ",
               "Once upon a time, in a small village,", "List three colors:",
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    out = Results()
    for dtype in ("float32", "bfloat16"):
        eng = Engine(device=DEV, dtype=dtype, log_level="warning", max_total_tokens=1 << 17)
        hf = AutoModelForCausalLM.from_pretrained(eng.model_path, dtype=getattr(torch, dtype))
        hf = hf.cuda().eval()
        same = total = 0
        first_div = []
        res = eng.generate(prompts, {"max_new_tokens": 64, "min_new_tokens": 64, "temperature": 0})
        for p, r in zip(prompts, res):
            ids = eng.tokenizer.encode(p)
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids], device=DEV), max_new_tokens=64,
                                  min_new_tokens=64, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
            k = next((i for i, (a, b) in enumerate(zip(r["output_ids"], ref)) if a != b), 64)
            first_div.append(k)
            same += k
            total += 64
        print(f"engine {dtype}: greedy tokens identical before first divergence: "
              f"{first_div} of 64 each", flush=True)
        # Logits of a 300-token prompt + generated text, our prefill vs HF.
        ids = eng.tokenizer.encode(prompts[2]) + res[2]["output_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device=DEV)).logits[0, -1].float()
        lp = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1},
                          return_logprob=True, top_logprobs_num=5)
        top = [t[1] for t in lp["meta_info"]["output_top_logprobs"][0]]
        ref_top = ref.topk(5).indices.tolist()
        # fp32 must agree exactly; bf16 kernels round differently from transformers' bf16,
        # so there only the set of the top-5 next tokens is required to match.
        if dtype == "float32":
            out.append((f"engine {dtype} greedy disagreement (5x64 tokens)", 1 - same / total,
                        0.0))
            out.append((f"engine {dtype} top-5 next tokens differ", float(top != ref_top), 0.0))
        else:
            out.append((f"engine {dtype} top-5 next-token sets differ",
                        float(set(top) != set(ref_top)), 0.0))
        if dtype == "bfloat16":
            out.append(check_prefill_graph(eng))
        eng.shutdown()
        del hf, eng
        torch.cuda.empty_cache()
    return out


def check_prefill_graph(eng) -> tuple[str, float, float]:
    """A prompt past the scope prefilled through the prefill CUDA graph (its pieces past
    the scope replay it) against the same engine with the graph off (every piece eager):
    the same kernels on the same inputs, so the greedy tokens must be identical."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (24 * 1024,), generator=g).tolist()
    params = {"max_new_tokens": 16, "temperature": 0}
    replays = []
    graph = eng.runner._pf_graph
    if graph is None:
        return ("engine prefill graph captured", 1.0, 0.0)
    orig = graph.replay
    graph.replay = lambda: (replays.append(1), orig())
    eng.flush_cache()
    with_graph = eng.generate(input_ids=ids, sampling_params=params)["output_ids"]
    graph.replay = orig
    eng._call(lambda: setattr(eng.runner, "_pf_graph", None))
    eng.flush_cache()
    eager = eng.generate(input_ids=ids, sampling_params=params)["output_ids"]
    eng._call(lambda: setattr(eng.runner, "_pf_graph", graph))
    print(f"prefill graph: {len(replays)} pieces replayed; tokens {with_graph} against "
          f"eager {eager}", flush=True)
    k = next((i for i, (a, b) in enumerate(zip(with_graph, eager)) if a != b), 16)
    return ("engine bf16 24K prefill: graph against eager, tokens differing",
            (16 - k) / 16 if replays else 1.0, 0.0)


def main() -> int:
    results = check_kernels()
    try:
        if SMALL:
            raise SystemExit(_summary(results))
        results += check_engine()
    except Exception as e:  # noqa: BLE001 - report and fail below
        import traceback

        traceback.print_exc()
        results.append((f"engine check raised {type(e).__name__}", float("inf"), 0.0))
    return _summary(results)


def _summary(results) -> int:
    bad = 0
    print("\n| check | error | tolerance | ok |\n|---|---|---|---|")
    for name, err, tol in results:
        ok = err <= tol
        bad += not ok
        print(f"| {name} | {err:.2e} | {tol:.0e} | {'yes' if ok else 'NO'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
