"""Chunk ids equal SGLang's hierarchical-cache page hashes; namespaces separate tenants."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from sglang_reattn.kv_store import chunk_hashes, chunk_id, namespace_seed


def sglang_get_hash_str(token_ids, prior_hash=None):
    """SGLang's get_hash_str (mem_cache/hicache_storage.py), rewritten here on purpose."""
    hasher = hashlib.sha256()
    if prior_hash:
        hasher.update(bytes.fromhex(prior_hash))
    for t in token_ids:
        hasher.update(int(t).to_bytes(4, byteorder="little", signed=False))
    return hasher.hexdigest()


def sglang_page_hashes(token_ids, page_size, prior_hash=None):
    """What HiRadixCache stores per full page: a chain of get_hash_str over pages."""
    out = []
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        prior_hash = sglang_get_hash_str(token_ids[start : start + page_size], prior_hash)
        out.append(prior_hash)
    return out


def test_literal_values():
    # sha256(u32le 1, u32le 2), then sha256(digest || u32le 3, u32le 4)
    assert chunk_hashes([1, 2, 3, 4], 2) == [
        "34fb5c825de7ca4aea6e712f19d439c1da0c92c37b423936c5f618545ca4fa1f",
        "c57b445f90651b9a650e516ab2238c965b21af35608a31c303e6d9e407f2915c",
    ]


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_sglang(chunk_size, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 2**32 - 1, size=5 * chunk_size + chunk_size // 2, dtype=np.uint64).tolist()
    want = sglang_page_hashes(tokens, chunk_size)
    assert len(want) == 5
    assert chunk_hashes(tokens, chunk_size) == want
    assert chunk_hashes(np.array(tokens, dtype=np.int64), chunk_size) == want
    # continuing a chain from a prior hash, and one chunk at a time
    assert chunk_hashes(tokens[chunk_size:], chunk_size, prior_hash=want[0]) == want[1:]
    assert chunk_id(tokens[chunk_size : 2 * chunk_size], want[0]) == want[1]


def test_partial_chunk_dropped_and_empty():
    assert chunk_hashes([5, 6, 7], 2) == chunk_hashes([5, 6], 2)
    assert chunk_hashes([], 4) == []
    with pytest.raises(ValueError):
        chunk_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        chunk_hashes([-1, 2], 2)


def test_namespace_seeds_chain():
    tokens = list(range(32))
    plain = chunk_hashes(tokens, 8)
    assert chunk_hashes(tokens, 8, namespace="") == plain
    a = chunk_hashes(tokens, 8, namespace="tenant-a")
    b = chunk_hashes(tokens, 8, namespace="tenant-b")
    assert len({a[0], b[0], plain[0]}) == 3 and not set(a) & set(b) and not set(a) & set(plain)
    # the documented seed: SHA-256(tag || u32le len || utf-8), used as the first prior hash
    seed = hashlib.sha256(b"sglang_reattn/namespace/v1\x00" + (8).to_bytes(4, "little") + b"tenant-a")
    assert namespace_seed("tenant-a") == seed.digest()
    assert a == sglang_page_hashes(tokens, 8, prior_hash=seed.hexdigest())
    assert chunk_id(tokens[:8], None, "tenant-a") == a[0]


def test_wide_token_ids_follow_sglang_native_layout():
    # SGLang's native hasher: 0xff tag, then the page's tokens as uint64 LE
    page = [1, 2**33]
    want = hashlib.sha256(b"\xff" + np.array(page, dtype="<u8").tobytes()).hexdigest()
    assert chunk_hashes(page, 2) == [want]
