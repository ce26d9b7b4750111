"""Model fingerprint: what a store was made for, checked on every open."""

from __future__ import annotations

import json
from typing import Any

from .errors import ModelMismatch
from .records import normalize_dtype

REQUIRED_FIELDS = (
    "architecture",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "chunk_size",
    "summary_kind",
    "rope",
    "tokenizer_hash",
)
_MISSING = "<missing>"


def normalize(fp: dict[str, Any]) -> dict[str, Any]:
    """Validate and canonicalize a fingerprint (JSON round trip, dtype name normalized)."""
    missing = [k for k in REQUIRED_FIELDS if k not in fp]
    if missing:
        raise ValueError(f"fingerprint is missing required fields: {missing}")
    out = json.loads(json.dumps(fp, sort_keys=True, default=str))
    out["dtype"] = normalize_dtype(out["dtype"])
    for k in ("num_layers", "num_kv_heads", "head_dim", "chunk_size"):
        if not isinstance(out[k], int) or out[k] <= 0:
            raise ValueError(f"fingerprint field {k!r} must be a positive int, got {out[k]!r}")
    return out


def encode(fp: dict[str, Any]) -> bytes:
    return json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, Any]:
    return json.loads(bytes(raw))


def check(path: str, stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise ModelMismatch naming every field whose values differ (either side missing too)."""
    diff = {
        k: (stored.get(k, _MISSING), given.get(k, _MISSING))
        for k in sorted(set(stored) | set(given))
        if stored.get(k, _MISSING) != given.get(k, _MISSING)
    }
    if diff:
        raise ModelMismatch(path, diff)
