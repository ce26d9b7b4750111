from __future__ import annotations

from sglang_reattn.engine.radix_cache import RadixCache


def test_match_insert_lock_evict():
    c = RadixCache(page_size=4)
    a = list(range(10))  # 2 full chunks + 2 tokens
    res = c.insert(a, [11, 12])
    assert res.pages == [11, 12] and res.duplicates == [] and c.num_pages == 2
    m = c.match_prefix(a + [99])
    assert m.pages == [11, 12]
    assert c.match_prefix(a, max_tokens=7).pages == [11]
    assert c.match_prefix([0, 1, 2, 9]).pages == []
    # Another namespace never sees these chunks.
    assert c.match_prefix(a, namespace="tenant-b").pages == []
    # Same chunks inserted again with other pages: ours are reported as duplicates.
    res2 = c.insert(a[:8] + [7, 7, 7, 7], [21, 22, 23])
    assert res2.pages == [11, 12, 23] and res2.duplicates == [21, 22]
    c.inc_lock(res2.node)
    # Locked path: only the unlocked sibling branch... none; nothing evictable but none.
    assert c.evict(10) == []
    c.dec_lock(res2.node)
    freed = c.evict(1)
    assert freed == [23]  # leaves go first
    assert sorted(c.evict(10)) == [11, 12] and c.num_pages == 0


def test_lru_order():
    c = RadixCache(page_size=2)
    c.insert([1, 1], [1])
    c.insert([2, 2], [2])
    c.insert([3, 3], [3])
    c.match_prefix([1, 1])  # touch: 1 is now the most recent
    assert c.evict(2) == [2, 3]
    assert c.reset() == [1]
