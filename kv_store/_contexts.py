"""Named contexts inside a write/read transaction: name -> chain end, token count, pin.

A pinned context holds one pin on its last chunk, which (see ``_index.add_pins``) pins
the whole chain back to the root.
"""

from __future__ import annotations

import time

from . import _index as ix
from .errors import ChunkNotFound
from .records import ContextInfo, decode_context, encode_context


def get(txn, dbs: ix.Dbs, name: str) -> ContextInfo | None:
    v = txn.get(name.encode(), db=dbs.contexts)
    return None if v is None else decode_context(v)


def require(txn, dbs: ix.Dbs, name: str) -> ContextInfo:
    ctx = get(txn, dbs, name)
    if ctx is None:
        raise ChunkNotFound(name, "context")
    return ctx


def list_all(txn, dbs: ix.Dbs) -> list[ContextInfo]:
    return [decode_context(v) for _, v in txn.cursor(db=dbs.contexts)]


def _set_pin(txn, dbs: ix.Dbs, ctx: ContextInfo, delta: int) -> None:
    if ctx.last_chunk_id:
        ix.add_pins(txn, dbs, bytes.fromhex(ctx.last_chunk_id), delta)


def put(
    txn, dbs: ix.Dbs, name: str, last_chunk_id: str | None, token_count: int,
    namespace: str | None, pinned: bool, tail=(),
) -> ContextInfo:
    ns = namespace
    if last_chunk_id is not None:
        h = ix.require_header(txn, dbs, bytes.fromhex(last_chunk_id))
        if ns is not None and ns != h.namespace:
            raise ValueError(f"context namespace {ns!r} != chunk namespace {h.namespace!r}")
        ns = h.namespace
    old, now = get(txn, dbs, name), time.time()
    ctx = ContextInfo(name, ns or "", last_chunk_id, int(token_count), bool(pinned),
                      old.created if old else now, now, tail=tuple(int(t) for t in tail))
    if pinned:  # pin the new chain before unpinning the old: shared chunks stay pinned
        _set_pin(txn, dbs, ctx, +1)
    if old is not None and old.pinned:
        _set_pin(txn, dbs, old, -1)
    txn.put(name.encode(), encode_context(ctx), db=dbs.contexts)
    return ctx


def delete(txn, dbs: ix.Dbs, name: str) -> None:
    old = require(txn, dbs, name)
    if old.pinned:
        _set_pin(txn, dbs, old, -1)
    txn.delete(name.encode(), db=dbs.contexts)


def pin(txn, dbs: ix.Dbs, name: str, pinned: bool) -> ContextInfo:
    old = require(txn, dbs, name)
    if old.pinned != pinned:
        _set_pin(txn, dbs, old, +1 if pinned else -1)
    ctx = old._replace(pinned=pinned)
    txn.put(name.encode(), encode_context(ctx), db=dbs.contexts)
    return ctx


def pinned_in(txn, dbs: ix.Dbs, ids: set[bytes]) -> int:
    """How many pinned contexts end at one of ``ids``."""
    return sum(
        1 for c in list_all(txn, dbs)
        if c.pinned and c.last_chunk_id and bytes.fromhex(c.last_chunk_id) in ids
    )
