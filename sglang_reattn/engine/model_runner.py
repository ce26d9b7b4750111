"""Runs the model for one scheduled step: packs tokens, builds the attention metadata,
and returns logits for the rows the scheduler asked for. Decode steps on CUDA replay
captured CUDA graphs (one per padded batch size)."""

from __future__ import annotations

import bisect
import importlib
import logging

import numpy as np
import torch

from sglang_reattn.engine.request import Request
from sglang_reattn.kernels._triton_compat import aligned
from sglang_reattn.layers.attention import ForwardBatch, KVPool, PagedAttention
from sglang_reattn.layers.reattention import (
    REP_QUERIES,
    ReAttention,
    ScopePlan,
    build_scope_plan,
    completed_pages,
    plan_geometry,
    split_scope,
)
from sglang_reattn.models.llama import CausalLM

logger = logging.getLogger(__name__)


# A streamed graph step still missing after this many replays runs eagerly. A replay costs
# a few ms, an eager step of a 1M-token context 140-220 ms on the H200; with 2 the second
# decode step of a question went eager, with 4 none did (bench_stream.py, 2026-11-30).
MAX_STREAM_REPLAYS = 4


def pages_full(reqs: list[Request]) -> list[list[int]]:
    return [r.pages for r in reqs]


class _EagerGraph:
    def __init__(self, run, out: torch.Tensor) -> None:
        self._run, self._out = run, out

    def replay(self) -> None:
        self._out.copy_(self._run())


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, attn: PagedAttention,
                 device: torch.device, max_pages_per_seq: int, use_cuda_graph: bool,
                 cuda_graph_max_bs: int, prefill_graph_tokens: int = 0) -> None:
        self.model = model
        self.pool = pool
        self.attn = attn
        self.device = device
        self.page_size = pool.page_size
        self.max_pages = max_pages_per_seq
        self.reattn = attn.cfg if isinstance(attn, ReAttention) else None
        # (padded batch size, with selection) -> graph. With ReAttention two sets are
        # captured: steps where every context fits in the scope replay the plain one, which
        # is exactly equivalent and skips the per-layer scoring.
        self.graphs: dict[tuple[int, bool | str], torch.cuda.CUDAGraph] = {}
        self.graph_bs: list[int] = []
        # Graphs of streamed decode steps (when ReAttention has virtual summary rows): the
        # plan's candidates then span pool and virtual pages.
        self._splan: ScopePlan | None = None
        # static buffer (by its memory) -> (graph batch size, rows) of its last fill
        self._filled: dict[int, tuple[int, list]] = {}
        # The steady state of a long prefill (one sequence, pieces of `prefill_graph_tokens`,
        # past the scope) replays one captured graph: eager, its host work (launching ~10
        # kernels a layer) took longer than the device's (bench_e2e.py, H200, 2026-12-01).
        self.prefill_tokens = prefill_graph_tokens if self.reattn is not None else 0
        self._pf_graph = None
        if use_cuda_graph:
            self._capture(cuda_graph_max_bs)

    # ------------------------------------------------------------------ batch building

    def _slots(self, r: Request, start: int, n: int) -> list[int]:
        c = self.page_size
        return [r.pages[p // c] * c + p % c for p in range(start, start + n)]

    def build_batch(self, reqs: list[Request], q_lens: list[int], is_decode: bool
                    ) -> tuple[torch.Tensor, ForwardBatch]:
        ids: list[int] = []
        slots: list[int] = []
        scope: list[int] = []
        pages: list[list[int]] = []
        cu = [0]
        for r, n in zip(reqs, q_lens):
            start = r.num_computed
            ids.extend(r.ids_between(start, start + n))
            slots.extend(self._slots(r, start, n))
            total = start + n
            scope.append(total)
            pages.append(r.pages[: (total + self.page_size - 1) // self.page_size])
            # With ReAttention the per-layer scope comes from the plan; this table is the
            # whole sequence (used as-is while no sequence has more chunks than top-k).
            cu.append(cu[-1] + n)
        width = max(len(p) for p in pages)
        table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, p in enumerate(pages):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        dev = self.device
        batch = ForwardBatch(
            is_decode=is_decode,
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            page_table=table.to(dev, non_blocking=True),
            scope_lens=torch.tensor(scope, dtype=torch.int32).to(dev, non_blocking=True),
            cu_q_lens=torch.tensor(cu, dtype=torch.int32).to(dev, non_blocking=True),
            max_q_len=max(q_lens),
            pages_host=pages,
            scope_lens_host=scope,
            q_lens_host=list(q_lens),
            streamed=any(r.streamed for r in reqs),
        )
        if self.reattn is not None:
            # streamed rows whose prompt completes: their next step decodes
            nxt = [] if is_decode else [i for i, (r, n) in enumerate(zip(reqs, q_lens))
                                        if r.streamed and r.num_computed + n == r.num_tokens]
            batch.scope_plan = build_scope_plan(self.reattn, pages_full(reqs),
                                                [r.num_computed for r in reqs], q_lens, dev,
                                                next_rows=nxt)
            if not self.attn.use_triton:  # the Triton store keeps running summaries itself
                done = completed_pages(pages_full(reqs), [r.num_computed for r in reqs],
                                       q_lens, self.page_size)
                batch.completed_pages = torch.tensor(done, dtype=torch.long).to(dev)
        return torch.tensor(ids, dtype=torch.long).to(dev, non_blocking=True), batch

    # ------------------------------------------------------------------ execution

    @torch.inference_mode()
    def forward(self, reqs: list[Request], q_lens: list[int], is_decode: bool,
                logit_rows: list[int]) -> torch.Tensor:
        """Run one step. `logit_rows` index the packed new tokens whose logits are
        returned ([len(logit_rows), vocab] float32)."""
        graph = is_decode and self.graphs and len(reqs) <= self.graph_bs[-1]
        streamed = any(r.streamed for r in reqs)
        tier = getattr(self.attn, "stream", None)
        if tier is not None and not (graph and streamed and self._splan is not None):
            tier.run_deferred()  # (a streamed graph step runs them while it replays)
        if (not is_decode and self._pf_graph is not None and not logit_rows
                and len(reqs) == 1 and q_lens[0] == self.prefill_tokens and not streamed
                and self._replay_prefill(reqs[0])):
            return self._no_logits
        if graph:
            # Streamed contexts: the graph variant that maps virtual pages on the device.
            if not streamed:
                logits = self._replay(reqs)
            elif self._splan is not None:
                logits = self._replay_streamed(reqs)
            else:
                logits = None
            if logits is not None:
                return logits[torch.tensor(logit_rows, device=self.device)]
        input_ids, batch = self.build_batch(reqs, q_lens, is_decode)
        hidden = self.model(input_ids, self.attn, batch)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows])

    # ------------------------------------------------------------------ CUDA graphs

    def _capture(self, max_bs: int) -> None:
        sizes = [b for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
                 if b <= max_bs]
        dev = self.device
        n = sizes[-1]
        self._ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._batch = ForwardBatch(
            is_decode=True,
            slot_mapping=torch.zeros(n, dtype=torch.int64, device=dev),
            page_table=torch.zeros(n, self.max_pages, dtype=torch.int32, device=dev),
            scope_lens=torch.ones(n, dtype=torch.int32, device=dev),
            cu_q_lens=torch.arange(n + 1, dtype=torch.int32, device=dev),
            max_q_len=1,
        )
        if self.reattn is not None:
            cfg, c = self.reattn, self.page_size
            z = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=dev)  # noqa: E731
            # candidate rows a multiple of 16 wide (`aligned`: an odd row stride cost the
            # first top-k pass a third more at 1M)
            self._plan = ScopePlan(
                head_table=z(n, max(cfg.sink // c, 1)), head_pages=z(n),
                cand_pages=z(n, aligned(self.max_pages)), num_cands=z(n),
                local_table=z(n, cfg.local // c + 2), local_tokens=torch.ones(
                    n, dtype=torch.int32, device=dev),
                rep_index=torch.arange(n, device=dev), reps=1, needs_select=True)
            if self.attn.num_virtual:  # candidates may also be any virtual page
                self._splan = ScopePlan(**{**vars(self._plan), "cand_pages": z(
                    n, aligned(self.max_pages + self.attn.num_virtual))})
        self._logits: dict[tuple[int, bool | str], torch.Tensor] = {}
        self._views: dict[tuple[int, bool | str], ForwardBatch] = {}
        self._sel_out: dict[int, list[torch.Tensor]] = {}
        self._spare_out: dict[int, list[torch.Tensor]] = {}
        variants = (False,) if self.reattn is None else (
            (False, True, "stream") if self._splan is not None else (False, True))
        with torch.inference_mode():
            for select in variants:
                for bs in reversed(sizes):
                    b = self._view(bs, select)
                    self._views[bs, select] = b

                    def run(bs=bs, b=b) -> torch.Tensor:
                        return self.model.compute_logits(self.model(self._ids[:bs], self.attn, b))

                    self.graphs[bs, select], self._logits[bs, select] = self._record(run)
                    if select == "stream":  # each layer's selection: the graph's outputs
                        layers = range(self.pool.k.shape[0])
                        self._sel_out[bs] = [self.attn.last_selection[i] for i in layers]
                        if self.attn.spare:
                            self._spare_out[bs] = [self.attn.last_runners[i] for i in layers]
        if self.prefill_tokens:
            sink_p, local_w, _ = self._prefill_geometry(self.prefill_tokens)
            if self.max_pages > sink_p + self.reattn.topk + local_w:
                self._capture_prefill(self.prefill_tokens)
            else:  # no sequence this engine holds gets past the scope (nor could the
                self.prefill_tokens = 0  # capture's top-k + 1 candidates fit its table)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        self.graph_bs = sizes
        logger.info("captured CUDA graphs for decode batch sizes %s%s", sizes,
                    f" and {self.prefill_tokens}-token prefill pieces" if self.prefill_tokens
                    else "")

    def _prefill_geometry(self, n: int) -> tuple[int, int, int]:
        """The captured prefill piece of n tokens: (sink pages, local-window pages, scope
        tokens) once its context is past the scope."""
        cfg, c = self.reattn, self.page_size
        return cfg.sink // c, (cfg.local + n) // c, (cfg.sink // c + cfg.topk) * c + cfg.local + n

    def _capture_prefill(self, n: int) -> None:
        """Capture a prefill piece of `n` tokens of one sequence whose context is past the
        scope: every layer selects (16 voting queries), the scope is always the sink, top-k
        chunks and a full local window (one length), and no logits are needed (a middle
        piece). Captured on buffers that point every page at reserved page 0, which the
        capture writes."""
        dev = self.device
        sink_p, local_w, scope = self._prefill_geometry(n)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=dev)  # noqa: E731
        self._pf_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self._pf_plan = ScopePlan(
            head_table=z(1, max(sink_p, 1)), head_pages=z(1),
            cand_pages=z(1, aligned(self.max_pages)), num_cands=z(1),
            local_table=z(1, local_w + 2), local_tokens=z(1),
            rep_index=torch.arange(n - min(n, REP_QUERIES), n, device=dev),
            reps=min(n, REP_QUERIES), needs_select=True, scope_lens_host=[scope])
        self._pf_batch = ForwardBatch(
            False, torch.zeros(n, dtype=torch.int64, device=dev), z(1, 1),
            torch.full((1,), scope, dtype=torch.int32, device=dev),
            torch.tensor([0, n], dtype=torch.int32, device=dev), n, q_lens_host=[n],
            in_graph=True)
        self._pf_batch.scope_plan = self._pf_plan
        # a scope of the captured length over page 0 (any lengths read past their pages)
        self._pf_plan.head_pages.fill_(sink_p)
        self._pf_plan.num_cands.fill_(self.reattn.topk + 1)  # (< max_pages: see _capture)
        self._pf_plan.local_tokens.fill_(self.reattn.local + n)
        self._no_logits = torch.empty(0, self.model.config.vocab_size, device=dev)
        # (the module: the package's `prefill_attention` attribute is its dispatcher)
        pa = importlib.import_module("sglang_reattn.kernels.prefill_attention")

        def run() -> torch.Tensor:
            return self.model(self._pf_ids, self.attn, self._pf_batch)

        with torch.inference_mode():
            try:
                self._pf_graph, _ = self._record(run)
            except RuntimeError as e:
                if not pa.PREFILL_CUDNN:
                    raise
                # cuDNN's attention would not capture here: its flash route does
                logger.warning("prefill graph capture with cuDNN attention failed (%s); "
                               "using flash attention", e)
                pa.PREFILL_CUDNN = False
                self._pf_graph, _ = self._record(run)

    def _replay_prefill(self, r: Request) -> bool:
        """Replay the prefill graph for the next piece of `r` when its geometry is the
        captured one; False: run it eagerly."""
        n, c, cfg = self.prefill_tokens, self.page_size, self.reattn
        start = r.num_computed
        sink_p, local_w, _ = self._prefill_geometry(n)
        head, cand, local, ltok = split_scope(cfg, self._pages_cpu(r), start, n)
        if (start % c or len(head) != sink_p or len(cand) <= cfg.topk or len(local) != local_w
                or ltok != cfg.local + n):
            return False
        self._pf_ids.copy_(torch.tensor(r.ids_between(start, start + n), dtype=torch.long),
                           non_blocking=True)
        self._pf_batch.slot_mapping.copy_(
            torch.tensor(self._slots(r, start, n), dtype=torch.int64), non_blocking=True)
        self._fill_plan([r], 1, self._pf_plan, new=n)
        if self.device.type != "cuda":  # the eager stand-in's torch path (see _fill_inputs)
            self._pf_batch.completed_pages = torch.tensor(
                completed_pages([r.pages], [start], [n], c), dtype=torch.long)
        self._pf_graph.replay()
        return True

    def _record(self, run):
        """Capture `run` (reads only the static buffers) -> (replayable, its output).
        Off CUDA (tests) the "graph" re-runs `run` eagerly on the same static buffers, so
        the buffer-filling logic is exercised without a GPU."""
        if self.device.type != "cuda":
            out = run()
            return _EagerGraph(run, out), out
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compile) outside the capture
                run()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._graph_pool):
            out = run()
        return g, out

    def _view(self, bs: int, select: bool | str) -> ForwardBatch:
        b = self._batch
        out = ForwardBatch(True, b.slot_mapping[:bs], b.page_table[:bs], b.scope_lens[:bs],
                           b.cu_q_lens[: bs + 1], 1, q_lens_host=[1] * bs, in_graph=True,
                           streamed=select == "stream")
        if select:
            p = self._splan if select == "stream" else self._plan
            out.scope_plan = ScopePlan(p.head_table[:bs], p.head_pages[:bs], p.cand_pages[:bs],
                                       p.num_cands[:bs], p.local_table[:bs], p.local_tokens[:bs],
                                       p.rep_index[:bs], 1, True)
        return out

    @staticmethod
    def _pages_cpu(r: Request) -> torch.Tensor:
        """`r.pages` as an int32 CPU tensor, kept on the request and extended as decode
        appends pages: converting a million-token context's page list (16K Python ints)
        every step cost about a millisecond. A running request's list only grows at its
        end; a list that shrank or whose first or last cached page changed is re-read."""
        t = getattr(r, "_pages_cpu", None)
        n, m = len(r.pages), 0 if t is None else t.numel()
        # rebuilt when the list no longer extends the cached prefix (freed, replaced)
        if t is None or m > n or (m and (int(t[0]) != r.pages[0]
                                         or int(t[-1]) != r.pages[m - 1])):
            t = torch.tensor(r.pages, dtype=torch.int32)
        elif m < n:
            t = torch.cat([t, torch.tensor(r.pages[m:], dtype=torch.int32)])
        r._pages_cpu = t
        return t

    def _fill_plan(self, reqs: list[Request], gbs: int, p: ScopePlan, new: int = 1) -> None:
        """The step's ScopePlan (as `build_scope_plan` lays it out for `new` tokens a
        sequence: a decode step, or the prefill graph's piece) into a graph's static
        buffers `p`. A buffer whose rows are what it already holds (the same batch
        size and the same rows as the last fill: a decode's tables change once a chunk)
        is not copied again: a million-token context's candidates are 16K pages."""
        bs = len(reqs)
        parts = [split_scope(self.reattn, self._pages_cpu(r), r.num_computed, new)
                 for r in reqs]
        for k, name in enumerate(("head_table", "cand_pages", "local_table")):
            dst = getattr(p, name)
            rows = [part[k] for part in parts]
            if self._holds(dst, gbs, rows):
                continue
            width = max(1, max(row.numel() for row in rows))
            assert width <= dst.shape[1], f"{name} wider than the captured graph"
            src = torch.zeros(bs, width, dtype=torch.int32)
            for i, row in enumerate(rows):
                src[i, : row.numel()] = row
            dst[:gbs].zero_()
            dst[:bs, :width].copy_(src, non_blocking=True)
        counts = [[head.numel(), cand.numel(), ltok] for head, cand, _, ltok in parts]
        for j, (name, pad) in enumerate((("head_pages", 0), ("num_cands", 0),
                                         ("local_tokens", 1))):
            dst = getattr(p, name)
            col = [c[j] for c in counts]
            if self._holds(dst, gbs, col):
                continue
            dst[:gbs].fill_(pad)
            dst[:bs].copy_(torch.tensor(col, dtype=torch.int32), non_blocking=True)

    def _holds(self, dst: torch.Tensor, gbs: int, rows: list) -> bool:
        """Whether static buffer `dst` already holds `rows` (tensors or ints) as filled for
        a graph of batch size `gbs`; if not, they are remembered as what it holds next.
        Keyed by the buffer's memory: the stream plan shares buffers with the plain one."""
        key = dst.data_ptr()
        held = self._filled.get(key)
        if held is not None and held[0] == gbs and len(held[1]) == len(rows) and all(
                (a == b) if isinstance(a, int) else (a.numel() == b.numel()
                                                     and torch.equal(a, b))
                for a, b in zip(held[1], rows)):
            return True
        self._filled[key] = (gbs, rows)
        return False

    def _needs_select(self, reqs: list[Request]) -> bool:
        if self.reattn is None:
            return False
        for r in reqs:
            sink_p, local_p, _ = plan_geometry(self.reattn, r.num_computed, 1)
            if local_p - sink_p > self.reattn.topk:
                return True
        return False

    def _fill_inputs(self, reqs: list[Request], gbs: int, select: bool | str) -> None:
        """The step's token ids, slots, lengths and page table or scope plan into the
        static buffers of the graphs of padded batch size `gbs`."""
        bs = len(reqs)
        c = self.page_size
        # Build on the host as plain lists, then one tensor each: per-element tensor writes
        # cost more than the whole decode step at batch 32.
        ids = [0] * gbs
        slots = [0] * gbs  # padded rows write into reserved page 0
        scope = [1] * gbs
        rows: list[list[int]] = []
        for i, r in enumerate(reqs):
            pos = r.num_computed
            ids[i] = r.token_at(pos)
            slots[i] = r.pages[pos // c] * c + pos % c
            scope[i] = pos + 1
            if not select:
                rows.append(r.pages[: pos // c + 1])
        b = self._batch
        self._ids[:gbs].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        b.slot_mapping[:gbs].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        b.scope_lens[:gbs].copy_(torch.tensor(scope, dtype=torch.int32), non_blocking=True)
        if select:  # the scope comes from the per-layer selection
            self._fill_plan(reqs, gbs, self._splan if select == "stream" else self._plan)
        else:
            width = max(len(p) for p in rows)
            table = torch.zeros(gbs, width, dtype=torch.int32)
            table[:bs] = torch.tensor([p + [0] * (width - len(p)) for p in rows],
                                      dtype=torch.int32)
            b.page_table[:gbs, :width].copy_(table, non_blocking=True)
        if self.reattn is not None and self.device.type != "cuda":
            # The eager stand-in runs the torch path, which summarizes completed pages from
            # this list (the Triton store keeps running summaries inside the real graph).
            done = completed_pages(pages_full(reqs), [r.num_computed for r in reqs], [1] * bs,
                                   c)
            self._views[gbs, select].completed_pages = torch.tensor(done, dtype=torch.long)

    def _replay(self, reqs: list[Request]) -> torch.Tensor:
        bs = len(reqs)
        gbs = self.graph_bs[bisect.bisect_left(self.graph_bs, bs)]
        select = self._needs_select(reqs)
        self._fill_inputs(reqs, gbs, select)
        self.graphs[gbs, select].replay()
        return self._logits[gbs, select][:bs]

    def _read_selection(self, gbs: int, bs: int) -> np.ndarray:
        """[L, bs, topk (+ spare)] on the host: each layer's selected pages from the stream
        graph's outputs, followed by its runners-up, read back once the replay has run
        (the step's one sync)."""
        layers = range(self.pool.k.shape[0])
        if self.device.type == "cuda":
            sel, spare = self._sel_out[gbs], self._spare_out.get(gbs)
        else:  # the eager stand-in re-ran the step: this replay's tensors
            sel = [self.attn.last_selection[i] for i in layers]
            spare = [self.attn.last_runners[i] for i in layers] if self.attn.spare else None
        return torch.stack(sel if spare is None else [torch.cat([s, r], 1) for s, r in
                                                      zip(sel, spare)])[:, :bs].cpu().numpy()

    def _replay_streamed(self, reqs: list[Request]) -> torch.Tensor | None:
        """A decode step with streamed contexts, replayed from the graph that maps virtual
        pages through the device page map. After the replay every layer's selection is
        read back: when some selected chunk was not in the chunk cache (its page read as
        page 0), the chunks are fetched and the step replays, with the summaries of the
        pages it writes restored first (a replay's running min/max must not keep what a
        discarded one wrote). Each replay makes at least the lowest layer that missed
        exact, but a layer that changed its input may then select other uncached chunks:
        after MAX_STREAM_REPLAYS the step runs eagerly instead (each layer's selection
        fetched before its attention: one more pass, whatever the misses). None: did not
        settle (run it eagerly)."""
        bs, tier = len(reqs), self.attn.stream
        gbs = self.graph_bs[bisect.bisect_left(self.graph_bs, bs)]
        self._fill_inputs(reqs, gbs, "stream")
        c = self.page_size
        written = torch.tensor([r.pages[r.num_computed // c] for r in reqs], device=self.device)
        kmin, kmax = self.attn.kmin, self.attn.kmax
        saved = kmin[:, written].clone(), kmax[:, written].clone()
        num_layers, topk = self.pool.k.shape[0], self.reattn.topk
        graph = self.graphs[gbs, "stream"]
        settled = False
        try:
            for attempt in range(min(num_layers, MAX_STREAM_REPLAYS) + 1):
                if attempt:
                    kmin[:, written], kmax[:, written] = saved
                tier.sync_map()
                graph.replay()
                if not attempt:  # the loads ahead left by the last step, while it runs
                    tier.run_deferred(in_flight=True)
                # one read-back of every layer's selection (and runners-up)
                back = self._read_selection(gbs, bs)
                settled = tier.settle(back[..., :topk],
                                      back[..., topk:] if self.attn.spare else None)
                if settled:
                    tier.stats["stream_graph_steps"] += 1
                    tier.stats["stream_graph_replays"] += attempt
                    return self._logits[gbs, "stream"][:bs]
        finally:
            if not settled:  # a fault, or no replay settled: nothing of the step stays
                kmin[:, written], kmax[:, written] = saved
        tier.stats["stream_graph_eager"] += 1  # (the replays it made counted as replays)
        tier.stats["stream_graph_replays"] += min(num_layers, MAX_STREAM_REPLAYS)
        return None
