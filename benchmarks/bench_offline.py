"""Offline throughput: our Engine against `transformers` generate, same weights, same run.

Measures prefill tokens/s and decode tokens/s at each batch size (default 1 and 32) on the
default model (or --model-path). Decode tokens/s is timed from the first to the last
streamed token, so prefill is excluded; for transformers it is (generate(N) - generate(1))
with N forced new tokens. Prints a markdown table of medians over --repeats runs.

  python benchmarks/bench_offline.py                     # CPU
  python benchmarks/bench_offline.py --device cuda       # GPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def rand_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (n, length), generator=g).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ours(engine, bs: int, prompt_len: int, gen_len: int, seed: int) -> tuple[float, float]:
    prompts = rand_prompts(bs, prompt_len, engine.model_config.vocab_size, seed)
    engine.flush_cache()
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})
    prefill = bs * prompt_len / (time.perf_counter() - t0)
    engine.flush_cache()
    # Decode is timed from the moment every request has its first token (a batch larger
    # than one prefill step gets its first tokens over several steps) to the last token.
    params = {"max_new_tokens": gen_len, "temperature": 0, "ignore_eos": True}
    got = [0] * bs
    start: float | None = None
    at_start = 0
    last = 0.0
    for out in engine.generate(input_ids=prompts, sampling_params=params, stream=True):
        now = time.perf_counter()
        got[out.get("index", 0)] = out["meta_info"]["completion_tokens"]
        if start is None and min(got) >= 1:
            start, at_start = now, sum(got)
        last = now
    decode = (sum(got) - at_start) / (last - start)
    return prefill, decode


def bench_hf(model, device: str, bs: int, prompt_len: int, gen_len: int, vocab: int,
             seed: int) -> tuple[float, float]:
    ids = torch.tensor(rand_prompts(bs, prompt_len, vocab, seed), device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    t1 = run(1)
    tn = run(gen_len)
    return bs * prompt_len / t1, bs * (gen_len - 1) / max(tn - t1, 1e-9)


def run_sides(args) -> list[dict]:
    """Each side in its own process: a torch thread pool warmed by one side must not slow
    the other (with OpenMP, two threads that both compute contend; see Engine)."""
    import subprocess
    import sys

    results = {}
    sides = ["ours"] + ([] if args.skip_hf else ["hf"])
    for side in sides:
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    rows = results["ours"]
    for row, ref in zip(rows, results.get("hf", [])):
        row.update(ref)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def run_side(args) -> list[dict]:
    rows = []
    if args.side == "ours":
        from sglang_reattn import Engine

        engine = Engine(args.model_path, device=args.device, dtype=args.dtype,
                        quantization=args.quantization,
                        log_level="warning", max_running_requests=max(args.batch_sizes),
                        max_total_tokens=args.max_total_tokens,
                        chunked_prefill_size=max(2048, 64 * ((args.prompt_len + 63) // 64)))
        for bs in args.batch_sizes:
            bench_ours(engine, bs, args.prompt_len, min(args.gen_len, 8), 999)  # warm-up
            ours = [bench_ours(engine, bs, args.prompt_len, args.gen_len, i)
                    for i in range(args.repeats)]
            rows.append({"batch": bs, "dtype": str(engine.dtype).removeprefix("torch."),
                         "ours_prefill": statistics.median(o[0] for o in ours),
                         "ours_decode": statistics.median(o[1] for o in ours)})
        engine.shutdown()
        return rows
    from transformers import AutoModelForCausalLM

    from sglang_reattn.models.loader import resolve_model_path

    path = resolve_model_path(args.model_path)
    # transformers cannot compute on GGUF blocks; it dequantizes them. Against our
    # --quantization gguf (bfloat16 activations) it runs the same weights in bfloat16.
    on_gpu_or_q4 = args.device == "cuda" or args.quantization == "gguf"
    dtype = {"auto": torch.bfloat16 if on_gpu_or_q4 else torch.float32}.get(
        args.dtype) or getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    vocab = hf.config.vocab_size
    for bs in args.batch_sizes:
        bench_hf(hf, args.device, bs, args.prompt_len, 4, vocab, 999)  # warm-up
        ref = [bench_hf(hf, args.device, bs, args.prompt_len, args.gen_len, vocab, i)
               for i in range(args.repeats)]
        rows.append({"batch": bs, "hf_prefill": statistics.median(r[0] for r in ref),
                     "hf_decode": statistics.median(r[1] for r in ref)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, choices=[None, "gguf"],
                    help="ours: compute on the GGUF file's 4-bit blocks (CPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-total-tokens", type=int, default=1 << 17)
    ap.add_argument("--json", default=None, help="also write results here")
    ap.add_argument("--side", choices=["ours", "hf"], default=None,
                    help=argparse.SUPPRESS)  # internal: one side per process
    args = ap.parse_args()

    if args.side is None:
        rows = run_sides(args)
    else:
        print(json.dumps(run_side(args)), flush=True)
        return
    dtype = rows[0].get("dtype", args.dtype)
    if args.quantization:
        dtype += f", ours --quantization {args.quantization}"
    print(f"\nhardware: {hardware(args.device)}; dtype {dtype}; prompt {args.prompt_len}, "
          f"gen {args.gen_len}; median of {args.repeats}")
    print("| batch | ours prefill tok/s | ours decode tok/s | hf prefill tok/s | "
          "hf decode tok/s | decode ratio |")
    print("|---|---|---|---|---|---|")
    b1 = rows[0]["ours_decode"]
    for r in rows:
        hfp, hfd = r.get("hf_prefill"), r.get("hf_decode")
        ratio = f"{r['ours_decode'] / hfd:.2f}x" if hfd else "-"
        print(f"| {r['batch']} | {r['ours_prefill']:.0f} | {r['ours_decode']:.1f} | "
              f"{hfp or 0:.0f} | {hfd or 0:.1f} | {ratio} |")
    if len(rows) > 1:
        print(f"\nbatch-{rows[-1]['batch']} decode throughput / our batch-1: "
              f"{rows[-1]['ours_decode'] / b1:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
