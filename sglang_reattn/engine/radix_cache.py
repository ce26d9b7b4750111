"""Chunk-aligned radix tree over KV pages (one node = one full chunk = one page).

Like SGLang's paged radix cache with page size C: only whole chunks are shared, keyed by
their C token ids, under one root per namespace (`extra_key` / `cache_salt`), so tenants
never share entries. Nodes carry a lock count (requests using the path) and a last-access
time; unlocked leaves are evicted LRU and their pages go back to the pool.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import NamedTuple


class TreeNode:
    __slots__ = ("key", "page", "parent", "children", "lock_ref", "last_access", "depth")

    def __init__(self, key: tuple[int, ...], page: int, parent: "TreeNode | None") -> None:
        self.key = key
        self.page = page
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.lock_ref = 0
        self.last_access = time.monotonic()
        self.depth = 0 if parent is None else parent.depth + 1


class MatchResult(NamedTuple):
    pages: list[int]  # pages of the matched full chunks, in order
    node: TreeNode  # deepest matched node (a root when nothing matched)


class InsertResult(NamedTuple):
    node: TreeNode  # deepest node of the inserted path
    pages: list[int]  # the tree's pages for the inserted chunks (use these from now on)
    duplicates: list[int]  # caller pages whose chunk was already cached: free them


class RadixCache:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._roots: dict[str, TreeNode] = {}
        self._num_pages = 0
        self._counter = itertools.count()

    def _root(self, namespace: str) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode((), -1, None)
            root.lock_ref = 1  # roots are never evicted
        return root

    @property
    def num_pages(self) -> int:
        return self._num_pages

    def _chunks(self, token_ids: list[int], limit: int | None = None):
        c = self.page_size
        n = len(token_ids) // c if limit is None else min(len(token_ids), limit) // c
        for i in range(n):
            yield tuple(token_ids[i * c:(i + 1) * c])

    def match_prefix(self, token_ids: list[int], namespace: str = "",
                     max_tokens: int | None = None) -> MatchResult:
        """Longest cached chunk prefix of `token_ids` (at most `max_tokens` tokens).
        Does not change ownership: the pages are only safe while the node is locked."""
        node = self._root(namespace)
        pages: list[int] = []
        now = time.monotonic()
        for key in self._chunks(token_ids, max_tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            pages.append(child.page)
            node = child
        return MatchResult(pages, node)

    def insert(self, token_ids: list[int], pages: list[int], namespace: str = "",
               after: TreeNode | None = None) -> InsertResult:
        """Insert the full chunks of `token_ids` backed by `pages` (one page per chunk).
        `after`: a node of the tree; `token_ids` and `pages` are then the chunks that follow
        its path (a growing sequence extends its own path without walking it again)."""
        node = self._root(namespace) if after is None else after
        out_pages: list[int] = []
        dups: list[int] = []
        now = time.monotonic()
        for i, key in enumerate(self._chunks(token_ids)):
            child = node.children.get(key)
            if child is None:
                child = TreeNode(key, pages[i], node)
                node.children[key] = child
                self._num_pages += 1
            elif child.page != pages[i]:
                dups.append(pages[i])
            child.last_access = now
            out_pages.append(child.page)
            node = child
        return InsertResult(node, out_pages, dups)

    @staticmethod
    def inc_lock(node: TreeNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    @staticmethod
    def move_lock(old: TreeNode, new: TreeNode) -> None:
        """dec_lock(old) then inc_lock(new), where `new` is `old` or below it: only the
        nodes between them change."""
        while new is not old:
            assert new is not None, "move_lock: the new node is not below the old one"
            new.lock_ref += 1
            new = new.parent

    @staticmethod
    def dec_lock(node: TreeNode) -> None:
        while node is not None:
            node.lock_ref -= 1
            assert node.lock_ref >= 0, "radix cache lock underflow"
            node = node.parent

    def evictable_pages(self) -> int:
        return sum(1 for n in self._iter_nodes() if n.lock_ref == 0)

    def evict(self, num_pages: int) -> list[int]:
        """Free up to `num_pages` pages from unlocked leaves, least recently used first."""
        heap = [(n.last_access, next(self._counter), n) for n in self._iter_nodes()
                if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            self._num_pages -= 1
            freed.append(node.page)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(self._counter), parent))
        return freed

    def reset(self) -> list[int]:
        """Drop every node; returns all their pages. Only valid with no locks held."""
        pages = [n.page for n in self._iter_nodes()]
        self._roots.clear()
        self._num_pages = 0
        return pages

    def _iter_nodes(self):
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
