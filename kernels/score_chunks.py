"""Score candidate chunks (pages) against the decode query and pick one top-k per sequence.

ReAttention's selection is position-agnostic: the *un-rotated* query is compared with the
page summaries of *un-rotated* keys (``store_kv`` maintains them), per KV head:

- ``"minmax"``: Quest's upper bound of ``q.k`` over the page,
  ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` (needs ``kmin`` and ``kmax``);
- ``"mean"``: ``q . kmean``.

Every query head is scored against its GQA group's KV head, and the heads are combined into
ONE selection per sequence (decision 3 of the design), so a fetched chunk serves all heads:

- ``combine="sum"``: sum of the per-head scores (fused in the kernel: one ``[B, N]`` write);
- ``combine="max"``: each head's scores divided by that head's max ``|score|`` over the
  valid candidates, then summed, so that no single head with a large query norm dominates.

Kernels: per-head scores (the ``max`` combine's input) come from ``_score_dot_kernel``, grid
``(B, P, Hkv)``: all query rows of a sequence and KV head (the GQA group, times a prefill
piece's voting queries) against blocks of candidates as matrix products, the bound being
``max(q, 0) . kmax + min(q, 0) . kmin``; each of the P programs takes every P-th block
(P = a few programs per SM). Summed scores come from
``_score_chunks_kernel``, grid ``(B, cdiv(max_cands, BLOCK_N), 1)``, elementwise, one
program per block of candidates looping over the KV heads. Either reads the summaries once
(memory-bound). Here the
top-k is ``torch.topk`` on the small score matrix (select_scope.py fuses it instead);
everything is shape-static, so the whole op is CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from ._triton_compat import check, device_sms, dot_dtype, next_pow2, tl, tl_max, tl_sum, triton

COMBINE_MODES = ("sum", "max")


@triton.jit
def _score_chunks_kernel(
    q_ptr, kmin_ptr, kmax_ptr, kmean_ptr, cand_ptr, num_cands_ptr, out_ptr, scale_ptr,
    max_cands, reps,
    stride_qb, stride_qh,
    stride_sp, stride_sh,  # summaries [num_pages, Hkv, D]
    stride_cb,  # candidates [B, max_cands]
    stride_ob, stride_oh,  # scores [B * reps, N] (PER_HEAD=False) or [B * reps, Hq, N]
    stride_scb,  # max |score| per row and head [B * reps, Hq] (WRITE_SCALE; zeroed first)
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_MINMAX: tl.constexpr, PER_HEAD: tl.constexpr, WRITE_SCALE: tl.constexpr,
    CHECK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)  # query row; rows b * reps .. b * reps + reps - 1 share seq b
    pid_n = tl.program_id(1)
    # per head: one KV head per program (axis 2); summed: this program loops over all heads
    if PER_HEAD:
        h_lo = tl.program_id(2)
        h_hi = h_lo + 1
    else:
        h_lo = 0
        h_hi = NUM_KV_HEADS
    seq = pid_b // reps
    n_cands = tl.load(num_cands_ptr + seq)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n_cands
    d_mask = offs_d < HEAD_DIM
    nd_mask = n_mask[:, None] & d_mask[None, :]
    page = tl.load(cand_ptr + seq.to(tl.int64) * stride_cb + offs_n, mask=n_mask,
                   other=0).to(tl.int64)
    row = page[:, None] * stride_sp + offs_d[None, :]  # [BLOCK_N, BLOCK_D]

    total = tl.full([BLOCK_N], 0.0, tl.float32)
    # A block wholly past this sequence's candidates (the width is padded to a captured
    # maximum) reads nothing: it only marks its scores -inf.
    if pid_n * BLOCK_N < n_cands:
        for h in range(h_lo, h_hi):
            if USE_MINMAX:
                mn = tl.load(kmin_ptr + row + h * stride_sh, mask=nd_mask,
                             other=0.0).to(tl.float32)
                mx = tl.load(kmax_ptr + row + h * stride_sh, mask=nd_mask,
                             other=0.0).to(tl.float32)
            else:
                mean = tl.load(kmean_ptr + row + h * stride_sh, mask=nd_mask,
                               other=0.0).to(tl.float32)
            for g in tl.static_range(GROUP):
                qh = h * GROUP + g
                qv = tl.load(q_ptr + pid_b.to(tl.int64) * stride_qb + qh * stride_qh + offs_d,
                             mask=d_mask, other=0.0).to(tl.float32)
                if USE_MINMAX:
                    # max(q*min, q*max) per channel = q * (max if q >= 0 else min)
                    bound = tl.where(qv[None, :] >= 0, mx, mn)
                    s = tl_sum(bound * qv[None, :], 1)
                else:
                    s = tl_sum(mean * qv[None, :], 1)
                if PER_HEAD:
                    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + qh * stride_oh + offs_n,
                             tl.where(n_mask, s, float("-inf")), mask=offs_n < max_cands)
                    if WRITE_SCALE:
                        top = tl_max(tl.where(n_mask, tl.abs(s), 0.0), 0)
                        at = scale_ptr + pid_b.to(tl.int64) * stride_scb + qh
                        if CHECK_SCALE:  # most programs find a larger max already there
                            if top > tl.load(at, cache_modifier=".cg"):
                                tl.atomic_max(at, top)
                        else:
                            tl.atomic_max(at, top)
                else:
                    total += s
    elif PER_HEAD:
        for qh in range(h_lo * GROUP, h_hi * GROUP):
            tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + qh * stride_oh + offs_n,
                     tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_n < max_cands)
    if not PER_HEAD:
        tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + offs_n,
                 tl.where(n_mask, total, float("-inf")), mask=offs_n < max_cands)


@triton.jit
def _dot_block(qp, qn, kmin_ptr, kmax_ptr, kmean_ptr, cand, n_cands, max_cands, blk,
               out_row, m_valid, offs_d, d_mask, h, stride_sp, stride_sh,
               USE_MINMAX: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Scores of the query rows (qp = max(q, 0), qn = min(q, 0); the mean: qp = q) against
    block `blk` of one KV head's candidates, stored at `out_row` (-inf past n_cands) ->
    each row's max |score| over the block."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_cands
    page = tl.load(cand + offs_n, mask=n_mask, other=0).to(tl.int64)
    row = page[:, None] * stride_sp + h * stride_sh + offs_d[None, :]
    nd_mask = n_mask[:, None] & d_mask[None, :]
    if USE_MINMAX:
        mx = tl.load(kmax_ptr + row, mask=nd_mask, other=0.0).to(DOT_DTYPE)
        mn = tl.load(kmin_ptr + row, mask=nd_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(qp, tl.trans(mx), input_precision=DOT_PRECISION)
        s += tl.dot(qn, tl.trans(mn), input_precision=DOT_PRECISION)
    else:
        mean = tl.load(kmean_ptr + row, mask=nd_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(qp, tl.trans(mean), input_precision=DOT_PRECISION)
    tl.store(out_row + offs_n[None, :], tl.where(n_mask[None, :], s, float("-inf")),
             mask=m_valid[:, None] & (offs_n < max_cands)[None, :])
    return tl_max(tl.where(n_mask[None, :], tl.abs(s), 0.0), 1)


@triton.jit
def _dead_block(out_row, m_valid, max_cands, blk, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """-inf scores for block `blk`, past the candidates (up to max_cands)."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_row + offs_n[None, :], tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32),
             mask=m_valid[:, None] & (offs_n < max_cands)[None, :])


@triton.jit
def _score_dot_kernel(
    q_ptr, kmin_ptr, kmax_ptr, kmean_ptr, cand_ptr, num_cands_ptr, out_ptr, scale_ptr,
    max_cands,
    stride_qb, stride_qh, stride_sp, stride_sh, stride_cb, stride_ob, stride_oh, stride_scb,
    REPS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_MINMAX: tl.constexpr, WRITE_SCALE: tl.constexpr, CHECK_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, LOOP: tl.constexpr,
):
    """Per-head scores as matrix products, grid ``(B, P, Hkv)``: the REPS x GROUP query rows
    of a sequence and KV head (row m: rep m // GROUP, head m % GROUP) against blocks of
    BLOCK_N candidates, block j by program j % P (LOOP; otherwise P = the number of blocks,
    one each). The min/max bound is
    ``sum_d max(q_d kmin_d, q_d kmax_d) = max(q, 0) . kmax + min(q, 0) . kmin``, so the
    summaries are read once for every row and the products run on the tensor cores (16-bit
    operands are exact products, accumulated in float32). A looping program loads its query
    rows once and makes one atomic of its maxima for all of its blocks."""
    seq = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    n_cands = tl.load(num_cands_ptr + seq)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < REPS * GROUP
    d_mask = offs_d < HEAD_DIM
    q_row = (seq * REPS + offs_m // GROUP).to(tl.int64)
    q_head = h * GROUP + offs_m % GROUP
    out_row = out_ptr + q_row[:, None] * stride_ob + q_head[:, None] * stride_oh
    cand = cand_ptr + seq.to(tl.int64) * stride_cb
    n_live = (n_cands + BLOCK_N - 1) // BLOCK_N  # blocks holding candidates
    step = tl.num_programs(1)
    top = tl.full([BLOCK_M], 0.0, tl.float32)
    if pid_n < n_live:
        q = tl.load(q_ptr + q_row[:, None] * stride_qb + q_head[:, None] * stride_qh
                    + offs_d[None, :], mask=m_valid[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        if USE_MINMAX:
            qp = tl.maximum(q, 0.0).to(DOT_DTYPE)
            qn = tl.minimum(q, 0.0).to(DOT_DTYPE)
        else:
            qp = q.to(DOT_DTYPE)
            qn = qp
        if LOOP:
            for blk in range(pid_n, n_live, step):
                top = tl.maximum(top, _dot_block(
                    qp, qn, kmin_ptr, kmax_ptr, kmean_ptr, cand, n_cands, max_cands, blk,
                    out_row, m_valid, offs_d, d_mask, h, stride_sp, stride_sh, USE_MINMAX,
                    BLOCK_N, DOT_DTYPE, DOT_PRECISION))
        else:
            top = _dot_block(qp, qn, kmin_ptr, kmax_ptr, kmean_ptr, cand, n_cands, max_cands,
                             pid_n, out_row, m_valid, offs_d, d_mask, h, stride_sp,
                             stride_sh, USE_MINMAX, BLOCK_N, DOT_DTYPE, DOT_PRECISION)
        if WRITE_SCALE:
            at = scale_ptr + q_row * stride_scb + q_head
            if CHECK_SCALE:  # most programs find a larger max already there
                cur = tl.load(at, mask=m_valid, other=0.0, cache_modifier=".cg")
                tl.atomic_max(at, top, mask=m_valid & (top > cur))
            else:
                tl.atomic_max(at, top, mask=m_valid)
    if LOOP:  # blocks past the candidates: -inf
        first_dead = pid_n + step * ((tl.maximum(n_live - pid_n, 0) + step - 1) // step)
        for blk in range(first_dead, (max_cands + BLOCK_N - 1) // BLOCK_N, step):
            _dead_block(out_row, m_valid, max_cands, blk, BLOCK_M, BLOCK_N)
    elif pid_n >= n_live:
        _dead_block(out_row, m_valid, max_cands, pid_n, BLOCK_M, BLOCK_N)


def _check_score_inputs(q, cand_pages, num_cands, topk, kmin, kmax, kmean, combine,
                        reps: int = 1) -> bool:
    """Validates arguments; returns True for the min/max bound, False for the mean.
    ``q`` holds ``reps`` consecutive query rows per sequence of ``cand_pages``."""
    check(combine in COMBINE_MODES, f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    check(topk >= 0, f"topk must be >= 0, got {topk}")
    use_minmax = kmin is not None or kmax is not None
    check(use_minmax != (kmean is not None),
          "pass either kmin and kmax (Quest bound) or kmean (mean key), not both or neither")
    summaries = (kmin, kmax) if use_minmax else (kmean,)
    check(all(s is not None for s in summaries), "kmin and kmax must be given together")
    check(q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}")
    for s in summaries:
        check(s.dim() == 3 and s.shape[2] == q.shape[2] and s.shape == summaries[0].shape,
              f"summaries must be [num_pages, Hkv, D={q.shape[2]}], got {tuple(s.shape)}")
        check(s.is_contiguous(), "summaries must be contiguous")
        check(s.device == q.device, "summaries must be on q's device")
    check(q.shape[1] % summaries[0].shape[1] == 0,
          f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads {summaries[0].shape[1]}")
    check(q.stride(-1) == 1, "q must be contiguous in head_dim")
    check(cand_pages.dtype == torch.int32 and cand_pages.dim() == 2
          and cand_pages.shape[0] * reps == q.shape[0] and cand_pages.stride(1) == 1,
          f"cand_pages must be int32 [B, max_cands] with contiguous rows and B * {reps} = "
          f"{q.shape[0]} query rows, got {cand_pages.dtype} {tuple(cand_pages.shape)}")
    check(num_cands.dtype == torch.int32 and num_cands.shape == (cand_pages.shape[0],)
          and num_cands.is_contiguous(), "num_cands must be contiguous int32 [B]")
    check(cand_pages.device == q.device and num_cands.device == q.device,
          "cand_pages / num_cands must be on q's device")
    return use_minmax


def chunk_scores_triton(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                        kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                        kmean: torch.Tensor | None = None, per_head: bool = False,
                        ) -> torch.Tensor:
    """Raw scores: float32 ``[B, max_cands]`` (summed over heads) or ``[B, Hq, max_cands]``
    (``per_head``); candidates at index >= ``num_cands[b]`` get ``-inf``."""
    _check_score_inputs(q, cand_pages, num_cands, 0, kmin, kmax, kmean, "sum")
    batch, num_q_heads, _ = q.shape
    max_cands = cand_pages.shape[1]
    shape = (batch, num_q_heads, max_cands) if per_head else (batch, max_cands)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    launch_scorer(q, cand_pages, num_cands, kmin, kmax, kmean, out, None, 1)
    return out


# The elementwise kernel (summed scores, and per-head ones of fewer rows than below):
# candidates per program and warps. Read a head's max |score| so far before the atomic max,
# which then runs only where it would raise it (the atomics of every program on the same
# Hq addresses serialize).
SCORE_BLOCK_N = 32
SCORE_WARPS = 4
SCORE_CHECK_SCALE = True
# Per-head scores of at least this many query rows per sequence and KV head (reps x GQA
# group) take the matrix-product kernel, with this many candidates a program and warps.
# The whole selection of one 8B layer, H200, us (benchmarks/bench_scorer_atomics.py,
# 2026-12-01; query rows 1: a decode step, 16: a prefill piece's voting queries):
#   context, rows     16/2 atomic  32/4 read  dot 32/4  dot 64/4  dot 128/8
#   32K, 1               16.0        16.7       14.0      14.6      15.3
#   1M, 1                66.9        65.1       46.4      43.7      46.7
#   4M, 1                 216         171        133       120       134
#   1M, 16                632         529       83.8      80.0       114
#   4M, 16               2452        1962        220       208       336
SCORE_DOT_MIN_ROWS = 1
SCORE_DOT_BLOCK_N = 64
SCORE_DOT_WARPS = 4
# Looping programs: about this many per SM (0: a program per block of candidates), each
# taking every P-th block of candidates. The scores kernel of one 8B layer, CUDA graph,
# H200 (bench_attention.py, 2026-12-01), us at 1M / 4M (floor 15.8 / 63.1): a program per
# block 24.7 / 85.3; looping, 2 a SM 22.3 / 73.0, 4 a SM 21.7 / 71.2, 8 a SM (32 a
# program) 21.9 / 72.9. (Programs of one block's KV heads launched together, the grid
# heads first, were no faster than the default order: 85.6 / 85.8 us at 4M.)
SCORE_DOT_WAVES = 4
SCORE_DOT_STAGES = 3  # the launch's num_stages (as measured; not swept)
# ... for at most this many query rows a program (reps x GQA group): a decode step's. A
# prefill piece's 16 voting queries (48-64 rows) keep a program per block, as measured in
# the 1M-token prefill (the looping kernel was timed for decode rows only).
SCORE_DOT_LOOP_MAX_ROWS = 16


def launch_scorer(q, cand_pages, num_cands, kmin, kmax, kmean, out, scale, reps) -> None:
    """Launch the scorer: row r of ``q`` scores the candidates of sequence ``r // reps``
    into ``out`` (``[rows, N]`` or per head ``[rows, Hq, N]``); with ``scale`` (per head
    only, zero-filled) it also leaves each row's and head's max ``|score|`` in
    ``scale [rows, Hq]``."""
    rows, num_q_heads, head_dim = q.shape
    summ = kmin if kmin is not None else kmean
    max_cands = cand_pages.shape[1]
    per_head = out.dim() == 3
    if rows == 0 or max_cands == 0:
        return
    group = num_q_heads // summ.shape[1]
    if per_head and reps * group >= SCORE_DOT_MIN_ROWS:
        # 16-bit operands of one dtype multiply exactly on the tensor cores; otherwise fp32
        half = q.dtype in (torch.float16, torch.bfloat16) and summ.dtype == q.dtype
        blocks = triton.cdiv(max_cands, SCORE_DOT_BLOCK_N)
        hkv = summ.shape[1]
        loop = SCORE_DOT_WAVES and reps * group <= SCORE_DOT_LOOP_MAX_ROWS
        progs = (min(blocks, triton.cdiv(SCORE_DOT_WAVES * device_sms(q), rows // reps * hkv))
                 if loop else blocks)
        _score_dot_kernel[(rows // reps, progs, hkv)](
            q, summ, kmax if kmin is not None else summ, summ, cand_pages, num_cands, out,
            scale if scale is not None else out, max_cands,
            q.stride(0), q.stride(1), summ.stride(0), summ.stride(1), cand_pages.stride(0),
            out.stride(0), out.stride(1), scale.stride(0) if scale is not None else 0,
            REPS=reps, GROUP=group, HEAD_DIM=head_dim, USE_MINMAX=kmin is not None,
            WRITE_SCALE=scale is not None, CHECK_SCALE=SCORE_CHECK_SCALE,
            BLOCK_M=max(16, next_pow2(reps * group)), BLOCK_N=SCORE_DOT_BLOCK_N,
            BLOCK_D=max(16, next_pow2(head_dim)),
            DOT_DTYPE=dot_dtype(q.dtype) if half else tl.float32,
            DOT_PRECISION="tf32" if half else "ieee", LOOP=progs < blocks,
            num_warps=SCORE_DOT_WARPS, num_stages=SCORE_DOT_STAGES,
        )
        return
    grid = (rows, triton.cdiv(max_cands, SCORE_BLOCK_N), summ.shape[1] if per_head else 1)
    _score_chunks_kernel[grid](
        q, summ, kmax if kmin is not None else summ, summ, cand_pages, num_cands, out,
        scale if scale is not None else out, max_cands, reps,
        q.stride(0), q.stride(1), summ.stride(0), summ.stride(1), cand_pages.stride(0),
        out.stride(0), out.stride(1) if per_head else 0,
        scale.stride(0) if scale is not None else 0,
        NUM_KV_HEADS=summ.shape[1], GROUP=num_q_heads // summ.shape[1], HEAD_DIM=head_dim,
        USE_MINMAX=kmin is not None, PER_HEAD=per_head, WRITE_SCALE=scale is not None,
        CHECK_SCALE=SCORE_CHECK_SCALE, BLOCK_N=SCORE_BLOCK_N, BLOCK_D=next_pow2(head_dim),
        num_warps=SCORE_WARPS,
    )


def chunk_scores_ref(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                     kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                     kmean: torch.Tensor | None = None, per_head: bool = False,
                     ) -> torch.Tensor:
    """Torch reference of ``chunk_scores_triton`` (same arguments and result)."""
    use_minmax = _check_score_inputs(q, cand_pages, num_cands, 0, kmin, kmax, kmean, "sum")
    batch, num_q_heads, _ = q.shape
    pages = cand_pages.long()  # [B, N]
    qf = q.float().reshape(batch, -1, num_q_heads // (kmin if use_minmax else kmean).shape[1],
                           q.shape[2])  # [B, Hkv, G, D]
    if use_minmax:
        mn, mx = kmin[pages].float(), kmax[pages].float()  # [B, N, Hkv, D]
        s = torch.maximum(qf[:, None] * mn[:, :, :, None], qf[:, None] * mx[:, :, :, None])
        scores = s.sum(-1)  # [B, N, Hkv, G]
    else:
        scores = torch.einsum("bhgd,bnhd->bnhg", qf, kmean[pages].float())
    scores = scores.flatten(2).transpose(1, 2)  # [B, Hq, N]
    invalid = (torch.arange(cand_pages.shape[1], device=q.device)[None, :]
               >= num_cands[:, None])  # [B, N]
    if not per_head:
        scores = scores.sum(1)
        return scores.masked_fill(invalid, float("-inf"))
    return scores.masked_fill(invalid[:, None, :], float("-inf"))


def combine_head_scores(scores: torch.Tensor, combine: str) -> torch.Tensor:
    """``[B, Hq, N]`` per-head scores (``-inf`` = invalid) -> ``[B, N]`` by ``combine``."""
    check(combine in COMBINE_MODES, f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if combine == "max":
        finite = torch.isfinite(scores)
        scale = scores.abs().masked_fill(~finite, 0.0).amax(-1, keepdim=True)  # [B, Hq, 1]
        scores = scores / scale.clamp_min(1e-30)
    return scores.sum(1)


def select_topk(scores: torch.Tensor, num_cands: torch.Tensor, topk: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``topk`` candidates of ``scores [B, N]``, as ascending indices.

    Returns ``(selected int32 [B, topk], num_selected int32 [B])``: row b holds
    ``num_selected[b] = min(topk, num_cands[b])`` candidate indices in ascending order (=
    original order), then ``-1`` padding. Shape-static (no host sync).
    """
    batch, n = scores.shape
    k_eff = min(topk, n)
    selected = torch.full((batch, topk), -1, dtype=torch.int32, device=scores.device)
    if k_eff == 0:
        return selected, torch.zeros(batch, dtype=torch.int32, device=scores.device)
    idx = scores.topk(k_eff, dim=1).indices  # [B, k_eff]
    valid = idx < num_cands[:, None].long()
    idx = torch.where(valid, idx, n).sort(dim=1).values
    selected[:, :k_eff] = torch.where(idx < n, idx, -1).to(torch.int32)
    return selected, valid.sum(1, dtype=torch.int32)


def score_chunks_triton(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                        topk: int, kmin: torch.Tensor | None = None,
                        kmax: torch.Tensor | None = None, kmean: torch.Tensor | None = None,
                        combine: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton scorer + torch top-k; see ``score_chunks_ref`` for the semantics."""
    _check_score_inputs(q, cand_pages, num_cands, topk, kmin, kmax, kmean, combine)
    scores = chunk_scores_triton(q, cand_pages, num_cands, kmin, kmax, kmean,
                                 per_head=combine != "sum")
    if combine != "sum":
        scores = combine_head_scores(scores, combine)
    return select_topk(scores, num_cands, topk)


def score_chunks_ref(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                     topk: int, kmin: torch.Tensor | None = None,
                     kmax: torch.Tensor | None = None, kmean: torch.Tensor | None = None,
                     combine: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the ``topk`` best candidate chunks of each sequence, one selection for all heads.

    Args:
        q: ``[B, Hq, D]`` un-rotated decode queries.
        cand_pages: int32 ``[B, max_cands]`` page ids of each sequence's candidate chunks
            (the past between sink and local window), in original order; entries at
            index >= ``num_cands[b]`` are ignored.
        num_cands: int32 ``[B]``.
        topk: chunks to select per sequence (may exceed ``max_cands``).
        kmin, kmax: ``[num_pages, Hkv, D]`` per-page channel min/max (Quest bound), or
        kmean: ``[num_pages, Hkv, D]`` per-page mean key; exactly one kind.
        combine: ``"sum"`` of per-head scores, or ``"max"`` (per-head max-normalized sum).
    Returns:
        ``(selected int32 [B, topk], num_selected int32 [B])``: ascending indices into
        ``cand_pages[b]``, ``-1``-padded after ``num_selected[b] = min(topk, num_cands[b])``.
    """
    _check_score_inputs(q, cand_pages, num_cands, topk, kmin, kmax, kmean, combine)
    scores = chunk_scores_ref(q, cand_pages, num_cands, kmin, kmax, kmean, per_head=True)
    return select_topk(combine_head_scores(scores, combine), num_cands, topk)
