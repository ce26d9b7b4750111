"""The inner step shared by decode and prefill attention: one tile of paged, un-rotated keys.

For ``BLOCK_N`` consecutive scope tokens starting at ``n0`` it gathers K and V through the
page table (token j lives at page ``page_row[j // PAGE_SIZE]``, offset ``j % PAGE_SIZE``),
rotates the keys to their virtual positions j in registers, and folds the tile into the
online-softmax state ``(acc1, acc2, m_i, l_i)`` of ``BLOCK_M`` query rows. Head dims are
processed as two halves (``x1 = x[:D/2]``, ``x2 = x[D/2:]``), which is what the neox RoPE
rotation pairs, so ``q.k = q1r.k1r + q2r.k2r`` and the output is kept as two halves too.
Scores are in the log2 domain (``qk_scale = sm_scale * log2(e)``). With ``ANGLE_ADD`` a
tile reads two rows of the cos/sin tables instead of ``BLOCK_N``.
"""

from __future__ import annotations

from ._triton_compat import tl, tl_max, tl_sum, triton


@triton.jit
def _tile_ptrs(
    n0, n_end, pt_row, k_cache_ptr, v_cache_ptr, kv_head,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    PAGE_SIZE: tl.constexpr, HALF_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, BOUNDS: tl.constexpr,
):
    """The tile's first-half key and value pointers [BLOCK_N, BLOCK_DH] (through the page
    table) and their mask (past n_end with BOUNDS: masked loads read no memory)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DH)
    d_mask = offs_d < HALF_D
    if BOUNDS:
        n_mask = offs_n < n_end
    else:
        n_mask = offs_n >= 0  # all true; lets the compiler drop the masks
    nd_mask = n_mask[:, None] & d_mask[None, :]
    page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    slot_in_page = offs_n % PAGE_SIZE
    k_row = page * stride_kp + slot_in_page * stride_kt + kv_head * stride_kh
    v_row = page * stride_vp + slot_in_page * stride_vt + kv_head * stride_vh
    return (k_cache_ptr + k_row[:, None] + offs_d[None, :],
            v_cache_ptr + v_row[:, None] + offs_d[None, :], nd_mask)


@triton.jit
def _tile_rope(n0, cos_ptr, sin_ptr, stride_rope, max_pos, nd_mask, HALF_D: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, cos_step=0.0, sin_step=0.0,
               ANGLE_ADD: tl.constexpr = False):
    """cos/sin (float32) of the tile's positions n0 + t."""
    offs_d = tl.arange(0, BLOCK_DH)
    if ANGLE_ADD:
        # cos/sin of n0 (one table row each) combined with those of t (`cos_step` /
        # `sin_step`, the table's first BLOCK_N rows, loaded once by the caller) by the
        # angle-addition identities, instead of BLOCK_N rows a tile
        d_mask = offs_d < HALF_D
        base = tl.minimum(n0, max_pos - 1) * stride_rope + offs_d
        cb = tl.load(cos_ptr + base, mask=d_mask, other=0.0)[None, :]
        sb = tl.load(sin_ptr + base, mask=d_mask, other=0.0)[None, :]
        ck = cb * cos_step - sb * sin_step
        sk = sb * cos_step + cb * sin_step
    else:
        # positions past the RoPE table (a caller bug) are clamped: wrong numbers, no fault
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rope_off = tl.minimum(offs_n, max_pos - 1)[:, None] * stride_rope + offs_d[None, :]
        ck = tl.load(cos_ptr + rope_off, mask=nd_mask, other=0.0)
        sk = tl.load(sin_ptr + rope_off, mask=nd_mask, other=0.0)
    return ck, sk


@triton.jit
def _tile_scores(q1r, q2r, k1, k2, ck, sk, q_pos, n0, n_end, qk_scale,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Scores (log2 domain) of the query rows against the tile's keys, rotated here to their
    positions; -inf where masked."""
    kv_dtype = k1.dtype
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    k1r = (k1f * ck - k2f * sk).to(kv_dtype).to(DOT_DTYPE)
    k2r = (k2f * ck + k1f * sk).to(kv_dtype).to(DOT_DTYPE)
    qk = tl.dot(q1r, tl.trans(k1r), input_precision=DOT_PRECISION)
    qk += tl.dot(q2r, tl.trans(k2r), input_precision=DOT_PRECISION)
    qk = qk * qk_scale
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if CAUSAL:
        keep = offs_n[None, :] <= q_pos[:, None]
        if BOUNDS:
            keep = keep & (offs_n < n_end)[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    elif BOUNDS:
        qk = tl.where((offs_n < n_end)[None, :], qk, float("-inf"))
    return qk


@triton.jit
def _tile_fold(acc1, acc2, m_i, l_i, qk, v1, v2, DOT_PRECISION: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """The online-softmax state with the tile's scores and value halves folded in."""
    kv_dtype = v1.dtype
    # callers guarantee every row has a visible key in its first tile, so m_new is finite
    m_new = tl.maximum(m_i, tl_max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl_sum(p, 1)
    pv = p.to(kv_dtype).to(DOT_DTYPE)
    acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc1, acc2, m_new, l_i


@triton.jit
def _paged_rope_tile(
    acc1, acc2, m_i, l_i,  # [BLOCK_M, BLOCK_DH] x2 fp32, [BLOCK_M] x2 fp32
    q1r, q2r,  # [BLOCK_M, BLOCK_DH] rotated query halves, DOT_DTYPE
    q_pos,  # [BLOCK_M] int32: row r sees keys j <= q_pos[r] (used when CAUSAL)
    n0, n_end,  # tile start; tokens >= n_end are masked (used when BOUNDS)
    pt_row, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, kv_head,
    qk_scale,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_rope, max_pos,
    PAGE_SIZE: tl.constexpr, HALF_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    cos_step=0.0, sin_step=0.0, ANGLE_ADD: tl.constexpr = False,
):
    """One tile, its values loaded after its scores are computed."""
    k_ptrs, v_ptrs, nd_mask = _tile_ptrs(
        n0, n_end, pt_row, k_cache_ptr, v_cache_ptr, kv_head, stride_kp, stride_kt,
        stride_kh, stride_vp, stride_vt, stride_vh, PAGE_SIZE, HALF_D, BLOCK_N, BLOCK_DH,
        BOUNDS)
    k1 = tl.load(k_ptrs, mask=nd_mask, other=0.0)
    k2 = tl.load(k_ptrs + HALF_D, mask=nd_mask, other=0.0)
    ck, sk = _tile_rope(n0, cos_ptr, sin_ptr, stride_rope, max_pos, nd_mask, HALF_D, BLOCK_N,
                        BLOCK_DH, cos_step, sin_step, ANGLE_ADD)
    qk = _tile_scores(q1r, q2r, k1, k2, ck, sk, q_pos, n0, n_end, qk_scale, BLOCK_N, CAUSAL,
                      BOUNDS, DOT_PRECISION, DOT_DTYPE)
    v1 = tl.load(v_ptrs, mask=nd_mask, other=0.0)
    v2 = tl.load(v_ptrs + HALF_D, mask=nd_mask, other=0.0)
    return _tile_fold(acc1, acc2, m_i, l_i, qk, v1, v2, DOT_PRECISION, DOT_DTYPE)
