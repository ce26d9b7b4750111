"""Time to first token of a question over a long stored document after a restart: sent
with the document's token ids, and by the name of a stored context.

    python benchmarks/bench_context_ttft.py [--tokens 1M] [--repeats 3] [--dir /tmp]

A random model (`--shape tiny`: 4 layers; `default`: the default model's shapes) trained
to 8K, so ReAttention's default scope (sink 64, top-62 chunks of 64 tokens, local window
2,048), and a synthetic store holding a document
of `--tokens` random tokens (its chunks' K/V and summaries are synthetic, with summary
packs as the engine writes them), named "doc". Each repeat starts new engines on the
store, as a restarted server, with a streamed KV pool far smaller than the document:
- the question sent with the document's ids (`input_ids=doc + question`);
- the question sent with `context="doc"`, the first request of its engine, then a second
  question on the same engine.
Median of `--repeats`. The model is tiny, so on a CPU the question's own prefill (its
top-k selection over 16K chunks in torch) is a fixed part of every figure.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from sglang_reattn import Engine
from sglang_reattn.kv_store import ChunkRecord, chunk_hashes
from sglang_reattn.kv_store.synthetic import kv_for, summary_for
from sglang_reattn.testing import make_tiny_model

PACK = 256  # chunks per summary pack, as the engine writes them
SHAPES = {"tiny": dict(num_hidden_layers=4),
          "default": dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          head_dim=64, hidden_size=576, intermediate_size=1536)}


def parse_size(text: str) -> int:
    text = text.upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def build_store(model: str, store: str, tokens: np.ndarray, opts: dict) -> None:
    c = opts["reattn_chunk_size"]
    with Engine(model, kv_store_path=store, **opts) as eng:
        st = eng.store_tier.store
        fp = st.fingerprint
        ids = chunk_hashes(tokens, c)
        parent = None
        for lo in range(0, len(ids), 1024):
            recs = []
            for i in range(lo, min(lo + 1024, len(ids))):
                k, v = kv_for(ids[i], fp)
                recs.append(ChunkRecord(ids[i], parent, "", tokens[i * c:(i + 1) * c], k, v,
                                        summary_for(ids[i], fp)))
                parent = ids[i]
            st.put_chunks(recs, verify_ids=False)
        for lo in range(0, len(ids) - PACK + 1, PACK):
            st.pack_summaries(ids[lo:lo + PACK])
        st.put_context("doc", ids[-1], len(ids) * c)


def cprofiled(eng, fn, top: int):
    """fn() under cProfile, on the calling thread and on the engine's thread (which admits
    and runs the request); prints the `top` functions by own time, then by time inside, and
    returns fn's result. From Python 3.12 cProfile runs on sys.monitoring, which sees every
    thread and allows one profiler at a time: one profile then covers both threads (the
    calling thread waits while the engine's runs, so their calls hardly interleave)."""
    if sys.version_info >= (3, 12):
        profs = [("both threads", cProfile.Profile())]
        start, stop = [profs[0][1].enable], [profs[0][1].disable]
    else:
        profs = [("calling thread", cProfile.Profile()), ("engine thread", cProfile.Profile())]
        start = [profs[0][1].enable, lambda: eng._call(profs[1][1].enable)]
        stop = [profs[0][1].disable, lambda: eng._call(profs[1][1].disable)]
    for f in start:
        f()
    try:
        out = fn()
    finally:
        for f in stop:
            f()
    for label, prof in profs:
        for key in ("tottime", "cumulative"):
            print(f"## {label}, by {key}")
            pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(top)
    return out


def ttft(eng, **kw) -> tuple[float, int]:
    t = time.perf_counter()
    out = eng.generate(sampling_params={"max_new_tokens": 1, "temperature": 0}, **kw)
    return time.perf_counter() - t, out["meta_info"]["cached_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--shape", choices=("tiny", "default"), default="tiny",
                    help="tiny: 4 layers; default: the default model's shapes (30 layers, 9 "
                         "query and 3 KV heads of 64, hidden 576), random weights")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="after the repeats, one more restart whose TTFT (the document's ids "
                         "sent) runs under cProfile: its N costliest functions, by own time "
                         "and by time inside")
    ap.add_argument("--sample", type=int, default=0, metavar="N",
                    help="one more restart whose TTFT runs under a stack sampler "
                         "(stack_sampler.py): its N costliest lines and functions per thread")
    args = ap.parse_args()
    n = parse_size(args.tokens)
    c = 64
    root = tempfile.mkdtemp(prefix="bench_context_", dir=args.dir)
    try:
        model = make_tiny_model(f"{root}/model", "llama", max_position_embeddings=8192,
                                **SHAPES[args.shape])
        store = f"{root}/store"
        opts = dict(device=args.device, dtype=args.dtype, reattn_chunk_size=c,
                    chunked_prefill_size=2048,
                    log_level="warning", context_length=n + 4096)
        doc = np.random.default_rng(0).integers(3, 49152, n // c * c, dtype=np.int64)
        t = time.perf_counter()
        build_store(model, store, doc, opts)
        built = time.perf_counter() - t
        doc_ids = doc.tolist()
        streamed = dict(opts, max_total_tokens=c * 256 + 8192, kv_chunk_cache_pages=160,
                        kv_resident_max_tokens=4096)
        rows: dict[str, list[float]] = {}
        cached: dict[str, int] = {}
        rng = np.random.default_rng(1)

        def question() -> list[int]:
            return rng.integers(3, 49152, 24).tolist()

        for _ in range(args.repeats):
            with Engine(model, kv_store_path=store, **streamed) as eng:
                label = "document's ids sent, after a restart"
                sec, cached[label] = ttft(eng, input_ids=doc_ids + question())
                rows.setdefault(label, []).append(sec)
            with Engine(model, kv_store_path=store, **streamed) as eng:
                for label in ("named context, after a restart",
                              "named context, the engine's second question"):
                    sec, cached[label] = ttft(eng, input_ids=question(), context="doc")
                    rows.setdefault(label, []).append(sec)
        if args.cprofile:
            with Engine(model, kv_store_path=store, **streamed) as eng:
                q = question()
                sec, _ = cprofiled(eng, lambda: ttft(eng, input_ids=doc_ids + q), args.cprofile)
            print(f"# TTFT under cProfile (document's ids sent): {sec * 1e3:.0f} ms")
        if args.sample:
            from stack_sampler import sampled

            with Engine(model, kv_store_path=store, **streamed) as eng:
                q = question()
                sec, _ = sampled(lambda: ttft(eng, input_ids=doc_ids + q), args.sample)
            print(f"# TTFT under the stack sampler (document's ids sent): {sec * 1e3:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    hw = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
          else f"{platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"# {hw}; {args.shape} shape, random weights ({SHAPES[args.shape]}), document {n:,} tokens in {n // c:,} chunks of {c}, "
          f"synthetic store built in {built:.0f} s; median of {args.repeats}\n")
    print("| question | TTFT | cached tokens |\n|---|---|---|")
    for label, secs in rows.items():
        print(f"| {label} | {statistics.median(secs) * 1e3:.0f} ms | {cached[label]:,} |")


if __name__ == "__main__":
    main()
