"""Paged varlen prefill (extend) attention over a ReAttention scope, RoPE on the fly.

Sequence b's new queries are the last ``q_len_b = cu_q_lens[b+1] - cu_q_lens[b]`` tokens of
its scope (their K/V already stored there): query i has virtual position
``scope_len_b - q_len_b + i`` and sees every scope key with a virtual position <= its own
(full attention over the earlier scope, causal inside the new block).

Kernel ``_prefill_attention_kernel``, grid ``(cdiv(max_q_len, Q_PER_BLOCK), B, Hkv)``: one
program takes ``Q_PER_BLOCK`` consecutive queries of one sequence times the ``GROUP`` query
heads of one KV head, packed as ``BLOCK_M`` rows (row r = query r // GROUP, head r % GROUP),
so each key tile is loaded and rotated once for the whole GQA group. Key tiles strictly
below the block's first query are visible to every row and skip the causal mask.

``prefill_attention_gathered`` takes another route for long query blocks on a GPU: one
Triton launch (``_gather_scope_kernel``) gathers each scope's keys and values through the
page table into contiguous ``[Hkv, n, D]`` buffers, keys rotated at their virtual positions,
and the queries rotated too; then a library attention kernel runs over them: torch's
cuDNN attention as two calls merged by log-sum-exps (``_cudnn_split``), or its flash op
(bottom-right causal, GQA) where cuDNN is missing or disagrees. The rotation is paid once
per key instead of once per key and query block, and the library kernels' full-width dots
beat the paged kernel's half-width ones (benchmarks/bench_prefill_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ._paged_tile import _paged_rope_tile
from ._triton_compat import check, dot_dtype, next_pow2, tl, triton, use_triton
from .decode_attention import _check_paged_inputs, gather_scope_ref
from .rope import apply_rope_ref

# Query blocks at least this long take the gathered route on a GPU (a short one would pay
# a whole scope's gather for few queries). Chosen, not tuned: only 2,048 and 4,096 were
# measured.
GATHER_MIN_Q = 256

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, scope_lens_ptr, cu_q_lens_ptr,
    cos_ptr, sin_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ptb, stride_rope, max_pos,
    stride_ot, stride_oh,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HALF_D: tl.constexpr,
    Q_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_kvh = tl.program_id(2)
    kv_dtype = k_cache_ptr.dtype.element_ty
    scope_len = tl.load(scope_lens_ptr + pid_b)
    tok0 = tl.load(cu_q_lens_ptr + pid_b)
    q_len = tl.load(cu_q_lens_ptr + pid_b + 1) - tok0
    ctx_len = scope_len - q_len  # scope tokens before the new block
    block_q0 = pid_m * Q_PER_BLOCK
    n_q = tl.minimum(Q_PER_BLOCK, q_len - block_q0)  # <= 0: nothing to do here

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DH)
    d_mask = offs_d < HALF_D
    row_q = offs_m // GROUP  # query index inside the block
    row_valid = (row_q < n_q) & (row_q < Q_PER_BLOCK)
    rd_mask = row_valid[:, None] & d_mask[None, :]
    q_heads = pid_kvh * GROUP + offs_m % GROUP
    q_tok = (tok0 + block_q0 + row_q).to(tl.int64)
    q_pos = tl.where(row_valid, ctx_len + block_q0 + row_q, 0)  # < 0 only if scope < q_len
    q_rope = tl.minimum(tl.maximum(q_pos, 0), max_pos - 1)  # a caller bug must not fault

    q_off = q_tok[:, None] * stride_qt + q_heads[:, None] * stride_qh + offs_d[None, :]
    q1 = tl.load(q_ptr + q_off, mask=rd_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF_D, mask=rd_mask, other=0.0).to(tl.float32)
    rope_off = q_rope[:, None] * stride_rope + offs_d[None, :]
    cq = tl.load(cos_ptr + rope_off, mask=rd_mask, other=0.0)
    sq = tl.load(sin_ptr + rope_off, mask=rd_mask, other=0.0)
    q1r = (q1 * cq - q2 * sq).to(kv_dtype).to(DOT_DTYPE)
    q2r = (q2 * cq + q1 * sq).to(kv_dtype).to(DOT_DTYPE)
    # padding rows see every key in range, so no row is ever fully masked (no NaN)
    q_lim = tl.where(row_valid, q_pos, 2147483647)

    kv_end = tl.where(n_q > 0, ctx_len + block_q0 + n_q, 0)  # last query's position + 1
    full_end = tl.where(n_q > 0, ((ctx_len + block_q0 + 1) // BLOCK_N) * BLOCK_N, 0)
    full_end = tl.minimum(full_end, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_M, BLOCK_DH], 0.0, tl.float32)
    acc2 = tl.full([BLOCK_M, BLOCK_DH], 0.0, tl.float32)
    pt_row = page_table_ptr + pid_b.to(tl.int64) * stride_ptb
    for n0 in range(0, full_end, BLOCK_N):  # keys every row of the block sees
        acc1, acc2, m_i, l_i = _paged_rope_tile(
            acc1, acc2, m_i, l_i, q1r, q2r, q_lim, n0, kv_end,
            pt_row, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pid_kvh, qk_scale,
            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_rope, max_pos,
            PAGE_SIZE, HALF_D, BLOCK_N, BLOCK_DH, False, False, DOT_PRECISION, DOT_DTYPE,
        )
    for n0 in range(full_end, kv_end, BLOCK_N):  # the diagonal: causal mask per row
        acc1, acc2, m_i, l_i = _paged_rope_tile(
            acc1, acc2, m_i, l_i, q1r, q2r, q_lim, n0, kv_end,
            pt_row, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pid_kvh, qk_scale,
            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_rope, max_pos,
            PAGE_SIZE, HALF_D, BLOCK_N, BLOCK_DH, True, True, DOT_PRECISION, DOT_DTYPE,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_dtype = out_ptr.dtype.element_ty
    o_off = q_tok[:, None] * stride_ot + q_heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, (acc1 / l_safe[:, None]).to(out_dtype), mask=rd_mask)
    tl.store(out_ptr + o_off + HALF_D, (acc2 / l_safe[:, None]).to(out_dtype), mask=rd_mask)


def prefill_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             page_table: torch.Tensor, scope_lens: torch.Tensor,
                             cu_q_lens: torch.Tensor, max_q_len: int, cos: torch.Tensor,
                             sin: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Triton prefill attention; see ``prefill_attention_ref`` for the exact semantics."""
    _check_paged_inputs(q, k_cache, v_cache, page_table, scope_lens, cos, sin)
    check(q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}")
    batch = scope_lens.shape[0]
    check(page_table.shape[0] == batch, "page_table and scope_lens batch sizes differ")
    check(cu_q_lens.dtype == torch.int32 and cu_q_lens.shape == (batch + 1,)
          and cu_q_lens.is_contiguous(), f"cu_q_lens must be contiguous int32 [{batch + 1}]")
    check(cu_q_lens.device == q.device, "cu_q_lens must be on q's device")
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0 or batch == 0 or max_q_len <= 0:
        return out
    half = head_dim // 2
    # 128 rows x 64 keys per tile, 8 warps: the usual Hopper flash-attention shape; the
    # RoPE of the key tile costs ~6 FMA/element against 2 * 128 MMA flops/element.
    block_m = max(128, next_pow2(group))
    q_per_block = block_m // group
    grid = (triton.cdiv(max_q_len, q_per_block), batch, num_kv_heads)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, page_table, scope_lens, cu_q_lens, cos, sin, out,
        sm_scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), cos.stride(0), cos.shape[0],
        out.stride(0), out.stride(1),
        PAGE_SIZE=page_size, GROUP=group, HALF_D=half, Q_PER_BLOCK=q_per_block,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_DH=max(16, next_pow2(half)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_DTYPE=dot_dtype(q.dtype), num_warps=8, num_stages=2,
    )
    return out


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          page_table: torch.Tensor, scope_lens: torch.Tensor,
                          cu_q_lens: torch.Tensor, max_q_len: int, cos: torch.Tensor,
                          sin: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Prefill attention of packed new tokens over their paged scopes (torch, fp32 math).

    Args:
        q: ``[T, Hq, D]`` un-rotated queries of all sequences, packed.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, keys un-rotated; the new
            tokens' K/V are already stored as the last ``q_len_b`` tokens of each scope.
        page_table: int32 ``[B, max_pages]``; scope_lens: int32 ``[B]`` with
            ``scope_lens[b] >= q_len_b``.
        cu_q_lens: int32 ``[B + 1]`` prefix sums of the q lengths; max_q_len: their max.
        cos, sin: float32 ``[max_pos, D // 2]``; sm_scale: softmax scale.
    Returns:
        ``[T, Hq, D]`` in q's dtype; query i of sequence b (virtual position
        ``scope_lens[b] - q_len_b + i``) attends causally over its scope.
    """
    del max_q_len
    num_q_heads = q.shape[1]
    group = num_q_heads // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_q_lens.tolist()
    for b, n in enumerate(scope_lens.tolist()):
        t0, t1 = cu[b], cu[b + 1]
        if t1 == t0:
            continue
        q_len = t1 - t0
        pos = torch.arange(n, device=q.device)
        k = apply_rope_ref(gather_scope_ref(k_cache, page_table[b], n), pos, cos, sin)
        v = gather_scope_ref(v_cache, page_table[b], n).float()
        qr = apply_rope_ref(q[t0:t1], pos[n - q_len:], cos, sin)  # [q_len, Hq, D]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", qr, k) * sm_scale
        visible = pos[None, :] <= pos[n - q_len:, None]  # [q_len, n]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[t0:t1] = torch.einsum("hqn,nhd->qhd", scores.softmax(-1), v)
    return out.to(q.dtype)


@triton.jit
def _rope_rows(src, dst, pos, mask, cos_ptr, sin_ptr, max_pos, stride_rope, offs_d,
               ROTATE: tl.constexpr, HALF_D: tl.constexpr):
    """Copy rows ``src [T, D] -> dst`` (pointer tensors of the first half), rotating row t
    at position ``pos[t]`` when ROTATE (float32 math, rounded to dst's dtype)."""
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF_D, mask=mask, other=0.0)
    if ROTATE:
        rope_off = tl.minimum(pos, max_pos - 1)[:, None] * stride_rope + offs_d[None, :]
        c = tl.load(cos_ptr + rope_off, mask=mask, other=0.0)
        sn = tl.load(sin_ptr + rope_off, mask=mask, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        x1, x2 = a * c - b * sn, b * c + a * sn
    tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF_D, x2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _gather_scope_kernel(
    k_cache_ptr, v_cache_ptr, q_ptr, page_row_ptr, cos_ptr, sin_ptr, k_out, v_out, q_out,
    n, q_len, max_pos, stride_rope,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_qt, stride_qh,
    stride_koh, stride_kot, stride_voh, stride_vot, stride_qoh, stride_qot,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HALF_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    """One launch for a scope of ``n`` tokens, grid ``(cdiv(max(n, q_len), BLOCK_T), Hkv,
    2 + GROUP)``: axis 2 picks keys (gathered through the page row, rotated at positions
    0..n-1), values (gathered), or query head ``h * GROUP + (axis2 - 2)`` (its ``q_len``
    rows rotated at positions ``n - q_len ..``); every output is ``[H, L, D]``."""
    h = tl.program_id(1)
    role = tl.program_id(2)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_DH)
    d_mask = (offs_d < HALF_D)[None, :]
    t64 = offs_t.to(tl.int64)[:, None]
    if role < 2:
        t_mask = offs_t < n
        page = tl.load(page_row_ptr + offs_t // PAGE_SIZE, mask=t_mask, other=0).to(tl.int64)
        slot = offs_t % PAGE_SIZE
        mask = t_mask[:, None] & d_mask
        if role == 0:
            _rope_rows(k_cache_ptr + (page * stride_kp + slot * stride_kt
                                      + h * stride_kh)[:, None] + offs_d[None, :],
                       k_out + h.to(tl.int64) * stride_koh + t64 * stride_kot
                       + offs_d[None, :], offs_t, mask, cos_ptr, sin_ptr, max_pos,
                       stride_rope, offs_d, True, HALF_D)
        else:
            _rope_rows(v_cache_ptr + (page * stride_vp + slot * stride_vt
                                      + h * stride_vh)[:, None] + offs_d[None, :],
                       v_out + h.to(tl.int64) * stride_voh + t64 * stride_vot
                       + offs_d[None, :], offs_t, mask, cos_ptr, sin_ptr, max_pos,
                       stride_rope, offs_d, False, HALF_D)
    else:
        qh = (h * GROUP + role - 2).to(tl.int64)
        mask = (offs_t < q_len)[:, None] & d_mask
        _rope_rows(q_ptr + t64 * stride_qt + qh * stride_qh + offs_d[None, :],
                   q_out + qh * stride_qoh + t64 * stride_qot + offs_d[None, :],
                   n - q_len + offs_t, mask, cos_ptr, sin_ptr, max_pos, stride_rope, offs_d,
                   True, HALF_D)


def gather_rope_scope(q, k_cache, v_cache, page_row, n, cos, sin):
    """One sequence's scope of ``n`` tokens (pages ``page_row``) and its ``q`` ([q_len,
    Hq, D], the scope's last q_len tokens) -> (q, k rotated at their virtual positions, v),
    each ``[H, L, D]`` in the cache's dtype (k and v contiguous, q a view of token-major
    rows); one launch."""
    q_len, num_q_heads, dim = q.shape
    hkv = k_cache.shape[2]
    kw = dict(dtype=k_cache.dtype, device=k_cache.device)
    k, v = torch.empty(hkv, n, dim, **kw), torch.empty(hkv, n, dim, **kw)
    # queries token-major underneath: flash attention then writes its output that way too,
    # and [q_len, Hq, D] needs no copy
    qr = torch.empty(q_len, num_q_heads, dim, **kw).transpose(0, 1)
    block_t = 64
    if max(n, q_len):
        group = num_q_heads // hkv
        _gather_scope_kernel[(triton.cdiv(max(n, q_len), block_t), hkv, 2 + group)](
            k_cache, v_cache, q, page_row, cos, sin, k, v, qr,
            n, q_len, cos.shape[0], cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), qr.stride(0), qr.stride(1),
            PAGE_SIZE=k_cache.shape[1], GROUP=group, HALF_D=dim // 2, BLOCK_T=block_t,
            BLOCK_DH=max(16, next_pow2(dim // 2)), num_warps=4,
        )
    return qr, k, v


def _flash_op_usable(q: torch.Tensor) -> bool:
    """torch's flash-attention op takes the gathered scope directly: CUDA, 16-bit, head
    dims a multiple of 8 up to 256 (otherwise the public SDPA call dispatches)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"))


# Attention of the gathered scope with cuDNN as two calls merged by their log-sum-exps
# (``_cudnn_split``): 16 / 26% faster than the flash op at 2,048 queries of the 1B / 8B
# shapes (benchmarks/bench_prefill_attention.py, H200, 2026-12-01). Checked against the
# flash op once, on random inputs, outside a graph capture; a failure or mismatch keeps
# flash.
PREFILL_CUDNN = True
_cudnn_ok: bool | None = None  # the check's outcome (None: not made yet)


# The merge as one Triton launch instead of ~8 torch ops (their kernels took at least 1.2 ms
# of a 16.5 ms 1B prefill piece, H200, 2026-12-01). Off until measured: A/B in
# benchmarks/bench_prefill_attention.py ("engine, Triton merge") and bench_e2e.py
# --merge-triton.
PREFILL_MERGE_TRITON = False


@triton.jit
def _merge_lse_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, n_rows,
                      s1h, s1t, s2h, s2t, sl1h, sl1t, sl2h, sl2t, soh, sot,
                      HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid*BLOCK_T, +BLOCK_T)`` of head axis-1: ``out = (o1 e^(l1-m) + o2 e^(l2-m))
    / (e^(l1-m) + e^(l2-m))`` with ``m = max(l1, l2)`` (natural-log LSEs), float32 math."""
    h = tl.program_id(1).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    t_mask = t < n_rows
    mask = t_mask[:, None] & (d < HEAD_DIM)[None, :]
    l1 = tl.load(l1_ptr + h * sl1h + t * sl1t, mask=t_mask, other=0.0).to(tl.float32)
    l2 = tl.load(l2_ptr + h * sl2h + t * sl2t, mask=t_mask, other=0.0).to(tl.float32)
    m = tl.maximum(l1, l2)
    w1, w2 = tl.exp(l1 - m), tl.exp(l2 - m)
    o1 = tl.load(o1_ptr + h * s1h + t[:, None] * s1t + d[None, :], mask=mask, other=0.0)
    o2 = tl.load(o2_ptr + h * s2h + t[:, None] * s2t + d[None, :], mask=mask, other=0.0)
    o = (o1.to(tl.float32) * w1[:, None] + o2.to(tl.float32) * w2[:, None]) \
        / (w1 + w2)[:, None]
    tl.store(out_ptr + h * soh + t[:, None] * sot + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


def merge_lse_triton(o1, l1, o2, l2) -> torch.Tensor:
    """``_merge_lse`` in one launch: ``o1``/``o2`` ``[1, H, L, D]`` (last dim contiguous),
    ``l1``/``l2`` ``[1, H, L]`` or ``[1, H, L, 1]`` -> ``[1, H, L, D]`` in o1's dtype, laid
    out token-major (``[L, H, D]`` rows underneath)."""
    _, heads, rows, dim = o1.shape
    check(o2.shape == o1.shape and o1.stride(-1) == 1 and o2.stride(-1) == 1,
          "o1 and o2 must be [1, H, L, D] with contiguous rows")
    l1, l2 = l1.reshape(heads, rows), l2.reshape(heads, rows)
    out = torch.empty(rows, heads, dim, dtype=o1.dtype, device=o1.device)
    if rows:
        block_t = 32
        _merge_lse_kernel[(triton.cdiv(rows, block_t), heads)](
            o1, l1, o2, l2, out, rows, o1.stride(1), o1.stride(2), o2.stride(1), o2.stride(2),
            l1.stride(0), l1.stride(1), l2.stride(0), l2.stride(1), out.stride(1), out.stride(0),
            HEAD_DIM=dim, BLOCK_T=block_t, BLOCK_D=next_pow2(dim), num_warps=4)
    return out.transpose(0, 1)[None]


def _merge_lse(o1, l1, o2, l2) -> torch.Tensor:
    """Two partial attentions of the same queries over disjoint keys -> the whole one."""
    if PREFILL_MERGE_TRITON and use_triton(o1):
        return merge_lse_triton(o1, l1, o2, l2)
    l1, l2 = l1.reshape(o1.shape[:3]).float(), l2.reshape(o2.shape[:3]).float()
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(o1.dtype)


def _cudnn_split(qr, kr, v, n, scale) -> torch.Tensor:
    """``[1, Hq, q_len, D]``: cuDNN attention of the new tokens over the scope before them
    (no mask) and over their own block (causal; square, so it is bottom-right too)."""
    pre = n - qr.shape[1]
    op = torch.ops.aten._scaled_dot_product_cudnn_attention
    own = op(qr[None], kr[None, :, pre:], v[None, :, pre:], None, True, 0.0, True, False,
             scale=scale)
    if pre == 0:
        return own[0]
    before = op(qr[None], kr[None, :, :pre], v[None, :, :pre], None, True, 0.0, False, False,
                scale=scale)
    return _merge_lse(before[0], before[1], own[0], own[1])


def _use_cudnn(hq: int, hkv: int, dim: int, dtype: torch.dtype, device) -> bool:
    """Whether to take ``_cudnn_split``: decided once per process, outside graph captures,
    by comparing it with the flash op on random inputs of these head shapes."""
    global _cudnn_ok
    if not PREFILL_CUDNN:
        return False
    if _cudnn_ok is None and not torch.cuda.is_current_stream_capturing():
        g = torch.Generator(device=device).manual_seed(0)
        qr, kr, v = (torch.randn(h, n, dim, generator=g, device=device, dtype=dtype)
                     for h, n in ((hq, 192), (hkv, 448), (hkv, 448)))
        try:
            ref = torch.ops.aten._scaled_dot_product_flash_attention(
                qr[None], kr[None], v[None], 0.0, is_causal=True, scale=dim ** -0.5)[0]
            alt = _cudnn_split(qr, kr, v, 448, dim ** -0.5)
            _cudnn_ok = bool((alt.float() - ref.float()).abs().max() < 3e-2)
        except Exception:  # noqa: BLE001 - no cuDNN attention here: keep flash
            _cudnn_ok = False
    return bool(_cudnn_ok)


def prefill_attention_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               page_table: torch.Tensor, scope_lens_host: list[int],
                               q_lens_host: list[int], cos: torch.Tensor, sin: torch.Tensor,
                               sm_scale: float) -> torch.Tensor:
    """``prefill_attention_ref``'s result by gathering each scope (``gather_rope_scope``),
    then flash attention with a bottom-right causal mask; scope and query lengths are
    given on the host (the attention's shapes).

    On a GPU the flash op is called directly: with ``is_causal`` it aligns the mask to the
    bottom right (what ``causal_lower_right`` dispatches to, without that dispatch's host
    time in every layer), and it reads GQA's shared KV heads itself. Where cuDNN's
    attention matches it (checked once), ``_cudnn_split`` runs instead."""
    _check_paged_inputs(q, k_cache, v_cache, page_table, None, cos, sin)
    check(len(scope_lens_host) == len(q_lens_host) == page_table.shape[0],
          "scope_lens_host, q_lens_host and page_table batch sizes differ")
    check(sum(q_lens_host) == q.shape[0], "q_lens_host must sum to q's tokens")
    flash = _flash_op_usable(q)
    outs = []
    t0 = 0
    for b, (n, ql) in enumerate(zip(scope_lens_host, q_lens_host)):
        check(ql <= n <= page_table.shape[1] * k_cache.shape[1],
              f"sequence {b}: scope of {n} tokens for {ql} queries, table of "
              f"{page_table.shape[1]} pages")
        if ql == 0:
            continue
        qr, kr, v = gather_rope_scope(q[t0:t0 + ql], k_cache, v_cache, page_table[b], n,
                                      cos, sin)
        if flash and _use_cudnn(qr.shape[0], kr.shape[0], qr.shape[2], qr.dtype, qr.device):
            o = _cudnn_split(qr, kr, v, n, sm_scale)
        elif flash:
            o = torch.ops.aten._scaled_dot_product_flash_attention(
                qr[None], kr[None], v[None], 0.0, is_causal=True, scale=sm_scale)[0]
        else:
            o = F.scaled_dot_product_attention(
                qr[None], kr[None], v[None], attn_mask=causal_lower_right(ql, n),
                scale=sm_scale, enable_gqa=qr.shape[0] != kr.shape[0])
        outs.append(o[0].transpose(0, 1))  # [ql, Hq, D]
        t0 += ql
    if not outs:
        return torch.empty_like(q)
    # one sequence: no copy (the kernels write q's token-major layout)
    return outs[0].contiguous() if len(outs) == 1 else torch.cat(outs)
