"""End-to-end batch-1 decode (and a long prefill) at long contexts, random weights.

Models are built with `--load-format dummy` from a config only: a Llama-3.1-8B shape
(32 layers, 32/8 heads, dim 128, llama3 RoPE) and a Llama-3.2-1B shape (16 layers,
32/8 heads, dim 64). ReAttention scope: sink 64 + top-k 95 chunks of 64 + local 2048 =
8192 tokens, as in bench_attention.py.

Decode: the context's K/V are filled with random values straight into the engine's KV pool
(pages allocated from it, summaries computed as for chunks loaded from the disk tier), then
the engine's model runner decodes greedily one token at a time (CUDA graph with per-layer
top-k selection, the same call the scheduler makes). tokens/s is the median of --repeats
timed runs of --steps tokens. The floor is the weights read once per token at the copy
bandwidth measured in the same run.

Prefill (--prefill): a real `Engine.generate` over N random token ids, 1 new token; the
time is compared with the FLOP floor (2 x non-embedding params x N + attention over each
token's scope) at the bf16 matmul rate measured in the same run.

    python benchmarks/bench_e2e.py --model 8b --contexts 32K 128K 512K
    python benchmarks/bench_e2e.py --model 1b --contexts 32K 1M --prefill 1M
    python benchmarks/bench_e2e.py --model tiny --contexts 2K 8K --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shutil
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

_LLAMA3 = {"max_position_embeddings": 131072, "rope_theta": 500000.0,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


SHAPES = {
    "8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "head_dim": 128, "tie_word_embeddings": False, "rope_scaling": _llama3_rope(8.0)},
    "1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "head_dim": 64, "tie_word_embeddings": True, "rope_scaling": _llama3_rope(32.0)},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 49152, "max_position_embeddings": 16384, "rope_theta": 10000.0,
             "tie_word_embeddings": True},
}
SCOPE = dict(reattn_chunk_size=64, reattn_sink=64, reattn_topk=95, reattn_local=2048)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def model_dir(name: str) -> str:
    """A config-only model directory (plus the default model's tokenizer files)."""
    from sglang_reattn.models.loader import resolve_model_path

    path = os.path.join(tempfile.gettempdir(), f"sglang_reattn_dummy_{name}")
    os.makedirs(path, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, **SHAPES[name]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    # BENCH_TOKENIZER_DIR: a folder with the default model's tokenizer files (lets a GPU
    # run without the 98 MB GGUF); otherwise they come from the default model
    src = os.environ.get("BENCH_TOKENIZER_DIR") or resolve_model_path(None)
    for fn in os.listdir(src):
        if fn.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(os.path.join(src, fn), path)
    return path


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, read + write counted."""
    n = (2 << 30) if dev.type == "cuda" else (256 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    times = []
    for _ in range(7):
        sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times[2:])


def matmul_flops(dev: torch.device) -> float:
    n = 8192 if dev.type == "cuda" else 1024
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    times = []
    for _ in range(7):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times[2:])


class Context(SimpleNamespace):
    """A filled context as the model runner reads a Request."""

    def token_at(self, pos: int) -> int:
        return self.all_ids[pos]

    def ids_between(self, start: int, stop: int) -> list[int]:
        return self.all_ids[start:stop]


def fill_context(eng, n: int) -> Context:
    """Allocate pages for n tokens, random K/V, summaries; -> a request-like object."""
    c = eng.pool.page_size
    pages = eng.pool.allocate((n + c - 1) // c + 1)
    idx = torch.tensor(pages, device=eng.device)
    g = torch.Generator(device=eng.device).manual_seed(0)
    for layer in range(eng.pool.k.shape[0]):
        for pool in (eng.pool.k, eng.pool.v):
            block = pool[layer, idx]
            block.normal_(generator=g)
            pool[layer, idx] = block
    eng.attn.pages_loaded(idx)
    ids = torch.randint(100, 40000, (n + 1,), generator=torch.Generator().manual_seed(1))
    return Context(pages=pages, num_computed=n, all_ids=ids.tolist(), streamed=False)


def decode_tokens(eng, req, steps: int) -> float:
    """Greedy decode `steps` tokens through the model runner; -> seconds."""
    c = eng.pool.page_size
    dev = eng.device
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        if req.num_computed // c >= len(req.pages):
            req.pages.extend(eng.pool.allocate(1))
        logits = eng.runner.forward([req], [1], True, [0])
        req.all_ids.append(int(logits[0].argmax()))
        req.num_computed += 1
    sync(dev)
    return time.perf_counter() - t


def profiler_activities(eng) -> list:
    """The torch profiler's activities for an engine: host, and the device's on CUDA."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eng.device.type == "cuda"
                                     else [])


def dev_time(ev) -> float:
    """A profiler event's self time on the device, microseconds (either torch's name)."""
    return getattr(ev, "self_device_time_total", None) or getattr(
        ev, "self_cuda_time_total", 0.0)


def profile_run(eng, run, steps: int, label: str, top: int = 12) -> None:
    """Where a step's time goes: kernel time per step (a CUDA graph's kernels included)
    against wall time per step, and the kernels that take most of it. `run()` runs
    `steps` steps and returns its wall seconds."""
    from torch.profiler import profile

    with profile(activities=profiler_activities(eng)) as prof:
        wall = run()
    print_profile(prof, wall, steps, label, top)


def print_profile(prof, wall: float, steps: int, label: str, top: int = 12) -> None:
    """`profile_run`'s table, of a profiler that recorded `steps` steps in `wall` seconds."""
    evs = [e for e in prof.key_averages() if dev_time(e) > 0]
    busy = sum(dev_time(e) for e in evs)
    print(f"profile of {label}, {steps} steps: wall {wall / steps * 1e3:.3f} ms/step, kernels "
          f"{busy / steps / 1e3:.3f} ms/step ({busy / 1e6 / wall:.0%} busy)")
    for e in sorted(evs, key=dev_time, reverse=True)[:top]:
        print(f"  {dev_time(e) / steps:9.1f} us/step  {e.count // steps:4d}/step  {e.key[:90]}")
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print("  host: " + ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / steps:.0f} us/step"
                                 for e in host[:8]))


class StepTimer:
    """Wraps the engine's model runner: each step's time on the device, by the tokens
    cached before it (where a long prefill's time goes as its context grows). Steps are
    timed with CUDA events between consecutive step starts, so nothing syncs and host work
    overlaps the device as in an uninstrumented run."""

    def __init__(self, eng) -> None:
        self.eng, self.orig = eng, eng.runner.forward
        self.cuda = eng.device.type == "cuda"
        self.marks: list[tuple[int, object]] = []  # (cached tokens, event or host time)
        self.started = time.perf_counter()
        self.first_call = None  # host time of the first step, from `started`
        self.host: list[float] = []  # host seconds in each step's forward call
        eng.runner.forward = self

    def _mark(self, cached: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((cached, ev))
        else:
            self.marks.append((cached, time.perf_counter()))

    def __call__(self, reqs, q_lens, is_decode, rows):
        if self.first_call is None:
            self.first_call = time.perf_counter() - self.started
        self._mark(reqs[0].num_computed)
        t = time.perf_counter()
        out = self.orig(reqs, q_lens, is_decode, rows)
        self.host.append(time.perf_counter() - t)  # launching it (the device runs behind)
        if reqs[0].num_computed + q_lens[0] >= reqs[0].num_tokens:
            self._mark(reqs[0].num_tokens)
        return out

    def close(self) -> None:
        self.eng.runner.forward = self.orig
        sync(self.eng.device)
        m = self.marks
        if self.cuda:
            t = [(c, a.elapsed_time(b) / 1e3) for (c, a), (_, b) in zip(m, m[1:])]
        else:
            t = [(c, b - a) for (c, a), (_, b) in zip(m, m[1:])]
        if len(t) >= 8:
            k = len(t) // 8
            print("prefill step time on the device by cached tokens: " + ", ".join(
                f"{t[i][0] // 1024}K {statistics.median(x for _, x in t[i:i + k]) * 1e3:.1f} ms"
                for i in range(0, 8 * k, k)))
            slow = sorted(t, key=lambda x: -x[1])[:5]
            print(f"prefill steps: {len(t)}, {sum(x for _, x in t):.2f} s from the first "
                  f"step's start to the last one's end; the first started "
                  f"{self.first_call:.2f} s after the request; slowest: " + ", ".join(
                      f"{x * 1e3:.0f} ms at {p // 1024}K" for p, x in slow)
                  + f"; host time in a step's forward call: median "
                  f"{statistics.median(self.host) * 1e3:.1f} ms")


def host_profile(eng, run, steps: int, top: int = 25) -> None:
    """cProfile of the host side of the model runner's steps during `run()` (it runs in the
    engine's thread): where the Python time of a step goes, by own time per step."""
    import cProfile
    import pstats

    prof, orig = cProfile.Profile(), eng.runner.forward

    def forward(*args):
        prof.enable()
        try:
            return orig(*args)
        finally:
            prof.disable()
    eng.runner.forward = forward
    try:
        run()
    finally:
        eng.runner.forward = orig
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    print(f"host profile (cProfile, own time per step over {steps} steps):")
    for (fn, line, name), (_, calls, own, cum, _) in rows:
        print(f"  {own / steps * 1e3:7.3f} ms  {calls // steps:5d}/step  cum "
              f"{cum / steps * 1e3:7.3f} ms  {os.path.basename(fn)}:{line}({name})")


def prefill_floor(cfg, n: int, scope: int) -> float:
    """FLOPs of a prefill of n tokens: the linear layers plus attention over the scope."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    linear = 2 * n * per_layer * cfg.num_layers
    span = min(n, scope)
    keys = span * (span + 1) // 2 + (n - span) * scope  # sum over queries of keys seen
    attn = 4 * keys * cfg.num_heads * d * cfg.num_layers
    return float(linear + attn)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--contexts", nargs="*", default=["32K", "128K", "512K"],
                    help="decode contexts (none: only --prefill)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", default=None, help="also time a real prefill of this size")
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge-triton", action="store_true",
                    help="prefill: merge the cuDNN split attention in one Triton launch")
    ap.add_argument("--decode-angle", action="store_true",
                    help="decode: rotate keys by angle addition (DECODE_ROPE_ANGLE)")
    ap.add_argument("--knob", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a kernel module's knob, e.g. score_chunks.SCORE_DOT_WAVES=0"
                         " (a Python literal; repeatable)")
    ap.add_argument("--profile", action="store_true",
                    help="after each context, profile 16 decode steps (kernel breakdown)")
    args = ap.parse_args()

    from sglang_reattn import Engine

    shorthands = {"merge_triton": "prefill_attention.PREFILL_MERGE_TRITON=True",
                  "decode_angle": "decode_attention.DECODE_ROPE_ANGLE=True"}
    for knob in [v for k, v in shorthands.items() if getattr(args, k)] + args.knob:
        target, _, value = knob.partition("=")
        module, _, name = target.rpartition(".")
        mod = importlib.import_module(f"sglang_reattn.kernels.{module}")
        if not value or not hasattr(mod, name):
            ap.error(f"--knob {knob}: no knob {name!r} in kernels.{module}, or no value")
        setattr(mod, name, ast.literal_eval(value))
        print(f"# knob: kernels.{module}.{name} = {getattr(mod, name)!r}", flush=True)

    dev = torch.device(args.device)
    path = model_dir(args.model)
    contexts = [parse_size(x) for x in args.contexts]
    longest = max(contexts + ([parse_size(args.prefill)] if args.prefill else []))
    scope = dict(SCOPE)
    if args.model == "tiny":
        scope.update(reattn_chunk_size=16, reattn_sink=16, reattn_topk=16, reattn_local=256)
    eng = Engine(path, load_format="dummy", device=args.device, dtype="bfloat16"
                 if dev.type == "cuda" else "float32", log_level="warning",
                 max_running_requests=4, max_total_tokens=longest + 16384,
                 chunked_prefill_size=args.chunked_prefill_size, disable_radix_cache=True,
                 **scope)
    cfg = eng.model_config
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    if not cfg.tie_word_embeddings:  # the input embedding is not read per token, one row
        weight_bytes -= eng.model.embed_tokens.weight.numel() * 2
    bw = copy_bandwidth(dev)
    floor_tps = bw / weight_bytes
    hw = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    rows = []
    for n in contexts:
        req = fill_context(eng, n)
        decode_tokens(eng, req, 8)  # warm-up (graph replay, allocations)
        runs = [args.steps / decode_tokens(eng, req, args.steps) for _ in range(args.repeats)]
        tps = statistics.median(runs)
        rows.append({"model": args.model, "context": n, "decode_tok_s": tps,
                     "floor_tok_s": floor_tps, "runs": runs})
        print(json.dumps(rows[-1]), flush=True)
        if args.profile:
            profile_run(eng, lambda: decode_tokens(eng, req, 16), 16, f"decode at {n:,}")
        eng.pool.free(req.pages)
    prefill = None
    if args.prefill:
        n = parse_size(args.prefill)
        ids = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(2))
        flops = prefill_floor(cfg, n, eng.reattn.scope_tokens if eng.reattn else n)
        rate = matmul_flops(dev)
        # Warm-up: a prefill just past the scope compiles every kernel of the path (the
        # selection's first; 12 s of a cold 1M-token run on the H200, 2026-12-01)
        scope_tokens = eng.reattn.scope_tokens if eng.reattn else 0
        warm = torch.randint(100, 40000, (scope_tokens + 4 * args.chunked_prefill_size,))
        t = time.perf_counter()
        eng.generate(input_ids=warm.tolist(), sampling_params={"max_new_tokens": 1})
        print(f"warm-up prefill of {warm.numel():,} tokens (kernel compiles): "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        ids = ids.tolist()
        steps = StepTimer(eng)
        t = time.perf_counter()
        eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
        secs = time.perf_counter() - t
        steps.close()
        prefill = {"tokens": n, "seconds": secs, "tok_s": n / secs, "flops": flops,
                   "matmul_flops_s": rate, "floor_seconds": flops / rate}
        print(json.dumps(prefill), flush=True)
        if args.profile:  # 32 prefill chunks past the scope, on a fresh context
            m = min(n, 32 * args.chunked_prefill_size + scope_tokens)
            ids = torch.randint(100, 40000, (m,), generator=torch.Generator().manual_seed(3))

            def prefill_run() -> float:
                t = time.perf_counter()
                eng.generate(input_ids=ids.tolist(), sampling_params={"max_new_tokens": 1})
                return time.perf_counter() - t
            profile_run(eng, prefill_run, m // args.chunked_prefill_size,
                        f"a {m:,}-token prefill (per {args.chunked_prefill_size}-token chunk)")
            host_profile(eng, prefill_run, m // args.chunked_prefill_size)
    eng.shutdown()

    dtype = str(eng.dtype).removeprefix("torch.")
    print(f"\nhardware: {hw}; model {args.model}-shaped, random weights, {dtype} "
          f"({weight_bytes / 2**30:.2f} GiB read per token); copy bandwidth "
          f"{bw / 1e9:.0f} GB/s; batch 1, {args.steps} tokens, median of {args.repeats}")
    print("| context | decode tok/s | weight-read floor tok/s | of floor | vs first context |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context'] // 1024}K | {r['decode_tok_s']:.1f} | {r['floor_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / r['floor_tok_s']:.0%} | "
              f"{r['decode_tok_s'] / rows[0]['decode_tok_s']:.2f} |")
    if prefill:
        print(f"\nprefill of {prefill['tokens']:,} tokens: {prefill['seconds']:.1f} s "
              f"({prefill['tok_s']:,.0f} tok/s); FLOP floor {prefill['floor_seconds']:.1f} s at "
              f"the measured {prefill['matmul_flops_s'] / 1e12:.0f} TFLOP/s matmul rate: "
              f"{prefill['seconds'] / prefill['floor_seconds']:.2f}x the floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"decode": rows, "prefill": prefill}, f, indent=2)
    eng.shutdown()


if __name__ == "__main__":
    main()
