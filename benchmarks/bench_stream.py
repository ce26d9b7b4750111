"""A stored context served after a restart: prefill again vs streamed from the disk tier.

    python benchmarks/bench_stream.py [--model-path P | --shape 8b] [--device cpu|cuda]
        [--tokens 16K] [--cache-pages 256] [--capped] [--decode 32] [--repeats 3]

`--shape 8b --capped --cache-pages 512` is the capped-cache case of the disk-tier issue: a
Llama-3.1-8B-shaped context (random weights) decoded through a 4 GiB chunk cache (8 MiB per
page), the streamed engine's KV pool sized to that cache plus its sink, local window and
a prefill piece.

Four engines, one after the other (each a restart; the operating system's page cache is
left alone: how much of the store it holds shows in the major page faults reported):

0. **prefill**: a fresh LMDB store; the document and a question are prefilled with the
   store filled behind. This first engine also compiles the kernels (Triton keeps them in
   the process), so its time to first token includes the compiles.
1. **baseline**: no store at all; the same prefill, its kernels compiled. Time to first
   token = a full prefill, the baseline of the TTFT ratios (`--skip-baseline`: the
   prefill above stands in for it). Then a warm-up streamed engine compiles the streamed
   kernel variants of prefill and of graph and eager decode (a restarted server has them
   in Triton's cache).
2. **streamed**: a new engine with a chunk cache of `--cache-pages` pages and
   `--kv-resident-max-tokens` set to the scope, so only the sink and local window are
   loaded into the pool; the middle chunks' summaries are read in bulk and the chunks each
   layer selects are streamed (chunk cache <- host tier <- LMDB). A new question over the
   same document: time to first token, then decode tok/s with the cache capped, the
   chunk-cache hit rate and the bytes read from the store per token. Each of `--variants`
   then repeats this in an engine of its own, with other replay, runner-up, first-step
   load and summary-pack settings.
3. **resident**: a new engine without streaming: the whole stored prefix is loaded into the
   pool, then the same question and decode, for the decode baseline.

Every ratio comes from one run of this script. Decode tok/s are timed from the first token
to the last (greedy, EOS ignored), median of `--repeats`; the four slowest steps of each
engine are printed with the streaming counters, Triton compiles and garbage collections
that moved in them (and, with `--step-timers`, the time spent in the engine's parts).
`--profile` adds a breakdown of 64 decode steps (from a question's first token on) of the
streamed and the resident engine, by kernel and by engine part, and the time the
measure's streamed TTFT spent in the engine's parts;
`--profile-ttft` one more restart whose streamed TTFT runs under the torch profiler;
`--cprofile-ttft N` one more under cProfile.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e as E2E  # noqa: E402

from sglang_reattn.engine import model_runner  # noqa: E402
from sglang_reattn.kv_store import store as kv_store_mod  # noqa: E402
from sglang_reattn.engine.store_tier import major_faults  # noqa: E402


def page_cache_gib() -> float:
    with open("/proc/meminfo") as f:
        kb = next((int(line.split()[1]) for line in f if line.startswith("Cached:")), 0)
    return kb / 2 ** 20


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "KM" else t) * mult)


def ids_of(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (n,), generator=g).tolist()


def profile_ttft(eng, ids: list[int], top: int = 30) -> None:
    """A streamed TTFT under the torch profiler: the operations (CUDA runtime calls
    included) that took the most host time, by self time, and the device's busy time."""
    from torch.profiler import profile

    prof = profile(activities=E2E.profiler_activities(eng))
    eng._call(prof.start)  # on the engine thread, which runs the step's operations
    try:
        t, _ = ttft(eng, ids)
    finally:
        eng._call(prof.stop)
    evs = prof.key_averages()
    dev = sum(E2E.dev_time(e) for e in evs)
    print(f"profile of a streamed TTFT: wall {t * 1e3:.1f} ms (profiled), device busy "
          f"{dev / 1e3:.1f} ms; host self time by operation:")
    for e in sorted(evs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        print(f"  {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:6d} calls  {e.key[:80]}")


def cprofile_ttft(eng, ids: list[int], top: int) -> None:
    """A streamed TTFT under cProfile (bench_context_ttft.cprofiled), both threads."""
    from bench_context_ttft import cprofiled

    t, _ = cprofiled(eng, lambda: ttft(eng, ids), top)
    print(f"cProfile of a streamed TTFT: wall {t * 1e3:.1f} ms (profiled)")


def ttft(eng, ids: list[int]) -> tuple[float, int]:
    t = time.perf_counter()
    out = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0})
    return time.perf_counter() - t, out["meta_info"]["cached_tokens"]


GAPS: list[float] = []  # seconds between streamed tokens of the last decode_rate call


def decode_rate(eng, ids: list[int], n: int, on_first=None) -> float:
    """Decode tok/s of one request after its first token (`on_first()` is called when
    that token arrives)."""
    params = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
    first = last = None
    got = 0
    GAPS.clear()
    STEPS.clear()
    seen = step_counters(eng)
    for out in eng.generate(input_ids=ids, sampling_params=params, stream=True):
        now = time.perf_counter()
        got = out["meta_info"]["completion_tokens"]
        if first is None:
            first, at_first = now, got
            if on_first is not None:
                on_first()
                now = time.perf_counter()
        else:
            GAPS.append(now - last)
            STEPS.append(seen)
        seen = step_counters(eng)
        last = now
    for i in range(len(STEPS)):  # counters seen at each token -> what each gap did
        after = STEPS[i + 1] if i + 1 < len(STEPS) else seen
        STEPS[i] = {k: round(a - STEPS[i].get(k, 0), 1) for k, a in after.items()
                    if a != STEPS[i].get(k, 0)}
    return (got - at_first) / (last - first)


GAPS_ALL: list[float] = []  # the gaps of the last rates_of call, over all its questions
STEPS: list[dict] = []  # per gap of GAPS: the counters that moved in it
STEP_KEYS = ("stream_graph_replays", "stream_graph_eager", "stream_store_reads",
             "stream_prefetch_reads", "stream_spilled_chunks", "chunk_cache_misses",
             "host_cache_hits", "store_chunks_written", "store_touched_chunks",
             "store_writer_ms")
# What else can stall a step, counted from start-up on (`watch_stalls`): Triton kernels
# compiled (with their names), and garbage collections' pauses.
STALLS = {"triton_compiles": 0, "gc_ms": 0.0, "compile_s": 0.0}
COMPILED: list[str] = []


def watch_stalls() -> None:
    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            STALLS["gc_ms"] += (time.perf_counter() - started[0]) * 1e3

    gc.callbacks.append(on_gc)
    try:
        from triton import knobs
    except ImportError:  # an older Triton: compiles are not counted
        return

    begun: dict = {}  # (thread, kernel) -> when its compile began

    def before_compile(*, fn, **_):  # called only for a kernel not compiled yet
        begun[threading.get_ident(), fn.name] = time.perf_counter()
        return None  # (a true value would skip the compile)

    def on_compile(*, fn, **_):
        STALLS["triton_compiles"] += 1
        COMPILED.append(fn.name)
        t = begun.pop((threading.get_ident(), fn.name), None)
        if t is not None:
            STALLS["compile_s"] += time.perf_counter() - t

    knobs.runtime.jit_cache_hook = before_compile
    knobs.runtime.jit_post_compile_hook = on_compile


def step_counters(eng) -> dict[str, int]:
    """Streaming counters and garbage collections so far, read from the client thread
    (plain attribute reads: no call into the engine)."""
    c = dict(eng.stream_tier.counters() if eng.stream_tier is not None else {},
             **(eng.store_tier.stats if eng.store_tier is not None else {}))
    out = {k: c.get(k, 0) for k in STEP_KEYS}
    out.update({f"gc_gen{i}": g["collections"] for i, g in enumerate(gc.get_stats())})
    out.update(triton_compiles=STALLS["triton_compiles"], gc_ms=round(STALLS["gc_ms"], 1))
    out.update({f"ms {k}": sec * 1e3 for k, (sec, _) in list(LIVE.items())})
    return out


LIVE: dict = {}  # `timers` of the decode being measured (rates_of, `--step-timers`)
STEP_TIMERS = False


def cache_matches_store(eng) -> tuple[int, int]:
    """Every block in the streamed engine's chunk cache against its stored copy, bit for
    bit (the engine idle): (blocks checked, blocks that differ). Streaming changes where a
    block comes from, never its value."""
    import numpy as np

    from sglang_reattn.engine.store_tier import _to_numpy

    tier, store = eng.stream_tier, eng.store_tier.store
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    checked = bad = 0
    for layer in range(tier.num_layers):
        items = tier.cache.items(layer)
        if not items:
            continue
        pages = torch.tensor([p for _, p in items], device=eng.pool.k.device)
        k, v = store.get_kv_many([key for key, _ in items], layer)
        same = [(_to_numpy(t[layer, pages]) == want).reshape(len(items), -1).all(1)
                for t, want in ((eng.pool.k, k), (eng.pool.v, v))]
        checked += len(items)
        bad += int(np.count_nonzero(~(same[0] & same[1])))
    return checked, bad


def summaries_match_store(eng) -> tuple[int, int]:
    """Every attached chunk's summary rows on the device (kmin, kmax of its slot) against
    the store's, dequantized the same way (the engine idle): (chunks checked, chunks that
    differ). Reading them in pieces through buffers changes no value."""
    tier, store = eng.stream_tier, eng.store_tier.store
    slots = [(i, c) for i, c in enumerate(tier._slot_ids) if c is not None]
    if not slots:
        return 0, 0
    q, sc = store.get_summaries([c for _, c in slots], dequantize=False)
    want = (torch.from_numpy(q).to(eng.device).float()
            * torch.from_numpy(sc).to(eng.device)[..., None]).transpose(0, 1)  # [L, n, 2, ...]
    rows = torch.tensor([i for i, _ in slots], device=eng.device) + tier.base
    bad = torch.zeros(len(slots), dtype=torch.bool, device=eng.device)
    for j, t in enumerate((tier.attn.kmin, tier.attn.kmax)):
        got = t[:, rows]
        bad |= (got != want[:, :, j].to(t.dtype)).flatten(2).any(2).any(0)
    return len(slots), int(bad.sum())


PREFIX = 0  # --decode-prefix: rates_of also rates each answer's first PREFIX tokens
PREFIX_RATES: dict[str, float] = {}  # label -> the median of those


def rates_of(eng, doc: list[int], questions: list[list[int]], n: int, label: str) -> float:
    """Median decode tok/s over the questions; prints the step-time spread. With PREFIX,
    also the median rate of each answer's first PREFIX tokens (as an answer of that
    length would have decoded: the steps after them change none before), in
    PREFIX_RATES[label]."""
    rates, gaps, steps, firsts = [], [], [], []
    for q in questions:
        with timers(LIVE) if STEP_TIMERS else contextlib.nullcontext():
            rates.append(decode_rate(eng, doc + q, n))
        LIVE.clear()
        if 1 < PREFIX < n:  # (gaps between tokens 1..PREFIX: PREFIX - 1 of them)
            firsts.append((PREFIX - 1) / sum(GAPS[: PREFIX - 1]))
        gaps.extend(GAPS)
        steps.extend(STEPS)
    GAPS_ALL[:] = gaps
    g = sorted(gaps)
    first = ""
    if firsts:
        PREFIX_RATES[label] = statistics.median(firsts)
        first = f" (its first {PREFIX} tokens: {PREFIX_RATES[label]:.1f} tok/s)"
    print(f"# {label} decode: {statistics.median(rates):.1f} tok/s{first}; per token median "
          f"{g[len(g) // 2] * 1e3:.2f} ms, p90 {g[int(len(g) * 0.9)] * 1e3:.2f} ms, max "
          f"{g[-1] * 1e3:.1f} ms", flush=True)
    # Approximate: a token's counters are read when the client gets it, a little after
    # its step; a step's work can show in the gap before or after.
    for gap, moved in sorted(zip(gaps, steps), key=lambda x: -x[0])[:4]:
        moved = {k: v for k, v in moved.items() if not k.startswith("ms ") or v >= 0.5}
        print(f"#   slow step {gap * 1e3:7.1f} ms: {moved or 'no counter moved'}", flush=True)
    return statistics.median(rates)


def moved(before: dict, after: dict) -> dict:
    """How much each numeric engine stat moved between two `Engine.stats()`."""
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}


def release(eng) -> None:
    """Free a shut-down engine's memory before the next one: it froze the collector's
    objects while serving (unfrozen at shutdown), so its reference cycles wait for a
    collection."""
    eng.__dict__.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def timers(out: dict, trace: list | None = None):
    """Wall time spent in the streamed engine's main parts: the methods below, wrapped for
    the duration, accumulate seconds and calls into `out`, keyed `Class.method`, with
    `@thread` appended off the engine thread (the prefetch and writer threads). `trace`:
    every call is also appended to it as (key, thread, start, end, depth), depth counting
    the wrapped calls it is inside on its thread (`print_timeline`)."""
    depth = threading.local()
    from sglang_reattn.engine import (
        model_runner,
        radix_cache,
        scheduler,
        store_tier,
        stream_tier,
    )
    from sglang_reattn.engine import engine
    from sglang_reattn.kv_store import codecs, store
    from sglang_reattn.layers import reattention
    from sglang_reattn import kernels as kernels_mod

    targets = [(stream_tier.StreamTier, ("attach", "fetch", "resolve", "settle",
                                         "sync_map", "prefetch", "end_step", "_to_device",
                                         "_write_pages", "_prefetch_one", "_stage",
                                         "_fill_many", "_read_rows", "expect",
                                         "_put_summaries", "release", "_load",
                                         "run_deferred", "_cache_in", "_cache_in_many",
                                         "_read_summaries", "_wait_ahead")),
               (stream_tier.ChunkCache, ("acquire",)), (stream_tier.HostCache, ("put",)),
               (store_tier.StoreTier, ("lookup", "load", "save", "_write_one", "hold",
                                       "get_kv", "read_ahead", "pack")),
               (store.ChunkStore, ("get_summaries", "get_kv_many", "has_many", "hold", "_write")),
               (codecs, ("decode_block",)),
               (engine.Engine, ("_build", "_make_request")),
               (reattention.ReAttention, ("select", "forward", "attend_scope")),
               (kernels_mod, ("select_scope", "assemble_scope_host")),
               (radix_cache.RadixCache, ("match_prefix",)),
               (scheduler.Scheduler, ("_admit", "_run_prefill", "_run_decode", "_spill",
                                      "_sample_and_emit", "_store_ids", "_release",
                                      "_postprocess_prefill", "_insert_into_tree")),
               (scheduler.Scheduler, ("_prefetch", "_cap_streamed", "_grow_pages")),
               (scheduler, ("sample",)),
               (model_runner.ModelRunner, ("forward", "_fill_inputs", "_fill_plan",
                                           "_replay_streamed", "_read_selection"))]
    if torch.cuda.is_available():
        targets.append((torch.cuda.CUDAGraph, ("replay",)))
    saved = []
    for cls, names in targets:
        for name in names:
            f = getattr(cls, name)
            saved.append((cls, name, f))

            def wrapped(*a, _f=f, _key=f"{cls.__name__}.{name}", **k):
                d = depth.n = getattr(depth, "n", 0) + 1
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    end = time.perf_counter()
                    depth.n = d - 1
                    name_ = threading.current_thread().name
                    th = name_.rstrip("0123456789").rstrip("_")  # a pool's threads as one
                    key = _key if th in ("engine", "MainThread") else f"{_key}@{th}"
                    s, n = out.get(key, (0.0, 0))
                    out[key] = (s + end - t, n + 1)
                    if trace is not None:
                        trace.append((_key, name_, t, end, d - 1))

            setattr(cls, name, wrapped)
    try:
        yield out
    finally:
        for cls, name, f in saved:
            setattr(cls, name, f)


def print_parts(parts: dict, label: str, top: int | None = None) -> None:
    """`timers`' totals, the costliest first (the first `top`)."""
    for key, (sec, calls) in sorted(parts.items(), key=lambda x: -x[1][0])[:top]:
        print(f"  {label}: {sec * 1e3:9.1f} ms in {calls:5d} calls of {key}")


def print_timeline(trace: list, t0: float, depth: int = 2) -> None:
    """A traced TTFT (`timers(trace=)`) in time order from t0: the engine thread's calls
    up to `depth` wrapped calls deep (a run of calls of one method at one depth as one
    line: count, first start, last end, time inside), then each other thread's outermost
    calls, merged likewise."""
    def runs(events):
        out = []
        for key, _, a, b, d in sorted(events, key=lambda e: e[2]):
            if out and out[-1][0] == (key, d):
                r = out[-1]
                r[1] += 1
                r[3] = max(r[3], b)
                r[4] += b - a
            else:
                out.append([(key, d), 1, a, b, b - a])
        return out

    print("timeline of a streamed TTFT (ms from the request; calls, inside ms):")
    threads = sorted({e[1] for e in trace}, key=lambda th: (th != "engine", th))
    for th in threads:
        ev = [e for e in trace if e[1] == th and e[4] <= (depth if th == "engine" else 0)]
        for (key, d), n, a, b, inside in runs(ev):
            print(f"  {th:22s} {(a - t0) * 1e3:8.1f} -> {(b - t0) * 1e3:8.1f}  "
                  f"{'  ' * d}{key} x{n} ({inside * 1e3:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--shape", choices=sorted(E2E.SHAPES), default=None,
                    help="random weights of bench_e2e's shape (8b, 1b, tiny) instead of a model; "
                         "its scope (sink 64, top-95, local 2048, chunk 64)")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="no engine without a store: the TTFT ratios use the prefill that "
                         "writes the store (saves a prefill when decode is what is measured)")
    ap.add_argument("--capped", action="store_true",
                    help="size the streamed engine's KV pool to its chunk cache, sink, local "
                         "window and a prefill piece (the GPU's KV budget capped well below "
                         "the context) instead of the whole context")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", default="16K", help="document length")
    ap.add_argument("--cache-pages", type=int, default=256, help="chunk-cache pages (streamed)")
    ap.add_argument("--host-cache", default="1GiB")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per repeat")
    ap.add_argument("--decode-prefix", type=int, default=0, metavar="K",
                    help="also rate the first K tokens of each answer (K < --decode): a "
                         "K-token answer's decode, beside the --decode-token one's")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--reattn-chunk-size", type=int, default=64)
    ap.add_argument("--codec", default=None, help="store codec (default: the engine's)")
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temp dir)")
    ap.add_argument("--keep-store", default=None, metavar="DIR",
                    help="the store in DIR/store, kept after the run; a later run with the "
                         "same DIR, --tokens and model finds the document there and skips "
                         "the store-writing prefill (a warm GPU machine's second call)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="kernel and engine-part breakdown of 64 decode steps from the first "
                         "token on, streamed and resident")
    ap.add_argument("--variants", nargs="*", default=[],
                    metavar="CAP:AHEAD:REPLAY[:EXPECT[:PACKS[:PARTS[:DEFER[:RUNNERS]]]]]",
                    help="after the streamed measure, repeat it (a new engine, the same "
                         "questions) per variant: CAP replays of a streamed graph step before it "
                         "runs eagerly (model_runner.MAX_STREAM_REPLAYS); the first AHEAD "
                         "runners-up per layer loaded ahead after a step "
                         "(StreamTier.ahead_runners; 'all': every one ReAttention reports); "
                         "the first REPLAY runners-up loaded before a replay "
                         "(StreamTier.replay_runners); EXPECT: how many runners-up of the "
                         "prompt's last token are loaded with its selection before the first "
                         "decode step (StreamTier.due_runners), or 'off' to load neither "
                         "(StreamTier.expect_next); PACKS 0 reads the summaries one value per "
                         "chunk, not from the store's summary packs; PARTS: the most threads "
                         "one layer's K/V read is split over (kv_store.store.KV_PARTS); DEFER 0 "
                         "runs a step's loads ahead right after it, not while the next graph "
                         "step replays (StreamTier.defer_prefetch); RUNNERS: "
                         "--kv-prefetch-runners ('-': the engine's default)")
    ap.add_argument("--profile-ttft", action="store_true",
                    help="after the variants, one more streamed engine's TTFT under the torch "
                         "profiler: host time by operation (CUDA runtime calls included)")
    ap.add_argument("--ttft-restarts", type=int, default=1, metavar="N",
                    help="restarts whose streamed TTFT is taken (median reported; the "
                         "last one also decodes)")
    ap.add_argument("--sample-ttft", type=int, default=0, metavar="N",
                    help="after the variants, one more streamed engine's TTFT under a stack "
                         "sampler (stack_sampler.py): its N costliest lines and functions "
                         "per thread")
    ap.add_argument("--cprofile-ttft", type=int, default=0, metavar="N",
                    help="after the variants, one more streamed engine's TTFT under cProfile "
                         "(the calling and engine threads): its N costliest functions")
    ap.add_argument("--decode-each-restart", action="store_true",
                    help="each of --ttft-restarts' restarts also decodes (as the measure "
                         "does): every restart's streamed tok/s against resident, and their "
                         "median")
    ap.add_argument("--ttft-with-layer-ahead", type=int, default=0, metavar="N",
                    help="N more restarts' streamed TTFTs with the streaming tier's "
                         "layer-ahead reads on (StreamTier.layer_ahead; off by default), "
                         "beside the measure")
    ap.add_argument("--map-ab", type=int, default=0, metavar="N",
                    help="N more pairs of restarts that each take the TTFT and decode: one "
                         "with the store writer's map set back to its file's size (as it "
                         "was opened before 5815804: its first write grows the map), one as "
                         "opened (twice the file); each one's decode tok/s, slowest step "
                         "and whether the map grew, and their medians")
    ap.add_argument("--timeline-ttft", action="store_true",
                    help="after the variants, one more streamed engine's TTFT with the "
                         "engine's parts traced: their calls in time order, per thread")
    ap.add_argument("--step-timers", action="store_true",
                    help="time the engine's parts during the timed decode too, to show what "
                         "the slowest steps spent their time in (adds a little to each step)")
    args = ap.parse_args()
    watch_stalls()
    global STEP_TIMERS, PREFIX
    STEP_TIMERS = args.step_timers
    PREFIX = args.decode_prefix
    with timers({}):  # (every method it wraps exists: fail now, not after the prefill)
        pass

    from sglang_reattn import Engine

    n = parse_size(args.tokens)
    if args.keep_store and args.skip_baseline:
        ap.error("--keep-store needs the no-store baseline (a reused store has no prefill)")
    root = args.keep_store or tempfile.mkdtemp(prefix="bench_stream_", dir=args.dir)
    store = f"{root}/store"
    # what a kept store holds: written only once its document is flushed
    marker = f"{root}/document_{n}_{args.model_path or args.shape or 'default'}"
    reuse = bool(args.keep_store) and os.path.exists(marker)
    model = args.model_path
    shape = dict(reattn_chunk_size=args.reattn_chunk_size)
    if args.shape:
        model = E2E.model_dir(args.shape)
        shape = dict(E2E.SCOPE, load_format="dummy")
    common = dict(device=args.device, dtype=args.dtype, log_level="warning",
                  kv_store_path=store, chunked_prefill_size=args.chunked_prefill_size,
                  max_total_tokens=n + 8192, context_length=n + 4096, **shape,
                  **({"kv_store_codec": args.codec} if args.codec else {}))
    res: dict = {"tokens": n, "cache_pages": args.cache_pages}
    def profiled(eng, label: str, steps: int = 64) -> None:
        """Where `steps` decode steps' time goes: kernels (torch profiler) and the engine's
        parts (`timers`), both from the first token on (the prompt's admission and prefill
        left out)."""
        if not args.profile:
            return
        from torch.profiler import profile

        q = ids_of(24, 99, eng.model_config.vocab_size)
        decode_rate(eng, doc + q, 2)  # the question's prefill, outside the profile
        prof = profile(activities=E2E.profiler_activities(eng))
        with timers({}) as parts:
            def start() -> None:
                parts.clear()
                prof.start()

            rate = decode_rate(eng, doc + q, steps + 1, on_first=start)
            prof.stop()
        E2E.print_profile(prof, steps / rate, steps, label)
        for key, (sec, calls) in sorted(parts.items(), key=lambda x: -x[1][0]):
            print(f"  {label}: {sec / steps * 1e3:8.3f} ms/step in {calls / steps:5.2f} "
                  f"calls/step of {key}")

    try:
        # The store-writing prefill runs first: its engine compiles the kernels (in the
        # process's Triton cache from then on), so the no-store baseline after it times a
        # prefill alone.
        with Engine(model, **common) as eng:
            vocab = eng.model_config.vocab_size
            doc = ids_of(n, 1, vocab)
            questions = [ids_of(24, 10 + i, vocab) for i in range(args.repeats + 2)]
            before, kernels = STALLS["compile_s"], len(COMPILED)
            if reuse:  # (the kernels compile in the warm-up engines below)
                res["prefill_s"] = res["prefill_compile_s"] = None
                print(f"# the store in {root} holds the document: no store-writing prefill",
                      flush=True)
            else:
                res["prefill_s"], _ = ttft(eng, doc + questions[0])
                res["prefill_compile_s"] = STALLS["compile_s"] - before
                print(f"# prefill with the store written behind (first engine): TTFT "
                      f"{res['prefill_s']:.2f} s, of which {res['prefill_compile_s']:.1f} s "
                      f"compiling {len(COMPILED) - kernels} Triton kernels", flush=True)
                t = time.perf_counter()
                eng.store_tier.flush()
                print(f"# store written behind, flushed {time.perf_counter() - t:.1f} s later "
                      f"({eng.stats()['store_summary_packs']} summary packs)", flush=True)
                if args.keep_store:
                    open(marker, "w").close()
            scope = eng.reattn.scope_tokens
            hw = (torch.cuda.get_device_name(0) if eng.device.type == "cuda"
                  else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
            dtype = str(eng.dtype).removeprefix("torch.")
        plain = {k: v for k, v in common.items() if k not in ("kv_store_path", "kv_store_codec")}
        if args.skip_baseline:
            res["baseline_prefill_s"] = res["prefill_s"]
        else:
            compiled = len(COMPILED)
            with Engine(model, **plain, disable_kv_store=True) as eng:
                res["baseline_prefill_s"], _ = ttft(eng, doc + questions[0])
            print(f"# prefill without a store ({len(COMPILED) - compiled} kernels compiled "
                  f"in it): TTFT {res['baseline_prefill_s']:.2f} s", flush=True)

        stream_opts = dict(common, kv_chunk_cache_pages=args.cache_pages,
                           kv_host_cache_size=args.host_cache, kv_resident_max_tokens=scope)
        if args.capped:  # the cache, sink + local window + a prefill piece, and slack
            c = common["reattn_chunk_size"]
            resident = scope + args.chunked_prefill_size + 4 * c
            stream_opts["max_total_tokens"] = args.cache_pages * c + resident
            res["streamed_pool_tokens"] = stream_opts["max_total_tokens"]
        # A first streamed engine compiles the kernel variants of streamed prefill (as a
        # restarted server finds them in Triton's on-disk cache); nothing else carries over.
        # It decodes too: from its CUDA graphs, and eagerly (graphs set aside), the path of
        # a streamed step that still misses after its replays.
        with Engine(model, **stream_opts) as eng:
            t, _ = ttft(eng, doc + ids_of(24, 98, vocab))
            print(f"# warm-up engine (kernel compiles): streamed TTFT {t:.2f} s", flush=True)
            decode_rate(eng, doc + ids_of(24, 97, vocab), 4)
            graphs, eng.runner.graphs = eng.runner.graphs, {}  # (the engine is idle)
            decode_rate(eng, doc + ids_of(24, 96, vocab), 4)
            eng.runner.graphs = graphs
        warm_compiles = len(COMPILED)
        # More restarts that only take the TTFT (one restart's TTFT varied by half from
        # run to run on the H200's host): their median with the one below is reported.
        extra, extra_rates = [], []
        for i in range(args.ttft_restarts - 1):
            release(eng)
            with Engine(model, **stream_opts) as eng:
                extra.append(ttft(eng, doc + questions[1])[0])
                if args.decode_each_restart:  # (its decode too, as the measure's below)
                    extra_rates.append(rates_of(eng, doc, questions[2:], args.decode,
                                                f"streamed (restart {i + 1})"))
        res["streamed_tok_s_restarts"] = extra_rates
        if extra:
            print("# streamed TTFT, restarts before the measured one: "
                  + ", ".join(f"{t:.3f}" for t in extra) + " s", flush=True)
        release(eng)
        with Engine(model, **stream_opts) as eng:
            if args.profile:  # bound at start-up, so wrapped on the instance
                loaded = eng.store_tier.on_loaded

                def on_loaded(pages, _f=loaded):
                    t = time.perf_counter()
                    _f(pages)
                    print(f"  streamed TTFT: {(time.perf_counter() - t) * 1e3:9.1f} ms in one "
                          f"call of StoreTier.on_loaded ({pages.numel()} pages)", flush=True)

                eng.store_tier.on_loaded = on_loaded
            res["page_cache_before_streamed_gib"] = page_cache_gib()
            faults = major_faults()
            with timers({}) if args.profile else contextlib.nullcontext() as parts:
                res["streamed_ttft_s"], res["streamed_cached"] = ttft(eng, doc + questions[1])
            res["streamed_ttft_major_faults"] = major_faults() - faults
            res["streamed_ttft_all_s"] = extra + [res["streamed_ttft_s"]]
            res["streamed_ttft_s"] = statistics.median(res["streamed_ttft_all_s"])
            if args.profile:
                eng.store_tier.on_loaded = loaded  # the TTFT's only
            print_parts(parts or {}, "streamed TTFT")
            print(f"# streamed after restart: TTFT {res['streamed_ttft_s']:.2f} s, cached "
                  f"{res['streamed_cached']:,}", flush=True)
            res["summaries_checked"], res["summaries_wrong"] = summaries_match_store(eng)
            print(f"# summaries on the device against the store: {res['summaries_wrong']} of "
                  f"{res['summaries_checked']:,} chunks differ", flush=True)
            before, faults = eng.stats(), major_faults()
            res["streamed_tok_s"] = rates_of(eng, doc, questions[2:], args.decode, "streamed")
            after = eng.stats()
            res["streamed_decode_major_faults"] = major_faults() - faults
            d = moved(before, after)
            hits, misses = d.get("chunk_cache_hits", 0), d.get("chunk_cache_misses", 0)
            res["chunk_cache_hit_rate"] = hits / max(hits + misses, 1)
            steps = args.repeats * args.decode
            res["store_bytes_per_token"] = d.get("stream_store_bytes", 0) / steps
            res["device_bytes_per_token"] = d.get("stream_device_bytes", 0) / steps
            res["streamed_counters"] = {k: v for k, v in d.items()
                                        if k.startswith(("stream_", "chunk_cache", "host_cache"))}
            res["cache_blocks_checked"], res["cache_blocks_wrong"] = cache_matches_store(eng)
            print(f"# chunk cache against the store: {res['cache_blocks_wrong']} of "
                  f"{res['cache_blocks_checked']:,} blocks differ", flush=True)
            res["replay_cap"] = default_cap = model_runner.MAX_STREAM_REPLAYS
            res["kv_parts"] = default_parts = kv_store_mod.KV_PARTS
            res["ahead_runners"] = eng.attn.spare
            res["due_runners"] = due_default = eng.attn.stream.due_runners
            profiled(eng, "streamed decode")

        # Each variant restarts as the measure above did (the chunk cache and host tier
        # empty, the page cache warm): the same questions, with other settings.
        res["variants"] = {}
        for k, variant in enumerate(args.variants):
            fields = variant.split(":")
            cap, ahead, replay, expect, packs, parts, defer, runners = (
                fields + [str(due_default), "1", str(default_parts), "1", "-"][
                    len(fields) - 3:])
            model_runner.MAX_STREAM_REPLAYS = int(cap)
            kv_store_mod.KV_PARTS = int(parts)
            release(eng)
            opts = dict(stream_opts, **({} if runners == "-" else
                                        {"kv_prefetch_runners": int(runners)}))
            try:
                with Engine(model, **opts) as eng:
                    tier = eng.attn.stream
                    tier.defer_prefetch = tier.defer_prefetch and defer == "1"
                    tier.ahead_runners = None if ahead == "all" else int(ahead)
                    tier.replay_runners = int(replay)
                    tier.expect_next = expect != "off"
                    if packs == "0":  # summaries read one value per chunk
                        eng.store_tier.store._pack_rows = lambda *a: None
                    if expect != "off":
                        tier.due_runners = int(expect)
                    t, _ = ttft(eng, doc + questions[1])
                    before = eng.stats()
                    rate = rates_of(eng, doc, questions[2:], args.decode,
                                    f"streamed ({variant})")
                    after = eng.stats()
                    wrong = cache_matches_store(eng)[1]
            finally:
                model_runner.MAX_STREAM_REPLAYS = default_cap
                kv_store_mod.KV_PARTS = default_parts
            d = moved(before, after)
            res["variants"][f"{k}: {variant}"] = dict(
                {key: d.get(key, 0) for key in
                 ("stream_graph_steps", "stream_graph_replays", "stream_graph_eager",
                  "stream_store_reads", "stream_prefetch_reads", "stream_prefetch_hits",
                  "stream_replay_ahead", "stream_due_loads", "stream_ahead_late")},
                tok_s=rate, ttft_s=t, step_ms=sorted(GAPS_ALL)[len(GAPS_ALL) // 2] * 1e3,
                max_ms=max(GAPS_ALL) * 1e3, blocks_wrong=wrong)
            print(f"#   variant {variant}: TTFT {t:.2f} s, {res['variants'][f'{k}: {variant}']}",
                  flush=True)

        if args.profile_ttft:  # one more restart, its TTFT under the torch profiler
            release(eng)
            with Engine(model, **stream_opts) as eng:
                profile_ttft(eng, doc + questions[1])
        if args.sample_ttft:  # and under the stack sampler
            from stack_sampler import sampled

            release(eng)
            with Engine(model, **stream_opts) as eng:
                t, _ = sampled(lambda: ttft(eng, doc + questions[1]), args.sample_ttft)
                print(f"stack-sampled streamed TTFT: wall {t * 1e3:.1f} ms", flush=True)
        if args.ttft_with_layer_ahead:  # the same restarts, with layer-ahead reads
            on = []
            for _ in range(args.ttft_with_layer_ahead):
                release(eng)
                with Engine(model, **stream_opts) as eng:
                    eng.attn.stream.layer_ahead = True
                    on.append(ttft(eng, doc + questions[1])[0])
            res["streamed_ttft_layer_ahead_s"] = on
            print("# streamed TTFT with layer-ahead reads, each restart: "
                  + ", ".join(f"{t:.3f}" for t in on) + f" s (median {statistics.median(on):.3f};"
                  f" without them {res['streamed_ttft_s']:.3f})", flush=True)
        if args.map_ab:  # A/B, interleaved: the writer's map at the file's size, or twice
            ab: dict[bool, list[tuple[float, float, bool]]] = {True: [], False: []}
            for i in range(args.map_ab):
                for at_file in (True, False):
                    release(eng)
                    with Engine(model, **stream_opts) as eng:
                        env = eng.store_tier.store._env
                        if at_file:
                            env._set_mapsize(os.path.getsize(os.path.join(env.path,
                                                                          "data.mdb")))
                        mapped = env.map_size()
                        ttft(eng, doc + questions[1])
                        label = f"map {'at the file' if at_file else 'twice the file'} {i + 1}"
                        rate = rates_of(eng, doc, questions[2:], args.decode, label)
                        ab[at_file].append((rate, max(GAPS_ALL), env.map_size() > mapped))
            res["map_ab"] = {str(k): v for k, v in ab.items()}
            for at_file, label in ((True, "at the file's size"), (False, "twice the file")):
                got = ab[at_file]
                print(f"# writer's map {label}: decode "
                      + ", ".join(f"{r:.1f}" for r, _, _ in got)
                      + f" tok/s (median {statistics.median(r for r, _, _ in got):.1f}); "
                      "slowest step " + ", ".join(f"{g * 1e3:.1f}" for _, g, _ in got)
                      + f" ms; the map grew in {sum(grew for *_, grew in got)} of {len(got)}",
                      flush=True)
        if args.timeline_ttft:  # and traced
            release(eng)
            with Engine(model, **stream_opts) as eng:
                trace: list = []
                before = eng.stats()
                with timers({}, trace) as parts:
                    t0 = time.perf_counter()
                    t, _ = ttft(eng, doc + questions[1])
                d = moved(before, eng.stats())
                print(f"# traced TTFT: {d.get('stream_store_reads', 0)} blocks read, "
                      f"{d.get('stream_layer_ahead_reads', 0)} read a layer ahead, of which "
                      f"{d.get('stream_layer_ahead_hits', 0)} taken by the next layer")
                print_timeline(trace, t0)
                print_parts(parts, "traced TTFT", 30)
                print(f"traced streamed TTFT: wall {t * 1e3:.1f} ms", flush=True)
        if args.cprofile_ttft:  # and under cProfile
            release(eng)
            with Engine(model, **stream_opts) as eng:
                cprofile_ttft(eng, doc + questions[1], args.cprofile_ttft)

        release(eng)
        with Engine(model, **common) as eng:
            res["resident_ttft_s"], res["resident_cached"] = ttft(eng, doc + questions[1])
            print(f"# resident after restart: TTFT {res['resident_ttft_s']:.2f} s", flush=True)
            res["resident_tok_s"] = rates_of(eng, doc, questions[2:], args.decode, "resident")
            res["prefix_tok_s"] = dict(PREFIX_RATES, tokens=PREFIX)
            profiled(eng, "resident decode")
    finally:
        if not args.keep_store:
            shutil.rmtree(root, ignore_errors=True)

    late = COMPILED[warm_compiles:]
    print(f"# Triton kernels compiled after the warm-up engine: {len(late)}"
          + (f" ({', '.join(sorted(set(late)))})" if late else ""))
    print(json.dumps(res))
    what = (f"random weights of the {args.shape} shape" if args.shape else
            args.model_path or "default model")
    pool = (f"; streamed KV pool {res['streamed_pool_tokens']:,} tokens" if args.capped
            else "")
    print(f"\nhardware: {hw}; {what}, {dtype}{pool}; document "
          f"{n:,} tokens, scope {scope:,}; chunk cache {args.cache_pages} pages; decode "
          f"{args.decode} tokens, median of {args.repeats}; store on local disk "
          f"({args.codec or 'default codec'}); page cache "
          f"{res['page_cache_before_streamed_gib']:.1f} GiB before the streamed TTFT")
    print("| measure | value |\n|---|---|")
    base = res["baseline_prefill_s"]
    how = ("the store-writing prefill, with Triton compiles: --skip-baseline"
           if args.skip_baseline else "no store, kernels compiled")
    print(f"| TTFT, prefill again ({how}) | {base:.2f} s |")
    if res["prefill_s"] is not None:
        print(f"| TTFT, prefill with the store written behind (first engine: with Triton "
              f"compiles) | {res['prefill_s']:.2f} s ({res['prefill_s'] / base:.2f}x the "
              f"baseline), of which {res['prefill_compile_s']:.1f} s compiling |")
    runs = res["streamed_ttft_all_s"]
    print(f"| TTFT after restart, streamed (cached {res['streamed_cached']:,} tokens; median "
          f"of {len(runs)} restarts, {min(runs):.2f}-{max(runs):.2f} s) | "
          f"{res['streamed_ttft_s']:.2f} s ({base / res['streamed_ttft_s']:.1f}x faster) |")
    print(f"| TTFT after restart, whole prefix loaded (cached {res['resident_cached']:,}) | "
          f"{res['resident_ttft_s']:.2f} s ({base / res['resident_ttft_s']:.1f}x faster) |")
    print(f"| decode tok/s, streamed / resident{f' ({args.decode}-token answers)' if PREFIX_RATES else ''} "
          f"| {res['streamed_tok_s']:.1f} / "
          f"{res['resident_tok_s']:.1f} ({res['streamed_tok_s'] / res['resident_tok_s']:.0%}) |")
    if "streamed" in PREFIX_RATES and "resident" in PREFIX_RATES:
        a, b = PREFIX_RATES["streamed"], PREFIX_RATES["resident"]
        print(f"| decode tok/s, streamed / resident, the same answers' first {PREFIX} tokens "
              f"| {a:.1f} / {b:.1f} ({a / b:.0%}) |")
    if res.get("streamed_tok_s_restarts"):
        every = res["streamed_tok_s_restarts"] + [res["streamed_tok_s"]]
        print("| decode tok/s, streamed, each restart (the measure last) / resident | "
              + ", ".join(f"{r:.1f} ({r / res['resident_tok_s']:.0%})" for r in every)
              + f" / {res['resident_tok_s']:.1f}; median "
              f"{statistics.median(every) / res['resident_tok_s']:.0%} |")
    print(f"| chunk-cache hit rate while decoding | {res['chunk_cache_hit_rate']:.1%} |")
    c = res["streamed_counters"]
    print(f"| streamed decode steps from the CUDA graph / replays after a miss / run eagerly "
          f"after {res['replay_cap']} replays | {c.get('stream_graph_steps', 0)} / "
          f"{c.get('stream_graph_replays', 0)} / {c.get('stream_graph_eager', 0)} |")
    print(f"| major page faults (blocks read from disk, not the page cache): streamed TTFT / "
          f"decode | {res['streamed_ttft_major_faults']:,} / "
          f"{res['streamed_decode_major_faults']:,} |")
    print(f"| blocks loaded ahead into the chunk cache / read by a later step / loaded while "
          f"the step that selected them replayed | {c.get('stream_device_prefetches', 0)} / "
          f"{c.get('stream_prefetch_hits', 0)} / {c.get('stream_ahead_late', 0)} |")
    print(f"| bytes read from the store per token | {res['store_bytes_per_token'] / 1e6:.2f} MB |")
    print(f"| chunk-cache blocks that differ from the store (after decode) | "
          f"{res['cache_blocks_wrong']} of {res['cache_blocks_checked']:,} |")
    print(f"| summaries on the device that differ from the store (after the TTFT) | "
          f"{res['summaries_wrong']} of {res['summaries_checked']:,} chunks |")
    print(f"| bytes copied into the chunk cache per token | "
          f"{res['device_bytes_per_token'] / 1e6:.2f} MB |")
    if res["variants"]:
        print(f"\nstreamed decode per variant, each after its own restart (the measure's "
              f"questions, {args.decode} tokens, median of {args.repeats}; resident "
              f"{res['resident_tok_s']:.1f} tok/s; the engine's own settings: "
              f"{res['replay_cap']} replays, {res['ahead_runners']} runners-up, none before a "
              f"replay, the last token's selection and {res['due_runners']} of its runners-up "
              f"loaded before the first step, a layer's K/V read split over up to "
              f"{res['kv_parts']} threads)")
        print("| replays before eager : runners-up per layer loaded ahead : and before a "
              "replay : the last token's runners-up loaded before the first step : summary "
              "packs read : K/V read parts : loads ahead during the next replay : runners-up "
              "ranked | tok/s (of "
              "resident) | median / max step ms | graph steps / replays / eager | store reads "
              "/ read ahead / hits / loaded before a replay / before the first step / loaded "
              "while the step that selected them replayed | TTFT s "
              "| blocks differing from the store |\n|---|---|---|---|---|---|---|")
        for key, v in res["variants"].items():
            share = v["tok_s"] / res["resident_tok_s"]
            print(f"| {key.split(': ')[1]} | {v['tok_s']:.1f} ({share:.0%}) | "
                  f"{v['step_ms']:.2f} / {v['max_ms']:.1f} | {v['stream_graph_steps']} / "
                  f"{v['stream_graph_replays']} / {v['stream_graph_eager']} | "
                  f"{v['stream_store_reads']} / {v['stream_prefetch_reads']} / "
                  f"{v['stream_prefetch_hits']} / {v['stream_replay_ahead']} / "
                  f"{v['stream_due_loads']} / {v['stream_ahead_late']} | "
                  f"{v['ttft_s']:.2f} | {v['blocks_wrong']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
