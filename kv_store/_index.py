"""In-transaction primitives of the store: headers, LRU and child indexes, pins, removal.

Every function here runs inside the caller's write transaction and touches nothing
outside it, so a failed or retried transaction leaves no trace.

Databases (keys are raw bytes; a chunk id is its 32-byte digest)::

    headers   id                      -> encoded ChunkHeader
    kv        id || u16 BE layer      -> framed K|V block of that layer
    summaries id                      -> framed quantized summary
    lru       u64 BE time_ns || id    -> b""   (unpinned chunks only, oldest first)
    used      id                      -> u64 LE time_ns of its last use (every chunk)
    children  parent id || child id   -> b""
    contexts  name utf-8              -> encoded ContextInfo
    meta      name                    -> value (format, fingerprint, counters)
    packs     first id                -> framed u32 n || n ids || their n summaries (each
                                         the decoded payload of its summaries block)
    pack_of   id                      -> first id of the pack holding its summary

Packs are an index over the summaries of consecutive chunks of one chain, written after
the chunks (``ChunkStore.pack_summaries``) so that a long context's summaries are read a
few megabytes at a time; removing a chunk removes its pack. Stores created before packs
open them empty (readonly: without them).

Invariant: a pinned chunk's ancestors are pinned at least as many times (a pin covers
the chunk and its whole chain), so an unpinned chunk has no pinned descendant and
evicting it with its subtree never drops a pinned chunk.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from .errors import ChunkNotFound, CorruptBlock
from .records import ChunkHeader, decode_context, decode_header, encode_context, encode_header
from .writes import lmdb_bytes

_U64 = struct.Struct("<Q")


class Dbs(NamedTuple):
    meta: object
    headers: object
    kv: object
    summaries: object
    lru: object
    children: object
    contexts: object
    used: object
    packs: object  # None: a readonly store opened without them
    pack_of: object


def kv_key(cid: bytes, layer: int) -> bytes:
    return cid + struct.pack(">H", layer)


def lru_key(ts_ns: int, cid: bytes) -> bytes:
    return struct.pack(">Q", ts_ns) + cid


def get_counter(txn, dbs: Dbs, name: bytes) -> int:
    v = txn.get(name, db=dbs.meta)
    return _U64.unpack(bytes(v))[0] if v is not None else 0


def add_counter(txn, dbs: Dbs, name: bytes, delta: int) -> None:
    txn.put(name, _U64.pack(max(0, get_counter(txn, dbs, name) + delta)), db=dbs.meta)


def read_header(txn, dbs: Dbs, cid: bytes) -> ChunkHeader | None:
    """The chunk's header, with its last use from the ``used`` index (a touch writes only
    that index, not the header)."""
    v = txn.get(cid, db=dbs.headers)
    if v is None:
        return None
    h = decode_header(cid.hex(), v)
    u = txn.get(cid, db=dbs.used)
    if u is None:  # (never in format 2: a chunk and its entry are written in one txn)
        return h
    ts = _U64.unpack(u)[0]
    return dataclasses.replace(h, last_used=ts / 1e9, lru_key=lru_key(ts, cid))


def require_header(txn, dbs: Dbs, cid: bytes) -> ChunkHeader:
    h = read_header(txn, dbs, cid)
    if h is None:
        raise ChunkNotFound(cid.hex())
    return h


def write_header(txn, dbs: Dbs, h: ChunkHeader) -> None:
    txn.put(bytes.fromhex(h.chunk_id), encode_header(h), db=dbs.headers)


def subtree(txn, dbs: Dbs, root: bytes) -> list[bytes]:
    """The chunk and all its descendants, parents before children."""
    out, todo = [], deque([root])
    cur = txn.cursor(db=dbs.children)
    while todo:
        cid = todo.popleft()
        out.append(cid)
        if cur.set_range(cid):
            for key in cur.iternext(values=False):
                key = bytes(key)
                if not key.startswith(cid):
                    break
                todo.append(key[32:])
    return out


def set_used(txn, dbs: Dbs, cid: bytes, ts_ns: int) -> None:
    """A new chunk's last use (its LRU entry is the caller's)."""
    txn.put(cid, _U64.pack(ts_ns), db=dbs.used)


def set_touch(txn, dbs: Dbs, cid: bytes, ts_ns: int) -> bool:
    """Move a stored chunk to the young end of the LRU order (a pinned one, which has no
    LRU entry, only gets the new time). A few small writes and no header rewrite: a
    million-token context is 16K chunks. False when the chunk is not stored."""
    u = txn.get(cid, db=dbs.used)
    if u is None:
        return False
    if txn.delete(lru_key(_U64.unpack(u)[0], cid), db=dbs.lru):
        txn.put(lru_key(ts_ns, cid), b"", db=dbs.lru)
    set_used(txn, dbs, cid, ts_ns)
    return True


def add_pins(txn, dbs: Dbs, start: bytes | None, delta: int) -> None:
    """Add ``delta`` pins to ``start`` and every ancestor of it (chunks leave/enter the LRU)."""
    cid = start
    while cid is not None:
        h = require_header(txn, dbs, cid)
        new = h.pin_count + delta
        if new < 0:
            raise ValueError(f"chunk {h.chunk_id} is not pinned (pin count {h.pin_count})")
        if h.pin_count == 0 and new > 0:
            txn.delete(h.lru_key, db=dbs.lru)
        elif h.pin_count > 0 and new == 0:
            txn.put(h.lru_key, b"", db=dbs.lru)
        write_header(txn, dbs, dataclasses.replace(h, pin_count=new))
        cid = bytes.fromhex(h.parent_id) if h.parent_id else None


class Removed(NamedTuple):
    freed: int
    parents: dict[bytes, bytes | None]  # removed id -> its parent (None if unknown/root)


def remove_chunks(txn, dbs: Dbs, ids: Iterable[bytes], num_layers: int) -> Removed:
    """Delete every record of each chunk in ``ids``; corrupt headers are removed too."""
    freed, parents = 0, {}
    for cid in ids:
        try:
            h = read_header(txn, dbs, cid)
        except CorruptBlock:
            h = None
            freed += _sizes(txn, dbs, cid, num_layers)
            u = txn.get(cid, db=dbs.used)
            if u is None or not txn.delete(lru_key(_U64.unpack(u)[0], cid), db=dbs.lru):
                _drop_lru_by_scan(txn, dbs, cid)
        txn.delete(cid, db=dbs.used)
        if h is not None:
            freed += h.stored_bytes
            txn.delete(h.lru_key, db=dbs.lru)
        parent = bytes.fromhex(h.parent_id) if h is not None and h.parent_id else None
        parents[cid] = parent
        if parent is not None:
            txn.delete(parent + cid, db=dbs.children)
        txn.delete(cid, db=dbs.headers)
        txn.delete(cid, db=dbs.summaries)
        freed += drop_pack_of(txn, dbs, cid)
        for layer in range(num_layers):
            txn.delete(kv_key(cid, layer), db=dbs.kv)
        _drop_child_entries(txn, dbs, cid)
    add_counter(txn, dbs, b"bytes_used", -freed)
    add_counter(txn, dbs, b"chunk_count", -len(parents))
    add_counter(txn, dbs, b"removed_total", len(parents))  # see ChunkStore.removed_total
    return Removed(freed, parents)


def drop_pack_of(txn, dbs: Dbs, cid: bytes) -> int:
    """Remove the summary pack holding ``cid`` (if any) -> the bytes it was charged.
    The pack_of entries of its other chunks stay (they lead nowhere) until those go."""
    if dbs.pack_of is None:
        return 0
    first = txn.get(cid, db=dbs.pack_of)
    if first is None:
        return 0
    first = bytes(first)
    txn.delete(cid, db=dbs.pack_of)
    value = txn.get(first, db=dbs.packs)
    if value is None:
        return 0
    size = lmdb_bytes(len(first), len(value))
    txn.delete(first, db=dbs.packs)
    return size


def _sizes(txn, dbs: Dbs, cid: bytes, num_layers: int) -> int:
    vals = [txn.get(cid, db=dbs.headers), txn.get(cid, db=dbs.summaries)]
    vals += [txn.get(kv_key(cid, layer), db=dbs.kv) for layer in range(num_layers)]
    return sum(len(v) + 34 for v in vals if v is not None)


def _drop_lru_by_scan(txn, dbs: Dbs, cid: bytes) -> None:
    # Rare path (header unreadable, so its LRU key is unknown): scan the LRU index.
    cur = txn.cursor(db=dbs.lru)
    stale = [bytes(k) for k in cur.iternext(values=False) if bytes(k)[8:] == cid]
    for k in stale:
        txn.delete(k, db=dbs.lru)


def _drop_child_entries(txn, dbs: Dbs, cid: bytes) -> None:
    cur = txn.cursor(db=dbs.children)
    keys = []
    if cur.set_range(cid):
        for key in cur.iternext(values=False):
            key = bytes(key)
            if not key.startswith(cid):
                break
            keys.append(key)
    for key in keys:
        txn.delete(key, db=dbs.children)


def truncate_contexts(txn, dbs: Dbs, removed: Removed, chunk_size: int) -> list[str]:
    """Point contexts whose chain lost chunks at their nearest surviving ancestor (the
    cut tokens are added to their ``lost_tokens``).

    Returns the names of the contexts that were truncated.
    """
    names = []
    cur = txn.cursor(db=dbs.contexts)
    updates = []
    for key, val in cur.iternext():
        ctx = decode_context(val)
        last = bytes.fromhex(ctx.last_chunk_id) if ctx.last_chunk_id else None
        lost = 0
        while last is not None and last in removed.parents:
            last, lost = removed.parents[last], lost + 1
        if lost:
            cut = min(ctx.token_count, lost * chunk_size)
            updates.append((bytes(key), ctx._replace(
                last_chunk_id=last.hex() if last else None,
                token_count=ctx.token_count - cut, lost_tokens=ctx.lost_tokens + cut,
            )))
    for key, ctx in updates:
        txn.put(key, encode_context(ctx), db=dbs.contexts)
        names.append(ctx.name)
    return names


def evict(txn, dbs: Dbs, need: int, protected: set[bytes], num_layers: int, chunk_size: int) -> int:
    """Evict least recently used unpinned chunks (with their subtrees) until ``need`` bytes
    are freed or nothing evictable is left; subtrees holding a ``protected`` id are kept.
    Returns the bytes freed."""
    freed = 0
    cur = txn.cursor(db=dbs.lru)
    found = cur.first()
    while found and freed < need:
        key = bytes(cur.key())
        tree = subtree(txn, dbs, key[8:])
        if protected.intersection(tree):
            found = cur.next()
            continue
        removed = remove_chunks(txn, dbs, tree, num_layers)
        truncate_contexts(txn, dbs, removed, chunk_size)
        freed += removed.freed
        found = cur.set_range(key)  # the current key is gone; continue at the next one
    return freed
