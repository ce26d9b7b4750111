"""Deterministic synthetic chunks for tests and benchmarks (no model needed).

A chunk's KV and summary are a pure function of its id, so any process can check what
it reads back knowing only the id and the fingerprint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .hashing import chunk_hashes
from .records import ChunkRecord, normalize_dtype


def tiny_fingerprint(
    num_layers: int = 2, num_kv_heads: int = 1, head_dim: int = 8, chunk_size: int = 64,
    dtype: str = "float16", **overrides: Any,
) -> dict[str, Any]:
    fp = {
        "architecture": "LlamaForCausalLM", "num_layers": num_layers,
        "num_kv_heads": num_kv_heads, "head_dim": head_dim, "dtype": dtype,
        "chunk_size": chunk_size, "summary_kind": "minmax",
        "rope": {"type": "default", "theta": 10000.0}, "tokenizer_hash": "0" * 16,
    }
    fp.update(overrides)
    return fp


def gaussian_kv(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Gaussian values stored as ``dtype`` (bf16 as uint16 bits, fp8 as uint8 bytes)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    name = normalize_dtype(dtype)
    if name in ("float16", "half"):
        return x.astype(np.float16)
    if name in ("float32", "float"):
        return x
    if name == "bfloat16":  # round to nearest even on the top 16 bits of the fp32 pattern
        bits = x.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return (x.view(np.uint32) >> 24).astype(np.uint8)  # fp8 stand-in: any byte pattern


def kv_for(chunk_id: str, fp: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """K and V of a chunk, each [L, C, H, D], a function of its id."""
    rng = np.random.default_rng(int(chunk_id[:16], 16))
    shape = (fp["num_layers"], fp["chunk_size"], fp["num_kv_heads"], fp["head_dim"])
    both = gaussian_kv(rng, (2,) + shape, fp["dtype"])
    return both[0], both[1]


def summary_for(chunk_id: str, fp: dict[str, Any], n_desc: int = 2) -> np.ndarray:
    """A float32 summary [L, n_desc, H, D], a function of the id."""
    rng = np.random.default_rng(int(chunk_id[16:32], 16))
    shape = (fp["num_layers"], n_desc, fp["num_kv_heads"], fp["head_dim"])
    return rng.standard_normal(shape, dtype=np.float32)


def make_chain(
    fp: dict[str, Any], n_chunks: int, seed: int = 0, namespace: str = "",
    parent_id: str | None = None, n_desc: int = 2,
) -> list[ChunkRecord]:
    """``n_chunks`` consecutive chunks of random tokens, continuing ``parent_id``."""
    c = fp["chunk_size"]
    tokens = np.random.default_rng(seed).integers(0, 50_000, size=n_chunks * c, dtype=np.uint32)
    ids = chunk_hashes(tokens, c, namespace, prior_hash=parent_id)
    out, parent = [], parent_id
    for i, cid in enumerate(ids):
        k, v = kv_for(cid, fp)
        out.append(ChunkRecord(cid, parent, namespace, tokens[i * c : (i + 1) * c], k, v,
                               summary_for(cid, fp, n_desc)))
        parent = cid
    return out
