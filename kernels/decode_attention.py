"""Paged decode attention over a ReAttention scope, RoPE applied on the fly.

A sequence's scope is ``page_table[b, :cdiv(scope_lens[b], page_size)]``: token j of the
scope (page ``j // page_size``, offset ``j % page_size``) has *virtual* position j, and the
query (whose own K/V is already stored as the last scope token) has position
``scope_len - 1``. Keys in the cache are un-rotated; both q and each key are rotated in
registers, so nothing is gathered or copied.

Kernels: ``_decode_attention_kernel`` (grid ``(B, Hkv, num_splits)``; one program = one KV
head x all its GQA query heads x one slice of the scope, flash-decoding style) and
``_decode_reduce_kernel`` (grid ``(B, Hq)``; merges the splits by their log-sum-exp). The
grid depends only on shapes and every loop bound is read from ``scope_lens`` on the device,
so the op is CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from ._paged_tile import _paged_rope_tile
from ._triton_compat import (
    check,
    device_sms,
    dot_dtype,
    next_pow2,
    tl,
    tl_max,
    tl_sum,
    triton,
)
from .rope import apply_rope_ref

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES = 64, 4, 2  # keys per tile, warps, stages
# Rotate keys with cos/sin of each tile's first position and of offsets 0..BLOCK_N-1 (the
# angle-addition identities): 2 table rows a tile instead of BLOCK_N, whose fp32 loads are
# as many bytes as the bf16 keys and values of a 128-dim head. The whole 8B step (CUDA
# graph, H200, bench_attention.py, two runs), us at 32K / 128K / 1M / 4M: off 34.2 / 38.3 /
# 67.0 / 141 and 34.6 / 39.5 / 65.7 / 141; on 32.0 / 35.6 / 67.9 / 140 and 31.9 / 36.8 /
# 66.5 / 140. End to end (8B shape, one call, tok/s at 32K / 128K / 512K): off 165.8 /
# 164.3 / 156.7, on 160.2 / 160.3 / 152.5. Off until an end-to-end run shows the gain.
DECODE_ROPE_ANGLE = False
# A tile's values are loaded after its scores (Triton's pipeliner stages the loop's loads
# through shared memory). Two other orders were measured and dropped (commit a9fcfbb; the
# 8B decode step, CUDA graph, H200, us at 32K / 128K / 1M / 4M, this order 34.6 / 39.5 /
# 65.7 / 141): keys, values and cos/sin issued together at each tile's start, 33.1 / 37.7
# / 66.2 / 140; and the next tile's loaded into registers before this one is computed,
# 42.0 / 46.0 / 75.2 / 149 (both lose the pipeliner's staging).


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, page_table_ptr, scope_lens_ptr, cos_ptr, sin_ptr,
    out_ptr, lse_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ptb, stride_rope, max_pos,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HALF_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ANGLE_ADD: tl.constexpr = False,
):
    pid_b = tl.program_id(0)
    pid_kvh = tl.program_id(1)
    pid_s = tl.program_id(2)
    scope_len = tl.load(scope_lens_ptr + pid_b)
    kv_dtype = k_cache_ptr.dtype.element_ty  # operands are rounded to the cache dtype...
    # ...and fed to tl.dot as DOT_DTYPE: the cache dtype on GPUs, fp32 under the interpreter
    # (whose bf16 tl.dot returns garbage in triton 3.9); the rounding is identical either way.

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_DH)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HALF_D
    hd_mask = h_mask[:, None] & d_mask[None, :]
    q_heads = pid_kvh * GROUP + offs_h

    # q halves, rotated to the query's virtual position scope_len - 1
    q_off = pid_b.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :]
    q1 = tl.load(q_ptr + q_off, mask=hd_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_off + HALF_D, mask=hd_mask, other=0.0).to(tl.float32)
    q_pos = tl.minimum(tl.maximum(scope_len - 1, 0), max_pos - 1)
    cq = tl.load(cos_ptr + q_pos * stride_rope + offs_d, mask=d_mask, other=0.0)
    sq = tl.load(sin_ptr + q_pos * stride_rope + offs_d, mask=d_mask, other=0.0)
    q1r = (q1 * cq[None, :] - q2 * sq[None, :]).to(kv_dtype).to(DOT_DTYPE)
    q2r = (q2 * cq[None, :] + q1 * sq[None, :]).to(kv_dtype).to(DOT_DTYPE)

    # this program's slice of the scope, a whole number of BLOCK_N tiles
    # (plain integer math, not tl.cdiv: keeps the kernel runnable by the interpreter even
    # when triton itself was imported without TRITON_INTERPRET, see testing.py)
    per_split = (scope_len + NUM_SPLITS - 1) // NUM_SPLITS
    per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = pid_s * per_split
    end = tl.minimum(start + per_split, scope_len)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_H, BLOCK_DH], 0.0, tl.float32)  # output, first half of head_dim
    acc2 = tl.full([BLOCK_H, BLOCK_DH], 0.0, tl.float32)  # output, second half
    pt_row = page_table_ptr + pid_b.to(tl.int64) * stride_ptb
    cos_step = 0.0
    sin_step = 0.0
    if ANGLE_ADD:  # cos/sin of offsets 0..BLOCK_N-1 inside a tile (table rows, kept)
        step_off = tl.minimum(tl.arange(0, BLOCK_N), max_pos - 1)[:, None] * stride_rope \
            + offs_d[None, :]
        cos_step = tl.load(cos_ptr + step_off, mask=d_mask[None, :], other=0.0)
        sin_step = tl.load(sin_ptr + step_off, mask=d_mask[None, :], other=0.0)
    for n0 in range(start, end, BLOCK_N):
        acc1, acc2, m_i, l_i = _paged_rope_tile(
            acc1, acc2, m_i, l_i, q1r, q2r, offs_h, n0, end,
            pt_row, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pid_kvh, qk_scale,
            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_rope, max_pos,
            PAGE_SIZE, HALF_D, BLOCK_N, BLOCK_DH, False, True, DOT_PRECISION, DOT_DTYPE,
            cos_step, sin_step, ANGLE_ADD,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # empty slice / empty scope -> zeros, never NaN
    o1 = acc1 / l_safe[:, None]
    o2 = acc2 / l_safe[:, None]
    o_off = pid_b.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        out_dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_off, o1.to(out_dtype), mask=hd_mask)
        tl.store(out_ptr + o_off + HALF_D, o2.to(out_dtype), mask=hd_mask)
    else:
        o_off += pid_s * stride_os
        tl.store(out_ptr + o_off, o1, mask=hd_mask)
        tl.store(out_ptr + o_off + HALF_D, o2, mask=hd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + pid_b * stride_lb + q_heads * stride_lh + pid_s, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(part_lse_ptr + pid_b * stride_plb + pid_h * stride_plh + offs_s,
                  mask=s_mask, other=float("-inf"))
    m = tl_max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits have lse = -inf -> weight 0
    denom = tl_sum(w, 0)
    po = tl.load(part_o_ptr + pid_b.to(tl.int64) * stride_pob + pid_h * stride_poh
                 + offs_s[:, None] * stride_pos + offs_d[None, :],
                 mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl_sum(po * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=d_mask)


def default_num_splits(batch: int, num_kv_heads: int, max_scope: int, num_sms: int,
                       block_n: int = 64) -> int:
    """Splits so that ~2 waves of programs cover the GPU, each split >= 4 tiles of keys.

    Depends only on shapes (``max_scope = page_table.shape[1] * page_size``), never on
    ``scope_lens``, so a CUDA graph captured for a batch shape stays valid.
    """
    by_occupancy = triton.cdiv(2 * num_sms, batch * num_kv_heads)
    by_length = triton.cdiv(max_scope, 4 * block_n)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def _check_paged_inputs(q, k_cache, v_cache, page_table, scope_lens, cos, sin) -> None:
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"q must be fp16/bf16/fp32, got {q.dtype}")
    check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
          f"k_cache/v_cache dtype ({k_cache.dtype}/{v_cache.dtype}) must equal q dtype {q.dtype}")
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
          "k_cache and v_cache must both be [num_pages, page_size, num_kv_heads, head_dim], "
          f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    d = q.shape[-1]
    check(k_cache.shape[3] == d, f"head_dim mismatch: q {d}, cache {k_cache.shape[3]}")
    check(d % 2 == 0, f"head_dim must be even for RoPE, got {d}")
    check(q.shape[-2] % k_cache.shape[2] == 0,
          f"num_q_heads {q.shape[-2]} must be a multiple of num_kv_heads {k_cache.shape[2]}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check(t.stride(-1) == 1, f"{name} must be contiguous in head_dim")
    check(page_table.dtype == torch.int32 and page_table.dim() == 2,
          f"page_table must be int32 [B, max_pages], got {page_table.dtype} "
          f"{tuple(page_table.shape)}")
    check(page_table.stride(1) == 1, "page_table rows must be contiguous")
    check(scope_lens is None or (scope_lens.dtype == torch.int32 and scope_lens.dim() == 1
                                 and scope_lens.is_contiguous()),
          f"scope_lens must be a contiguous int32 [B], got "
          f"{getattr(scope_lens, 'dtype', None)} {tuple(getattr(scope_lens, 'shape', ()))}")
    for name, t in (("cos", cos), ("sin", sin)):
        check(t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] == d // 2,
              f"{name} must be float32 [max_pos, {d // 2}], got {t.dtype} {tuple(t.shape)}")
        check(t.stride(1) == 1 and t.stride(0) == cos.stride(0),
              f"{name} must be row-contiguous with the same row stride as cos")
    devs = {t.device for t in (q, k_cache, v_cache, page_table, scope_lens, cos, sin)
            if t is not None}
    check(len(devs) == 1, f"all tensors must be on one device, got {devs}")


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_table: torch.Tensor, scope_lens: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, sm_scale: float,
                            num_splits: int | None = None) -> torch.Tensor:
    """Triton decode attention; see ``decode_attention_ref`` for the exact semantics."""
    _check_paged_inputs(q, k_cache, v_cache, page_table, scope_lens, cos, sin)
    check(q.dim() == 3, f"q must be [B, Hq, D], got {tuple(q.shape)}")
    batch, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    check(page_table.shape[0] == batch and scope_lens.shape[0] == batch,
          "page_table / scope_lens batch size must match q")
    group = num_q_heads // num_kv_heads
    block_n = DECODE_BLOCK_N
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, page_table.shape[1] * page_size,
                                        device_sms(q), block_n)
    check(1 <= num_splits <= 256, f"num_splits must be in [1, 256], got {num_splits}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    half = head_dim // 2
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_splits == 1:
        part_o, part_lse = out, out  # lse is unused on this path
        so = (out.stride(0), out.stride(1), 0)
        sl = (0, 0)
    else:
        part_o = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32,
                               device=q.device)
        so = (part_o.stride(0), part_o.stride(1), part_o.stride(2))
        sl = (part_lse.stride(0), part_lse.stride(1))
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, scope_lens, cos, sin,
        part_o, part_lse,
        sm_scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), cos.stride(0), cos.shape[0],
        *so, *sl,
        PAGE_SIZE=page_size, GROUP=group, HALF_D=half, NUM_SPLITS=num_splits,
        BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_DH=max(16, next_pow2(half)),
        DOT_PRECISION=dot_precision, DOT_DTYPE=dot_dtype(q.dtype),
        ANGLE_ADD=DECODE_ROPE_ANGLE and cos.shape[0] >= block_n, num_warps=DECODE_WARPS,
        num_stages=DECODE_STAGES,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_o, part_lse, out,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=next_pow2(head_dim), num_warps=4,
        )
    return out


def gather_scope_ref(cache: torch.Tensor, page_row: torch.Tensor, scope_len: int) -> torch.Tensor:
    """The first ``scope_len`` tokens of a paged scope: ``[scope_len, H, D]`` (a copy)."""
    page_size = cache.shape[1]
    num_pages = -(-scope_len // page_size)
    pages = page_row[:num_pages].long()
    return cache[pages].reshape(num_pages * page_size, *cache.shape[2:])[:scope_len]


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         page_table: torch.Tensor, scope_lens: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, sm_scale: float,
                         num_splits: int | None = None) -> torch.Tensor:
    """Decode attention of one query per sequence over its paged scope (torch, fp32 math).

    Args:
        q: ``[B, Hq, D]`` un-rotated queries; query b has virtual position
            ``scope_lens[b] - 1`` (its own K/V is already the last scope token).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, keys un-rotated.
        page_table: int32 ``[B, max_pages]``; row b lists the scope's pages in order.
        scope_lens: int32 ``[B]`` tokens in each scope (0 gives a zero output row).
        cos, sin: float32 ``[max_pos, D // 2]`` RoPE tables.
        sm_scale: softmax scale, usually ``D ** -0.5``.
        num_splits: ignored (kept for signature parity with the Triton op).
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    del num_splits
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    for b, n in enumerate(scope_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        k = apply_rope_ref(gather_scope_ref(k_cache, page_table[b], n), pos, cos, sin)
        v = gather_scope_ref(v_cache, page_table[b], n).float()
        qr = apply_rope_ref(q[b][None], pos[-1:], cos, sin)[0]  # [Hq, D]
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", qr, k) * sm_scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)
