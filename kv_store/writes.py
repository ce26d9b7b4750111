"""Turning a ChunkRecord into stored bytes, outside any transaction.

Validation, compression and checksums all happen here, before the write transaction
starts, so the transaction itself only copies bytes into LMDB and stays short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import codecs
from .records import ChunkHeader, ChunkRecord, encode_header, quantize_summary

_PAGE = 4096
_NODE_MAX = (_PAGE - 16) // 2  # bigger LMDB nodes go to overflow pages of their own


def lmdb_bytes(key_len: int, value_len: int) -> int:
    """About what one key/value costs in LMDB: small ones share leaf pages, big values
    take whole overflow pages (this is what capacity_bytes bounds)."""
    node = 8 + key_len + value_len
    if node <= _NODE_MAX:
        return node + 2
    return -(-(value_len + 16) // _PAGE) * _PAGE + 8 + key_len + 8 + 2


@dataclass
class PreparedChunk:
    cid: bytes
    parent: bytes | None
    namespace: str
    token_ids: np.ndarray
    blocks: list[bytes]  # per layer: framed K|V block
    summary: bytes  # framed quantized summary
    summary_shape: tuple[int, ...]
    codec: str
    level: int
    kv_raw_bytes: int
    stored_bytes: int = 0

    def header(self, now: float, lru_key: bytes) -> ChunkHeader:
        return ChunkHeader(
            chunk_id=self.cid.hex(), parent_id=self.parent.hex() if self.parent else None,
            namespace=self.namespace, token_ids=tuple(self.token_ids.tolist()),
            created=now, last_used=now, pin_count=0, codec=self.codec, level=self.level,
            kv_raw_bytes=self.kv_raw_bytes, stored_bytes=self.stored_bytes,
            kv_crcs=tuple(codecs.block_crc(b) for b in self.blocks),
            summary_crc=codecs.block_crc(self.summary), summary_shape=self.summary_shape,
            lru_key=lru_key,
        )


def _layers(x, num_layers: int, name: str) -> list[np.ndarray]:
    if isinstance(x, np.ndarray) and x.ndim == 4:
        x = list(x)
    if len(x) != num_layers:
        raise ValueError(f"{name}: {len(x)} layers given, the store has {num_layers}")
    return [np.asarray(a) for a in x]


def _check_layer(a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if a.shape != shape:
        raise ValueError(f"{what}: shape {a.shape}, expected [C, H, D] = {shape}")
    bit_container = dtype.kind == "u"  # bf16 / fp8 arrive as any dtype of the same width
    if a.dtype.itemsize != dtype.itemsize or (not bit_container and a.dtype != dtype):
        raise ValueError(f"{what}: dtype {a.dtype}, the store holds {dtype} ({dtype.itemsize} bytes)")


def prepare_chunk(
    r: ChunkRecord, num_layers: int, kv_shape: tuple[int, int, int], dtype: np.dtype,
    codec: str, level: int,
) -> PreparedChunk:
    """Validate one record and encode its blocks, summary and (size of) header."""
    tokens = np.asarray(r.token_ids)
    if tokens.shape != (kv_shape[0],):
        raise ValueError(f"chunk {r.chunk_id}: {tokens.size} token ids, chunk size is {kv_shape[0]}")
    ks, vs = _layers(r.k, num_layers, "k"), _layers(r.v, num_layers, "v")
    blocks = []
    for layer, (k, v) in enumerate(zip(ks, vs)):
        _check_layer(k, kv_shape, dtype, f"chunk {r.chunk_id} k[{layer}]")
        _check_layer(v, kv_shape, dtype, f"chunk {r.chunk_id} v[{layer}]")
        raw = np.ascontiguousarray(k).tobytes() + np.ascontiguousarray(v).tobytes()
        blocks.append(codecs.encode_block(raw, codec, level, dtype.itemsize))
    summary = np.asarray(r.summary)
    if summary.ndim != 4 or summary.shape[0] != num_layers or summary.shape[2:] != kv_shape[1:]:
        raise ValueError(
            f"chunk {r.chunk_id}: summary shape {summary.shape}, expected "
            f"[L, n_desc, H, D] = [{num_layers}, n_desc, {kv_shape[1]}, {kv_shape[2]}]"
        )
    summary_codec = "raw" if codec == "raw" else "zstd"
    sblock = codecs.encode_block(quantize_summary(summary), summary_codec, level, 1)
    p = PreparedChunk(
        cid=bytes.fromhex(r.chunk_id), parent=bytes.fromhex(r.parent_id) if r.parent_id else None,
        namespace=r.namespace, token_ids=tokens, blocks=blocks, summary=sblock,
        summary_shape=tuple(summary.shape), codec=codec, level=level,
        kv_raw_bytes=2 * num_layers * int(np.prod(kv_shape)) * dtype.itemsize,
    )
    header_len = len(encode_header(p.header(0.0, b"\0" * 40))) + 64  # slack: times, pins
    p.stored_bytes = (
        sum(lmdb_bytes(34, len(b)) for b in blocks)
        + lmdb_bytes(32, len(sblock)) + lmdb_bytes(32, header_len)
        + lmdb_bytes(40, 0) + lmdb_bytes(64, 0)  # LRU and children index entries
    )
    return p
