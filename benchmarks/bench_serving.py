"""Online serving benchmark: N concurrent streaming clients against /generate.

Measures request throughput, token throughput, time to first token (TTFT), inter-token
latency (ITL) and end-to-end latency percentiles, from the client side, like SGLang's
`bench_serving` with its random dataset: prompts are random token ids (no prefix-cache
hits), outputs are forced to their length with ignore_eos.

    # start a server itself (default model, CPU), 8 clients, a mix of lengths:
    python benchmarks/bench_serving.py --launch --device cpu --num-clients 8 \
        --num-requests 64 --mix 128:32,512:16,32:64
    # or target a running server:
    python benchmarks/bench_serving.py --url http://127.0.0.1:30000 --num-clients 32

`--mix` is a comma list of PROMPT_LEN:OUTPUT_LEN[:WEIGHT]; requests draw from it at random.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    prompt_len: int
    output_len: int
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    completion_tokens: int = 0
    ok: bool = False
    error: str = ""


def parse_mix(text: str) -> list[tuple[int, int, float]]:
    mix = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) not in (2, 3):
            raise SystemExit(f"--mix entry {part!r}: expected PROMPT:OUTPUT[:WEIGHT]")
        mix.append((int(fields[0]), int(fields[1]),
                    float(fields[2]) if len(fields) == 3 else 1.0))
    return mix


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, ids: list[int],
                      output_len: int) -> Result:
    res = Result(len(ids), output_len)
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True,
                                "temperature": 0.0}}
    start = time.perf_counter()
    last = start
    seen = 0
    try:
        async with client.stream("POST", url + "/generate", json=body,
                                 headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                out = json.loads(line[6:])
                if "error" in out:
                    res.error = str(out["error"])
                    return res
                tokens = out["meta_info"]["completion_tokens"]
                now = time.perf_counter()
                if tokens > seen:
                    if seen == 0:
                        res.ttft = now - start
                        new = tokens - 1
                    else:
                        new = tokens - seen
                    if new > 0 and seen > 0:
                        res.itls.extend([(now - last) / new] * new)
                    seen, last = tokens, now
        res.e2e = time.perf_counter() - start
        res.completion_tokens = seen
        res.ok = True
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def run(args: argparse.Namespace, url: str) -> dict:
    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    weights = [w for _, _, w in mix]
    jobs = []
    for _ in range(args.num_requests):
        p, o, _ = rng.choices(mix, weights)[0]
        jobs.append(([rng.randrange(args.min_token_id, args.max_token_id) for _ in range(p)],
                     o))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.num_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        await one_request(client, url, headers, jobs[0][0][:16], 4)  # warm-up
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        results: list[Result] = []

        async def worker() -> None:
            while not queue.empty():
                ids, out_len = queue.get_nowait()
                results.append(await one_request(client, url, headers, ids, out_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.num_clients)))
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    e2es = [r.e2e for r in ok]
    return {
        "clients": args.num_clients, "requests": len(results), "failed": len(errors),
        "first_error": errors[0] if errors else None, "mix": args.mix,
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_tok_per_s": sum(r.prompt_len for r in ok) / duration,
        "output_tok_per_s": sum(r.completion_tokens for r in ok) / duration,
        **{f"ttft_p{q}_ms": 1000 * pct(ttfts, q) for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": 1000 * pct(itls, q) for q in (50, 90, 99)},
        "e2e_p50_s": pct(e2es, 50), "e2e_mean_s": statistics.fmean(e2es) if e2es else None,
    }


def markdown(r: dict, hardware: str) -> str:
    head = ("| hardware | clients | mix | req/s | out tok/s | TTFT p50/p90/p99 ms | "
            "ITL p50/p90/p99 ms |\n|---|---|---|---|---|---|---|")
    row = (f"| {hardware} | {r['clients']} | {r['mix']} | {r['request_throughput']:.2f} | "
           f"{r['output_tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p90_ms']:.0f} / "
           f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p90_ms']:.1f} / "
           f"{r['itl_p99_ms']:.1f} |")
    return head + "\n" + row


def hardware_name(device: str) -> str:
    try:
        import torch

        if device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server; default: --launch one")
    ap.add_argument("--launch", action="store_true", help="start a server for the run")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--server-flag", action="append", default=[],
                    help="extra launch_server flag (repeatable), e.g. "
                    "--server-flag=--dtype=float32")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-clients", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--mix", default="128:32,512:16,32:64")
    ap.add_argument("--min-token-id", type=int, default=1000)
    ap.add_argument("--max-token-id", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-json", default=None, help="append the result as a JSON line")
    args = ap.parse_args(argv)
    if not args.url and not args.launch:
        ap.error("give --url or --launch")

    server = None
    url = args.url
    if args.launch:
        from sglang_reattn.server.launcher import ServerProcess

        flags = ["--device", args.device, "--log-level", "warning", *args.server_flag]
        if not any(f.split("=")[0] in ("--kv-store-path", "--disable-kv-store")
                   for f in args.server_flag):
            # Random prompts never recur: without this the run would fill the user's
            # default store and time its write-behind. Give --server-flag to keep a store.
            flags.append("--disable-kv-store")
        if args.model_path:
            flags += ["--model-path", args.model_path]
        if args.api_key:
            flags += ["--api-key", args.api_key]
        server = ServerProcess(flags, timeout=900)
        url = server.url
    try:
        result = asyncio.run(run(args, url.rstrip("/")))
    finally:
        if server is not None:
            server.stop()
    result["hardware"] = hardware_name(args.device)
    print(markdown(result, result["hardware"]))
    print(json.dumps(result))
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
