"""Chunk store codecs and I/O: ratio and GB/s per codec, store write/read vs a plain file.

    python benchmarks/bench_store.py [--mb 64] [--level 3] [--dir /tmp]

Data is synthetic Gaussian KV (bf16 and fp16) and, with `--real-kv TOKENS`, the default
model's own KV: its K (before RoPE) and V of this repository's README text, prefilled on
the CPU in bf16 through the engine with a store, and read back from it. GB/s are of raw
(uncompressed) KV bytes on one core. Store and file reads are warm (page cache) in both
columns; the file write and the store's commit both fsync.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import lmdb
import numpy as np
import zstandard
from sglang_reattn.kv_store import CODECS, ChunkRecord, ChunkStore, chunk_hashes, codecs
from sglang_reattn.kv_store.synthetic import gaussian_kv


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_codecs(mb: int, level: int, data: dict[str, bytes] | None = None) -> None:
    """Ratio and speed of each codec on `data` ({label: 2-byte KV bytes}; default: `mb`
    MiB of Gaussian KV per dtype)."""
    what = "of Gaussian KV per dtype" if data is None else "of the default model's KV"
    print(f"\n## Codecs ({mb} MiB {what}, zstd level {level}, one core)\n")
    print("| data | codec | ratio | compress GB/s | decompress GB/s |")
    print("| --- | --- | --- | --- | --- |")
    if data is None:
        data = {dtype: gaussian_kv(np.random.default_rng(0), (mb << 20) // 2, dtype).tobytes()
                for dtype in ("bfloat16", "float16")}
    for dtype, raw in data.items():
        for codec in CODECS:
            payload = codecs.compress(raw, codec, level, 2)
            tc = best_of(lambda raw=raw, codec=codec: codecs.compress(raw, codec, level, 2))
            n = len(raw)
            td = best_of(lambda p=payload, c=codec, n=n: codecs.decompress(p, c, n, 2))
            assert bytes(codecs.decompress(payload, codec, len(raw), 2)) == raw
            if codec == "raw":  # no transform: nothing to time
                print(f"| {dtype} | raw | 1.000 | - | - |")
                continue
            print(f"| {dtype} | {codec} | {len(raw) / len(payload):.3f} | "
                  f"{len(raw) / tc / 1e9:.2f} | {len(raw) / td / 1e9:.2f} |")


def make_records(fp: dict, n_chunks: int) -> list[ChunkRecord]:
    rng = np.random.default_rng(1)
    c, layers = fp["chunk_size"], fp["num_layers"]
    tokens = rng.integers(0, 50_000, n_chunks * c, dtype=np.uint32)
    ids = chunk_hashes(tokens, c)
    shape = (layers, c, fp["num_kv_heads"], fp["head_dim"])
    recs, parent = [], None
    for i, cid in enumerate(ids):
        kv = gaussian_kv(rng, (2,) + shape, fp["dtype"])
        summary = rng.standard_normal((layers, 2, fp["num_kv_heads"], fp["head_dim"]), dtype=np.float32)
        recs.append(ChunkRecord(cid, parent, "", tokens[i * c : (i + 1) * c], kv[0], kv[1], summary))
        parent = cid
    return recs


def bench_store(mb: int, level: int, root: str, real: tuple | None = None) -> None:
    """Store writes and reads per codec against a plain file of the same bytes; real:
    (fingerprint, records) of real KV, else `mb` MiB of Gaussian KV."""
    if real is None:
        fp = {
            "architecture": "LlamaForCausalLM", "num_layers": 4, "num_kv_heads": 8,
            "head_dim": 128, "dtype": "bfloat16", "chunk_size": 64, "summary_kind": "minmax",
            "rope": {"theta": 500000.0}, "tokenizer_hash": "bench",
        }
        per_chunk = (2 * fp["num_layers"] * fp["chunk_size"] * fp["num_kv_heads"]
                     * fp["head_dim"] * 2)
        recs = make_records(fp, max(8, (mb << 20) // per_chunk))
        what = "bf16 Gaussian KV"
    else:
        fp, recs = real
        per_chunk = sum(x.nbytes for x in (recs[0].k, recs[0].v))
        what = "the default model's bf16 KV"
    n_chunks = len(recs)
    total = n_chunks * per_chunk
    blob = b"".join(np.ascontiguousarray(x).tobytes() for r in recs for x in (r.k, r.v))
    print(f"\n## Store vs plain file ({total >> 20} MiB of {what}, {n_chunks} chunks of "
          f"{fp['num_layers']} layers x [{fp['chunk_size']}, {fp['num_kv_heads']}, "
          f"{fp['head_dim']}] K and V, {per_chunk >> 10} KiB per chunk, batches of 8)\n")
    print("| what | write GB/s | read GB/s | bytes on disk / raw |")
    print("| --- | --- | --- | --- |")

    path = os.path.join(root, "plain.bin")
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.writelines(blob[i : i + (1 << 20)] for i in range(0, len(blob), 1 << 20))
        f.flush()
        os.fsync(f.fileno())
    tw = time.perf_counter() - t
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    tr = time.perf_counter() - t
    print(f"| plain file, sequential | {total / tw / 1e9:.2f} | {total / tr / 1e9:.2f} | 1.000 |")
    os.remove(path)

    for codec in CODECS:
        sdir = os.path.join(root, f"store-{codec}")
        with ChunkStore(sdir, fp, 4 * total + (64 << 20), codec=codec, level=level) as s:
            t = time.perf_counter()
            for i in range(0, n_chunks, 8):
                s.put_chunks(recs[i : i + 8])
            tw = time.perf_counter() - t
            ids = [r.chunk_id for r in recs]
            t = time.perf_counter()
            for layer in range(fp["num_layers"]):
                for i in range(0, n_chunks, 16):
                    s.get_kv_many(ids[i : i + 16], layer)
            tr = time.perf_counter() - t
            on_disk = s.stats()["file_bytes"]
        print(f"| ChunkStore {codec} | {total / tw / 1e9:.2f} | {total / tr / 1e9:.2f} | "
              f"{on_disk / total:.3f} |")
        shutil.rmtree(sdir)


def real_kv(n_tokens: int, root: str) -> tuple[dict, list[ChunkRecord]]:
    """The default model's KV of the first n_tokens of this repository's README (repeated
    if short): prefilled on the CPU in bf16 by the engine, written to a store, read back
    -> (the store's fingerprint, a record per whole chunk, with its stored summary)."""
    import torch

    from sglang_reattn import Engine

    torch.set_num_threads(os.cpu_count() or 1)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        text = f.read()
    path = os.path.join(root, "store-real")
    t = time.perf_counter()
    with Engine(device="cpu", dtype="bfloat16", kv_store_path=path,
                kv_store_codec="raw") as eng:
        ids = eng.tokenizer.encode(text)
        while len(ids) < n_tokens:
            ids += ids
        ids = ids[:n_tokens]
        eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
        eng.store_tier.flush()
    print(f"# real KV: {n_tokens} tokens of README.md prefilled (bf16, CPU) and stored in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    with ChunkStore(path, None, readonly=True) as s:
        fp = s.fingerprint
        c, layers = fp["chunk_size"], fp["num_layers"]
        toks = np.asarray(ids[: len(ids) // c * c], dtype=np.uint32)
        chain = chunk_hashes(toks, c)
        have = s.has_many(chain)
        chain = chain[: have.index(False) if False in have else len(chain)]
        summaries = s.get_summaries(chain)
        recs, parent = [], None
        kv = [s.get_kv_many(chain, layer) for layer in range(layers)]  # [L] (K, V) [n, ...]
        for i, cid in enumerate(chain):
            k = np.stack([kv[layer][0][i] for layer in range(layers)])
            v = np.stack([kv[layer][1][i] for layer in range(layers)])
            recs.append(ChunkRecord(cid, parent, "", toks[i * c:(i + 1) * c], k, v,
                                    summaries[i]))
            parent = cid
    shutil.rmtree(path)
    return fp, recs


def bench_summaries(n_chunks: int, root: str, per_pack: int = 256) -> None:
    """A streamed context's bulk summary read (`get_summaries(..., dequantize=False)`, what
    the streaming tier's attach does): one LMDB value per chunk, against summary packs of
    `per_pack` chunks. Default-model summary shape: 30 layers x min/max x 3 KV heads x 64;
    one token per chunk keeps the KV small (the summaries' size does not depend on it)."""
    fp = {
        "architecture": "LlamaForCausalLM", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
        "dtype": "bfloat16", "chunk_size": 1, "summary_kind": "minmax",
        "rope": {"theta": 100000.0}, "tokenizer_hash": "bench",
    }
    recs = make_records(fp, n_chunks)
    ids = [r.chunk_id for r in recs]
    sdir = os.path.join(root, "store-summaries")
    with ChunkStore(sdir, fp, 64 << 30, codec="raw") as s:
        for i in range(0, n_chunks, 256):
            s.put_chunks(recs[i: i + 256])
        del recs

        def median_read() -> float:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                s.get_summaries(ids, dequantize=False)
                times.append(time.perf_counter() - t)
            return sorted(times)[2]

        single = median_read()
        t = time.perf_counter()
        for i in range(0, n_chunks - per_pack + 1, per_pack):
            s.pack_summaries(ids[i: i + per_pack])
        tp = time.perf_counter() - t
        packed = median_read()
        nbytes = s.get_summaries(ids[:1], dequantize=False)[0].nbytes * n_chunks
    shutil.rmtree(sdir)
    print(f"\n## Bulk summary read ({n_chunks} chunks, {nbytes / n_chunks / 1024:.1f} KiB of "
          f"int8 summaries each, warm, median of 5)\n")
    print("| layout | read s | us per chunk | GB/s |\n| --- | --- | --- | --- |")
    for what, sec in (("one value per chunk", single), (f"packs of {per_pack}", packed)):
        print(f"| {what} | {sec:.3f} | {sec / n_chunks * 1e6:.1f} | {nbytes / sec / 1e9:.2f} |")
    print(f"(writing the packs took {tp:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="MiB of KV per measurement")
    ap.add_argument("--level", type=int, default=codecs.DEFAULT_LEVEL, help="zstd level")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--summaries", type=int, default=16384,
                    help="chunks of the bulk summary read (16384: a million tokens)")
    ap.add_argument("--real-kv", type=int, default=0, metavar="TOKENS",
                    help="also measure codecs and the store on the default model's KV of "
                         "this many tokens of README.md (0: synthetic KV only)")
    args = ap.parse_args()
    print(f"# bench_store: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, lmdb {lmdb.__version__}, "
          f"zstandard {zstandard.__version__}")
    print(f"command: python benchmarks/bench_store.py --mb {args.mb} --level {args.level} "
          f"--summaries {args.summaries} --real-kv {args.real_kv}")
    bench_codecs(args.mb, args.level)
    root = tempfile.mkdtemp(prefix="bench_store-", dir=args.dir)
    try:
        bench_store(args.mb, args.level, root)
        if args.real_kv:
            real = real_kv(args.real_kv, root)
            blob = b"".join(x.tobytes() for r in real[1] for x in (r.k, r.v))
            bench_codecs(len(blob) >> 20, args.level, {"default model, bf16": blob})
            del blob
            bench_store(0, args.level, root, real)
        bench_summaries(args.summaries, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
