"""Block codecs: ``raw``, ``zstd`` and ``zstd-planes``, and the self-checking block frame.

``zstd-planes`` splits every element into byte planes before zstd (2-byte elements: a
high-byte plane then a low-byte plane; 4-byte: four planes, high first). The high bytes of
bf16/fp16 KV (sign, exponent, top mantissa bits) are very repetitive, the low bytes are
close to noise, so separating them is what makes zstd worth its time on KV.

Frame of every stored block (little-endian)::

    u32 check(rest) | u8 codec id | u8 itemsize | u16 check kind | u32 raw_len | payload

The check covers everything after itself, so a flipped bit anywhere is caught on read. Its
kind (the u16, reserved and zero in format 2) is
- 0, ``crc32``: zlib's CRC-32 of the rest (blocks written by format 2);
- 1, ``mix``: a weighted sum of the payload's 64-bit words (:func:`mix_checks`), which
  numpy computes for many blocks in one pass, about twice as fast as CRC-32 on one block at
  a time (10 against 19 us per 48 KiB block on the H200's host, 5 against 12 on a 2-core
  machine; ``benchmarks/bench_block_checks.py``). New blocks get this one.
"""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np
import zstandard

from .errors import CorruptBlock

_FRAME = struct.Struct("<IBBHI")  # check, codec id, itemsize, check kind, raw_len
_U64 = struct.Struct("<Q")
FRAME_SIZE = _FRAME.size

CODEC_IDS = {"raw": 0, "zstd": 1, "zstd-planes": 2}
CHECK_CRC32, CHECK_MIX = 0, 1  # the frame's check kinds
WRITE_CHECK = CHECK_MIX  # the kind new blocks get (benchmarks and tests write CRC-32 too)
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


# ------------------------------------------------------------------ the ``mix`` check
#
# Of a block whose frame's bytes 4..12 read h (a little-endian u64) and whose payload is
# P bytes: with w_i the payload's little-endian 64-bit words (the last one zero-padded) and
# m_i = splitmix64(i + 1) | 1 (odd weights),
#
#     s = h * K_HEAD + P * K_LEN + sum_i w_i * m_i   (mod 2**64)
#
# and the check is the low 32 bits of murmur3's 64-bit finalizer of s. A change confined
# to one word (any flipped bit or byte) changes s, as an odd weight is invertible mod 2**64;
# a changed s passes with a chance of 2**-32, as with a CRC-32 on random damage.

_M64 = (1 << 64) - 1
_K_HEAD, _K_LEN = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
_FMIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_weights_cache = np.empty(0, dtype=np.uint64)


def _weights(n: int) -> np.ndarray:
    """The first n weights m_i (uint64); the table grows to twice its size when short."""
    global _weights_cache
    w = _weights_cache
    if len(w) < n:
        i = np.arange(1, max(n, 2 * len(w), 1 << 13) + 1, dtype=np.uint64)
        z = i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        w = (z ^ (z >> np.uint64(31))) | np.uint64(1)
        _weights_cache = w  # (a thread holding the old table keeps it: same values)
    return w[:n]


def _finish(s: np.ndarray, heads: np.ndarray, nbytes: int) -> np.ndarray:
    """uint64 sums [n] -> uint32 checks [n] (the head and length terms, then the finalizer)."""
    s = s + heads * np.uint64(_K_HEAD) + np.uint64(nbytes * _K_LEN & _M64)
    s ^= s >> np.uint64(33)
    s *= np.uint64(_FMIX[0])
    s ^= s >> np.uint64(33)
    s *= np.uint64(_FMIX[1])
    s ^= s >> np.uint64(33)
    return (s & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def mix_checks(rows: np.ndarray, heads: np.ndarray, nbytes: int | None = None
               ) -> np.ndarray:
    """``mix`` checks [n] (uint32) of n payloads of one size: rows [n, R] uint8 (C-contiguous
    rows, R a multiple of 8), heads [n] their frames' bytes 4..12 as uint64; nbytes: the
    payloads' length when the rows are them zero-padded (default R). The weighted sums in
    one pass of numpy over all rows, without a temporary (einsum: 4.5 us a 48 KiB block on
    the CI machine, against 9.3 for a product then a sum), releasing the interpreter
    lock."""
    width = rows.shape[1]
    words = rows.view("<u8")
    sums = np.einsum("ij,j->i", words, _weights(words.shape[1]))
    return _finish(sums, np.asarray(heads, dtype=np.uint64),
                   width if nbytes is None else nbytes)


def mix_check(body: bytes | memoryview) -> int:
    """The ``mix`` check of one block's bytes after its check field (frame bytes 4..12,
    then the payload, of any length): `mix_checks`'s arithmetic on one payload, with the
    finish in Python integers (a numpy call per step costs more than the sum on one block)."""
    mv = memoryview(body).cast("B")
    nbytes = len(mv) - 8
    whole = nbytes - nbytes % 8
    words = np.frombuffer(mv, dtype="<u8", count=whole // 8, offset=8)
    s = int(np.einsum("i,i->", words, _weights(len(words)))) if whole else 0
    if whole < nbytes:  # the last word, zero-padded
        tail = int.from_bytes(bytes(mv[8 + whole:]), "little")
        s += tail * int(_weights(len(words) + 1)[-1])
    s = (s + frame_head(mv, 0) * _K_HEAD + nbytes * _K_LEN) & _M64
    s ^= s >> 33
    s = s * _FMIX[0] & _M64
    s ^= s >> 33
    s = s * _FMIX[1] & _M64
    s ^= s >> 33
    return s & 0xFFFFFFFF


def frame_head(block: bytes | memoryview, at: int = 4) -> int:
    """A block's frame bytes 4..12 (at `at` in `block`) as the u64 the ``mix`` check
    weighs."""
    return _U64.unpack_from(block, at)[0]


def raw_mix_payload(block: bytes | memoryview) -> tuple[int, int, memoryview] | None:
    """(stored check, frame head as `frame_head` reads it, payload view) of a ``raw`` block
    framed with a ``mix`` check, its check NOT verified (the caller checks it with
    :func:`mix_checks`, e.g. after copying many of them); None for any other block (read it
    with :func:`decode_block`). One parse of the frame."""
    mv = memoryview(block)
    if len(mv) < FRAME_SIZE:
        return None
    check, codec_id, _, kind, raw_len = _FRAME.unpack_from(mv)
    if codec_id != CODEC_IDS["raw"] or kind != CHECK_MIX or len(mv) - FRAME_SIZE != raw_len:
        return None
    return check, frame_head(mv), mv[FRAME_SIZE:]


def _check(body: memoryview, kind: int) -> int | None:
    """The check of ``kind`` over a block's bytes after its check field (None: unknown)."""
    if kind == CHECK_CRC32:
        return zlib.crc32(body)
    if kind == CHECK_MIX:
        return mix_check(body)
    return None


def encode_block(raw: bytes | memoryview, codec: str, level: int, itemsize: int,
                 check: int | None = None) -> bytes:
    """Frame + payload of one block, ready to be stored (``check``: its kind, default
    WRITE_CHECK)."""
    check = WRITE_CHECK if check is None else check
    payload = compress(raw, codec, level, itemsize)
    body = _FRAME.pack(0, CODEC_IDS[codec], itemsize, check, len(raw))[4:] + payload
    value = _check(memoryview(body), check)
    if value is None:
        raise ValueError(f"unknown check kind {check}")
    return struct.pack("<I", value) + body


def decode_block(
    block: bytes | memoryview, chunk_id: str, layer: int | None, part: str, copy: bool = True
) -> bytes | memoryview:
    """Verify the check and decode a framed block; raises :class:`CorruptBlock`.

    copy=False lets a ``raw`` block come back as a view of ``block`` (only for callers
    that copy it before the read transaction ends); other codecs always return fresh bytes.
    """
    mv = memoryview(block)
    if len(mv) < FRAME_SIZE:
        raise CorruptBlock(chunk_id, layer, part, f"block of {len(mv)} bytes is shorter than its frame")
    crc, codec_id, itemsize, kind, raw_len = _FRAME.unpack_from(mv)
    value = _check(mv[4:], kind)
    if value is None:
        raise CorruptBlock(chunk_id, layer, part, f"bad frame (check kind {kind})")
    if value != crc:
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
    """The check stored in a block's frame (recorded in the chunk header for audits)."""
    return struct.unpack_from("<I", block)[0]
