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


def test_insert_after_a_node_and_move_lock_equal_a_full_insert():
    """A growing sequence extends its own path (insert `after` its node, then move_lock):
    the same tree, pages, duplicates and lock counts as inserting it whole again."""
    c = 4
    seq = list(range(100, 100 + 10 * c))
    trees = [RadixCache(c), RadixCache(c)]
    other = seq[:6 * c]  # another request cached chunks 0..5 first, with its own pages
    for t in trees:
        t.insert(other, list(range(200, 206)))
    full, inc = trees
    # the request: chunks 0..3 matched and locked, then it grows to 7, then to 10 chunks
    nodes = []
    for t in trees:
        m = t.match_prefix(seq, max_tokens=4 * c)
        t.inc_lock(m.node)
        nodes.append(m.node)
    mine = list(range(300, 310))
    a = full.insert(seq[:7 * c], [200, 201, 202, 203] + mine[4:7])  # matched: tree pages
    full.dec_lock(nodes[0])
    full.inc_lock(a.node)
    b = inc.insert(seq[4 * c:7 * c], mine[4:7], after=nodes[1])
    inc.move_lock(nodes[1], b.node)
    assert a.pages[4:] == b.pages == [204, 205, 306] and a.duplicates == b.duplicates == [304, 305]
    a2 = full.insert(seq, a.pages + mine[7:])
    full.dec_lock(a.node)
    full.inc_lock(a2.node)
    b2 = inc.insert(seq[7 * c:], mine[7:], after=b.node)
    inc.move_lock(b.node, b2.node)
    assert a2.pages[7:] == b2.pages == mine[7:] and a2.node.depth == b2.node.depth == 10

    def locks(t):
        m = t.match_prefix(seq)
        out, node = [], m.node
        while node.parent is not None:
            out.append(node.lock_ref)
            node = node.parent
        return out, t.num_pages

    assert locks(full) == locks(inc) == ([1] * 10, 10)
