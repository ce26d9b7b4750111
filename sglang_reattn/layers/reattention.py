"""ReAttention: per (sequence, layer, step), pick the top-k middle chunks by their key
summaries, then attend over `[sink | selected chunks in original order | local window]`
with contiguous virtual positions.

Page geometry of a sequence with `s` tokens already cached and `n` new ones (N = s + n,
pages of C tokens, the last one possibly partial):

    pages:  [0 .. sink_p)          sink (always full)
            [sink_p .. local_p)    middle: the candidates, scored and top-k selected
            [local_p .. ceil(N/C)) local window: covers the `local` tokens before the new
                                   ones and all new ones, so queries see their own block

The candidates and the sink/local tables are the same for every layer, so they are built
once per step on the host (`ScopePlan`); the selection runs per layer on the device with
no host sync, so decode stays CUDA-graph capturable. When a sequence has no more middle
chunks than `topk`, all are selected in order and the scope is the whole sequence: exactly
full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sglang_reattn.config import ReAttnConfig
from sglang_reattn.layers.attention import ForwardBatch, KVPool, PagedAttention
from sglang_reattn.models.rope import RopeTable

REP_QUERIES = 16  # queries of a prefill piece that vote for its one selection


@dataclass
class ScopePlan:
    head_table: torch.Tensor  # [B, S] int32 sink pages (padded)
    head_pages: torch.Tensor  # [B] int32
    cand_pages: torch.Tensor  # [B, Wc] int32 middle pages in order (padded)
    num_cands: torch.Tensor  # [B] int32
    local_table: torch.Tensor  # [B, Wl] int32 (padded)
    local_tokens: torch.Tensor  # [B] int32 tokens in the local pages
    rep_index: torch.Tensor  # [B * R] int64 rows of the packed q that score for each seq
    reps: int  # R
    needs_select: bool  # some sequence has more candidates than topk
    # each sequence's scope length in tokens after the selection (it always takes
    # min(topk, candidates) chunks), for kernels that need it on the host
    scope_lens_host: list[int] | None = None
    # Streamed prefill pieces that complete their prompt: the batch rows ([B'] int64, and
    # as a list) and the packed q row of each one's last token. Each layer also selects
    # for that token alone, as the decode step after the piece will: the streaming tier
    # loads those chunks before that step (`StreamTier.expect`).
    next_rows: torch.Tensor | None = None
    next_rows_host: list[int] | None = None
    next_index: torch.Tensor | None = None
    # (ReAttention.select) the selection inputs of the B rows followed by those of
    # next_rows, each of those scoring its last token (repeated R times): one selection
    # per layer for both, made once per step
    merged: tuple[torch.Tensor, ...] | None = None
    # (build_scope_plan) head_table, head_pages, local_table and local_tokens as host
    # arrays, for a streamed eager step's scope assembled on the host
    host: tuple | None = None


def plan_geometry(cfg: ReAttnConfig, cached: int, new: int) -> tuple[int, int, int]:
    """-> (sink_pages, local_start_page, total_pages) for one sequence."""
    c = cfg.chunk_size
    total = (cached + new + c - 1) // c
    sink_p = min(cfg.sink // c, total - 1)
    local_p = max(sink_p, max(0, cached - cfg.local) // c)
    return sink_p, local_p, total


def split_scope(cfg: ReAttnConfig, pages, cached: int, new: int):
    """One sequence's pages (a list or a tensor) -> (sink, candidates, local window, tokens
    in the local window), as slices of `pages`."""
    sink_p, local_p, total = plan_geometry(cfg, cached, new)
    return (pages[:sink_p], pages[sink_p:local_p], pages[local_p:total],
            cached + new - local_p * cfg.chunk_size)


def completed_pages(page_lists: list[list[int]], cached: list[int], q_lens: list[int],
                    chunk_size: int) -> list[int]:
    """Pages whose last slot is written by this step (their summaries become final)."""
    c = chunk_size
    return [pages[p] for pages, s, n in zip(page_lists, cached, q_lens)
            for p in range(s // c, (s + n) // c) if (p + 1) * c - 1 >= s]


def build_scope_plan(cfg: ReAttnConfig, page_lists: list[list[int]], cached: list[int],
                     q_lens: list[int], device: torch.device, min_widths=(1, 1, 1),
                     next_rows: list[int] = ()) -> ScopePlan:
    """`next_rows`: the rows of a prefill step whose next step decodes a streamed context
    (see `ScopePlan.next_rows`)."""
    heads, cands, locals_, ltoks = zip(*(split_scope(cfg, pages, s, n)
                                         for pages, s, n in zip(page_lists, cached, q_lens)))
    reps = 1 if max(q_lens) == 1 else REP_QUERIES
    rep_index, start, start_of = [], 0, []
    for n in q_lens:
        rep_index.extend(max(start, start + n - reps + j) for j in range(reps))
        start_of.append(start)
        start += n

    def pad(rows: list[list[int]], width: int) -> torch.Tensor:
        w = max([width] + [len(r) for r in rows])
        return torch.tensor([r + [0] * (w - len(r)) for r in rows], dtype=torch.int32)

    def dev(x) -> torch.Tensor:
        return torch.as_tensor(x).to(device, non_blocking=True)

    host = (pad(heads, min_widths[0]), torch.tensor([len(h) for h in heads], dtype=torch.int32),
            pad(locals_, min_widths[2]), torch.tensor(ltoks, dtype=torch.int32))
    return ScopePlan(
        head_table=dev(host[0]),
        head_pages=dev(host[1]),
        cand_pages=dev(pad(cands, min_widths[1])),
        num_cands=dev(torch.tensor([len(x) for x in cands], dtype=torch.int32)),
        local_table=dev(host[2]),
        local_tokens=dev(host[3]),
        host=tuple(t.numpy() for t in host),
        rep_index=dev(torch.tensor(rep_index, dtype=torch.int64)),
        reps=reps,
        needs_select=any(len(x) > cfg.topk for x in cands),
        scope_lens_host=[(len(h) + min(cfg.topk, len(x))) * cfg.chunk_size + t
                         for h, x, t in zip(heads, cands, ltoks)],
        next_rows=dev(torch.tensor(next_rows, dtype=torch.int64)) if next_rows else None,
        next_rows_host=list(next_rows) or None,
        next_index=(dev(torch.tensor([start_of[b] + q_lens[b] - 1 for b in next_rows],
                                     dtype=torch.int64)) if next_rows else None),
    )


class ReAttention(PagedAttention):
    """Paged attention whose scope is narrowed per layer by top-k chunk selection."""

    def __init__(self, pool: KVPool, rope: RopeTable, num_heads: int, head_dim: int,
                 cfg: ReAttnConfig, summary: str = "minmax", combine: str = "max",
                 use_triton: bool = False, rot_limit: int = 0, num_virtual: int = 0,
                 spare: int = 0) -> None:
        super().__init__(pool, rope, num_heads, head_dim, None, use_triton, rot_limit)
        from sglang_reattn import kernels

        self._kernels = kernels
        self.cfg = cfg
        self.summary = summary
        self.combine = combine
        # Per layer, per page, per KV head summaries of the un-rotated keys, in the cache's
        # dtype: min/max of bf16 keys are exact in bf16, and the scorer reads half the bytes.
        # `num_virtual` more rows hold the streaming tier's virtual pages (pool.num_pages + s
        # is slot s), so candidates index one table whether resident or streamed; and
        # `page_map` [L, num_virtual] maps each slot to the chunk-cache page holding its
        # chunk in that layer (-1: none), for selections mapped on the device.
        self.num_virtual = num_virtual
        # Streamed selections also report the `spare` candidates ranked just below the top
        # k: the streaming tier loads them ahead of the steps likely to select them.
        self.spare = spare if num_virtual else 0
        shape = (pool.k.shape[0], pool.num_pages + num_virtual, pool.k.shape[3],
                 pool.k.shape[4])
        kw = dict(device=pool.k.device, dtype=pool.k.dtype)
        self.page_map = (torch.full((shape[0], num_virtual), -1, dtype=torch.int32,
                                    device=pool.k.device) if num_virtual else None)
        self.kmin = torch.zeros(shape, **kw) if summary == "minmax" else None
        self.kmax = torch.zeros(shape, **kw) if summary == "minmax" else None
        self.kmean = torch.zeros(shape, **kw) if summary == "mean" else None
        self.last_selection: dict[int, torch.Tensor] = {}  # layer -> selected pages (debug)
        self.last_runners: dict[int, torch.Tensor] = {}  # layer -> runners-up (streamed)
        self.stream = None  # the StreamTier when contexts may hold virtual pages
        # (CUDA) two pinned int32 buffers and their last copies' events (`_to_device`)
        self._pins = ([[None, torch.cuda.Event()] for _ in range(2)]
                      if pool.k.device.type == "cuda" else [])

    def _summaries(self, layer_id: int):
        return tuple(None if t is None else t[layer_id]
                     for t in (self.kmin, self.kmax, self.kmean))

    def _summarize_pages(self, layers: int | slice, pages: torch.Tensor) -> None:
        """Recompute the summaries of whole pages from their keys, as `chunk_summaries_ref`
        does: in one layer (an int) or in a slice of layers at once."""
        pages = pages.long()
        keys = self.pool.k[layers, pages].float()  # [(L,) n, C, Hkv, D]
        if self.kmin is not None:
            self.kmin[layers, pages] = keys.amin(-3).to(self.kmin.dtype)
            self.kmax[layers, pages] = keys.amax(-3).to(self.kmax.dtype)
        if self.kmean is not None:
            self.kmean[layers, pages] = (keys.sum(-3) / keys.shape[-3]).to(self.kmean.dtype)

    def pages_loaded(self, pages: torch.Tensor, batch_bytes: int = 256 << 20) -> None:
        """Summaries of whole pages, every layer (chunks loaded from the disk tier): all
        layers of a batch of pages at once (a streamed admission's 33 sink and
        local-window pages, one layer at a time, took 25-38 ms of launches in a 1M-token
        TTFT on the H200's host)."""
        super().pages_loaded(pages)
        k = self.pool.k  # [L, P, C, Hkv, D]
        step = max(1, batch_bytes // (k.shape[0] * k[0, 0].numel() * 4))  # (float32 keys)
        for lo in range(0, len(pages), step):
            self._summarize_pages(slice(None), pages[lo:lo + step])

    def store(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        if self.use_triton:
            self._kernels.store_kv(k, v, self.pool.k[layer_id], self.pool.v[layer_id],
                                   batch.slot_mapping, *self._summaries(layer_id))
            return
        # Torch path: write K/V, and summarize a page only once its last slot is written.
        # A page still filling is always the sequence's last page, which is always in the
        # local window, so its summary is never read before it completes; this keeps a
        # decode step down to two small writes per layer on the CPU.
        super().store(layer_id, k, v, batch)
        done = batch.completed_pages
        if done is not None and done.numel():
            self._summarize_pages(layer_id, done)

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        self.store(layer_id, k, v, batch)
        plan: ScopePlan | None = batch.scope_plan
        if plan is None or (not plan.needs_select and not batch.in_graph
                            and not batch.streamed):
            return self.attend_scope(layer_id, q, batch, batch.page_table, batch.scope_lens,
                                     batch.pages_host, batch.scope_lens_host)
        # Virtual pages are never read: the selection always runs and maps them to pages.
        table, lens = self.select(layer_id, q, plan, batch.streamed, batch.in_graph)
        return self.attend_scope(layer_id, q, batch, table, lens, None, plan.scope_lens_host)

    def select(self, layer_id: int, q: torch.Tensor, plan: ScopePlan, streamed: bool = False,
               in_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scope page table [B, W] int32, scope lengths [B] int32) for this layer.
        `streamed`: candidates may be virtual pages of the streaming tier; selected ones
        are mapped to the chunk-cache pages their K/V are (eager) or were (`in_graph`)
        fetched into."""
        kn, c, topk = self._kernels, self.cfg.chunk_size, self.cfg.topk
        # A streamed prefill piece that completes its prompt also selects for its last
        # token alone (`StreamTier.expect`): as rows after the batch's, in the same call.
        # (R copies of that token score as one: the max over a row's R queries.)
        merge = (streamed and not in_graph and plan.next_rows is not None
                 and self.stream.expect_next)
        cand, ncand, htab, hpages, ltab, ltoks, rep_index = (
            self._merged_inputs(plan) if merge else
            (plan.cand_pages, plan.num_cands, plan.head_table, plan.head_pages,
             plan.local_table, plan.local_tokens, plan.rep_index))
        # [B*R, Hq, D] un-rotated; decode (one query per sequence, R = 1) scores q itself
        qr = q if plan.reps == 1 and not merge else q.index_select(0, rep_index)
        kmin, kmax, kmean = self._summaries(layer_id)
        # Virtual candidates (streamed) have summaries like any page. Scoring, top-k and the
        # table are one fused op (5 launches on GPU). In a CUDA graph the table maps virtual
        # pages to the chunk-cache pages holding them on the device (the runner replays the
        # step when one was not cached); streamed and eager, the selection is mapped, and
        # fetched, on the host.
        on_device = streamed and in_graph
        spare = self.spare if streamed else 0
        table, lens, sel_pages, nsel, *runners = kn.select_scope(
            qr, cand, ncand, htab, hpages, ltab, ltoks, topk, c, kmin, kmax, kmean,
            self.combine, plan.reps, self.page_map[layer_id] if on_device else None,
            self.pool.num_pages, spare)
        runners = runners[0] if runners else None
        if streamed and not in_graph:
            return self._select_on_host(layer_id, plan, sel_pages, nsel, runners, merge)
        if runners is not None:
            self.last_runners[layer_id] = runners
        self.last_selection[layer_id] = sel_pages  # candidates' own pages
        return table, lens

    def _select_on_host(self, layer_id: int, plan: ScopePlan, sel_pages: torch.Tensor,
                        nsel: torch.Tensor, runners: torch.Tensor | None, merge: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A streamed eager step's selection (the batch's rows, then with `merge` those of
        `plan.next_rows`) read back in one copy, its virtual pages mapped on the host
        (`StreamTier.resolve`), and the scope table assembled there (`assemble_scope_host`,
        as `assemble_scope_ref` on the device) and sent in one copy: the step's one sync,
        in place of about twenty small device operations and seven small copies per layer.
        A plan without host tables (not `build_scope_plan`'s) has them copied here."""
        bt, k = sel_pages.shape
        parts = [sel_pages.reshape(-1), nsel.reshape(-1)]
        if runners is not None:
            parts.append(runners.reshape(-1))
        host = torch.cat([t.to(torch.int32) for t in parts]).cpu().numpy()
        sel_h, nsel_h = host[: bt * k].reshape(bt, k), host[bt * k: bt * k + bt]
        run_h = host[bt * k + bt:].reshape(bt, -1) if runners is not None else None
        b = plan.cand_pages.shape[0]
        if run_h is not None:
            self.last_runners[layer_id] = runners[:b]
        mapped = self.stream.resolve(layer_id, sel_h[:b], nsel_h[:b],
                                     None if run_h is None else run_h[:b])
        if merge:
            self.stream.expect(layer_id, plan.next_rows_host, sel_h[b:], nsel_h[b:],
                               None if run_h is None else run_h[b:])
        head_table, head_pages, local_table, local_tokens = plan.host or tuple(
            t.cpu().numpy() for t in (plan.head_table, plan.head_pages, plan.local_table,
                                      plan.local_tokens))
        table, lens = self._kernels.assemble_scope_host(
            head_table, head_pages, mapped, nsel_h[:b], local_table, local_tokens,
            self.cfg.chunk_size)
        out = self._to_device(np.concatenate([table.ravel(), lens, mapped.ravel()]),
                              sel_pages.device)
        n = table.size
        self.last_selection[layer_id] = out[n + b:].view(b, k)
        return out[:n].view(table.shape), out[n: n + b]

    def _to_device(self, a: np.ndarray, device: torch.device) -> torch.Tensor:
        """A small int32 host array on the device. On CUDA through one of two pinned
        buffers, in turn (each reused after its last copy's event), so the copy is queued
        behind the step's fills instead of waiting for them (a copy from pageable memory
        waits for the stream)."""
        if device.type != "cuda":
            return torch.from_numpy(a).to(device)
        self._pins.append(self._pins.pop(0))
        buf, done = self._pins[-1]
        done.synchronize()
        if buf is None or buf.numel() < a.size:
            buf = self._pins[-1][0] = torch.empty(max(a.size, 4096), dtype=torch.int32,
                                                  pin_memory=True)
        view = buf[: a.size]
        view.numpy()[:] = a
        out = view.to(device, non_blocking=True)
        done.record()
        return out

    @staticmethod
    def _merged_inputs(plan: ScopePlan) -> tuple[torch.Tensor, ...]:
        """A streamed prefill piece completing its prompt: the selection inputs of the
        batch's rows, then those of `plan.next_rows` again, whose R query rows are all
        their last token (as the next decode step scores it): each layer's selection for
        that token alone comes from the same call, for the streaming tier to load before
        that step (`StreamTier.expect`). The piece's own selection votes with its last
        REP_QUERIES queries and often differs, so without this the first decode step
        missed in most layers (replays, then an eager pass); as a call of its own per
        layer it took 56 ms (sampled) of a 1M-token TTFT on the H200's host. Made once
        per step (kept on the plan)."""
        if plan.merged is None:
            r = plan.next_rows
            plan.merged = tuple(torch.cat([t, t[r]]) for t in (
                plan.cand_pages, plan.num_cands, plan.head_table, plan.head_pages,
                plan.local_table, plan.local_tokens)) + (
                torch.cat([plan.rep_index, plan.next_index.repeat_interleave(plan.reps)]),)
        return plan.merged
