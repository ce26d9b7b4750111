"""Block codecs: ``raw``, ``zstd`` and ``zstd-planes``, and the self-checking block frame.

``zstd-planes`` splits every element into byte planes before zstd (2-byte elements: a
high-byte plane then a low-byte plane; 4-byte: four planes, high first). The high bytes of
bf16/fp16 KV (sign, exponent, top mantissa bits) are very repetitive, the low bytes are
close to noise, so separating them is what makes zstd worth its time on KV.

Frame of every stored block (little-endian)::

    u32 crc32(rest) | u8 codec id | u8 itemsize | u16 reserved | u32 raw_len | payload

The CRC covers everything after itself, so a flipped bit anywhere is caught on read.
"""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import zstandard

from .errors import CorruptBlock

_FRAME = struct.Struct("<IBBHI")  # crc, codec id, itemsize, reserved, raw_len
FRAME_SIZE = _FRAME.size

CODEC_IDS = {"raw": 0, "zstd": 1, "zstd-planes": 2}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
DEFAULT_LEVEL = 3
_local = threading.local()  # zstd (de)compressor objects are not thread-safe


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def split_planes(raw: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    """[n * itemsize] bytes -> itemsize planes of n bytes, most significant byte first."""
    if itemsize == 1:
        return raw
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    out = np.empty((itemsize, a.shape[0]), dtype=np.uint8)
    for i in range(itemsize):  # one strided copy per plane: much faster than a.T copy
        out[i] = a[:, itemsize - 1 - i]
    return memoryview(out.reshape(-1))


def join_planes(planes: bytes | memoryview, itemsize: int) -> bytes | memoryview:
    """Inverse of :func:`split_planes` (a fresh buffer)."""
    if itemsize == 1:
        return planes
    a = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)
    out = np.empty((a.shape[1], itemsize), dtype=np.uint8)
    for i in range(itemsize):
        out[:, itemsize - 1 - i] = a[i]
    return memoryview(out.reshape(-1))


def compress(raw: bytes | memoryview, codec: str, level: int, itemsize: int) -> bytes:
    """Payload bytes of ``raw`` under ``codec`` (no frame)."""
    if codec == "raw":
        return bytes(raw)
    if codec == "zstd":
        return _compressor(level).compress(raw)
    if codec == "zstd-planes":
        return _compressor(level).compress(split_planes(raw, itemsize))
    raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODEC_IDS)}")


def decompress(
    payload: bytes | memoryview, codec: str, raw_len: int, itemsize: int
) -> bytes | memoryview:
    """Inverse of :func:`compress`; always a fresh buffer (safe after the txn ends)."""
    if codec == "raw":
        return bytes(payload)
    out = _decompressor().decompress(payload, max_output_size=raw_len)
    if codec == "zstd-planes":
        out = join_planes(out, itemsize)
    return out


def encode_block(raw: bytes | memoryview, codec: str, level: int, itemsize: int) -> bytes:
    """Frame + payload of one block, ready to be stored."""
    payload = compress(raw, codec, level, itemsize)
    body = _FRAME.pack(0, CODEC_IDS[codec], itemsize, 0, len(raw))[4:] + payload
    return struct.pack("<I", zlib.crc32(body)) + body


def decode_block(
    block: bytes | memoryview, chunk_id: str, layer: int | None, part: str, copy: bool = True
) -> bytes | memoryview:
    """Verify the CRC and decode a framed block; raises :class:`CorruptBlock`.

    copy=False lets a ``raw`` block come back as a view of ``block`` (only for callers
    that copy it before the read transaction ends); other codecs always return fresh bytes.
    """
    mv = memoryview(block)
    if len(mv) < FRAME_SIZE:
        raise CorruptBlock(chunk_id, layer, part, f"block of {len(mv)} bytes is shorter than its frame")
    crc, codec_id, itemsize, _, raw_len = _FRAME.unpack_from(mv)
    if zlib.crc32(mv[4:]) != crc:
        raise CorruptBlock(chunk_id, layer, part, "checksum mismatch")
    codec = CODEC_NAMES.get(codec_id)
    if codec is None or itemsize not in (1, 2, 4, 8):
        raise CorruptBlock(chunk_id, layer, part, f"bad frame (codec {codec_id}, itemsize {itemsize})")
    if codec == "raw" and not copy:
        out = mv[FRAME_SIZE:]
        if len(out) != raw_len:
            raise CorruptBlock(chunk_id, layer, part, f"{len(out)} bytes, expected {raw_len}")
        return out
    try:
        out = decompress(mv[FRAME_SIZE:], codec, raw_len, itemsize)
    except zstandard.ZstdError as exc:
        raise CorruptBlock(chunk_id, layer, part, f"zstd: {exc}") from exc
    if len(out) != raw_len:
        raise CorruptBlock(chunk_id, layer, part, f"decoded {len(out)} bytes, expected {raw_len}")
    return out


def block_crc(block: bytes) -> int:
    """The CRC stored in a block's frame (recorded in the chunk header for audits)."""
    return struct.unpack_from("<I", block)[0]
