"""The scheduler: admits requests, plans each step (a chunked-prefill batch or a decode
batch), manages KV pages with the radix cache, and turns sampled tokens into results.

Everything here runs on the engine thread; nothing is shared with other threads except
through `Engine`'s queues.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from typing import Any

from sglang_reattn.engine.detokenize import output_dict, update_text
from sglang_reattn.engine.model_runner import ModelRunner
from sglang_reattn.engine.radix_cache import RadixCache
from sglang_reattn.engine.request import Request, State
from sglang_reattn.engine.sampler import sample, top_logprobs
from sglang_reattn.engine.stream_tier import StreamFault, StreamFull
from sglang_reattn.kv_store import chunk_hashes
from sglang_reattn.layers.attention import KVPool

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, runner: ModelRunner, pool: KVPool, tokenizer, page_size: int,
                 max_running: int, chunked_prefill_size: int, use_radix: bool,
                 store=None, stream=None, reattn=None,
                 resident_max_tokens: int | None = None) -> None:
        self.runner = runner
        self.pool = pool
        self.tokenizer = tokenizer
        self.c = page_size
        self.max_running = max_running
        self.prefill_budget = chunked_prefill_size
        self.cache = RadixCache(page_size) if use_radix or store is not None else None
        self.store = store  # StoreTier or None
        # The streaming tier (StreamTier or None) and what it needs: the ReAttention
        # geometry, and how many streamed sequences one step's selections fit the cache.
        self.stream = stream
        self.reattn = reattn
        self.resident_max = resident_max_tokens
        self.max_streamed = (len(stream.cache.pages) // reattn.topk) if stream else 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0,
                         "requests_finished": 0, "requests_aborted": 0, "preemptions": 0}
        # Held from a finished request's final output to the end of its release (which
        # comes after, off the caller's wait): Engine.stats() takes it, so a caller who
        # got the output never sees the request's pages still held.
        self.release_lock = threading.RLock()

    # ------------------------------------------------------------------ queue side

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        for r in list(self.waiting) + self.running:
            if r.rid == rid or r.rid.startswith(rid + "/"):
                r.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # The cyclic garbage collector: a full collection walks every tracked object, and with
    # a million-token context (its page and id lists, radix nodes, cached blocks) one took
    # 441 ms in the middle of a decode (H200 host, bench_stream at 1M). So what exists once
    # a prefill step ran (the requests' long-lived state) is frozen out of the collector's
    # walks (`gc.freeze`, O(1)); decode steps' short-lived objects are collected as usual.
    # Objects only ever freed by the collector (cycles) among the frozen wait for the
    # engine to go idle: after GC_IDLE_S idle, everything is unfrozen, collected once and
    # the survivors frozen again (`collect_idle`).
    gc_pending = False  # something was frozen since the last idle collection

    def _freeze_gc(self) -> None:
        gc.freeze()
        self.gc_pending = True

    def collect_idle(self) -> None:
        """The engine has been idle a while: collect what was frozen, freeze the rest."""
        if self.gc_pending and not self.has_work():
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.gc_pending = False

    def flush_cache(self) -> bool:
        if self.running or self.waiting or self.cache is None:
            return self.cache is None and not self.running and not self.waiting
        self.pool.free(self.cache.reset())
        return True

    # ------------------------------------------------------------------ memory

    def _ensure_free(self, n: int) -> bool:
        if self.pool.can_allocate(n):
            return True
        if self.cache is not None:
            self.pool.free(self.cache.evict(n - self.pool.num_free))
        return self.pool.can_allocate(n)

    def _grow_pages(self, r: Request, upto_tokens: int) -> bool:
        need = (upto_tokens + self.c - 1) // self.c - len(r.pages)
        if need <= 0:
            return True
        if not self._ensure_free(need):
            return False
        r.pages.extend(self.pool.allocate(need))
        return True

    def _release(self, r: Request, keep_in_tree: bool) -> None:
        """Give a request's pages back: full computed chunks go to the radix tree (when
        `keep_in_tree`), the rest to the pool."""
        if self.cache is not None and keep_in_tree:
            self._insert_into_tree(r, r.num_computed)
        if r.tree_node is not None:
            self.cache.dec_lock(r.tree_node)
            r.tree_node = None
        rest = r.pages[r.num_tree_pages:]
        if r.streamed:
            self.stream.release(rest)
            rest = [p for p in rest if not self.stream.is_virtual(p)]
            r.streamed = False
        self.pool.free(rest)
        r.pages = []
        r.num_tree_pages = 0

    def _insert_into_tree(self, r: Request, upto_tokens: int) -> None:
        n_full = upto_tokens // self.c
        if r.streamed:
            # Virtual pages never enter the tree; what this process computed past the
            # stored prefix still goes to the disk tier (its pages are real).
            if self.store is not None and n_full > r.num_saved:
                self._save(r, n_full)
            return
        if n_full <= r.num_tree_pages:
            return
        c, have, node = self.c, r.num_tree_pages, r.tree_node
        if node is not None and node.depth == have:
            # Extend the request's own path (from its namespace's root when it has none):
            # O(new chunks), not O(context), per chunk a long generation completes.
            res = self.cache.insert(r.ids_between(have * c, n_full * c), r.pages[have:n_full],
                                    r.namespace, after=node)
            self.cache.move_lock(node, res.node)
        else:
            res = self.cache.insert(r.ids_between(0, n_full * c), r.pages[:n_full],
                                    r.namespace)
            if node is not None:
                self.cache.dec_lock(node)
            self.cache.inc_lock(res.node)
            have = 0
        # Pages that another request cached first: switch to the tree's copy, free ours.
        self.pool.free(res.duplicates)
        r.pages[have:n_full] = res.pages
        r.tree_node = res.node
        r.num_tree_pages = n_full
        if self.store is not None:
            self._save(r, n_full)

    def _store_ids(self, r: Request, n: int) -> list[str]:
        """Disk-tier ids of r's first n whole chunks: a chained hash, computed once per
        request and extended as it grows (never re-hashed from the start)."""
        have = r.store_ids
        if len(have) < n:
            c = self.c
            have.extend(chunk_hashes(r.array_between(len(have) * c, n * c), c, r.namespace,
                                     have[-1] if have else None))
        return have[:n]

    def _save(self, r: Request, n_full: int) -> None:
        """Chunks [num_saved, n_full) of r to the disk tier (written behind)."""
        self.store.save(r.tokens, r.pages[:n_full], r.num_saved, r.namespace,
                        self._store_ids(r, n_full))
        r.num_saved = n_full

    # ------------------------------------------------------------------ admission

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting[0]
            if r.aborted:
                self.waiting.popleft()
                self._finish(r, {"type": "abort"})
                continue
            if not self._try_admit(r):
                break
            self.waiting.popleft()
            self.running.append(r)

    def _extend_from_store(self, r: Request, ids: list[int], matched: list[int],
                           limit: int) -> list[int]:
        """Continue the radix match with chunks from the disk tier: load them into fresh
        pages and insert them into the tree, as if this process had computed them."""
        have = len(matched)
        stored = self.store.lookup(self._store_ids(r, limit // self.c), have, limit // self.c)
        if not stored or not self._ensure_free(len(stored)):
            return matched
        pages = self.pool.allocate(len(stored))
        n = self.store.load(stored, pages)
        self.pool.free(pages[n:])
        if n == 0:
            return matched
        res = self.cache.insert(ids[: (have + n) * self.c], matched + pages[:n], r.namespace)
        self.pool.free(res.duplicates)
        self.cache.dec_lock(r.tree_node)
        self.cache.inc_lock(res.node)
        r.tree_node = res.node
        r.num_saved = have + n
        return res.pages

    def _try_admit(self, r: Request) -> bool:
        # (read only here: a new request's prompt list itself, not a copy of 1M ids)
        ids = r.all_ids if r.output_ids else r.prompt_ids
        matched: list[int] = []
        if self.cache is not None:
            limit = len(ids) - 1  # always compute at least the last token
            if r.wants_input_logprobs and not r.output_ids:
                limit = min(limit, max(r.logprob.logprob_start_len - 1, 0))
            m = self.cache.match_prefix(ids, r.namespace, limit)
            matched = m.pages
            self.cache.inc_lock(m.node)
            r.tree_node = m.node
            if self.stream is not None:
                streamed, matched = self._admit_streamed(r, ids, matched, limit)
                if streamed is not None:
                    return streamed
            if self.store is not None:
                matched = self._extend_from_store(r, ids, matched, limit)
        # Room for the whole prompt plus one decode page, so admitted prefills finish.
        need = (len(ids) + self.c) // self.c - len(matched)
        spill = False
        if not self._ensure_free(need):
            if not self._may_spill() or not self._ensure_free(self._spill_window()):
                return self._cannot_admit(r)
            spill = True  # prefilled piece by piece, completed chunks spilled to the store
        r.pages = list(matched)
        r.num_tree_pages = len(matched)
        r.num_computed = len(matched) * self.c
        r.streamed = spill
        self._admitted(r)
        return True

    def _may_spill(self) -> bool:
        return self.stream is not None and not self.store.readonly

    def _spill_window(self) -> int:
        """Pages a spilling prefill keeps: sink, local window, one piece, alignment."""
        cfg = self.reattn
        return (cfg.sink + cfg.local + self.prefill_budget) // self.c + 2

    def _middle_end(self, num_computed: int) -> int:
        """End (in pages) of the completed middle chunks of a sequence of that many
        computed tokens: the next step sees them between its sink and local window."""
        c, cfg = self.c, self.reattn
        local_p = max(cfg.sink // c, max(0, num_computed - cfg.local) // c)
        return min(local_p, num_computed // c)

    def _spill(self, r: Request, wait: bool = True) -> None:
        """Between steps of a streamed request (its prefill pieces, its decode steps):
        completed chunks that the next step will see as middle chunks are written to the
        store (synchronously: they must be readable before the step that may select
        them) and their pages become virtual pages, so a prompt longer than the pool
        prefills, and a long generation decodes, in bounded memory."""
        c = self.c
        n_full = r.num_computed // c
        sink_p = self.reattn.sink // c
        # the middle pages not yet virtual: those since the last spill (scanned from the
        # end, so a long context's decode step does not walk all its pages)
        lo = max(sink_p, r.num_tree_pages)
        idx = []
        for i in range(self._middle_end(r.num_computed) - 1, lo - 1, -1):
            if self.stream.is_virtual(r.pages[i]):
                break
            idx.append(i)
        idx.reverse()
        if not idx or self.store.readonly:
            return
        if n_full > r.num_saved:
            self._save(r, n_full)
        ids = self._store_ids(r, n_full)
        chosen = [ids[i] for i in idx]
        # A decode step does not wait for the writer (it may be busy with other work, such
        # as touching a whole context's chunks): the chunks stay in their pages until they
        # are published, and a later step spills them.
        r.spill_due = not wait and self.store.pending(chosen)
        if r.spill_due:
            return
        if wait:
            self.store.flush()
        if not all(self.store.store.has_many(chosen)):  # a failed write: stay resident
            return
        try:
            virtual = self.stream.attach(chosen)
        except StreamFault as e:
            self._report_fault(e)
            return
        except StreamFull as e:  # stays resident while it can
            logger.warning("%s", e)
            return
        self.pool.free([r.pages[i] for i in idx])
        for i, v in zip(idx, virtual):
            r.pages[i] = v
        r._pages_cpu = None  # the runner's copy of the list (pages changed mid-list)
        self.stream.stats["stream_spilled_chunks"] += len(idx)

    def _cannot_admit(self, r: Request) -> bool:
        if r.tree_node is not None:
            self.cache.dec_lock(r.tree_node)
            r.tree_node = None
        if not self.running:
            self._finish(r, {"type": "abort", "message": "KV cache too small for prompt"})
            self.waiting.popleft()
        return False

    def _admitted(self, r: Request) -> None:
        if not r.output_ids:
            r.cached_tokens = r.num_computed
            self.counters["cached_tokens"] += r.cached_tokens
        r.state = State.RUNNING

    def _admit_streamed(self, r: Request, ids: list[int], matched: list[int],
                        limit: int) -> tuple[bool | None, list[int]]:
        """Admit a request whose stored prefix is streamed: sink and local-window chunks
        are loaded into pages, the chunks between them become virtual pages (summaries
        only). -> (admitted, the radix match now locked). admitted None: not a streaming
        case (nothing stored between sink and local window, or it fits the pool within
        the resident budget); the caller goes on from the returned match."""
        c, cfg = self.c, self.reattn

        def stored_after(have: int) -> tuple[list[str], int, int]:
            """Stored chunks after the first `have`, the stored prefix's length in chunks,
            and the pages the rest of the prompt and one decode page need."""
            stored = self.store.lookup(self._store_ids(r, limit // c), have, limit // c)
            return stored, have + len(stored), (len(ids) + c) // c - have - len(stored)

        have = len(matched)
        stored, total, tail = stored_after(have)
        over = self.resident_max is not None and total * c > self.resident_max
        if not over and self._ensure_free(len(stored) + tail):
            return None, matched
        if have > cfg.sink // c:
            # Past the sink, the in-memory match is taken from the store too (its pages
            # were saved when computed), so that it can stream rather than stay locked.
            self.cache.dec_lock(r.tree_node)
            m = self.cache.match_prefix(ids, r.namespace, cfg.sink // c * c)
            self.cache.inc_lock(m.node)
            r.tree_node, matched, have = m.node, m.pages, len(m.pages)
            stored, total, tail = stored_after(have)
        sink_p = min(cfg.sink // c, total)
        # The first step's local window starts here and only moves forward later.
        local_p = max(sink_p, max(0, total * c - cfg.local) // c)
        middle = range(max(have, sink_p), local_p)
        if not stored or not middle:
            return None, matched
        real = [i for i in range(have, total) if i not in middle]
        if not self._ensure_free(len(real) + tail):
            return self._cannot_admit(r), matched
        real_ids = [stored[i - have] for i in real]
        ahead = self.store.read_ahead(real_ids)  # while the summaries are read
        try:
            start = self.store.pack_start(middle.start)  # (where its summary pack starts)
            virtual = self.stream.attach([stored[i - have] for i in middle], middle.start,
                                         (self._store_ids(r, start + 1)[start],
                                          middle.start - start))
        except StreamFault as e:
            self._report_fault(e)
            return None, matched
        except StreamFull as e:  # not streamed: loaded whole if the pool can hold it
            logger.warning("%s", e)
            return None, matched
        pages = self.pool.allocate(len(real))
        if self.store.load(real_ids, pages, ahead) < len(real):
            self.pool.free(pages)  # corrupt or evicted meanwhile: reported by `load`
            self.stream.release(virtual)
            self.stream.forget_cached()
            return None, matched
        table = list(matched) + [0] * len(stored)
        for i, p in zip(real, pages):
            table[i] = p
        for i, p in zip(middle, virtual):
            table[i] = p
        r.pages = table
        r.num_tree_pages = have
        r.num_computed = total * c
        r.num_saved = total
        r.streamed = True
        # a context stored before summary packs existed gets them now, for the next time
        self.store.pack(self._store_ids(r, total))
        self._admitted(r)
        return True, matched

    def _report_fault(self, e: StreamFault) -> None:
        self.stream.stats["stream_faults"] += 1
        self.stream.forget_cached()
        if e.corrupt:
            self.store.stats["store_corrupt_blocks"] += 1
            logger.error("kv store: %s; dropping it, it will be recomputed", e)
            self.store.drop_corrupt(e.chunk_id)
        else:
            logger.warning("kv store: %s", e)

    def _stream_fault(self, reqs: list[Request], e: StreamFault) -> None:
        """A streamed chunk could not be read mid-step: nothing of the step is kept; the
        streamed requests go back to the queue and are admitted again from what the
        store still holds (recomputing the rest, or refused if that does not fit)."""
        self._report_fault(e)
        for r in reqs:
            if r.streamed and r in self.running:
                self.running.remove(r)
                self._release(r, keep_in_tree=True)
                r.num_computed = 0
                r.state = State.WAITING
                self.waiting.appendleft(r)

    def _cap_streamed(self, reqs: list[Request]) -> list[Request]:
        """At most `max_streamed` streamed requests per step, so that one layer's
        selections always fit the chunk cache. Those left out go first next time: the
        ones taken move to the back of `running`."""
        if self.stream is None:
            return reqs
        out, taken, n = [], [], 0
        for r in reqs:
            if r.streamed:
                if n >= self.max_streamed:
                    continue
                n += 1
                taken.append(r)
            out.append(r)
        if len(out) < len(reqs):
            for r in taken:
                self.running.remove(r)
                self.running.append(r)
        return out

    def _forward(self, reqs: list[Request], q_lens: list[int], is_decode: bool, rows):
        """runner.forward; None when a streamed chunk failed (the step is dropped)."""
        try:
            logits = self.runner.forward(reqs, q_lens, is_decode, rows)
        except StreamFault as e:
            self.stream.end_step(len(reqs))
            self._stream_fault(reqs, e)
            return None
        if self.stream is not None:
            for r, hint, due in zip(reqs, *self.stream.end_step(len(reqs))):
                if r.streamed:
                    r.stream_hint, r.stream_due = hint, due
        return logits

    def _prefetch(self) -> None:
        """After a step: the previous selection of the streamed requests the next step is
        expected to run goes to the chunk cache, that of all of them to the host tier
        (where decode replays graphs, while the next graph step replays: `StreamTier.
        prefetch`)."""
        if self.stream is None:
            return
        streamed = [r for r in self.running if r.streamed]
        if not streamed:
            return
        prefill = [r for r in streamed if r.in_prefill]
        nxt = (prefill if any(r.in_prefill for r in self.running) else streamed)
        nxt = nxt[: self.max_streamed]
        self.stream.prefetch([r.stream_hint for r in nxt + streamed],
                             [r.stream_hint for r in nxt], [r.stream_due for r in nxt])
        for r in nxt:
            r.stream_due = {}

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """Plan and run one step. Returns False when there was nothing to do."""
        self._store_idle_work()  # busy from here when requests wait: admission loads
        self._drop_aborted()
        self._admit()
        prefill = [r for r in self.running if r.in_prefill]
        if prefill:
            self._run_prefill(prefill)
            self._freeze_gc()
        else:
            decode = [r for r in self.running if not r.in_prefill]
            if not decode:
                self._store_idle_work(ran=False)
                return False
            self._run_decode(decode)
        self._store_idle_work()
        return True

    def _store_idle_work(self, ran: bool = True) -> None:
        """The disk tier's deferred work (StoreTier.touch) waits while requests run or
        wait; `ran=False`: nothing could run, the engine is idle."""
        if self.store is not None:
            self.store.idle_work(busy=ran and bool(self.running or self.waiting))

    def _drop_aborted(self) -> None:
        for r in [r for r in self.running if r.aborted]:
            self.running.remove(r)
            self._release(r, keep_in_tree=True)
            self._finish(r, {"type": "abort"})

    def _run_prefill(self, candidates: list[Request]) -> None:
        budget = self.prefill_budget
        reqs: list[Request] = []
        q_lens: list[int] = []
        for r in self._cap_streamed(candidates):
            if budget <= 0:
                break
            remaining = r.num_tokens - r.num_computed
            n = min(remaining, budget)
            if n < remaining:
                # Split on chunk boundaries so every prefill piece is chunk aligned.
                n = (r.num_computed + n) // self.c * self.c - r.num_computed
                if n <= 0:
                    break
            if not self._grow_pages(r, r.num_computed + n):
                break  # admitted requests reserved their prompt pages; only decode can fail
            reqs.append(r)
            q_lens.append(n)
            budget -= n
        if not reqs:
            return
        rows, plan = self._logit_plan(reqs, q_lens)
        logits = self._forward(reqs, q_lens, False, rows)
        if logits is None:
            return
        self._postprocess_prefill(reqs, q_lens, plan, logits)
        for r in reqs:
            if r.streamed and r.in_prefill and r in self.running:
                self._spill(r)
        self._prefetch()

    def _logit_plan(self, reqs: list[Request], q_lens: list[int]):
        """Which packed rows need logits: input-logprob rows and the last row of a
        request whose prefill completes in this step."""
        rows: list[int] = []
        plan: list[tuple[list[int], int | None]] = []  # (input-lp row slots, sample slot)
        base = 0
        for r, n in zip(reqs, q_lens):
            lp_slots: list[int] = []
            if r.wants_input_logprobs and not r.output_ids:
                # Row at position p predicts token p + 1 (prompt tokens only).
                lo = max(r.logprob.logprob_start_len - 1, r.num_computed)
                hi = min(r.num_computed + n, len(r.prompt_ids) - 1)
                for p in range(lo, hi):
                    lp_slots.append(len(rows))
                    rows.append(base + p - r.num_computed)
            sample_slot = None
            if r.num_computed + n == r.num_tokens:
                sample_slot = len(rows)
                rows.append(base + n - 1)
            plan.append((lp_slots, sample_slot))
            base += n
        return rows, plan

    def _postprocess_prefill(self, reqs, q_lens, plan, logits) -> None:
        done: list[Request] = []
        done_rows: list[int] = []
        for r, n, (lp_slots, sample_slot) in zip(reqs, q_lens, plan):
            if lp_slots:
                self._record_input_logprobs(r, logits, lp_slots, r.num_computed)
            r.num_computed += n
            self.counters["prompt_tokens"] += n
            if sample_slot is not None:
                done.append(r)
                done_rows.append(sample_slot)
                if self.cache is not None:
                    self._insert_into_tree(r, r.num_computed)
        if done:
            self._sample_and_emit(done, logits[done_rows])

    def _record_input_logprobs(self, r: Request, logits, slots: list[int], start: int) -> None:
        import torch

        lo = max(r.logprob.logprob_start_len - 1, start)
        lp = torch.log_softmax(logits[slots], dim=-1)
        targets = r.prompt_ids[lo + 1: lo + 1 + len(slots)]
        chosen = lp[torch.arange(len(slots)), torch.tensor(targets)].tolist()
        if not r.input_logprobs:
            # Token 0 (or the first requested one) has no predecessor in this request.
            if r.logprob.logprob_start_len == 0:
                r.input_logprobs.append((None, r.prompt_ids[0]))
                r.input_top.append(None)
        for i, (t, v) in enumerate(zip(targets, chosen)):
            r.input_logprobs.append((v, t))
            r.input_top.append(top_logprobs(lp[i], r.logprob.top_logprobs_num)
                               if r.logprob.top_logprobs_num else None)

    def _run_decode(self, reqs: list[Request]) -> None:
        ready: list[Request] = []
        for r in self._cap_streamed(reqs):
            while not self._grow_pages(r, r.num_computed + 1):
                if not self._preempt(exclude=r):
                    break
            if len(r.pages) * self.c >= r.num_computed + 1:
                ready.append(r)
        ready = [r for r in ready if r.state == State.RUNNING]
        if not ready:
            return
        logits = self._forward(ready, [1] * len(ready), True, list(range(len(ready))))
        if logits is None:
            return
        for r in ready:
            r.num_computed += 1
        self._sample_and_emit(ready, logits)
        for r in ready:
            # A chunk left the local window: spilled like a prefill's (a failed write is
            # tried again when the next one leaves, not every step).
            if r.streamed and r in self.running and (
                    r.spill_due
                    or self._middle_end(r.num_computed) > self._middle_end(r.num_computed - 1)):
                self._spill(r, wait=False)
        self._prefetch()

    def _preempt(self, exclude: Request) -> bool:
        """Out of pages: send the newest running request back to the queue (it will be
        recomputed from its tokens, mostly from the radix cache)."""
        victims = [r for r in self.running if r is not exclude]
        if not victims:
            return False
        v = victims[-1]
        self.running.remove(v)
        self._release(v, keep_in_tree=True)
        v.num_computed = 0
        v.state = State.WAITING
        self.waiting.appendleft(v)
        self.counters["preemptions"] += 1
        logger.warning("KV pool full: preempted request %s", v.rid)
        return True

    # ------------------------------------------------------------------ results

    def _sample_and_emit(self, reqs: list[Request], logits) -> None:
        res = sample(logits, reqs)
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            tok = res.tokens[i]
            r.output_ids.append(tok)
            self.counters["generation_tokens"] += 1
            if r.first_token_time is None:
                r.first_token_time = now
            if r.logprob.return_logprob and res.logprobs is not None:
                r.output_logprobs.append((res.logprobs[i], tok))
                r.output_top.append(res.top[i] if r.logprob.top_logprobs_num else None)
            if r.grammar is not None:
                r.grammar.accept(tok)
            reason = self._check_finish(r, tok)
            if reason is not None:
                self.running.remove(r)
                with self.release_lock:  # the output first: a 1M-token streamed context's
                    self._finish(r, reason)  # release took 17 ms of its TTFT on the H200
                    self._release(r, keep_in_tree=True)
            elif r.stream:
                r.emit(output_dict(r, self.tokenizer), False)

    def _check_finish(self, r: Request, tok: int) -> dict[str, Any] | None:
        p = r.params
        n_out = len(r.output_ids)
        if n_out >= p.min_new_tokens:
            if p.stop_token_ids and tok in p.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if not p.ignore_eos and tok in r.eos_ids:
                return {"type": "stop", "matched": tok}
        matched = update_text(r, self.tokenizer)
        if matched is not None and n_out >= p.min_new_tokens:
            return {"type": "stop", "matched": matched}
        if r.grammar is not None and r.grammar.terminated:
            return {"type": "stop", "matched": tok}
        if n_out >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        return None

    def _finish(self, r: Request, reason: dict[str, Any]) -> None:
        r.state = State.FINISHED
        r.finish_reason = reason
        if reason["type"] == "abort":
            self.counters["requests_aborted"] += 1
        else:
            self.counters["requests_finished"] += 1
        update_text(r, self.tokenizer, final=True)
        r.emit(output_dict(r, self.tokenizer), True)

    def abort_all(self, message: str) -> None:
        for r in list(self.running):
            self.running.remove(r)
            try:
                self._release(r, keep_in_tree=False)
            except Exception:  # noqa: BLE001 - state may be inconsistent after a crash
                pass
            self._finish(r, {"type": "abort", "message": message})
        while self.waiting:
            self._finish(self.waiting.popleft(), {"type": "abort", "message": message})
