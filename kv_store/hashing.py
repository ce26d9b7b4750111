"""Chunk ids: SGLang's hierarchical-cache page hashes, optionally salted by a namespace.

Byte layout (SGLang ``get_hash_str``, ``python/sglang/srt/mem_cache/hicache_storage.py``,
later ``mem_cache/utils.py`` + the native ``cpp_utils/hash_binding.cpp``)::

    id[0] = SHA-256(                      tokens[0:C] as uint32 little-endian)
    id[i] = SHA-256(bytes.fromhex(id[i-1]) || tokens[i*C:(i+1)*C] as uint32 little-endian)

hex-encoded. The prior hash enters as its raw 32-byte digest, not as hex text. A page
holding a token id above 2**32 - 1 is hashed the way SGLang's native hasher does it: a
0xff tag byte, then every token of the page as uint64 little-endian (the odd length keeps
it apart from the uint32 layout).

Namespaces (``cache_salt`` / ``extra_key``): SGLang's in-memory radix tree keeps
namespaces apart, but its storage page hashes long ignored them (sglang issue #26747;
fixed upstream by seeding the chain, PRs #37058 / #38577, whose exact byte framing we
did not find). Here a non-empty namespace seeds the chain: the first chunk's prior hash
is ``SHA-256(b"sglang_reattn/namespace/v1\\0" || uint32_le(len(ns)) || ns_utf8)``, so
tenants never share a chunk id. The empty namespace has no seed and gives exactly
SGLang's unsalted hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_NAMESPACE_TAG = b"sglang_reattn/namespace/v1\x00"
_U32_MAX = 0xFFFFFFFF
_WIDE_TAG = b"\xff"


def namespace_seed(namespace: str) -> bytes | None:
    """The 32-byte prior digest that starts a chain in ``namespace``; None for ""."""
    if not namespace:
        return None
    raw = namespace.encode("utf-8")
    return hashlib.sha256(_NAMESPACE_TAG + len(raw).to_bytes(4, "little") + raw).digest()


def _token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.uint32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError("token ids must be non-negative")
    return arr


def _page_bytes(page: np.ndarray) -> bytes:
    if page.size and int(page.max()) > _U32_MAX:
        return _WIDE_TAG + page.astype("<u8").tobytes()
    return page.astype("<u4").tobytes()


def chunk_digest(token_ids: Sequence[int] | np.ndarray, prior: bytes | None) -> bytes:
    """One chunk's raw 32-byte digest after the raw ``prior`` digest (None at a root)."""
    h = hashlib.sha256()
    if prior is not None:
        assert len(prior) == 32, "prior digest must be 32 bytes"
        h.update(prior)
    h.update(_page_bytes(_token_array(token_ids)))
    return h.digest()


def chunk_id(token_ids: Sequence[int] | np.ndarray, parent_id: str | None, namespace: str = "") -> str:
    """The id of one chunk given its parent's id (None for the first chunk of a sequence)."""
    prior = bytes.fromhex(parent_id) if parent_id else namespace_seed(namespace)
    return chunk_digest(token_ids, prior).hex()


def chunk_hashes(
    token_ids: Sequence[int] | np.ndarray,
    chunk_size: int,
    namespace: str = "",
    prior_hash: str | None = None,
) -> list[str]:
    """Hex ids of every *full* chunk of ``token_ids`` (a trailing partial chunk is dropped).

    ``prior_hash`` continues an existing chain (the id of the chunk before
    ``token_ids[0]``); without it the chain starts at the namespace's seed.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    arr = _token_array(token_ids)
    n_full = arr.size // chunk_size
    prior = bytes.fromhex(prior_hash) if prior_hash else namespace_seed(namespace)
    if not n_full:
        return []
    # The pages' bytes converted at once (chunk_digest per page, in bulk), one hash object
    # per page over the prior digest and the page: a million-token sequence hashes in a
    # few tens of milliseconds.
    pages = arr[: n_full * chunk_size].reshape(n_full, chunk_size)
    wide = (set(np.flatnonzero((pages > _U32_MAX).any(1)).tolist())
            if pages.dtype.itemsize > 4 else ())  # pages hashed as uint64
    narrow = pages.astype("<u4").tobytes()
    step = 4 * chunk_size
    sha256 = hashlib.sha256
    digests: list[bytes] = []
    keep = digests.append
    for i, at in enumerate(range(0, n_full * step, step)):
        page = _page_bytes(pages[i]) if i in wide else narrow[at:at + step]
        prior = sha256(prior + page if prior is not None else page).digest()
        keep(prior)
    hexed = b"".join(digests).hex()
    return [hexed[j:j + 64] for j in range(0, len(hexed), 64)]
