"""The streaming tier: contexts longer than the KV pool, served from the disk tier.

A streamed request keeps only its sink and local-window pages (and the pages it computes
itself) in the pool. Its other stored chunks are *virtual pages*: ids `num_pages + slot`
in the request's page list, whose per-layer min/max key summaries were loaded in bulk from
the store into ReAttention's summary rows past the pool's pages (a fixed number of slots,
`--kv-stream-max-tokens`). ReAttention scores real and virtual candidates alike; the
chunks it selects in a layer are then mapped to pages of the *chunk cache*:

    GPU chunk cache  (ChunkCache: pool pages set aside, an LRU per layer)
      <- host tier   (HostCache: (chunk, layer) -> K/V read ahead, LRU by bytes)
      <- LMDB        (ChunkStore.get_kv_many: checksums verified)

Blocks go to the device through two pinned staging buffers used in turn; a block read on
demand (or due before a decode step) goes from LMDB straight into one (`_fill_many`), not
through the host tier.

A cache page is used per layer independently: page p may hold chunk X's layer-0 K/V and
chunk Y's layer-1 K/V. The identity of a cached block is its chunk id (a chained hash of
the tokens and namespace), so sequences sharing a stored prefix share cache entries.

Summary slots are shared by requests over the same chunks and kept while idle.

Eager steps map a layer's selection on the host (`resolve`: one sync per layer). CUDA-graph
decode steps map it on the device through `page_map` [L, slots] (the chunk-cache page of
each slot's chunk in each layer, -1 when not cached), mirrored on the host: after a
replay, `settle` reads every layer's selection back; chunks that were not cached are
fetched and the step is replayed (the scheduler never sees the discarded replay).

After every step the chunks each streamed request selected, per layer, and the runners-up
ranked just below them (ReAttention's `spare`: the chunks a drifting selection most likely
takes next), are its prefetch hint: for the requests the next step is expected to run,
blocks held by the host tier are
copied into the chunk cache right away (on a side stream on CUDA, waited for by the next
step's first fetch); blocks in neither tier are read from LMDB into the host tier by a
background thread. A block that fails its checksum is never cached nor served: the fetch
raises `StreamFault` and the scheduler drops the chunk and requeues the request.

Attached chunks are held in the store (`ChunkStore.hold`, in memory: nothing leaks if the
process dies) from their first reference to their last, so this process's writes never
evict a chunk a running request may select.

The scheduler (`_admit_streamed`, `_spill`) decides which chunks are virtual: a stored
prefix that does not fit the pool, and the completed middle chunks of a prompt longer
than the pool, written to the store between its prefill pieces, or of a long generation,
written as they leave the local window.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent import futures

import numpy as np
import torch

from sglang_reattn.engine.store_tier import SUMMARY_PACK, _to_numpy, serve_queue
from sglang_reattn.kernels._triton_compat import next_pow2
from sglang_reattn.kv_store import ChunkNotFound, CorruptBlock, StoreError

logger = logging.getLogger(__name__)

SUMMARY_PIECE = 8 * SUMMARY_PACK  # chunks per piece of a pipelined summary read
# (CUDA) pinned memory taken when the tier is made, not on a request's path: fresh pinned
# memory cost 0.6-0.9 ms per MiB on the H200's host (bench_pinned_alloc.py). Each of the two
# staging buffers starts with room for every layer's selection and due runners-up, up to
# STAGE_BYTES (a 1M-token prompt's first decode step staged 877 blocks, 42 MB, and grew
# one to 64 MiB in that step); each of the two summary buffers holds a piece of at most
# SUMMARY_BUFFER_BYTES (whole packs).
STAGE_BYTES = 64 << 20
SUMMARY_BUFFER_BYTES = 32 << 20
PREFETCH_YIELD_S = 0.5  # longest a read ahead waits for a fill on the engine thread


class StreamFault(Exception):
    """A streamed chunk could not be read (corrupt block, or evicted from the store)."""

    def __init__(self, chunk_id: str, cause: StoreError) -> None:
        super().__init__(f"streamed chunk {chunk_id}: {cause}")
        self.chunk_id = chunk_id
        self.cause = cause

    @property
    def corrupt(self) -> bool:
        return isinstance(self.cause, CorruptBlock)


class StreamFull(RuntimeError):
    """Every summary slot of the streaming tier is referenced."""


class HostCache:
    """LRU map key -> (k, v) tensors, bounded by their bytes. Thread-safe (the prefetch
    thread fills it while the engine thread reads it). A pair larger than the whole
    capacity is not kept."""

    def __init__(self, capacity_bytes: int) -> None:
        assert capacity_bytes >= 0, "capacity must be non-negative"
        self.capacity = capacity_bytes
        self._d: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def _size(kv: tuple[torch.Tensor, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in kv)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def get(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pair (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            kv = self._d.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return kv

    def peek(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pair or None, counting nothing and leaving the LRU order alone."""
        with self._lock:
            return self._d.get(key)

    def put(self, key: Hashable, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Insert (or refresh) a pair, evicting least recently used ones beyond the
        capacity. Returns whether it is kept."""
        size = self._size((k, v))
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old)
            if size > self.capacity:
                return False
            self._d[key] = (k, v)
            self._bytes += size
            while self._bytes > self.capacity:
                _, gone = self._d.popitem(last=False)
                self._bytes -= self._size(gone)
                self.evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def keys(self) -> list[Hashable]:
        """Keys, least recently used first (tests)."""
        with self._lock:
            return list(self._d)


class ChunkCache:
    """Per-layer LRU map chunk key -> pool page over one fixed set of pages.

    Each layer has its own map and its own free list over the same pages, so a page holds
    unrelated chunks in different layers. Recency is a stamp per (layer, page) from one
    counter (every access takes the next value), so a whole step's hits, every layer at
    once, are stamped with one numpy assignment (`touch_pages`). Engine thread only."""

    def __init__(self, num_layers: int, pages: Sequence[int], on_change=None) -> None:
        self.pages = list(pages)
        self._maps: list[dict[Hashable, int]] = [{} for _ in range(num_layers)]
        self._free = [self.pages[::-1] for _ in range(num_layers)]
        # page -> its position in `pages`; per (layer, position): key and last-use stamp
        self._pos = np.full(max(self.pages, default=-1) + 1, -1, dtype=np.int64)
        self._pos[self.pages] = np.arange(len(self.pages))
        self._key: list[list[Hashable | None]] = [[None] * len(self.pages)
                                                  for _ in range(num_layers)]
        self._stamp = np.zeros((num_layers, len(self.pages)), dtype=np.int64)
        self._clock = 0
        self.hits = self.misses = self.evictions = 0
        # on_change(layer, key, page or None): a key was mapped to a page or unmapped
        self._on_change = on_change or (lambda layer, key, page: None)

    def _use(self, layer: int, page: int) -> None:
        self._clock += 1
        self._stamp[layer, self._pos[page]] = self._clock

    def touch_pages(self, layers: np.ndarray, pages: np.ndarray, distinct: bool = False
                    ) -> None:
        """Many layers' cached pages at once (`layers[i]`'s `pages[i]`, in access order)
        become most recently used; each distinct (layer, page) counts as a hit
        (`distinct`: the caller knows there are no repeats)."""
        n = len(pages)
        if not n:
            return
        self._stamp[layers, self._pos[pages]] = self._clock + 1 + np.arange(n)
        self._clock += n
        self.hits += n if distinct else len(np.unique(layers * len(self._pos) + pages))

    def page_of(self, layer: int, key: Hashable) -> int | None:
        """The page holding `key` in `layer` (no LRU update), or None."""
        return self._maps[layer].get(key)

    def missing(self, layer: int, keys: Sequence[Hashable]) -> list[Hashable]:
        """Those of `keys` not held in `layer`, in order (no LRU update): the loads ahead
        ask this of every chunk a step selected, each step (one membership test each, 2.5x
        faster than page_of in a loop)."""
        held = self._maps[layer]
        return [k for k in keys if k not in held]

    def _order(self, layer: int) -> list[int]:
        """Positions of the layer's mapped pages, least recently used first."""
        keys = self._key[layer]
        used = [i for i, k in enumerate(keys) if k is not None]
        return sorted(used, key=lambda i: self._stamp[layer, i])

    def keys(self, layer: int) -> list[Hashable]:
        """Keys of one layer, least recently used first."""
        return [self._key[layer][i] for i in self._order(layer)]

    def items(self, layer: int) -> list[tuple[Hashable, int]]:
        """(key, page) of one layer (any order)."""
        return list(self._maps[layer].items())

    def acquire(self, layer: int, keys: Sequence[Hashable], count: bool = True
                ) -> tuple[list[int], list[tuple[Hashable, int]]]:
        """Pages for `keys` (one layer, one step) -> (page of each key, [(key, page)] to
        fill). Cached keys become most recently used; a missing one takes a free page or
        evicts the least recently used key that is not among `keys`; RuntimeError (and
        nothing new mapped) when `keys` has more distinct keys than the cache has pages.
        The caller must fill the returned pages (or `forget` them) before any read.
        `count=False` (prefetch) leaves the hit and miss counters alone."""
        m = self._maps[layer]
        out: list[int] = []
        fills: list[tuple[Hashable, int]] = []
        seen: set = set()
        keep = None  # positions an eviction must not take (keys of this call), when needed
        for key in keys:
            page = m.get(key)
            if page is not None:
                if key not in seen and count:  # a key repeated in one call counts once
                    self.hits += 1
            else:
                self.misses += count
                if keep is None and not self._free[layer]:
                    keep = np.zeros(len(self.pages), dtype=bool)
                    keep[[self._pos[m[k]] for k in set(keys) if k in m]] = True
                page = self._take(layer, keep)
                if page is None:  # nothing of this call stays mapped
                    self.forget(layer, [k for k, _ in fills])
                    raise RuntimeError(f"chunk cache of {len(self.pages)} pages is smaller "
                                       f"than one step's selection of {len(set(keys))} chunks")
                if keep is not None:
                    keep[self._pos[page]] = True
                m[key] = page
                self._key[layer][self._pos[page]] = key
                self._on_change(layer, key, page)
                fills.append((key, page))
            self._use(layer, page)
            seen.add(key)
            out.append(page)
        return out, fills

    def _take(self, layer: int, keep: np.ndarray | None) -> int | None:
        """A free page, else the least recently used one not marked in `keep` (with no
        free page every page is mapped), evicted; None when every page is marked."""
        if self._free[layer]:
            return self._free[layer].pop()
        stamps = np.where(keep, np.iinfo(np.int64).max, self._stamp[layer])
        i = int(np.argmin(stamps)) if len(stamps) else 0
        if not len(stamps) or keep[i]:
            return None
        keys = self._key[layer]
        key = keys[i]
        page = self._maps[layer].pop(key)
        keys[i] = None
        self.evictions += 1
        self._on_change(layer, key, None)
        return page

    def clear(self) -> None:
        for layer in range(len(self._maps)):
            self.forget(layer, list(self._maps[layer]))

    def forget(self, layer: int, keys: Sequence[Hashable]) -> None:
        """Drop entries whose pages were never filled (a failed fetch)."""
        m = self._maps[layer]
        for key in keys:
            page = m.pop(key, None)
            if page is not None:
                self._key[layer][self._pos[page]] = None
                self._on_change(layer, key, None)
                self._free[layer].append(page)


class StreamTier:
    """Virtual pages, their summaries, and the fetch path of streamed chunks."""

    def __init__(self, store_tier, pool, attn, cache_pages: list[int], host_bytes: int,
                 prefetch: bool) -> None:
        self.tier = store_tier
        self.store = store_tier.store
        self.pool = pool
        self.attn = attn
        self.base = pool.num_pages  # virtual page v is summary slot v - base
        num_layers, _, _, hkv, d = pool.k.shape
        self.num_layers = num_layers
        self._shape = (num_layers, hkv, d)
        # Virtual page base + s keeps its summaries in ReAttention's rows base + s.
        slots = attn.num_virtual
        assert slots > 0, "the streaming tier needs ReAttention's virtual summary rows"
        # slot -> chunk-cache page of its chunk, per layer (-1: not cached): the host's
        # copy, and the layers whose device copy (attn.page_map) is stale
        self.vmap = np.full((num_layers, slots), -1, dtype=np.int32)
        self._stale: set[int] = set()
        # (layer, slot) entries changed one by one since the device copy was last synced
        # (`sync_map` copies only those, not their whole layers)
        self._changed: list[tuple[int, int]] = []
        # Summary slots are shared by every request attaching the same chunk (reference
        # counted); a slot nobody references keeps its summary (`_idle`, LRU first) until
        # the slot is needed, so the next request over the same context (an ingest's next
        # piece, a follow-up question) reloads nothing.
        self._slot_ids: list[str | None] = [None] * slots
        self._slot_of: dict[str, int] = {}
        self._refs: list[int] = [0] * slots
        self._free_slots: list[int] = list(range(slots - 1, -1, -1))
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.cache = ChunkCache(num_layers, cache_pages, self._on_cache)
        self.host = HostCache(host_bytes)
        self._pin = pool.k.device.type == "cuda"
        self._stats_lock = threading.Lock()  # `fetch` runs on the engine and prefetch threads
        self.stats = {"stream_summaries_loaded": 0, "stream_summaries_reused": 0,
                      "stream_store_reads": 0,
                      "stream_store_bytes": 0, "stream_device_bytes": 0,
                      "stream_prefetch_reads": 0, "stream_device_prefetches": 0,
                      "stream_prefetch_hits": 0,
                      "stream_faults": 0, "stream_spilled_chunks": 0,
                      # graph decode steps, their replays after a chunk-cache miss, and
                      # steps run eagerly after MAX_STREAM_REPLAYS replays still missed
                      "stream_graph_steps": 0, "stream_graph_replays": 0,
                      "stream_graph_eager": 0,
                      # runners-up loaded before a replay (`replay_runners`)
                      "stream_replay_ahead": 0,
                      # chunks a prefill's last token selected, loaded before the
                      # decode step after it (`expect`)
                      "stream_due_loads": 0,
                      # chunks a graph step selected that its loads ahead, run while it
                      # replayed (`run_deferred`), put in the cache too late for it
                      "stream_ahead_late": 0,
                      # blocks of the next layer read while a layer of an eager streamed
                      # step was selected (`layer_ahead`; their bytes count in
                      # stream_store_bytes), and those the next layer took
                      "stream_layer_ahead_reads": 0, "stream_layer_ahead_hits": 0}
        # how many of each layer's runners-up (best first) are loaded ahead (None: all
        # that ReAttention reports)
        self.ahead_runners: int | None = None
        # how many of each layer's runners-up a step that missed loads, before its replay,
        # in the layers above the lowest that missed: those selected from inputs the replay
        # changes, so their picks may move to the runners-up
        self.replay_runners = 0
        # whether a streamed prefill piece completing its prompt also selects for its last
        # token alone, so that its first decode step's chunks are loaded before it
        # (`expect`; ReAttention reads this; the engine sets it where decode replays graphs)
        self.expect_next = True
        # and how many of that token's runners-up (best first) are loaded with it: the
        # first decode step's query drifts from the prompt's last one (bench_first_step,
        # default model, 16K tokens: of its 160 picks outside the prefill's selection, 78
        # were outside that token's selection, 9 outside it and its first 16 runners-up;
        # on the H200 at 1M tokens, 32 decoded faster than 16 in both runs that compared
        # them, bench_stream.py 2026-11-30)
        self.due_runners = 32
        # layer -> [(batch row, chunk)] selected by the step in progress
        self._selected: dict[int, list[tuple[int, str]]] = {}
        # layer -> [(batch row, chunk)] the decode step after the step in progress will
        # likely select, for the rows whose prompt it completes (`expect`)
        self._due: dict[int, list[tuple[int, str]]] = {}
        # CUDA: chunk-cache fills ahead of a step run on a side stream; the step's first
        # fetch makes the compute stream wait for them.
        self._side = torch.cuda.Stream(pool.k.device) if self._pin else None
        # `_stage`'s two pinned staging buffers and the events of their last copies
        # (and each one's pinned int64 buffer for the indices of the pages it fills)
        self._staged = ([[None, torch.cuda.Event(), None] for _ in range(2)] if self._pin
                        else [])
        self._ahead: torch.cuda.Event | None = None
        # (layer, slot) loaded into the chunk cache ahead of a step and not read yet
        self._loaded_ahead = np.zeros((num_layers, slots), dtype=bool)
        # Where decode replays graphs, a step's loads ahead (`prefetch`'s host-tier copies
        # and background reads) wait for the next graph step and run while its replay is
        # on the device (`run_deferred`); the engine sets this.
        self.defer_prefetch = False
        self._deferred: tuple | None = None
        # while a replay is in flight: the (layer, slot) entries its loads ahead changed
        # (`settle` counts a selected one as a miss: the replay read the map before them)
        self._flying = False
        self._in_flight: set[tuple[int, int]] = set()
        # Cleared while the engine thread fills the chunk cache for the step it is about
        # to run (`_fill_many`): the prefetch thread then waits before its next read, so
        # that it does not take the interpreter from a fill that step waits for.
        self._go = threading.Event()
        self._go.set()
        # chunks per piece of a summary read, and (CUDA) the two pinned buffers the pieces
        # are read into in turn, each [piece, L, 2, Hkv, D] int8, [piece, L, 2, Hkv] float32
        # scales, and the event of its last copy to the device
        self._piece = SUMMARY_PIECE  # (halved, packs staying whole, to fit a buffer)
        while (self._piece > SUMMARY_PACK and self._piece % 2 == 0
               and self._piece * num_layers * 2 * hkv * (d + 4) > SUMMARY_BUFFER_BYTES):
            self._piece //= 2
        self._summary_bufs = []
        if self._pin:
            topk = getattr(getattr(attn, "cfg", None), "topk", 0)
            self._prestage(num_layers * (topk + self.due_runners))
            self._summary_bufs = [
                (self._pinned(self._piece * num_layers * 2 * hkv * d, torch.int8),
                 self._pinned(self._piece * num_layers * 2 * hkv, torch.float32),
                 torch.cuda.Event()) for _ in range(2)]
        # Layer-ahead reads (eager streamed steps: a question's prefill): when a layer's
        # selection is known and mostly not cached, the next layer's blocks of the same
        # chunks are read from the store on a reader thread while this layer fills,
        # attends and the next layer runs up to its own selection (adjacent layers pick
        # many of the same chunks); that layer's fill then copies those it picked from
        # here instead of reading them.
        # _next: {layer: (its chunk ids, the future of the rows they were read into, or
        # of None when the read failed: the fill then reads them itself and reports it)},
        # read into the buffer of the layer's parity.
        # Off by default: on the H200 at 1M tokens (page cache), on 3dbf979, the median
        # TTFT of three restarts was 0.261 s without them and 0.304 s with them in one run,
        # 0.297 and 0.379 s in another (bench_stream.py, 2026-12-02). Not traced apart;
        # likely the reader threads' reads taking the interpreter from the engine
        # thread's fills.
        self.layer_ahead = False
        self._next: dict[int, tuple[list[str], futures.Future]] = {}
        self._next_bufs: list[np.ndarray | None] = [None, None]
        self._q: queue.Queue | None = None
        if prefetch:
            self._q = queue.Queue()
            self._thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                             name="kv-stream-prefetch")
            self._thread.start()

    # ------------------------------------------------------------------ virtual pages

    def is_virtual(self, page: int) -> bool:
        return page >= self.base

    def attach(self, chunk_ids: list[str], first: int = 0,
               lead: tuple[str, int] | None = None) -> list[int]:
        """Virtual pages of stored chunks: summaries not attached yet are read from the
        store in bulk. Raises StreamFault (nothing attached) when one cannot be read, and
        StreamFull (nothing attached) when the summary slots cannot take the new ones.
        Attached chunks are held in the store (safe from this process's evictions) until
        their last reference is released. first: chunk_ids[0]'s place in its chain (the
        summaries are read in pieces that start where the store's summary packs do);
        lead: (id, row) when chunk_ids[0] is row `row` of the summary pack that starts at
        chunk `id` (a streamed context's middle starts after its sink chunk)."""
        unique = list(dict.fromkeys(chunk_ids))
        new = [c for c in unique if c not in self._slot_of]
        revived = sum(1 for c in unique if c in self._slot_of
                      and self._slot_of[c] in self._idle)  # idle slots these take back
        room = len(self._free_slots) + len(self._idle) - revived
        if len(new) > room:
            raise StreamFull(
                f"streaming tier: {len(new)} more chunks do not fit its {len(self._slot_ids)} "
                f"summary slots ({room} free); raise --kv-stream-max-tokens")
        # Held before being read: what is read now stays readable while attached.
        hold = [c for c in unique if c not in self._slot_of or not self._refs[self._slot_of[c]]]
        self.tier.hold(hold)
        s = None
        try:
            if new:  # int8 [n, L, 2, Hkv, D] and float32 scales [n, L, 2, Hkv]
                # (on the calling thread: split over reader threads, the parts contended
                # and took longer in all on the H200)
                s = self._read_summaries(new, first, lead if new[0] == chunk_ids[0] else None)
                assert s[0].shape[1:] == (self.num_layers, 2) + self._shape[1:], \
                    f"stored summary shape {s[0].shape[1:]} does not match the model"
            # Idle summaries were read earlier, maybe before an eviction: still there?
            idle = [c for c in hold if c in self._slot_of]
            gone = [c for c, there in zip(idle, self.store.has_many(idle) if idle else [])
                    if not there]
            if gone:
                raise ChunkNotFound(gone[0], "streamed chunk (evicted)")
        except BaseException as e:
            self.tier.release(hold)
            if isinstance(e, (CorruptBlock, ChunkNotFound)):
                raise StreamFault(e.chunk_id, e) from e
            raise
        # (all new and each once, as a context's first attach after a restart: its 16K
        # chunks' bookkeeping without a dictionary lookup per chunk and reference)
        simple = len(new) == len(chunk_ids)
        if not simple:
            for cid in chunk_ids:  # referenced first: allocating below never evicts these
                slot = self._slot_of.get(cid)
                if slot is not None:
                    self._refs[slot] += 1
                    self._idle.pop(slot, None)
        slots = []
        if new:
            slots = self._alloc_slots(len(new))
            self._put_summaries(slots, *s)
            slot_ids = self._slot_ids
            for slot, cid in zip(slots, new):
                slot_ids[slot] = cid
            self._slot_of.update(zip(new, slots))
            self.vmap[:, slots] = -1
            fresh = set(new)
            for layer in range(self.num_layers):  # maybe cached under an earlier slot
                for cid, page in self.cache.items(layer):
                    if cid in fresh:
                        self.vmap[layer, self._slot_of[cid]] = page
            self._stale.update(range(self.num_layers))
        refs = self._refs
        if simple:
            for slot in slots:
                refs[slot] += 1
        else:
            fresh = set(new)
            for cid in chunk_ids:
                if cid in fresh:
                    refs[self._slot_of[cid]] += 1
        self.stats["stream_summaries_loaded"] += len(new)
        self.stats["stream_summaries_reused"] += len(chunk_ids) - len(new)
        self.tier.touch(chunk_ids)
        base = self.base
        if simple:
            return [base + slot for slot in slots]
        return [base + self._slot_of[c] for c in chunk_ids]

    def _read_summaries(self, chunk_ids: list[str], first: int,
                        lead: tuple[str, int] | None = None):
        """The quantized summaries of chunks (int8 [n, L, 2, Hkv, D], float32 scales
        [n, L, 2, Hkv]) as tensors on the device. They are read in pieces of `_piece` chunks
        (aligned to the chain from `first`, as the store's packs are), one after the other
        on this thread (the store spreads a piece's packs over its worker threads); on
        CUDA each piece is read into one of two pinned buffers, in turn, and copied from it
        asynchronously while the next is read. (Read into fresh arrays, then copied from
        pageable memory, a 1M-token context's took 71 and 31 ms one after the other on the
        H200's host; each piece read on a reader thread while this one waited, the first
        started 33 ms after the read began, beside a streamed admission's reads ahead.)
        lead: `attach`'s (the first piece starts inside that pack)."""
        n = len(chunk_ids)
        dev = self.attn.kmin.device
        piece = self._piece
        cuts = list(range(piece - first % piece, n, piece))
        q_dev = s_dev = None
        for j, (a, b) in enumerate(zip([0] + cuts, cuts + [n])):
            ids, pack = chunk_ids[a:b], lead if a == 0 else None
            if not self._summary_bufs:
                q, sc = map(torch.from_numpy, self.tier.get_summaries(ids, pack_of_first=pack))
            else:
                q_buf, s_buf, copied = self._summary_bufs[j % 2]
                copied.synchronize()  # (its last piece is on the device)
                shape = (b - a, self.num_layers, 2) + self._shape[1:]
                q = q_buf[: math.prod(shape)].view(shape)
                sc = s_buf[: math.prod(shape[:-1])].view(shape[:-1])
                self.tier.get_summaries(ids, out=(q.numpy(), sc.numpy()), pack_of_first=pack)
            if q_dev is None:
                q_dev = torch.empty((n,) + q.shape[1:], dtype=torch.int8, device=dev)
                s_dev = torch.empty((n,) + sc.shape[1:], dtype=torch.float32, device=dev)
            if q.shape[1:] != q_dev.shape[1:]:
                raise StoreError(f"summaries of {chunk_ids[a]}: their shape differs "
                                 "from the first chunk's (one model per store)")
            q_dev[a:b].copy_(q, non_blocking=True)
            s_dev[a:b].copy_(sc, non_blocking=True)
            if self._summary_bufs:
                self._summary_bufs[j % 2][2].record()
        return q_dev, s_dev

    def _put_summaries(self, slots: list[int], q: torch.Tensor, scales: torch.Tensor,
                       batch: int = 4096) -> None:
        """Quantized summaries on the device (int8 [n, L, 2, Hkv, D], scales [n, L, 2,
        Hkv], `_read_summaries`: copied as int8, a quarter of the float32 bytes) into the
        summary rows of `slots`, dequantized in batches of chunks."""
        kmin, kmax = self.attn.kmin, self.attn.kmax
        dev = kmin.device
        for lo in range(0, len(slots), batch):
            hi = min(lo + batch, len(slots))
            tq, ts = q[lo:hi], scales[lo:hi]
            t = (tq.float() * ts[..., None]).transpose(0, 1)  # [L, n, 2, Hkv, D]
            idx = torch.tensor(slots[lo:hi], device=dev) + self.base
            kmin[:, idx] = t[:, :, 0].to(kmin.dtype)
            kmax[:, idx] = t[:, :, 1].to(kmax.dtype)

    def _alloc_slots(self, n: int) -> list[int]:
        """n slots (`attach` checked that they exist): never used ones, then idle ones
        (least recently released first)."""
        while len(self._free_slots) < n and self._idle:
            self._free_idle_slot()
        out = self._free_slots[-n:][::-1]
        del self._free_slots[len(self._free_slots) - n:]
        return out

    def release(self, pages: list[int]) -> None:
        """Drop a request's references to its virtual pages (real pages are ignored); a
        chunk nobody references any more is no longer held in the store."""
        gone: list[str] = []
        for p in pages:
            if p >= self.base:
                slot = p - self.base
                assert self._refs[slot] > 0, f"virtual page {p} released twice"
                self._refs[slot] -= 1
                if self._refs[slot] == 0:
                    self._idle[slot] = None
                    gone.append(self._slot_ids[slot])
        self.tier.release(gone)

    def forget_cached(self) -> None:
        """After chunks were dropped from the store (a corrupt block and its subtree): a
        chunk recomputed under the same id must be read and scored as recomputed, so
        every cached block and idle summary goes."""
        self._drop_ahead_reads()
        self.cache.clear()
        self.host.clear()
        self._deferred = None
        self._loaded_ahead[:] = False
        self.forget_idle()

    def forget_idle(self) -> None:
        """Drop every idle summary."""
        while self._idle:
            self._free_idle_slot()

    def _free_idle_slot(self) -> None:
        """The least recently released idle slot forgets its chunk and becomes free."""
        slot, _ = self._idle.popitem(last=False)
        del self._slot_of[self._slot_ids[slot]]
        self._slot_ids[slot] = None
        self._free_slots.append(slot)
        self.vmap[:, slot] = -1
        self._loaded_ahead[:, slot] = False
        self._stale.update(range(self.num_layers))

    def chunk_of(self, page: int) -> str:
        cid = self._slot_ids[page - self.base]
        assert cid is not None, f"virtual page {page} is not attached"
        return cid

    # ------------------------------------------------------------------ per layer

    def _on_cache(self, layer: int, key: Hashable, page: int | None) -> None:
        slot = self._slot_of.get(key)
        if slot is not None:
            self.vmap[layer, slot] = -1 if page is None else page
            self._changed.append((layer, slot))
            if self._flying:
                self._in_flight.add((layer, slot))
            if page is None:
                self._loaded_ahead[layer, slot] = False

    def _wait_ahead(self) -> None:
        """The compute stream waits for chunk-cache fills made ahead on the side stream."""
        if self._ahead is not None:
            torch.cuda.current_stream().wait_event(self._ahead)
            self._ahead = None

    def sync_map(self) -> None:
        """Before a graph step: the device page map (attn.page_map) catches up with the
        host's, and the step waits for chunk-cache fills made ahead on the side stream.
        Layers marked stale are copied whole; entries changed one by one (the chunk
        cache's fills and evictions) are scattered, in one small copy: a whole layer of a
        2M-token tier's slots is 128 KiB."""
        self._wait_ahead()
        self._in_flight.clear()  # (a new replay reads the map as it is now)
        dev = self.attn.page_map.device
        changed, self._changed = self._changed, []
        if len(changed) > self.vmap.shape[1] // 16:  # (as many as a sixteenth of a layer)
            self._stale.update(layer for layer, _ in changed)
        elif changed:
            at = np.array(changed, dtype=np.int64).T
            if self._stale:  # (those layers are copied whole below)
                at = at[:, ~np.isin(at[0], list(self._stale))]
            if at.shape[1]:  # layer, slot and page of each, in one copy
                idx = torch.from_numpy(np.concatenate([at, self.vmap[at[0], at[1]][None]])
                                       ).to(dev)
                self.attn.page_map[idx[0], idx[1]] = idx[2].to(self.attn.page_map.dtype)
        if self._stale:
            layers = sorted(self._stale)
            self._stale.clear()
            src = torch.from_numpy(self.vmap[layers])
            self.attn.page_map[torch.tensor(layers)] = src.to(dev)

    def _picks(self, pages: np.ndarray) -> tuple[list[int], list[str]]:
        """Virtual entries of a [B, K] page array -> (their rows, their chunks)."""
        rows, cols = np.nonzero(pages >= self.base)
        return rows.tolist(), [self._slot_ids[p - self.base] for p in pages[rows, cols].tolist()]

    def settle(self, sel_pages: np.ndarray, runners: np.ndarray | None = None) -> bool:
        """After a graph step that mapped its selection through the page map: `sel_pages`
        [L, B, K] (the selected candidates per layer, -1 padded) and, with ReAttention's
        `spare`, the runners-up [L, B, R]. True when every virtual selected one was cached
        (they become most recently used, all layers in one numpy pass); else the missing
        chunks are fetched into the cache and False: the step must be replayed. The
        step's prefetch hint: its runners-up that are not cached (the selected ones are)."""
        virtual = sel_pages >= self.base
        layers, _, _ = np.nonzero(virtual)
        slots = sel_pages[virtual] - self.base
        pages = self.vmap[layers, slots]
        hit = pages >= 0
        if self._in_flight:  # mapped or unmapped after the replay read the map: a miss
            changed = np.array([layer * len(self._slot_ids) + slot
                                for layer, slot in self._in_flight], dtype=np.int64)
            late = np.isin(layers * len(self._slot_ids) + slots, changed)
            self.stats["stream_ahead_late"] += int(np.count_nonzero(hit & late))
            hit &= ~late
        missed = np.unique(layers[~hit]).tolist()
        # layers that missed: fetched (and stamped) by _cache_in; the others stamped here
        keep = np.isin(layers, missed, invert=True) if missed else slice(None)
        self.cache.touch_pages(layers[keep], pages[keep], distinct=sel_pages.shape[1] == 1)
        self._ahead_read(layers[keep], slots[keep])
        if missed:
            self._cache_in_many({layer: [self._slot_ids[s]
                                         for s in slots[layers == layer].tolist()]
                                 for layer in missed})
        if missed and runners is not None and self.replay_runners:
            self._load_runners(missed[0] + 1, runners[..., : self.replay_runners])
        self._selected = {}
        if runners is not None:
            rl, rb, rs = self._uncached(runners[..., : self.ahead_runners])
            for layer, row, slot in zip(rl.tolist(), rb.tolist(), rs.tolist()):
                self._selected.setdefault(layer, []).append((row, self._slot_ids[slot]))
        return not missed

    def _uncached(self, pages: np.ndarray, first: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The virtual entries of pages [L', B, K] (layers first..) whose chunk is not in
        the chunk cache -> (layer, batch row, summary slot) of each."""
        virtual = pages >= self.base
        rl, rb, _ = np.nonzero(virtual)
        rl += first
        rs = pages[virtual] - self.base
        cold = self.vmap[rl, rs] < 0
        return rl[cold], rb[cold], rs[cold]

    def _load_runners(self, first: int, runners: np.ndarray) -> None:
        """The uncached virtual runners-up [L, B, R] of layers `first`.. into the chunk
        cache now, ahead of a replay."""
        rl, _, rs = self._uncached(runners[first:], first)
        self._load({layer: [self._slot_ids[s] for s in rs[rl == layer].tolist()]
                    for layer in np.unique(rl).tolist()}, "stream_replay_ahead")

    def _load(self, keys_of: dict[int, list[str]], stat: str, faults: bool = True) -> None:
        """Chunks of {layer: chunk ids} into the chunk cache now, ahead of the step
        expected to read them (from the host tier or LMDB, all layers in one fill,
        `_fill_many`); `stat` counts the blocks that were not cached. faults=False: a
        layer whose read fails is left out (logged), the others still load."""
        fills = {}
        for layer, keys in keys_of.items():
            _, f = self.cache.acquire(layer, list(dict.fromkeys(keys)), count=False)
            if f:
                fills[layer] = f
        done = self._fill_many(fills, faults)
        for layer in done:
            self._loaded_ahead[layer, [self._slot_of[k] for k, _ in fills[layer]]] = True
            self.stats[stat] += len(fills[layer])

    def _ahead_read(self, layers: np.ndarray, slots: np.ndarray) -> None:
        """Chunks loaded ahead into the cache that a step has now read: prefetch hits."""
        used = self._loaded_ahead[layers, slots]
        if used.any():
            self.stats["stream_prefetch_hits"] += int(np.count_nonzero(
                np.unique(layers[used] * self._loaded_ahead.shape[1] + slots[used])))
            self._loaded_ahead[layers[used], slots[used]] = False

    def resolve(self, layer: int, sel_pages: np.ndarray, nsel: np.ndarray,
                runners: np.ndarray | None = None) -> np.ndarray:
        """Selected pages [B, K] (host arrays; the first nsel[b] of row b valid) with every
        virtual page replaced by the chunk-cache page now holding that chunk's layer K/V
        (a new array, or `sel_pages` itself when none is virtual): streamed steps run
        eagerly (`ReAttention._select_on_host`). `runners` [B, R]: the runners-up (hints)."""
        rows, cols, keys = [], [], []
        for b, (row, n) in enumerate(zip(sel_pages.tolist(), nsel.tolist())):
            for j in range(n):
                if row[j] >= self.base:
                    rows.append(b)
                    cols.append(j)
                    keys.append(self.chunk_of(row[j]))
        self._selected[layer] = list(zip(rows, keys))
        if runners is not None:
            self._selected[layer] += list(zip(*self._picks(runners[:, : self.ahead_runners])))
        self._wait_ahead()
        # Read ahead only while this layer's own picks mostly miss its chunk cache (a
        # question's prefill after a restart): on the H200 a cold 1M-token TTFT's next
        # layers took 1,075 of the 1,798 blocks read ahead, the warm follow-up questions
        # 47 of 1,003.
        if self.layer_ahead and 2 * sum(
                self.cache.page_of(layer, k) is None for k in keys) >= max(len(keys), 1):
            self._read_next_layer(layer + 1, keys)
        if not keys:
            return sel_pages
        pages = self._cache_in(layer, keys)
        out = sel_pages.copy()
        out[rows, cols] = pages
        return out

    def expect(self, layer: int, rows: list[int], sel_pages: np.ndarray, nsel: np.ndarray,
               runners: np.ndarray | None = None) -> None:
        """A prefill piece's rows `rows` complete their prompts, so their next step
        decodes: `sel_pages` [B', K] (the first nsel[i] valid) is what each row's last token
        alone selects in `layer`, as that decode step will score, and `runners` [B', R] its
        runners-up. Those selected chunks and the first `due_runners` runners-up become the
        rows' due chunks (`end_step`), loaded before that step (`prefetch`); with the other
        runners-up they replace the rows' prefetch hint in this layer (called after
        `resolve`, which set the piece's own). Host arrays."""
        due = []
        for row, pages, n in zip(rows, sel_pages.tolist(), nsel.tolist()):
            due += [(row, self.chunk_of(p)) for p in pages[:n] if p >= self.base]
        rest = []
        if runners is not None:
            runners = runners[:, : self.ahead_runners]
            for part, out in ((runners[:, : self.due_runners], due),
                              (runners[:, self.due_runners:], rest)):
                r, keys = self._picks(part)
                out += [(rows[i], k) for i, k in zip(r, keys)]
        self._due[layer] = due
        self._selected[layer] = [(row, key) for row, key in self._selected.get(layer, ())
                                 if row not in rows] + due + rest

    def _read_next_layer(self, layer: int, keys: list[str]) -> None:
        """Start reading `layer`'s blocks of these chunks (those not in its chunk cache or
        host tier) on a reader thread, for `_ahead_rows` (see `layer_ahead`)."""
        if layer >= self.num_layers:
            return
        for other in [x for x in self._next if x % 2 == layer % 2]:
            self._next.pop(other)[1].result()  # (not taken: it ends before its buffer is reused)
        keys = [k for k in dict.fromkeys(keys) if self.cache.page_of(layer, k) is None
                and (k, layer) not in self.host]
        if not keys:
            return
        buf = self._next_bufs[layer % 2]
        if buf is None or buf.shape[0] < len(keys):  # rows as `_read_rows` reads into
            buf = self._next_bufs[layer % 2] = np.empty(
                (max(len(keys), 2 * getattr(getattr(self.attn, "cfg", None), "topk", 0)), 2)
                + tuple(self.pool.k.shape[2:]),
                _to_numpy(torch.empty(0, dtype=self.pool.k.dtype)).dtype)
        out = buf[: len(keys)]

        def read():
            try:
                self.tier.get_kv(keys, layer, out, split=False)
            except (CorruptBlock, ChunkNotFound):
                return None  # (read again by the fill, which reports it)
            return out

        self._next[layer] = (keys, self.tier._reader_pool().submit(read))
        with self._stats_lock:  # (the prefetch thread counts its reads too)
            self.stats["stream_layer_ahead_reads"] += len(keys)
            self.stats["stream_store_bytes"] += out.nbytes  # (read, taken or not)

    def _ahead_rows(self, layer: int) -> dict[str, np.ndarray] | None:
        """The blocks read ahead for `layer` (`_read_next_layer`), {chunk id: its block [2,
        C, Hkv, D]}, once their read has ended; None when none were (or it failed)."""
        entry = self._next.pop(layer, None)
        if entry is None:
            return None
        buf = entry[1].result()
        return None if buf is None else dict(zip(entry[0], buf))

    def _drop_ahead_reads(self) -> None:
        """Reads ahead not taken (the step ended, or cached blocks were forgotten): each
        ends before its buffer is reused."""
        while self._next:
            self._next.popitem()[1][1].result()

    def _cache_in(self, layer: int, keys: list[str]) -> list[int]:
        """One layer's selected chunks into the chunk cache (fetching those not cached)
        -> the page of each key."""
        return self._cache_in_many({layer: keys})[layer]

    def _cache_in_many(self, keys_of: dict[int, list[str]]) -> dict[int, list[int]]:
        """Selected chunks of {layer: chunk ids} into the chunk cache, those not cached
        fetched in one `_fill_many` (a replay's misses) -> {layer: the page of each key}."""
        pages, fills = {}, {}
        for layer, keys in keys_of.items():
            pages[layer], f = self.cache.acquire(layer, keys)
            slots = np.array([self._slot_of[k] for k in keys if k in self._slot_of],
                             dtype=np.int64)
            self._ahead_read(np.full(len(slots), layer), slots)
            if f:
                fills[layer] = f
        self._fill_many(fills)
        return pages

    def _fill_many(self, fills: dict[int, list[tuple[str, int]]], faults: bool = True
                   ) -> list[int]:
        """Pages just acquired in several layers ({layer: [(chunk, page)]}) filled in one
        staging buffer and one copy to the device: blocks in neither tier are read from
        LMDB straight into its first rows (on this thread), the host tier's copied after
        them. A 1M-token prompt's first decode step loads about 880 blocks over 30 layers
        before it (`prefetch`'s due
        chunks); loaded a layer at a time, through the host tier, they took 50-100 ms on
        the H200's host (reads into fresh memory, 30 staging copies). Returns the layers
        filled; a layer whose read fails keeps none of its pages mapped, and with
        `faults` its StreamFault is raised (after the others are unmapped too: nothing is
        copied), else it is logged and the other layers are filled."""
        if not fills:
            return []
        self._wait_ahead()  # (a page taken may have just been filled on the side stream)
        layers = list(fills)
        self._go.clear()
        try:
            reads, hits = [], []  # (layer, [(chunk, page)]) to read; (layer, page, (k, v))
            ahead = []  # (row of `rows`, block read ahead): rows read by `_read_next_layer`
            for layer in layers:
                todo, early = [], self._ahead_rows(layer)
                for key, page in fills[layer]:
                    kv = self.host.get((key, layer))
                    if kv is not None:
                        hits.append((layer, page, kv))
                    elif early is not None and key in early:
                        ahead.append((layer, page, early[key]))
                    else:
                        todo.append((key, page))
                if todo:
                    reads.append((layer, todo))
            if ahead:
                with self._stats_lock:
                    self.stats["stream_layer_ahead_hits"] += len(ahead)
            m = sum(len(t) for _, t in reads)
            rows = self._stage((m + len(ahead) + len(hits), 2) + tuple(self.pool.k.shape[2:]),
                               self.pool.k.dtype)
            bounds = np.cumsum([0] + [len(t) for _, t in reads]).tolist()
            failed = self._read_rows(reads, rows, bounds)
            if failed and faults:
                raise failed[0][1]
            bad = {layer for layer, _ in failed}
            for layer, e in failed:
                logger.debug("load skipped: %s", e)
            keep = [j for j, (layer, _) in enumerate(reads) if layer not in bad]
            if bad:  # (rare: the others' rows in a copy, without the failed ones')
                for layer in bad:
                    self.cache.forget(layer, [k for k, _ in fills[layer]])
                rows = rows[[i for j in keep for i in range(bounds[j], bounds[j + 1])]
                            + list(range(m, len(rows)))]
            page_layers = [reads[j][0] for j in keep for _ in reads[j][1]]
            pages = [p for j in keep for _, p in reads[j][1]]
            if ahead:  # (after the rows read now: a failed read dropped some of those)
                r = len(pages)
                np.stack([b for _, _, b in ahead], out=_to_numpy(rows[r:r + len(ahead)]))
                page_layers += [layer for layer, _, _ in ahead]
                pages += [p for _, p, _ in ahead]
            if hits:
                r = len(pages)
                torch.stack([kv[0] for _, _, kv in hits], out=rows[r:, 0])
                torch.stack([kv[1] for _, _, kv in hits], out=rows[r:, 1])
                page_layers += [layer for layer, _, _ in hits]
                pages += [p for _, p, _ in hits]
            if pages:
                self._write_pages(page_layers, pages, rows[: len(pages)])
        except BaseException:
            for layer in layers:
                self.cache.forget(layer, [k for k, _ in fills[layer]])
            raise
        finally:
            self._go.set()
        return [layer for layer in layers if layer not in bad]

    def _read_rows(self, reads: list[tuple[int, list[tuple[str, int]]]], rows: torch.Tensor,
                   bounds: list[int]) -> list[tuple[int, StreamFault]]:
        """Each (layer, [(chunk, page)]) of `reads` from LMDB into rows[bounds[j]:
        bounds[j + 1]] (checksums verified). -> [(layer, fault)] of the reads that failed,
        in order."""
        def read(j: int) -> StreamFault | None:
            layer, todo = reads[j]
            try:
                self.tier.get_kv([k for k, _ in todo], layer,
                                 _to_numpy(rows[bounds[j]:bounds[j + 1]]), split=False)
            except (CorruptBlock, ChunkNotFound) as e:
                return StreamFault(e.chunk_id, e)
            return None

        # (on this thread: 870 due blocks in 30 layers filled in 32-34 ms read here, 46-47
        # ms read a layer per job on the store's reader threads, and a replay's 60 misses
        # in 20 layers in 4.6 ms against 11 ms; H200 host, bench_due_loads.py 2026-12-01)
        got = [read(j) for j in range(len(reads))]
        if bounds[-1]:
            with self._stats_lock:
                self.stats["stream_store_reads"] += bounds[-1]
                self.stats["stream_store_bytes"] += (bounds[-1] * rows[0].numel()
                                                     * rows.element_size())
        return [(reads[j][0], e) for j, e in enumerate(got) if e is not None]

    def _stack(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(K, V) pairs -> staged rows [n, 2, C, Hkv, D] (`_stage`) for `_write_pages`."""
        rows = self._stage((len(kv), 2) + tuple(kv[0][0].shape), kv[0][0].dtype)
        torch.stack([k for k, _ in kv], out=rows[:, 0])
        torch.stack([v for _, v in kv], out=rows[:, 1])
        return rows

    def _write_pages(self, layers: list[int], pages: list[int], rows: torch.Tensor) -> None:
        """Blocks into chunk-cache pages: row i of `rows` (what `_stage` gave last) into
        page pages[i] of layer layers[i], in one copy to the device (queued, on CUDA)."""
        dev = self.pool.k.device
        at = torch.from_numpy(np.array([layers, pages], dtype=np.int64))
        idx = tuple(self._stage_index(at).to(dev, non_blocking=True))
        kv_dev = rows.to(dev, non_blocking=True)
        if self._pin:
            self._staged[-1][1].record()  # the staging buffer is free again after this copy
        self.pool.k[idx] = kv_dev[:, 0]
        self.pool.v[idx] = kv_dev[:, 1]
        self.stats["stream_device_bytes"] += kv_dev.numel() * kv_dev.element_size()
        # Keys reached these pages outside `store`: no rotated copy of them is valid (the
        # host's copy of the pages: reading them back would sync the device; a set, not
        # torch.unique, which took 0.9 ms a fill on the H200's host)
        self.attn.invalidate_rotated(set(pages))

    def _stage(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host rows of `shape` for the next copy to the device (`_write_pages` makes it
        right after). On CUDA one of two pinned staging buffers, used in turn and kept
        (grown to the next power of two when too small), each reused only after its last
        copy's event: a fresh pinned allocation cost 0.6-0.9 ms per MiB on the H200's
        host (benchmarks/bench_pinned_alloc.py). Off CUDA a fresh tensor."""
        if not self._pin:
            return torch.empty(shape, dtype=dtype)
        self._staged.append(self._staged.pop(0))
        buf, done, _ = self._staged[-1]
        done.synchronize()
        need = math.prod(shape)
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            self._staged[-1][0] = buf = self._pinned(need, dtype)
        return buf[:need].view(shape)

    def _stage_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Page indices [2, n] for the copy `_write_pages` makes of what `_stage` gave last:
        on CUDA in that staging buffer's pinned index buffer (reused with it), so that
        their copy to the device is asynchronous. One from pageable memory waits for the
        copy stream: on the side stream, behind a replay in flight (`run_deferred`), it
        held the engine thread until the replay ended."""
        if not self._pin:
            return idx
        ibuf = self._staged[-1][2]
        if ibuf is None or ibuf.numel() < idx.numel():
            self._staged[-1][2] = ibuf = self._pinned(idx.numel(), torch.int64)
        out = ibuf[: idx.numel()].view(idx.shape)
        out.copy_(idx)
        return out

    def _prestage(self, rows: int) -> None:
        """Both staging buffers (and their index buffers) allocated now with room for
        `rows` blocks, at most STAGE_BYTES each."""
        per_row = 2 * math.prod(self.pool.k.shape[2:])
        need = min(rows * per_row, STAGE_BYTES // self.pool.k.element_size())
        for entry in self._staged:
            entry[0] = self._pinned(need, self.pool.k.dtype)
            entry[2] = self._pinned(2 * max(1, need // per_row), torch.int64)

    @staticmethod
    def _pinned(n: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer of at least n elements (the next power of two)."""
        # (a normal tensor even when a forward's inference mode grows it: prefetches
        # outside that mode write into it too)
        with torch.inference_mode(False):
            return torch.empty(next_pow2(n), dtype=dtype, pin_memory=True)

    def fetch(self, layer: int, chunk_ids: list[str]) -> None:
        """Read ahead (the prefetch thread): K/V of one layer of chunks from LMDB into the
        host tier (checksums verified; the host tier only ever holds verified blocks).
        One pageable tensor per read, read into directly: its blocks are views of it, so
        its memory is freed once the host tier dropped all of them; they reach the device
        later through the staging buffers."""
        shape = (len(chunk_ids), 2) + tuple(self.pool.k.shape[2:])
        buf = torch.empty(shape, dtype=self.pool.k.dtype)
        try:
            self.tier.get_kv(chunk_ids, layer, _to_numpy(buf))  # (a view)
        except (CorruptBlock, ChunkNotFound) as e:
            raise StreamFault(e.chunk_id, e) from e
        with self._stats_lock:
            self.stats["stream_prefetch_reads"] += len(chunk_ids)
            self.stats["stream_store_bytes"] += buf.numel() * buf.element_size()
        for j, cid in enumerate(chunk_ids):
            self.host.put((cid, layer), buf[j, 0], buf[j, 1])

    # ------------------------------------------------------------------ prefetch

    def end_step(self, num_rows: int
                 ) -> tuple[list[dict[int, list[str]]], list[dict[int, list[str]]]]:
        """The finished step's (hints, due chunks) of each batch row, each {layer: [chunk
        ids]}: the hint is the row's selection and runners-up, or for a row whose next step
        decodes (`expect`) what its last token selected and the runners-up of that; due
        chunks are that selection and its first `due_runners` (empty for other rows)."""
        self._drop_ahead_reads()
        hints: list[dict[int, list[str]]] = [{} for _ in range(num_rows)]
        dues: list[dict[int, list[str]]] = [{} for _ in range(num_rows)]
        for out, picks_of in ((hints, self._selected), (dues, self._due)):
            for layer, picks in picks_of.items():
                for row, key in picks:
                    out[row].setdefault(layer, []).append(key)
        self._selected, self._due = {}, {}
        return hints, dues

    def prefetch(self, hints: list[dict[int, list[str]]],
                 next_hints: list[dict[int, list[str]]] = (),
                 dues: list[dict[int, list[str]]] = ()) -> None:
        """Load ahead, from the previous selection of each streamed sequence: the due
        chunks of `dues` (those the next step will most likely select, `end_step`) go
        into the chunk cache now, read on this thread wherever they are; blocks of
        `next_hints` (the sequences expected in the next step) held by the host tier go
        into the chunk cache now (on a side stream on CUDA); blocks of `hints` in neither
        tier are queued for the background thread, which reads them from LMDB into the
        host tier. With `defer_prefetch` those two wait for `run_deferred` (a later call's
        replace an earlier one's not run yet). Changes where a block comes from, never its
        value."""
        if self._q is None:
            return
        # (at most what the cache holds: several requests' dues may not fit)
        due = {layer: list(dict.fromkeys(k for d in dues for k in d.get(layer, ())))[
            : len(self.cache.pages)] for layer in sorted({layer for d in dues for layer in d})}
        # (a layer whose read fails is left out: the step that selects it meets it again)
        self._load(due, "stream_due_loads", faults=False)
        self._deferred = (list(hints), list(next_hints))
        if not self.defer_prefetch:
            self.run_deferred()

    def run_deferred(self, in_flight: bool = False) -> None:
        """The loads ahead `prefetch` left (none: nothing to do). `in_flight`: a graph
        replay was just launched and has not been settled; the chunk-cache entries these
        loads change count as misses of that replay (`settle`), whose map they postdate.
        The engine thread otherwise waits for the device there (0.8 ms a step of a 1M-token
        context on the H200)."""
        work, self._deferred = self._deferred, None
        if work is None:
            return
        hints, next_hints = work
        self._flying = in_flight
        try:
            self._ahead_of(hints, next_hints)
        finally:
            self._flying = False

    def _ahead_of(self, hints: list[dict[int, list[str]]],
                  next_hints: list[dict[int, list[str]]]) -> None:
        """`prefetch`'s loads ahead: host-tier blocks of `next_hints` into the chunk cache,
        the blocks of `hints` in neither tier queued for the background thread."""
        self._to_device({
            layer: list(dict.fromkeys(k for h in next_hints for k in h.get(layer, ())))[
                : len(self.cache.pages)]
            for layer in sorted({layer for h in next_hints for layer in h})})
        todo: dict[int, list[str]] = {}
        for hint in hints:
            for layer, keys in hint.items():
                todo.setdefault(layer, []).extend(
                    k for k in self.cache.missing(layer, keys) if (k, layer) not in self.host)
        for layer, keys in todo.items():
            if keys:
                self._q.put((layer, list(dict.fromkeys(keys))))

    def _to_device(self, keys_of: dict[int, list[str]]) -> None:
        """Blocks the host tier holds of {layer: chunk ids} into the chunk cache, all
        layers in one copy (on the side stream on CUDA)."""
        layers, pages, kvs, taken = [], [], [], []
        for layer, keys in keys_of.items():
            pairs = [(k, self.host.peek((k, layer))) for k in self.cache.missing(layer, keys)]
            kv = {k: pair for k, pair in pairs if pair is not None}
            if not kv:
                continue
            _, fills = self.cache.acquire(layer, list(kv), count=False)
            for k, p in fills:
                layers.append(layer)
                pages.append(p)
                kvs.append(kv[k])
                taken.append(k)
        if not kvs:
            return
        try:
            rows = self._stack(kvs)
            if self._side is not None:
                # The pages taken may still be read by the last step's queued kernels.
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    self._write_pages(layers, pages, rows)
                self._ahead = torch.cuda.Event()
                self._ahead.record(self._side)
            else:
                self._write_pages(layers, pages, rows)
        except BaseException:  # no page taken stays mapped to a block it does not hold
            for layer, key in zip(layers, taken):
                self.cache.forget(layer, [key])
            raise
        ahead = [(layer, self._slot_of[k]) for layer, k in zip(layers, taken)
                 if k in self._slot_of]
        if ahead:
            self._loaded_ahead[tuple(np.array(ahead).T)] = True
        self.stats["stream_device_prefetches"] += len(kvs)

    def _prefetch_loop(self) -> None:
        serve_queue(self._q, self._prefetch_one)

    def _prefetch_one(self, item: tuple[int, list[str]]) -> None:
        layer, keys = item
        self._go.wait(PREFETCH_YIELD_S)
        try:
            keys = [k for k in keys if (k, layer) not in self.host]
            if keys:
                self.fetch(layer, keys)
        except StreamFault as e:  # the engine thread meets it again and handles it
            logger.debug("prefetch skipped: %s", e)
        except Exception:  # noqa: BLE001 - a prefetch never takes the engine down
            logger.exception("stream prefetch failed")

    def drain(self) -> None:
        """Wait for queued prefetches (tests)."""
        if self._q is not None:
            self._q.join()

    def close(self) -> None:
        if self._q is not None:
            self._q.put(None)
            self._thread.join(timeout=30)

    def counters(self) -> dict[str, int]:
        c, h = self.cache, self.host
        return dict(self.stats, chunk_cache_hits=c.hits, chunk_cache_misses=c.misses,
                    chunk_cache_evictions=c.evictions, chunk_cache_pages=len(c.pages),
                    host_cache_hits=h.hits, host_cache_misses=h.misses,
                    host_cache_evictions=h.evictions, host_cache_bytes=h.bytes,
                    host_cache_capacity=h.capacity,
                    stream_attached_chunks=len(self._slot_of) - len(self._idle))
