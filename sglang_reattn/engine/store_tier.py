"""The disk tier: completed chunks are written behind into the LMDB chunk store, and a
request whose prefix is in the store loads it instead of recomputing it, across
requests, server restarts and processes.

Chunk ids are the store's chained SHA-256 (SGLang's page hashes, salted by namespace).
Copies out of the KV pool happen on the engine thread (the pages may be reused right
after); compression and the LMDB transactions run on a writer thread. Summaries of loaded
chunks are recomputed from the loaded keys, so a restored chunk scores exactly like one
computed in this process.

Several processes (servers, `ingest`) may share one store, all writing: LMDB serializes
their transactions. `readonly=True` only reads it. Chunks loaded or named contexts used
are touched (LRU) by the writer thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sglang_reattn.kv_store import (
    ChunkNotFound,
    ChunkRecord,
    ChunkStore,
    ContextInfo,
    CorruptBlock,
    StoreError,
    StoreFull,
)
from sglang_reattn.kv_store import fingerprint as fpmod

logger = logging.getLogger(__name__)

# Chunks per summary pack (kv_store's `pack_summaries`): at 256, a million-token context
# of the default model (16K chunks of 11 KiB summaries) reads 64 values of 2.9 MB.
SUMMARY_PACK = 256


def parse_bytes(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def kv_store_root() -> str:
    """Where per-model default stores live: $XDG_CACHE_HOME/sglang_reattn/kv_store, or
    ~/.cache/sglang_reattn/kv_store when XDG_CACHE_HOME is unset (or not absolute)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache")
    return os.path.join(base, "sglang_reattn", "kv_store")


def default_store_path(model_path: str, fingerprint: dict) -> str:
    """The default store of a model: `<root>/<model dir name>-<12 hex of the fingerprint>`,
    so models, dtypes and chunk sizes never share a store (a store refuses another
    fingerprint) and the name still says which model it is."""
    name = os.path.basename(os.path.normpath(model_path)).removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64] or "model"
    digest = hashlib.sha256(fpmod.encode(fpmod.normalize(fingerprint))).hexdigest()[:12]
    return os.path.join(kv_store_root(), f"{name}-{digest}")


def engine_fingerprint(cfg, dtype: torch.dtype, chunk_size: int, tokenizer, model) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    emb = model.embed_tokens.weight
    # Identity of the weights, cheaply: two models of one shape must not share KV.
    sample = emb[:: max(1, emb.shape[0] // 64)].float().cpu().numpy().tobytes()
    return {
        "architecture": cfg.architecture, "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "dtype": str(dtype).removeprefix("torch."), "chunk_size": chunk_size,
        "summary_kind": "minmax", "rope": {"theta": cfg.rope_theta,
                                           "scaling": cfg.rope_scaling or {}},
        "tokenizer_hash": hashlib.sha256(vocab.encode()).hexdigest()[:32],
        "weights_hash": hashlib.sha256(sample).hexdigest()[:32],
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()


TOUCH_DEFER_S = 10.0  # longest a last-used mark waits for an idle engine
# Threads reading layers ahead in a load, and the parts of a split read: blocks not in the
# page cache come in one page fault at a time per thread (the store's readahead is off),
# so more threads keep more disk reads in flight (bench_cold_reads.py).
READERS = 16
READ_AHEAD_BYTES = 1 << 30  # most K/V bytes of layers read ahead at once
TOUCH_BATCH = 1024  # last-used marks per write transaction (a write-behind waits for one)
TOUCH_REFRESH_S = 30.0  # a chunk's last-used mark is not rewritten sooner than this
TOUCHED_MAX = 1 << 18  # chunks whose last mark time is remembered (about 50 MB at most)
AHEAD_READERS = 2  # reader threads of a `read_ahead` (beside the engine thread's work)
SPLIT_MIN = 4  # chunks per reader thread at least, when one layer's read is split
# (CUDA) a pinned buffer, made with the tier, that a streamed admission's sink and
# local-window blocks are read ahead into (every layer): copied from it asynchronously.
# Read into fresh pageable arrays, their copies to the device took 21 ms (sampled) of a
# 1M-token TTFT on the H200's host; the default model's 33 pages are 47 MB.
LOAD_PIN_BYTES = 64 << 20
LOAD_BUFFER_OFF_CUDA = False  # (tests) that buffer, unpinned, on other devices too


def major_faults() -> int:
    """This process's page faults that read from disk so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(dtype) if dtype == torch.bfloat16 else t.to(dtype)


def serve_queue(q: queue.Queue, handle: Callable[[Any], None]) -> None:
    """A worker thread's loop: handle(item) for each item until None. Each item is marked
    done once handled, so `q.join()` waits for everything queued before it; `handle`
    deals with its own errors."""
    while True:
        item = q.get()
        try:
            if item is None:
                return
            handle(item)
        finally:
            q.task_done()


class StoreTier:
    def __init__(self, path: str, fingerprint: dict, capacity: str, codec: str, pool,
                 on_loaded, readonly: bool = False) -> None:
        self.readonly = readonly
        if readonly:
            self.store = ChunkStore(path, fingerprint, readonly=True)
        else:
            self.store = ChunkStore(path, fingerprint, capacity_bytes=parse_bytes(capacity),
                                    codec=codec)
        self.path = path
        self.pool = pool
        self.c = pool.page_size
        self.on_loaded = on_loaded  # (pages tensor) -> None: refresh summaries
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # queued for the writer, not yet committed
        self._touched: dict[str, float] = {}  # (writer) chunk -> when last marked
        self._touch_buf: list[str] = []  # marks held back while the engine is busy
        self._readers: ThreadPoolExecutor | None = None  # read_layers' threads
        # `read_ahead`'s pinned buffer, the event of its last copies to the device, and the
        # last read ahead into it (the next one waits for both before writing into it)
        self._load_pin = self._load_done = self._ahead_prev = None
        cuda = pool.k.device.type == "cuda"
        if cuda or LOAD_BUFFER_OFF_CUDA:
            self._load_pin = torch.empty(LOAD_PIN_BYTES // pool.k.element_size(),
                                         dtype=pool.k.dtype, pin_memory=cuda)
            self._load_done = torch.cuda.Event() if cuda else None
        # Whether the last bulk read took major page faults (blocks read from disk): then
        # reads go over the reader threads, else on the calling thread (from the page
        # cache the threads only add overhead). Assumed cold until a read says otherwise.
        self.cold = True
        self._touch_since = 0.0
        self.busy = False
        self._known: set[str] = set()  # seen stored (valid while removed_total holds)
        self._packed: set[str] = set()  # first chunks of groups queued or found packed
        self._removed = -1
        self._bad: set[str] = set()  # corrupt chunks a read-only tier cannot drop
        # contexts cut back by dropping a corrupt chunk: restored once it is republished
        self._restore: dict[str, list[tuple[ContextInfo, ContextInfo]]] = {}
        self.last_error: Exception | None = None
        self._q: queue.Queue = queue.Queue()
        self.stats = {"store_chunks_written": 0, "store_chunks_loaded": 0,
                      "store_bytes_loaded": 0, "store_write_errors": 0,
                      "store_full_errors": 0, "store_corrupt_blocks": 0,
                      "store_touched_chunks": 0, "store_writer_ms": 0,
                      "store_summary_packs": 0}
        self.last_full: StoreFull | None = None
        self._writer = threading.Thread(target=self._write_loop, name="kv-store-writer",
                                        daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ write behind

    def save(self, token_ids, pages: list[int], first: int, namespace: str,
             ids: list[str]) -> None:
        """Persist full chunks [first, len(pages)) of a sequence whose chunk i lives in
        pages[i] and has store id ids[i]. Engine thread: copies the K/V out now, the writer
        thread stores them. `token_ids`: a list or anything sliced like one (only the saved
        chunks are read)."""
        if self.readonly or first >= len(pages):
            return
        assert len(ids) >= len(pages), "save: fewer ids than pages"
        self._forget_if_removed()
        self._save_chunks(token_ids, pages, first, namespace, ids)
        self._queue_packs(ids[:len(pages)], first)

    @staticmethod
    def pack_start(i: int) -> int:
        """Where the summary pack holding a chain's chunk i starts in the chain."""
        return i - i % SUMMARY_PACK

    def pack(self, ids: list[str]) -> None:
        """Summary packs, written behind, for the groups of SUMMARY_PACK chunks of `ids`
        (a stored chain from its root): a context's bulk summary read then takes one value
        per group, not one per chunk. Groups packed already are skipped by the writer (and
        those this tier saw packed, here)."""
        if self.readonly:
            return
        self._forget_if_removed()
        self._queue_packs(ids, 0)

    def _queue_packs(self, ids: list[str], first: int) -> None:
        """Pack jobs for the groups of a chain from its root that end past chunk `first`."""
        for end in range((first // SUMMARY_PACK + 1) * SUMMARY_PACK, len(ids) + 1,
                         SUMMARY_PACK):
            with self._lock:
                if ids[end - SUMMARY_PACK] in self._packed:
                    continue
                self._packed.add(ids[end - SUMMARY_PACK])
            self._q.put(("pack", ids[end - SUMMARY_PACK: end]))

    def _forget_if_removed(self) -> None:
        """`_known` and `_packed` remember chunks seen stored and groups seen packed; any
        removal (eviction, delete) by any process sharing the store bumps removed_total
        (removing a chunk removes its pack), and then they are forgotten."""
        removed = self.store.removed_total()
        with self._lock:
            if removed != self._removed or len(self._known) + len(self._packed) > 1 << 20:
                self._known.clear()
                self._packed.clear()
                self._removed = removed

    def _save_chunks(self, token_ids, pages: list[int], first: int, namespace: str,
                     ids: list[str]) -> None:
        with self._lock:
            todo = [i for i in range(first, len(pages))
                    if ids[i] not in self._known and ids[i] not in self._pending]
        if not todo:
            return
        present = self.store.has_many([ids[i] for i in todo])
        with self._lock:
            self._known.update(ids[i] for i, p in zip(todo, present) if p)
        todo = [i for i, p in zip(todo, present) if not p]
        if not todo:
            return
        idx = torch.tensor([pages[i] for i in todo], device=self.pool.k.device)
        k = self.pool.k[:, idx]  # [L, n, C, Hkv, D]
        v = self.pool.v[:, idx]
        kf = k.float()
        summary = torch.stack([kf.amin(2), kf.amax(2)], dim=2)  # [L, n, 2, Hkv, D]
        k_np, v_np = _to_numpy(k), _to_numpy(v)
        s_np = summary.permute(1, 0, 2, 3, 4).contiguous().cpu().numpy()
        c = self.c
        records = [ChunkRecord(ids[i], ids[i - 1] if i else None, namespace,
                               token_ids[i * c:(i + 1) * c], k_np[:, j], v_np[:, j], s_np[j])
                   for j, i in enumerate(todo)]
        with self._lock:
            self._pending.update(ids[i] for i in todo)
            self._bad.difference_update(ids[i] for i in todo)
        self._q.put(("put", records))

    def touch(self, chunk_ids: list[str], now: bool = True) -> None:
        """Mark chunks as just used (root first), behind: loaded chunks, used contexts.
        While requests run (`busy`) the marks are held back, up to TOUCH_DEFER_S seconds:
        the writer's LRU bookkeeping (a few microseconds of Python per chunk, 16K chunks
        for a million-token context) would otherwise contend for the interpreter with the
        steps it follows. now=False: held back even while idle, until the engine's next
        idle point (a request about to be submitted)."""
        if not chunk_ids or self.readonly:
            return
        with self._lock:
            if not self._touch_buf:
                self._touch_since = time.monotonic()
            self._touch_buf.extend(chunk_ids)
        if now:
            self.idle_work(self.busy)

    def idle_work(self, busy: bool) -> None:
        """Between engine steps: hand held-back marks to the writer when the engine is
        idle, or when the oldest has waited TOUCH_DEFER_S."""
        self.busy = busy
        with self._lock:
            if not self._touch_buf or (
                    busy and time.monotonic() - self._touch_since < TOUCH_DEFER_S):
                return
            ids, self._touch_buf = self._touch_buf, []
        self._q.put(("touch", (ids, self._touch_since)))

    def _fresh_marks(self, ids: list[str]) -> list[str]:
        """(The writer's) of marks handed over, each chunk once, and none marked within
        TOUCH_REFRESH_S (`_marked`): a question over a million-token context marks its 16K
        chunks twice (the context, then its attached chunks), and the writer's marks
        (about 17 us of Python per chunk on the CI machine) ran beside the next question's
        steps."""
        now, touched = time.monotonic(), self._touched
        if len(touched) > TOUCHED_MAX:
            touched.clear()
        return [c for c in dict.fromkeys(ids)
                if now - touched.get(c, -TOUCH_REFRESH_S) >= TOUCH_REFRESH_S]

    def _marked(self, ids: list[str]) -> None:
        self._touched.update(dict.fromkeys(ids, time.monotonic()))

    def _write_marks(self, ids: list[str], since: float) -> None:
        """(The writer) last-used marks, TOUCH_BATCH per write transaction. Marks handed
        over at an idle point wait again, from the next batch on, once the engine is busy,
        until the next idle point or until TOUCH_DEFER_S after `since` (when the oldest was
        held back): 16K marks are a few hundred ms of the interpreter, and a question
        arriving just after the idle point ran its first steps beside them."""
        ids = self._fresh_marks(ids)
        for lo in range(0, len(ids), TOUCH_BATCH):
            if lo and self.busy and time.monotonic() - since < TOUCH_DEFER_S:
                with self._lock:
                    if self._touch_buf:
                        since = min(since, self._touch_since)
                    self._touch_buf[:0] = ids[lo:]
                    self._touch_since = since
                return
            batch = ids[lo:lo + TOUCH_BATCH]
            self.store.touch(batch)
            self._marked(batch)
            self.stats["store_touched_chunks"] += len(batch)

    def hold(self, chunk_ids: list[str]) -> None:
        """Keep chunks in use from this process's evictions until `release` (in memory
        only: a crashed process holds nothing)."""
        if chunk_ids:
            self.store.hold(chunk_ids)

    def release(self, chunk_ids: list[str]) -> None:
        if chunk_ids:
            self.store.release(chunk_ids)

    def _write_loop(self) -> None:
        serve_queue(self._q, self._write_one)

    def _write_one(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        t = time.perf_counter()
        try:
            if kind == "put":
                self._put(payload)
            elif kind == "pack":
                try:
                    self.stats["store_summary_packs"] += self.store.pack_summaries(payload)
                except BaseException:
                    with self._lock:  # may be tried again
                        self._packed.discard(payload[0])
                    raise
            elif kind == "touch":
                self._write_marks(*payload)
                self._restore_contexts()
        except (StoreError, ValueError) as e:
            logger.warning("kv store %s failed: %s", kind, e)
        finally:
            self.stats["store_writer_ms"] += round((time.perf_counter() - t) * 1e3)

    def _put(self, records: list[ChunkRecord]) -> None:
        try:
            parent = records[0].parent_id
            if parent and parent not in {r.chunk_id for r in records} \
                    and not self.store.has(parent):  # fail before compressing anything
                raise ChunkNotFound(parent, "parent chunk (an earlier write failed or "
                                            "was evicted)")
            self.store.put_chunks(records)
            self.stats["store_chunks_written"] += len(records)
            with self._lock:
                self._known.update(r.chunk_id for r in records)
        except (StoreError, ValueError) as e:
            self.stats["store_write_errors"] += 1
            self.last_error = e
            if isinstance(e, StoreFull):
                self.stats["store_full_errors"] += 1
                self.last_full = e
            logger.warning("kv store write failed (%d chunks): %s", len(records), e)
        finally:
            with self._lock:
                self._pending.difference_update(r.chunk_id for r in records)
        self._restore_contexts()

    def flush(self) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        self.idle_work(False)
        self._q.join()

    def pending(self, chunk_ids: list[str]) -> bool:
        """Whether any of these chunks is still queued for the writer."""
        with self._lock:
            return any(c in self._pending for c in chunk_ids)

    # ------------------------------------------------------------------ reuse

    def lookup(self, ids: list[str], start: int, stop: int) -> list[str]:
        """Of a sequence's chunk ids, those of its stored chunks [start, start + n), n
        maximal <= stop."""
        if stop <= start:
            return []
        ids = ids[start:stop]
        # A chunk is published after its parent and removed with its subtree (evicted or
        # deleted), so what a store holds of a chain is a prefix of it: found by bisection,
        # a few reads, not one per chunk (16K of them took 42 ms of a 1M-token TTFT).
        lo, hi = 0, len(ids)  # ids[:lo] stored, ids[hi:] not
        while lo < hi:
            mid = (lo + hi) // 2
            if self.store.has(ids[mid]):
                lo = mid + 1
            else:
                hi = mid
        out = ids[:lo]
        if self._bad:
            out = out[: next((i for i, c in enumerate(out) if c in self._bad), len(out))]
        return out

    def read_ahead(self, chunk_ids: list[str]) -> Future:
        """Start reading every layer of these chunks on a reader thread, for a later
        `load(chunk_ids, pages, ahead)`: a streamed admission reads its sink and local
        window while it reads the context's summaries (after a restart on the H200 each
        took 70-100 ms of a 1M-token TTFT, one after the other)."""
        # Each layer's read on its reader thread alone: split into parts, they queued on
        # the store's worker threads ahead of the summaries' checks (the summaries' read
        # took 135 ms, not 66, on the H200's host). And at most AHEAD_READERS layers at
        # once: with 16, the engine thread's own Python work (holding and looking up 16K
        # chunks) waited for the interpreter lock (47 ms, not 8, to hold them).
        out = self._load_buffer(len(chunk_ids))
        prev = self._ahead_prev

        def run():
            if out is not None:  # the buffer's last use is over: its reads, its copies
                if prev is not None:
                    futures.wait([prev])
                if self._load_done is not None:
                    self._load_done.synchronize()
            return out, list(self.read_layers(chunk_ids, 1, AHEAD_READERS, out))

        fut = self._reader_pool().submit(run)
        if out is not None:
            self._ahead_prev = fut
        return fut

    def _load_buffer(self, n: int) -> torch.Tensor | None:
        """The pinned buffer as [L, n, 2, C, Hkv, D] (None: not CUDA, or too small)."""
        if self._load_pin is None:
            return None
        shape = (self.pool.k.shape[0], n, 2) + tuple(self.pool.k.shape[2:])
        size = math.prod(shape)
        return self._load_pin[:size].view(shape) if size <= self._load_pin.numel() else None

    def load(self, chunk_ids: list[str], pages: list[int], ahead: Future | None = None
             ) -> int:
        """Copy stored chunks into pool pages; returns how many leading chunks loaded. A
        corrupt block is reported and its chunk dropped from the store (recomputed).
        ahead: `read_ahead(chunk_ids)`'s reads, taken instead of reading now."""
        n = len(chunk_ids)
        try:
            idx = torch.tensor(pages[:n], device=self.pool.k.device)
            pinned, layers = (ahead.result() if ahead is not None
                              else (None, self.read_layers(chunk_ids[:n])))
            for layer, kv in layers:
                # K and V of a layer in one copy (as separate views, each went as a
                # contiguous host copy and then a copy of its own); from the pinned
                # buffer it was read into, queued
                src = pinned[layer] if pinned is not None else _from_numpy(kv, self.pool.k.dtype)
                kv_dev = src.to(self.pool.k.device, non_blocking=pinned is not None)
                self.pool.k[layer, idx] = kv_dev[:, 0]
                self.pool.v[layer, idx] = kv_dev[:, 1]
                self.stats["store_bytes_loaded"] += kv.nbytes
            if pinned is not None and self._load_done is not None:
                self._load_done.record()
        except CorruptBlock as e:
            self.stats["store_corrupt_blocks"] += 1
            logger.error("kv store: %s; dropping it, it will be recomputed", e)
            bad = chunk_ids.index(e.chunk_id) if e.chunk_id in chunk_ids else 0
            self.drop_corrupt(e.chunk_id)
            return self.load(chunk_ids[:bad], pages[:bad]) if bad else 0
        except ChunkNotFound as e:  # evicted (by another process) since the lookup
            cut = chunk_ids.index(e.chunk_id) if e.chunk_id in chunk_ids else 0
            return self.load(chunk_ids[:cut], pages[:cut]) if cut else 0
        if n:
            self.on_loaded(torch.tensor(pages[:n], device=self.pool.k.device))
            self.stats["store_chunks_loaded"] += n
            self.touch(chunk_ids[:n])
        return n

    def _reader_pool(self) -> ThreadPoolExecutor:
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="kv-store-reader")
        return self._readers

    @contextlib.contextmanager
    def _watch_faults(self):
        """Around a bulk read: `cold` becomes whether it took major page faults (counted
        for the whole process, so another thread's faults count too: a read is split for
        nothing at worst)."""
        before = major_faults()
        try:
            yield
        finally:
            self.cold = major_faults() > before

    def get_summaries(self, chunk_ids: list[str], out=None, pack_of_first=None):
        """ChunkStore.get_summaries (quantized: int8 and scales, into `out` if given),
        noting whether the store is being read from disk. The packs it read intact count
        as packed (`pack` queues no job for them): after a streamed admission, a 1M-token
        context's 64 jobs, each a write transaction finding its pack there, ran on the
        writer thread beside the question's forward."""
        seen: dict[bytes, bool] = {}
        self._forget_if_removed()  # (a removal from here on forgets what this read adds)
        with self._watch_faults():
            got = self.store.get_summaries(chunk_ids, dequantize=False, out=out,
                                           pack_of_first=pack_of_first, packs_seen=seen)
        if seen and not self.readonly:
            with self._lock:  # (a damaged pack is queued again, and rewritten)
                self._packed.update(k.hex() for k, ok in seen.items() if ok)
                self._packed.difference_update(k.hex() for k, ok in seen.items() if not ok)
        return got

    def get_kv(self, chunk_ids: list[str], layer: int, out: np.ndarray | None = None,
               split: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ChunkStore.get_kv_many (into `out` [n, 2, C, H, D] if given). Many chunks are
        split over the reader threads, each filling its rows of one buffer, when `split`
        (default: when the store is being read from disk, `cold`): blocks not in the page
        cache then come from disk several at a time."""
        parts = min(READERS, len(chunk_ids) // SPLIT_MIN)
        if not (self.cold if split is None else split):
            parts = 1
        with self._watch_faults():
            if parts < 2:
                return self.store.get_kv_many(chunk_ids, layer, out)
            if out is None:
                out = np.empty((len(chunk_ids), 2) + self.store.kv_shape, self.store.np_dtype)
            bounds = [len(chunk_ids) * i // parts for i in range(parts + 1)]
            futs = [self._reader_pool().submit(self.store.get_kv_many, chunk_ids[a:b], layer,
                                               out[a:b])
                    for a, b in zip(bounds, bounds[1:])]
            for f in futs:
                f.result()  # the first failing part's error, in order
            return out[:, 0], out[:, 1]

    def read_layers(self, chunk_ids: list[str], parts: int | None = None,
                    readers: int = READERS, out: torch.Tensor | None = None):
        """(layer, kv) of every layer of these chunks, in layer order, kv [n, 2, C, H, D]
        (K then V of each chunk). Layers are read ahead on a pool of reader threads (a
        window bounded by READ_AHEAD_BYTES): blocks not in the page cache come from disk
        several at a time, as page faults and checksums run outside the interpreter lock.
        Errors surface in layer order. parts: get_kv_many's, per layer; readers: the most
        reader threads used. out: [L, n, 2, C, H, D] to read into (each layer's kv a view
        of it), else fresh arrays."""
        num_layers = self.pool.k.shape[0]
        per_layer = 2 * len(chunk_ids) * self.pool.k[0, 0].numel() * self.pool.k.element_size()
        window = max(1, min(readers, READ_AHEAD_BYTES // max(per_layer, 1)))

        def read(layer: int) -> np.ndarray:
            buf = (_to_numpy(out[layer]) if out is not None else
                   np.empty((len(chunk_ids), 2) + self.store.kv_shape, self.store.np_dtype))
            self.store.get_kv_many(chunk_ids, layer, buf, parts)
            return buf

        if window == 1 or num_layers == 1 or not self.cold:
            with self._watch_faults():
                for layer in range(num_layers):
                    yield layer, read(layer)
            return
        readers = self._reader_pool()
        ahead: deque = deque()
        nxt = 0
        try:
            with self._watch_faults():
                while nxt < num_layers or ahead:
                    while nxt < num_layers and len(ahead) < window:
                        ahead.append((nxt, readers.submit(read, nxt)))
                        nxt += 1
                    layer, fut = ahead.popleft()
                    yield layer, fut.result()
        finally:
            for _, fut in ahead:  # stopped early (an error): reads not started are dropped
                fut.cancel()

    def drop_corrupt(self, chunk_id: str) -> None:
        """Take a chunk that failed its checksum out of use: deleted with its subtree
        (the engine recomputes and republishes them); named contexts cut back by that
        are restored once their last chunk is republished. A read-only tier only
        remembers not to read it again."""
        with self._lock:
            self._bad.add(chunk_id)
        if self.readonly:
            return
        try:
            before = {c.name: c for c in self.store.list_contexts()}
            self.store.delete(chunk_id, reason="checksum mismatch")
            after = {c.name: c for c in self.store.list_contexts()}
        except StoreError as e:
            logger.warning("kv store: could not drop corrupt chunk %s: %s", chunk_id, e)
            return
        with self._lock:
            self._bad.discard(chunk_id)
            for name, old in before.items():
                cut = after.get(name)
                if (cut is not None and old.last_chunk_id and not old.lost_tokens
                        and cut.lost_tokens > old.lost_tokens):
                    self._restore.setdefault(old.last_chunk_id, []).append((old, cut))

    def _restore_contexts(self) -> None:
        """Writer thread: point contexts cut back by a dropped corrupt chunk at their old
        end again once it is back in the store (unless they changed meanwhile)."""
        with self._lock:
            waiting = list(self._restore)
        if not waiting:
            return
        for last, there in zip(waiting, self.store.has_many(waiting)):
            if not there:
                continue
            with self._lock:
                entries = self._restore.pop(last, [])
            for old, cut in entries:
                try:
                    cur = self.store.get_context(old.name)
                    if cur != cut:  # replaced, deleted, pinned, used meanwhile: leave it
                        continue
                    self.store.put_context(old.name, old.last_chunk_id, old.token_count,
                                           pinned=cur.pinned)
                    logger.info("kv store: context %r restored after recomputing", old.name)
                except StoreError as e:
                    logger.warning("kv store: could not restore context %r: %s", old.name, e)

    def close(self) -> None:
        self.idle_work(False)
        self._q.put(None)
        self._writer.join(timeout=60)
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        self.store.close()

    def gauges(self) -> dict[str, Any]:
        """Live state of the store (one short read transaction)."""
        try:
            st = self.store.stats()
        except StoreError:
            return {"store_readonly": int(self.readonly)}
        return {"store_chunks": st["chunks"], "store_bytes": st["bytes"],
                "store_capacity": st["capacity"], "store_readonly": int(self.readonly)}

    def info(self) -> dict[str, Any]:
        return dict(self.stats, **{f"store_{k}": v for k, v in self.store.stats().items()
                                   if isinstance(v, (int, float))})
