"""Typed errors raised at the chunk store's boundary.

The server maps them to HTTP status codes; everything the store refuses or cannot serve
is one of these, never a bare lmdb or zstd exception.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by the chunk store."""


class StoreFull(StoreError):
    """The capacity bound (or the map ceiling) is reached and nothing unpinned is left."""


class ChunkNotFound(StoreError, KeyError):
    """A chunk id (or context name) is not in the store."""

    def __init__(self, chunk_id: str, what: str = "chunk") -> None:
        self.chunk_id = chunk_id
        super().__init__(f"{what} {chunk_id!r} not found in the store")

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return self.args[0]


class CorruptBlock(StoreError):
    """A stored block failed its checksum or could not be decoded.

    ``layer`` is the layer of a KV block, or None for the chunk's header or summary
    (``part`` says which). The caller should ``delete(chunk_id)`` and recompute.
    """

    def __init__(self, chunk_id: str, layer: int | None, part: str = "kv", detail: str = "") -> None:
        self.chunk_id = chunk_id
        self.layer = layer
        self.part = part
        where = f"layer {layer}" if layer is not None else part
        msg = f"corrupt {part} block for chunk {chunk_id} ({where})"
        super().__init__(msg + (f": {detail}" if detail else ""))


class ModelMismatch(StoreError):
    """The store was made for another model or layout.

    ``fields`` maps each mismatching fingerprint field to (store value, engine value).
    """

    def __init__(self, path: str, fields: dict[str, tuple[object, object]]) -> None:
        self.path = path
        self.fields = fields
        parts = [
            f"{name}: store has {stored!r}, engine has {given!r}"
            for name, (stored, given) in sorted(fields.items())
        ]
        super().__init__(
            f"chunk store at {path} was made for another model or layout; "
            "mismatching fingerprint fields: " + "; ".join(parts)
        )
