"""ChunkStore: the LMDB chunk store that holds the whole past KV of long contexts.

One LMDB environment per directory (layout in ``_index.py``). Any number of processes,
writers and ``readonly=True`` readers alike; LMDB serializes write transactions across
processes (a writer killed mid-transaction leaves nothing of it) and its MVCC gives every
transaction a consistent snapshot, so a chunk is visible only once its header, every layer
block and its summary are committed by one write transaction. Readers use one short read transaction per call and copy every buffer
before it ends. Open the store *after* forking: a store used in a forked child raises.
One ChunkStore may be shared by threads of a process (see ``_env.py`` for map growth).

Methods that write (not on a readonly store): put_chunks, touch, pin, unpin, delete, evict_to,
put_context, delete_context, pin_context. All others only read. ``hold``/``release`` write
nothing: they keep chunks from this object's evictions while the process uses them.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _contexts as cx
from . import _index as ix
from . import codecs
from . import fingerprint as fpmod
from ._env import DB_NAMES, Env
from .codecs import FRAME_SIZE
from .errors import ChunkNotFound, CorruptBlock, StoreError, StoreFull
from .hashing import chunk_id as derive_chunk_id
from .records import (
    ChunkHeader,
    ChunkRecord,
    ContextInfo,
    header_link,
    numpy_dtype,
    split_summary,
)
from .writes import PreparedChunk, lmdb_bytes, prepare_chunk

logger = logging.getLogger(__name__)
_U32 = struct.Struct("<I")
# get_kv_many can split a read's checks and copies into up to KV_PARTS parts of at least
# KV_PART_MIN blocks when a block has KV_PART_BYTES or more. One part by default: with the
# `mix` check, 30 layers of 95 blocks of 48 KiB read in 43 ms on one thread and 77 ms in
# 4 parts on the H200's host (28 and 39 ms on a 2-core machine; bench_block_checks.py);
# a streamed 1M-token TTFT took 0.43-0.45 s against 0.49-0.50 s in 4 parts in one run, and
# 0.37-0.40 s against 0.37 s in the next.
KV_PARTS, KV_PART_MIN, KV_PART_BYTES = 1, 8, 16 << 10

# 2: last uses in their own index (touches rewrite no header); 3: blocks may carry the
# `mix` check (codecs.py), which format-2 code would take for damage. This code reads both;
# a writer opening a format-2 store marks it 3 before it writes.
FORMAT_VERSION = 3
READS_FORMATS = (2, 3)
_HEADROOM = 64 << 20  # map ceiling = 2 * capacity + this (LMDB page and B-tree overhead)


class _EvictLockBusy(Exception):
    """(put_chunks) its transaction must evict while the eviction lock is held elsewhere."""


class ChunkStore:
    """Disk store of KV chunks, their summaries, headers and named contexts.

    Shapes: C = chunk_size, H = num_kv_heads, D = head_dim, L = num_layers (all from the
    fingerprint). A KV block is K and V of one layer, each [C, H, D], keys before RoPE.
    Arrays come back in ``records.numpy_dtype(dtype)``: bf16 as np.uint16 bit patterns.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: dict[str, Any] | None,
        capacity_bytes: int | None = None,
        codec: str | None = None,
        level: int | None = None,
        readonly: bool = False,
        initial_map_size: int = 64 << 20,
    ) -> None:
        """Open (or, for a writer, create) the store at ``path``.

        fingerprint: the engine's model fingerprint; a mismatch raises ModelMismatch. None
        accepts the store's own (inspection tools). capacity_bytes: bound on the bytes
        charged to chunks (required when creating). codec/level: settings for new blocks,
        recorded in meta; None keeps the store's (defaults "zstd", level 3).
        """
        self.path = os.fspath(path)
        self.readonly = readonly
        self._held: Counter[bytes] = Counter()  # hold() counts, in this process only
        self._held_lock = threading.Lock()
        # held around this object's write transactions that may evict (they read the held
        # set): hold() waits for one in flight, not for every write (a touch batch)
        self._evict_lock = threading.Lock()
        self._workers: ThreadPoolExecutor | None = None  # `_in_parallel`, made on first use
        self._packs_ok: set[tuple[bytes, bytes]] = set()  # `_pack_ok`'s: (key, stored crc)
        self._env = Env(self.path, readonly, initial_map_size)
        try:
            self.dbs = ix.Dbs(*self._env.dbs)
            meta = self._load_meta()
            if meta is None:
                self._create(fingerprint, capacity_bytes, codec, level)
                meta = self._load_meta()
            self._apply_meta(meta, fingerprint, capacity_bytes, codec, level)
        except BaseException:
            self.close()
            raise

    def _load_meta(self) -> dict[str, bytes] | None:
        meta = self._env.read(lambda txn: {bytes(k): bytes(v) for k, v in txn.cursor(db=self.dbs.meta)})
        return meta if b"fingerprint" in meta else None

    def _create(self, fingerprint, capacity_bytes, codec, level) -> None:
        if self.readonly:
            raise StoreError(f"chunk store at {self.path} is not initialized")
        if fingerprint is None or capacity_bytes is None:
            raise StoreError("creating a store needs a fingerprint and capacity_bytes")
        meta = {
            b"format_version": str(FORMAT_VERSION).encode(),
            b"fingerprint": fpmod.encode(fpmod.normalize(fingerprint)),
            b"codec": (codec or "zstd").encode(),
            b"level": str(codecs.DEFAULT_LEVEL if level is None else level).encode(),
            b"capacity": str(int(capacity_bytes)).encode(),
        }
        self._env.max_map_size = 2 * int(capacity_bytes) + _HEADROOM
        self._env.write(lambda txn: [txn.put(k, v, db=self.dbs.meta) for k, v in meta.items()])

    def _apply_meta(self, meta, fingerprint, capacity_bytes, codec, level) -> None:
        version = int(meta[b"format_version"])
        if version not in READS_FORMATS:
            raise StoreError(f"store format {version} at {self.path}; this code reads "
                             f"{', '.join(map(str, READS_FORMATS))}")
        stored = fpmod.decode(meta[b"fingerprint"])
        if fingerprint is not None:
            fpmod.check(self.path, stored, fpmod.normalize(fingerprint))
        self.fingerprint = stored
        self.num_layers = stored["num_layers"]
        self.chunk_size = stored["chunk_size"]
        self.kv_shape = (stored["chunk_size"], stored["num_kv_heads"], stored["head_dim"])
        self.np_dtype = numpy_dtype(stored["dtype"])
        self.codec = codec or meta[b"codec"].decode()
        self.level = int(meta[b"level"]) if level is None else int(level)
        if self.codec not in codecs.CODEC_IDS:
            raise ValueError(f"unknown codec {self.codec!r}; expected one of {sorted(codecs.CODEC_IDS)}")
        self.capacity = int(capacity_bytes if capacity_bytes is not None else meta[b"capacity"])
        self._env.max_map_size = self.max_map_size = 2 * self.capacity + _HEADROOM
        if not self.readonly:
            changed = {b"codec": self.codec.encode(), b"level": str(self.level).encode(),
                       b"capacity": str(self.capacity).encode(),
                       b"format_version": str(FORMAT_VERSION).encode()}
            if any(meta.get(k) != v for k, v in changed.items()):
                self._write(lambda txn: [txn.put(k, v, db=self.dbs.meta) for k, v in changed.items()])
            if self._counter(b"bytes_used") > self.capacity:
                self.evict_to(self.capacity)

    # ----- transactions --------------------------------------------------------------

    def _write(self, fn: Callable[[Any], Any]) -> Any:
        """fn(txn) in one write transaction, retried after growing the map (see _env)."""
        return self._env.write(fn)

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        """fn(txn) in one short read transaction; buffers must not escape fn."""
        return self._env.read(fn)

    def _counter(self, name: bytes) -> int:
        return self._read(lambda txn: ix.get_counter(txn, self.dbs, name))

    # ----- writing chunks --------------------------------------------------------------

    def put_chunks(self, records: Sequence[ChunkRecord], verify_ids: bool = True) -> list[str]:
        """Publish many chunks in one write transaction (writes). Returns the new ids.

        Each chunk becomes visible with its header, all L layer blocks and its summary at
        once, or not at all. Chunks already present are only touched. A parent must be in
        the store or earlier in ``records``. Over capacity, least recently used unpinned
        chunks are evicted in the same transaction; StoreFull if that is not enough (then
        nothing of the batch is written). verify_ids re-derives every id from its parent,
        tokens and namespace (ValueError on a mismatch).
        """
        if verify_ids:
            for r in records:
                want = derive_chunk_id(r.token_ids, r.parent_id, r.namespace)
                if want != r.chunk_id:
                    raise ValueError(f"chunk id {r.chunk_id} does not match its tokens/parent/namespace ({want})")
        present = self.has_many([r.chunk_id for r in records])  # don't compress those again
        prepared = [
            bytes.fromhex(r.chunk_id) if there else
            prepare_chunk(r, self.num_layers, self.kv_shape, self.np_dtype, self.codec, self.level)
            for r, there in zip(records, present)
        ]
        # The eviction lock (which `hold` waits for) only while this write evicts: taken in
        # the transaction once it must evict, held to its commit. A write that evicts
        # nothing does not make a hold wait for its commit (a streamed decode step that
        # spilled a chunk waited 41 ms for the write of the next one, with its fsync, on
        # the H200's host). Taken without waiting there (the lock is taken before a
        # write transaction elsewhere): when busy, the transaction is dropped and the
        # write runs again with the lock held around it.
        state: list[str] = []
        try:
            return self._write(lambda txn: self._put_txn(txn, prepared, state))
        except _EvictLockBusy:
            pass  # (nothing was written)
        finally:
            if state == ["taken"]:
                self._evict_lock.release()
        with self._evict_lock:
            state[:] = ["around"]
            return self._write(lambda txn: self._put_txn(txn, prepared, state))

    def _put_txn(self, txn, prepared: list[PreparedChunk | bytes], state: list[str]
                 ) -> list[str]:
        """put_chunks' transaction. state: [] until it takes the eviction lock to evict
        (then ["taken"]); ["around"] when the caller holds it."""
        dbs, now, now_ns = self.dbs, time.time(), time.time_ns()
        batch: dict[bytes, PreparedChunk] = {}
        existing: list[bytes] = []
        for p in prepared:
            if isinstance(p, bytes):  # was present before the transaction: only touch it
                existing.append(p)
                continue
            if p.cid in batch or txn.get(p.cid, db=dbs.headers) is not None:
                existing.append(p.cid)
                continue
            self._check_parent(txn, p, batch)
            batch[p.cid] = p
        need = sum(p.stored_bytes for p in batch.values())
        over = ix.get_counter(txn, dbs, b"bytes_used") + need - self.capacity
        if over > 0:
            if not state:
                if not self._evict_lock.acquire(blocking=False):
                    raise _EvictLockBusy
                state.append("taken")
            protected = {p.parent for p in batch.values() if p.parent} | set(existing)
            protected |= self._held_ids()
            freed = ix.evict(txn, dbs, over, protected, self.num_layers, self.chunk_size)
            if freed < over:
                raise StoreFull(self._full_message(txn, need, freed))
        for i, cid in enumerate(existing):
            ix.set_touch(txn, dbs, cid, now_ns - i)
        for i, p in enumerate(batch.values()):
            ts = now_ns - len(existing) - i
            key = ix.lru_key(ts, p.cid)
            ix.write_header(txn, dbs, p.header(now, key))
            ix.set_used(txn, dbs, p.cid, ts)
            for layer, block in enumerate(p.blocks):
                txn.put(ix.kv_key(p.cid, layer), block, db=dbs.kv)
            txn.put(p.cid, p.summary, db=dbs.summaries)
            txn.put(key, b"", db=dbs.lru)
            if p.parent:
                txn.put(p.parent + p.cid, b"", db=dbs.children)
        ix.add_counter(txn, dbs, b"bytes_used", need)
        ix.add_counter(txn, dbs, b"chunk_count", len(batch))
        return [cid.hex() for cid in batch]

    def _check_parent(self, txn, p: PreparedChunk, batch: dict[bytes, PreparedChunk]) -> None:
        if p.parent is None:
            return
        if p.parent in batch:
            parent_ns = batch[p.parent].namespace
        else:
            h = ix.read_header(txn, self.dbs, p.parent)
            if h is None:
                raise ChunkNotFound(p.parent.hex(), "parent chunk")
            parent_ns = h.namespace
        if parent_ns != p.namespace:
            raise ValueError(f"chunk {p.cid.hex()} in namespace {p.namespace!r} has a parent in {parent_ns!r}")

    def _full_message(self, txn, need: int, freed: int) -> str:
        used = ix.get_counter(txn, self.dbs, b"bytes_used")
        evictable = txn.stat(self.dbs.lru)["entries"]
        return (
            f"chunk store {self.path} is full: {need} bytes to write, {used} used of "
            f"capacity {self.capacity}, only {freed} freed by eviction; {evictable} unpinned "
            "chunks are left and the rest are pinned (by pin() or pinned contexts), held "
            "(in use by this process) or ancestors of this batch. Unpin contexts, delete "
            "chunks or raise capacity_bytes."
        )

    # ----- reading ---------------------------------------------------------------------

    def has(self, chunk_id: str) -> bool:
        """True if the chunk is published (reads)."""
        cid = bytes.fromhex(chunk_id)
        return self._read(lambda txn: txn.get(cid, db=self.dbs.headers) is not None)

    def has_many(self, chunk_ids: Sequence[str]) -> list[bool]:
        """has() for many ids in one read transaction."""
        keys = [bytes.fromhex(c) for c in chunk_ids]

        def read(txn) -> list[bool]:
            found = txn.cursor(db=self.dbs.headers).set_key  # no value fetched: 1.6x faster
            return [found(k) for k in keys]

        return self._read(read)

    def get_header(self, chunk_id: str) -> ChunkHeader:
        """The chunk's header (reads); ChunkNotFound / CorruptBlock(layer=None, part="header")."""
        return self._read(lambda txn: ix.require_header(txn, self.dbs, bytes.fromhex(chunk_id)))

    def chain(self, last_chunk_id: str) -> tuple[list[str], np.ndarray]:
        """The ids (root first) and the token ids (int64) of the chain that ends at a
        chunk, walked through its headers in one read transaction, each checksum verified
        (reads): a named context's document. A million tokens' 16K headers took 500 ms
        one transaction and full decode each, about 0.1 s here, on the CI machine.
        ChunkNotFound / CorruptBlock(layer=None, part="header") name the chunk."""
        def read(txn) -> tuple[list[str], list[np.ndarray]]:
            ids: list[str] = []
            toks: list[np.ndarray] = []
            limit = txn.stat(self.dbs.headers)["entries"]  # (a loop means damage)
            cid = last_chunk_id
            while cid:
                if len(ids) >= limit:
                    raise CorruptBlock(cid, None, "header", "parent links loop")
                value = txn.get(bytes.fromhex(cid), db=self.dbs.headers)
                if value is None:
                    raise ChunkNotFound(cid)
                parent, tokens = header_link(cid, value)
                ids.append(cid)
                toks.append(tokens)
                cid = parent
            return ids, toks

        ids, toks = self._read(read)
        ids.reverse()
        toks.reverse()
        return ids, (np.concatenate(toks).astype(np.int64) if toks
                     else np.empty(0, np.int64))

    def get_kv(self, chunk_id: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer of one chunk, each [C, H, D] (reads; CRC verified)."""
        k, v = self.get_kv_many([chunk_id], layer)
        return k[0], v[0]

    def get_kv_many(self, chunk_ids: Sequence[str], layer: int, out: np.ndarray | None = None,
                    parts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer of many chunks, each [n, C, H, D], in one read transaction.

        out: where the blocks go, C-contiguous [n, 2, C, H, D] of the store's dtype (or any
        dtype of the same bytes per block, e.g. a view of a pinned buffer); K and V come
        back as views of it. parts: the most threads its checks and copies are split over
        (default KV_PARTS, for blocks of KV_PART_BYTES or more)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        n = len(chunk_ids)
        if out is None:
            out = np.empty((n, 2) + self.kv_shape, dtype=self.np_dtype)
        flat = out.reshape(n, -1).view(np.uint8)
        want = 2 * int(np.prod(self.kv_shape)) * self.np_dtype.itemsize
        if not out.flags.c_contiguous or flat.shape[1] != want:
            raise ValueError(f"out must be C-contiguous with {want} bytes per chunk")

        # raw blocks with a `mix` check are copied first and checked after, a run of
        # rows in one numpy pass (`codecs.mix_checks`); other blocks one at a time
        bulk = want % 8 == 0 and flat.ctypes.data % 8 == 0

        def check_run(a: int, b: int, heads: list[int], checks: list[int]) -> None:
            if a == b:
                return
            bad = np.flatnonzero(codecs.mix_checks(flat[a:b], np.array(heads, np.uint64))
                                 != np.array(checks, np.uint32))
            if len(bad):
                raise CorruptBlock(chunk_ids[a + int(bad[0])], layer, "kv", "checksum mismatch")

        def decode(rows: range, blocks: list) -> None:
            run, heads, checks = rows.start, [], []  # the unchecked run [run, i)
            for i, block in zip(rows, blocks):
                framed = codecs.raw_mix_payload(block) if bulk else None
                if framed is not None and len(framed[2]) == want:
                    flat[i] = np.frombuffer(framed[2], dtype=np.uint8)
                    checks.append(framed[0])
                    heads.append(framed[1])
                    continue
                check_run(run, i, heads, checks)  # (errors in chunk order)
                run, heads, checks = i + 1, [], []
                raw = codecs.decode_block(block, chunk_ids[i], layer, "kv", copy=False)
                if len(raw) != flat.shape[1]:
                    raise CorruptBlock(chunk_ids[i], layer, "kv",
                                       f"{len(raw)} bytes, expected {flat.shape[1]}")
                flat[i] = np.frombuffer(raw, dtype=np.uint8)
            check_run(run, rows.stop, heads, checks)

        def read(txn):
            blocks = []
            for chunk_id in chunk_ids:
                cid = bytes.fromhex(chunk_id)
                block = txn.get(ix.kv_key(cid, layer), db=self.dbs.kv)
                if block is None:
                    if txn.get(cid, db=self.dbs.headers) is None:
                        raise ChunkNotFound(chunk_id)
                    raise CorruptBlock(chunk_id, layer, "kv", "block missing")
                blocks.append(block)
            # Checksums, decompression and copies in parts on threads (zlib, zstd and numpy
            # release the interpreter lock on blocks this size); errors in chunk order.
            split = min(KV_PARTS if parts is None else parts, n // KV_PART_MIN)
            split = max(split, 1) if want >= KV_PART_BYTES else 1
            bounds = [n * j // split for j in range(split + 1)]
            self._in_parallel(lambda ab: decode(range(*ab), blocks[ab[0]:ab[1]]),
                              list(zip(bounds, bounds[1:])))

        self._read(read)
        return out[:, 0], out[:, 1]

    def get_summaries(self, chunk_ids: Sequence[str], dequantize: bool = True,
                      out: tuple[np.ndarray, np.ndarray] | None = None,
                      pack_of_first: tuple[str, int] | None = None,
                      packs_seen: dict[bytes, bool] | None = None):
        """Summaries of many chunks (reads).

        dequantize=True: float32 [n, L, n_desc, H, D]. False: (int8 [n, L, n_desc, H, D],
        float32 per-row scales [n, L, n_desc, H]) for dequantizing on the GPU, written into
        `out` when given (arrays of those shapes and dtypes, e.g. views of pinned buffers
        reused from read to read; StoreError when the stored shape differs). All chunks
        must share one summary shape. Runs of chunks held by a summary pack
        (`pack_summaries`) are read from it, a pack per LMDB value; the others one by one.
        pack_of_first: (id, row) when chunk_ids[0] is row `row` of the pack that starts
        at chunk `id` (`row` places before it in its chain): the run it starts is read
        from that pack too (a streamed context's summaries start after its sink chunk; its
        first 255 were read one by one, 40-50 ms of a 1M-token TTFT on the H200's host).
        packs_seen: gets key (first chunk id, bytes) -> intact of every pack met (a damaged
        one's rows are read chunk by chunk).
        """
        n = len(chunk_ids)
        keys = [bytes.fromhex(c) for c in chunk_ids]
        given = out
        out: list[np.ndarray] = []  # int8 q [n, *shape] and float32 scales [n, *shape[:-1]]
        # the first block's framing, which every chunk must share: row size, where the
        # quantized part starts, the header bytes (and as an array), and the outputs' bytes
        shape: list = []

        def put(i: int, rows: np.ndarray, raw=None) -> None:
            """Decoded summaries rows [m, size] (uint8; `raw`: the one row's buffer) into
            rows i.. of the output."""
            if not shape:
                q0, s0 = split_summary(rows[0].tobytes())
                cut = rows.shape[1] - q0.nbytes
                head = rows[0, : cut - s0.nbytes].tobytes()
                if given is None:
                    out[:] = [np.empty((n,) + q0.shape, np.int8),
                              np.empty((n,) + s0.shape, np.float32)]
                elif (given[0].shape, given[1].shape) != ((n,) + q0.shape, (n,) + s0.shape) \
                        or (given[0].dtype, given[1].dtype) != (np.int8, np.float32) \
                        or not (given[0].flags.c_contiguous and given[1].flags.c_contiguous):
                    raise StoreError(f"stored summaries are int8 {q0.shape} and float32 "
                                     f"{s0.shape} a chunk; the buffers given (C-contiguous "
                                     "ones needed) are "
                                     f"{given[0].dtype} {given[0].shape[1:]} and "
                                     f"{given[1].dtype} {given[1].shape[1:]}")
                else:
                    out[:] = given
                shape[:] = [rows.shape[1], cut, head, np.frombuffer(head, np.uint8),
                            out[0].reshape(n, -1).view(np.uint8),
                            out[1].reshape(n, -1).view(np.uint8)]
            size, cut, head, head_a, q_bytes, s_bytes = shape
            if rows.shape[1] != size or (raw[: len(head)] != head if raw is not None else
                                         (rows[:, : len(head)] != head_a).any()):
                raise StoreError(f"summary of {chunk_ids[i]}: its shape differs from the "
                                 "first chunk's (one model per store)")
            m = len(rows)
            s_bytes[i:i + m] = rows[:, len(head):cut]
            q_bytes[i:i + m] = rows[:, cut:]

        def one(txn, i: int) -> None:
            block = txn.get(keys[i], db=self.dbs.summaries)
            if block is None:
                if txn.get(keys[i], db=self.dbs.headers) is None:
                    raise ChunkNotFound(chunk_ids[i])
                raise CorruptBlock(chunk_ids[i], None, "summary", "block missing")
            raw = codecs.decode_block(block, chunk_ids[i], None, "summary", copy=False)
            put(i, np.frombuffer(raw, np.uint8)[None], raw)

        def from_pack(item) -> bool:
            """A pack's checksum, then its rows into the output (False: it failed)."""
            i, rows, block, key = item
            ok = self._pack_ok(block, key)
            if packs_seen is not None:
                packs_seen[key] = ok  # (one dict store: safe across the worker threads)
            if ok:
                put(i, rows)
            return ok

        def read(txn):
            i, packs = 0, []  # packs found: (first row, rows, block), checked below
            while i < n:
                got = (self._pack_rows(txn, keys, i, pack_of_first if i == 0 else None)
                       if n - i > 1 else None)
                if got is not None and shape:  # checked and copied below
                    packs.append((i, *got))
                    i += len(got[0])
                elif got is not None and from_pack((i, *got)):  # the rows fixing the framing
                    i += len(got[0])
                else:
                    one(txn, i)
                    i += 1
            # Checksums and copies of the packs on threads (zlib and numpy release the
            # interpreter lock on megabytes); a pack that fails is read chunk by chunk.
            for (i, rows, _, _), ok in zip(packs, self._in_parallel(from_pack, packs)):
                for j in range(i, i + (0 if ok else len(rows))):
                    one(txn, j)

        if n:
            self._read(read)
        if not out:
            return np.empty((0,), np.float32) if dequantize else (np.empty((0,), np.int8), np.empty((0,), np.float32))
        q, s = out
        return q.astype(np.float32) * s[..., None] if dequantize else (q, s)

    def _pack_rows(self, txn, keys: list[bytes], i: int, lead: tuple[str, int] | None = None
                   ) -> tuple[np.ndarray, Any, bytes] | None:
        """(decoded summaries [m, size] uint8, the pack's block, its key), views valid in
        this txn, of keys[i:i+m] from the pack that starts at keys[i], or with `lead`
        (id, row) from row `row` of the pack that starts at chunk `id` (m >= 1: the chunks
        it holds in that order), its checksum NOT verified yet (`_pack_ok`); None when
        there is none."""
        if self.dbs.packs is None:
            return None
        key, skip = (bytes.fromhex(lead[0]), lead[1]) if lead else (keys[i], 0)
        block = txn.get(key, db=self.dbs.packs)
        if block is None or len(block) < FRAME_SIZE + 4:
            return None
        raw = memoryview(block)[FRAME_SIZE:]
        count = _U32.unpack_from(raw)[0]
        if not 0 < 4 + 33 * count <= len(raw) or skip >= count:
            return None  # (a damaged count: no room for its rows)
        ids = raw[4 + 32 * skip: 4 + 32 * count]
        want = keys[i: i + count - skip]
        m = len(want)
        if ids[: 32 * m] != b"".join(want):
            m = next(j for j, k in enumerate(want) if ids[32 * j: 32 * j + 32] != k)
        size, rest = divmod(len(raw) - 4 - 32 * count, count)
        if not m or rest:
            return None
        rows = np.frombuffer(raw, np.uint8, offset=4 + 32 * count)
        return rows.reshape(count, size)[skip: skip + m], block, key

    def _pack_ok(self, block, key: bytes) -> bool:
        """A pack's checksum and frame (a damaged one is skipped, and left for its next
        writer to replace). Packs found intact are remembered by key and stored checksum,
        for `_pack_seen_ok`."""
        seen = (key, bytes(block[:4]))
        try:
            codecs.decode_block(block, key.hex(), None, "pack", copy=False)
        except CorruptBlock as e:
            self._packs_ok.discard(seen)
            logger.warning("summary pack skipped: %s", e)
            return False
        if len(self._packs_ok) >= 1 << 16:
            self._packs_ok.clear()
        self._packs_ok.add(seen)
        return True

    def _pack_seen_ok(self, block, key: bytes) -> bool:
        """`_pack_ok`, taken from memory for a pack this object found intact with the same
        stored checksum (a context's admission reads its packs, then asks for them to be
        written: checking them again took 70 ms of a 1M-token TTFT on the H200's host,
        competing with it). Reads always check."""
        return (key, bytes(block[:4])) in self._packs_ok or self._pack_ok(block, key)

    def _in_parallel(self, fn: Callable[[Any], Any], items: list) -> list:
        """[fn(item)] computed on this store's worker threads (inline for one item)."""
        if len(items) < 2:
            return [fn(x) for x in items]
        with self._held_lock:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                                   thread_name_prefix="kv-store")
        return list(self._workers.map(fn, items))

    def pack_summaries(self, chunk_ids: Sequence[str]) -> bool:
        """Write the summaries of consecutive chunks of one chain as one pack, keyed by the
        first (writes): `get_summaries` then reads them in one value instead of one per
        chunk. Returns False when that pack is already there, or when it would take the
        store over its capacity (a pack is only an index: it evicts nothing).
        ChunkNotFound / CorruptBlock when a chunk's summary cannot be read (nothing is
        written). Removing any of the chunks removes the pack."""
        keys = [bytes.fromhex(c) for c in chunk_ids]
        if len(keys) < 2:
            return False
        if self.dbs.packs is None:
            raise StoreError("this store has no summary packs (opened readonly)")
        body = _U32.pack(len(keys)) + b"".join(keys)

        def there(old) -> bool:  # this pack, intact (a damaged one is rewritten)
            return (old is not None and bytes(old[FRAME_SIZE: FRAME_SIZE + len(body)]) == body
                    and self._pack_seen_ok(old, keys[0]))

        if self._read(lambda txn: there(txn.get(keys[0], db=self.dbs.packs))):
            return False  # (checked without taking the writer lock)

        def txn_fn(txn):
            old = txn.get(keys[0], db=self.dbs.packs)
            if there(old):
                return False
            rows = []
            for key, chunk_id in zip(keys, chunk_ids):
                block = txn.get(key, db=self.dbs.summaries)
                if block is None:
                    raise ChunkNotFound(chunk_id, "chunk of a summary pack")
                rows.append(bytes(codecs.decode_block(block, chunk_id, None, "summary",
                                                      copy=False)))
            value = codecs.encode_block(body + b"".join(rows), "raw", 0, 1)
            charge = lmdb_bytes(32, len(value))
            if old is not None:
                charge -= lmdb_bytes(32, len(old))
            if ix.get_counter(txn, self.dbs, b"bytes_used") + charge > self.capacity:
                return False
            txn.put(keys[0], value, db=self.dbs.packs)
            for key in keys:
                txn.put(key, keys[0], db=self.dbs.pack_of)
            ix.add_counter(txn, self.dbs, b"bytes_used", charge)
            return True

        return self._write(txn_fn)

    def iter_headers(
        self, batch: int = 4096, on_corrupt: Callable[[CorruptBlock], None] | None = None
    ) -> Iterator[ChunkHeader]:
        """Every chunk header, in id order, for rebuilding the radix tree (reads).

        Reads ``batch`` headers per short read transaction, so the writer can go on
        meanwhile (chunks added or removed during the walk may or may not appear). A
        corrupt header raises CorruptBlock, or is passed to ``on_corrupt`` and skipped.
        """
        start = b""
        while True:
            def read(txn, start=start):
                cur = txn.cursor(db=self.dbs.headers)
                rows = []
                if cur.set_range(start):
                    for k, v in cur.iternext():
                        k = bytes(k)
                        if k == start:
                            continue
                        rows.append((k, bytes(v)))
                        if len(rows) >= batch:
                            break
                return rows

            rows = self._read(read)
            for k, v in rows:
                try:
                    yield ix.decode_header(k.hex(), v)
                except CorruptBlock as exc:
                    if on_corrupt is None:
                        raise
                    on_corrupt(exc)
            if len(rows) < batch:
                return
            start = rows[-1][0]

    # ----- LRU, pins, deletion -----------------------------------------------------------

    def touch(self, chunk_ids: Sequence[str], batch: int | None = None) -> int:
        """Mark chunks as just used (writes). Give a chain root first: later ids get
        slightly older stamps, so eviction takes deeper chunks first. Missing ids are
        skipped; returns how many were touched. batch: at most this many per write
        transaction (the stamps are the same), so that another write of this process
        waits for one batch at most, not for all (16K chunks took 100 ms)."""
        now_ns = time.time_ns()
        keys = [bytes.fromhex(c) for c in chunk_ids]
        step = batch or max(len(keys), 1)

        def txn_fn(txn, lo: int):
            return sum(ix.set_touch(txn, self.dbs, cid, now_ns - i)
                       for i, cid in enumerate(keys[lo:lo + step], lo))

        return sum(self._write(lambda txn, lo=lo: txn_fn(txn, lo))
                   for lo in range(0, len(keys), step))

    def pin(self, chunk_id: str) -> None:
        """Pin a chunk and its whole chain against eviction (writes; pins are counted)."""
        self._write(lambda txn: ix.add_pins(txn, self.dbs, bytes.fromhex(chunk_id), +1))

    def unpin(self, chunk_id: str) -> None:
        """Undo one pin() of this chunk (writes)."""
        self._write(lambda txn: ix.add_pins(txn, self.dbs, bytes.fromhex(chunk_id), -1))

    def hold(self, chunk_ids: Sequence[str]) -> None:
        """Keep chunks (and so their chains) from eviction by this ChunkStore's writes
        (put_chunks, evict_to) until release(); counted per id. Nothing is stored: a hold
        lives in this object only, so it ends with the process (a crash leaks nothing),
        and it does not bind other processes sharing the store, nor delete(). A chunk
        found present after hold() returns stays until release()."""
        keys = [bytes.fromhex(c) for c in chunk_ids]
        with self._held_lock:
            self._held.update(keys)  # (counted in C: a 1M-token context holds 16K chunks)
        if keys and not self.readonly:
            # Wait for an evicting write of ours in flight, which may have read the held
            # set before this call: a chunk read after hold() returns stays. Other writes
            # (marks, packs, pins) remove nothing, and are not waited for: on the H200's
            # host the writer's marks of a 1M-token context (16 transactions) took 0.5-0.8
            # s beside decode steps (bench_stream), and an admission's hold waited for the
            # one in flight.
            with self._evict_lock:
                pass

    def release(self, chunk_ids: Sequence[str]) -> None:
        """Undo one hold() of each id (ValueError, nothing changed, if one is not held)."""
        keys = [bytes.fromhex(c) for c in chunk_ids]
        with self._held_lock:
            left = dict(self._held)
            for k in keys:
                n = left.get(k, 0)
                if n <= 0:
                    raise ValueError(f"chunk {k.hex()} is not held")
                left[k] = n - 1
            self._held = Counter({k: n for k, n in left.items() if n})

    def held(self) -> set[str]:
        """Ids held now (tests, inspection)."""
        return {k.hex() for k in self._held_ids()}

    def _held_ids(self) -> set[bytes]:
        with self._held_lock:
            return set(self._held)

    def delete(self, chunk_id: str, reason: str = "") -> list[str]:
        """Drop a chunk and all its descendants (writes), e.g. after CorruptBlock.

        Works on a chunk whose header is corrupt too. Contexts whose chain lost chunks
        are cut back to the nearest surviving ancestor (token_count reduced, lost_tokens
        raised). Returns the removed ids ([] if the chunk was not there).
        """
        cid = bytes.fromhex(chunk_id)

        def txn_fn(txn):
            if txn.get(cid, db=self.dbs.headers) is None:
                return [], []
            try:
                h = ix.read_header(txn, self.dbs, cid)
            except CorruptBlock:
                h = None
            tree = ix.subtree(txn, self.dbs, cid)
            pinned_ctx = cx.pinned_in(txn, self.dbs, set(tree))
            removed = ix.remove_chunks(txn, self.dbs, tree, self.num_layers)
            ctx_names = ix.truncate_contexts(txn, self.dbs, removed, self.chunk_size)
            if h is not None and h.parent_id and h.pin_count - pinned_ctx:
                # pins taken below the removed root no longer have a chunk to hold
                ix.add_pins(txn, self.dbs, bytes.fromhex(h.parent_id), -(h.pin_count - pinned_ctx))
            return [c.hex() for c in tree], ctx_names

        ids, ctx_names = self._write(txn_fn)
        if ids:
            logger.warning("dropped chunk %s and %d descendants%s; contexts cut back: %s",
                           chunk_id, len(ids) - 1, f" ({reason})" if reason else "", ctx_names)
        return ids

    def removed_total(self) -> int:
        """How many chunks were ever removed (evicted or deleted), by any process (reads).
        Unchanged means every chunk seen present since is still there: a cheap check for
        callers that remember which chunks are stored."""
        return self._counter(b"removed_total")

    def evict_to(self, target_bytes: int) -> int:
        """Evict LRU unpinned chunks until at most ``target_bytes`` are used (writes).
        Returns the bytes freed; stops early when only pinned chunks are left."""
        def txn_fn(txn):
            over = ix.get_counter(txn, self.dbs, b"bytes_used") - target_bytes
            if over <= 0:
                return 0
            return ix.evict(txn, self.dbs, over, self._held_ids(), self.num_layers,
                            self.chunk_size)

        with self._evict_lock:
            return self._write(txn_fn)

    # ----- contexts ----------------------------------------------------------------------

    def put_context(
        self, name: str, last_chunk_id: str | None, token_count: int,
        namespace: str | None = None, pinned: bool = False, tail: Sequence[int] = (),
    ) -> ContextInfo:
        """Create or replace a named context ending at ``last_chunk_id`` (writes).

        The namespace defaults to the last chunk's. pinned=True pins the chain (and a
        replaced pinned context's old chain is unpinned), all in one transaction. ``tail``:
        the document's tokens after its last whole chunk, kept in the record.
        """
        return self._write(
            lambda txn: cx.put(txn, self.dbs, name, last_chunk_id, token_count, namespace,
                               pinned, tail)
        )

    def get_context(self, name: str) -> ContextInfo:
        """The named context (reads); ChunkNotFound if there is none."""
        return self._read(lambda txn: cx.require(txn, self.dbs, name))

    def list_contexts(self) -> list[ContextInfo]:
        """All named contexts, by name (reads)."""
        return self._read(lambda txn: cx.list_all(txn, self.dbs))

    def delete_context(self, name: str) -> None:
        """Forget a named context and release its pin (writes); its chunks stay, evictable."""
        self._write(lambda txn: cx.delete(txn, self.dbs, name))

    def pin_context(self, name: str, pinned: bool = True) -> ContextInfo:
        """Pin (or unpin) a named context's whole chain (writes); idempotent."""
        return self._write(lambda txn: cx.pin(txn, self.dbs, name, pinned))

    # ----- stats and lifetime ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Chunks, charged bytes, capacity, map and file sizes, per-db entries/bytes (reads)."""
        def read(txn):
            dbs = {}
            for name, db in zip(DB_NAMES, self.dbs):
                if db is None:  # (readonly, a store made before that database existed)
                    continue
                s = txn.stat(db)
                pages = s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]
                dbs[name] = {"entries": s["entries"], "bytes": pages * s["psize"]}
            return {
                "chunks": ix.get_counter(txn, self.dbs, b"chunk_count"),
                "bytes": ix.get_counter(txn, self.dbs, b"bytes_used"),
                "dbs": dbs,
            }

        out = self._read(read)
        out.update(
            capacity=self.capacity, codec=self.codec, level=self.level,
            map_size=self._env.map_size(), max_map_size=self.max_map_size,
            file_bytes=os.path.getsize(os.path.join(self.path, "data.mdb")),
        )
        return out

    def close(self) -> None:
        """Close the environment (idempotent)."""
        workers = getattr(self, "_workers", None)
        if workers is not None:
            workers.shutdown()
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
