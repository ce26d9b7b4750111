"""Value types of the store and their on-disk encodings (headers, summaries, contexts).

KV element types: bf16 and fp8 are not numpy dtypes, so blocks hold raw bytes and
:func:`numpy_dtype` maps the fingerprint's dtype name to the numpy type that views
them: float16 -> np.float16, float32 -> np.float32, bfloat16 -> np.uint16 (bit pattern;
the engine converts with ``torch.from_numpy(a).view(torch.bfloat16)``), float8_* ->
np.uint8 (likewise).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import CorruptBlock

_DTYPES = {
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float": np.float32,
    "float8_e4m3fn": np.uint8,
    "float8_e5m2": np.uint8,
}


def normalize_dtype(name: str) -> str:
    """"torch.bfloat16" -> "bfloat16"; raises ValueError for an unsupported name."""
    short = str(name).removeprefix("torch.")
    if short not in _DTYPES:
        raise ValueError(f"unsupported KV dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return short


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds (or views the bits of) KV elements of dtype ``name``."""
    return np.dtype(_DTYPES[normalize_dtype(name)])


class ChunkRecord(NamedTuple):
    """One chunk to publish with :meth:`ChunkStore.put_chunks`.

    k, v: one array per layer, each [chunk_size, num_kv_heads, head_dim] of the store's
    dtype (bf16 as uint16 bits or as any 2-byte array), keys *before* RoPE; or one array
    [num_layers, chunk_size, num_kv_heads, head_dim].
    summary: float array [num_layers, n_desc, num_kv_heads, head_dim].
    parent_id: id of the previous chunk of the sequence, None for the first chunk.
    """

    chunk_id: str
    parent_id: str | None
    namespace: str
    token_ids: object  # Sequence[int] | np.ndarray, length chunk_size
    k: object
    v: object
    summary: np.ndarray


@dataclass(frozen=True)
class ChunkHeader:
    """Everything about a chunk except its KV and summary (times are Unix seconds)."""

    chunk_id: str
    parent_id: str | None
    namespace: str
    token_ids: tuple[int, ...]
    created: float
    last_used: float
    pin_count: int
    codec: str
    level: int
    kv_raw_bytes: int  # K+V of all layers before compression
    stored_bytes: int  # everything this chunk occupies in the store (charged to capacity)
    kv_crcs: tuple[int, ...]  # per layer, the CRC in that block's frame
    summary_crc: int
    summary_shape: tuple[int, ...]
    lru_key: bytes = field(default=b"", repr=False)


class ContextInfo(NamedTuple):
    """A named context: a chain of chunks ending at ``last_chunk_id``.

    ``lost_tokens``: tokens cut from the end of the chain since it was named (evicted or
    deleted chunks); ``token_count`` is what is left. 0 for a whole context.
    ``tail``: the document's token ids after its last whole chunk (fewer than a chunk),
    kept in the record itself: they have no KV in the store and are recomputed on use.
    """

    name: str
    namespace: str
    last_chunk_id: str | None
    token_count: int
    pinned: bool
    created: float
    last_used: float
    lost_tokens: int = 0
    tail: tuple[int, ...] = ()


# Header value: u32 crc32(rest) | u32 json_len | json | token ids (uint32 or uint64 LE).
_HDR = struct.Struct("<II")


def encode_header(h: ChunkHeader) -> bytes:
    toks = np.asarray(h.token_ids, dtype=np.uint64)
    wide = bool(toks.size and int(toks.max()) > 0xFFFFFFFF)
    meta = {
        "p": h.parent_id, "ns": h.namespace, "c": h.created, "u": h.last_used,
        "pin": h.pin_count, "codec": h.codec, "lvl": h.level, "raw": h.kv_raw_bytes,
        "sz": h.stored_bytes, "kc": list(h.kv_crcs), "sc": h.summary_crc,
        "ss": list(h.summary_shape), "w": wide, "lru": h.lru_key.hex(),
    }
    js = json.dumps(meta, separators=(",", ":")).encode()
    body = struct.pack("<I", len(js)) + js + toks.astype("<u8" if wide else "<u4").tobytes()
    return struct.pack("<I", zlib.crc32(body)) + body


_HEADER_ERRORS = (ValueError, KeyError, struct.error, json.JSONDecodeError, UnicodeDecodeError)


def _header_body(value: bytes | memoryview) -> tuple[bytes, memoryview]:
    """A header value's JSON and token bytes (a view of `value`), checksum verified;
    raises one of _HEADER_ERRORS."""
    mv = memoryview(value)
    crc, js_len = _HDR.unpack_from(mv)
    if zlib.crc32(mv[4:]) != crc:
        raise ValueError("checksum mismatch")
    return bytes(mv[8 : 8 + js_len]), mv[8 + js_len :]


def _header_parts(value: bytes | memoryview) -> tuple[dict[str, Any], np.ndarray]:
    """A header value's metadata and token ids (a view of `value`), checksum verified;
    raises one of _HEADER_ERRORS."""
    js, toks = _header_body(value)
    m = json.loads(js)
    return m, np.frombuffer(toks, dtype="<u8" if m["w"] else "<u4")


def decode_header(chunk_id: str, value: bytes | memoryview) -> ChunkHeader:
    """Parse and verify a header value; raises CorruptBlock(chunk_id, None, "header")."""
    try:
        m, toks = _header_parts(value)
        return ChunkHeader(
            chunk_id=chunk_id, parent_id=m["p"], namespace=m["ns"],
            token_ids=tuple(toks.tolist()), created=m["c"], last_used=m["u"],
            pin_count=m["pin"], codec=m["codec"], level=m["lvl"], kv_raw_bytes=m["raw"],
            stored_bytes=m["sz"], kv_crcs=tuple(m["kc"]), summary_crc=m["sc"],
            summary_shape=tuple(m["ss"]), lru_key=bytes.fromhex(m["lru"]),
        )
    except _HEADER_ERRORS as exc:
        raise CorruptBlock(chunk_id, None, "header", str(exc)) from exc


# encode_header's JSON starts with the parent and ends with the token width then the LRU
# key (hex): both read from those places without a JSON parse, where they are found there.
_PARENT_AT = b'{"p":"'
_WIDE_AT = b',"w":'


def header_link(chunk_id: str, value: bytes | memoryview) -> tuple[str | None, np.ndarray]:
    """A header's parent id and token ids (a copy), checksum verified: the part of
    `decode_header` that walking a chain needs, read from their places in the JSON
    encode_header writes (a third of decode_header's time; a header laid out otherwise is
    parsed). Raises CorruptBlock(chunk_id, None, "header")."""
    try:
        js, toks = _header_body(value)
        at = js.rfind(_WIDE_AT) + len(_WIDE_AT)
        wide = js[at : at + 5]
        if at >= len(_WIDE_AT) and wide in (b"true,", b"false") and (
                js.startswith(_PARENT_AT) and js[70:72] == b'",' or js.startswith(b'{"p":null,')):
            parent = js[6:70].decode() if js[5:6] == b'"' else None
            dtype = "<u8" if wide == b"true," else "<u4"
        else:
            m = json.loads(js)
            parent, dtype = m["p"], "<u8" if m["w"] else "<u4"
        return parent, np.frombuffer(toks, dtype=dtype).copy()
    except _HEADER_ERRORS as exc:
        raise CorruptBlock(chunk_id, None, "header", str(exc)) from exc


def quantize_summary(s: np.ndarray) -> bytes:
    """float [..., head_dim] -> ndim, shape, float32 per-row scales, int8 rows (raw bytes).

    Symmetric int8 per row of head_dim values: q = round(x / scale), scale = max|x| / 127.
    """
    s = np.asarray(s, dtype=np.float32)
    if s.ndim < 1 or not np.all(np.isfinite(s)):
        raise ValueError("summary must be a finite float array with at least one dimension")
    rows = s.reshape(-1, s.shape[-1]) if s.size else s.reshape(0, max(s.shape[-1], 1))
    scale = np.abs(rows).max(axis=1, initial=0.0) / 127.0
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    head = struct.pack(f"<I{s.ndim}I", s.ndim, *s.shape)
    return head + scale.astype("<f4").tobytes() + q.tobytes()


def split_summary(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse framing of :func:`quantize_summary`: (int8 [...shape], float32 scales [...shape[:-1]])."""
    (ndim,) = struct.unpack_from("<I", raw)
    shape = struct.unpack_from(f"<{ndim}I", raw, 4)
    off = 4 + 4 * ndim
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    scales = np.frombuffer(raw, dtype="<f4", count=n_rows, offset=off).reshape(shape[:-1])
    q = np.frombuffer(raw, dtype=np.int8, offset=off + 4 * n_rows).reshape(shape)
    return q, scales


def encode_context(c: ContextInfo) -> bytes:
    return json.dumps(c._asdict(), separators=(",", ":")).encode()


def decode_context(value: bytes) -> ContextInfo:
    d = json.loads(bytes(value))
    d["tail"] = tuple(d.get("tail", ()))  # records written before `tail` existed have none
    return ContextInfo(**d)
