"""One ReAttention selection step, fused: score the candidate chunks, combine the heads, take
the top k, and write the scope page table ``[sink | selected chunks | local window]``.

Shape-static, no host sync (CUDA-graph capturable). The default path (``method="radix"``)
launches three kernels and no fill (its workspace is left zeroed by its last program):

1. ``_score_chunks_kernel`` (score_chunks.py): per-head (or, for ``combine="sum"``, summed)
   scores of every candidate; for ``combine="max"`` it also folds each head's max
   ``|score|`` into a ``[rows, Hq]`` buffer with atomic max.
2. ``_combine_hist_kernel``, grid ``(B, cdiv(N, 256))``: normalizes and sums the heads,
   takes the max over a prefill piece's representative queries, stores each candidate's
   order-preserving int32 key, and counts it into the row's histogram of ``SELECT_BINS``
   bins (one global atomic per candidate).
3. ``_radix_select_kernel``, grid ``(B, cdiv(N, _SELECT_BLOCK))``: every program finds the
   bin of the ``(topk + spare)``-th best key and appends its block's candidates from that
   bin up to a buffer; the row's last program sorts the buffer, takes the top k (placed in
   original order) and the runners-up, writes the table and zeroes the workspace. When the
   threshold bin holds more than ``SELECT_CAP`` candidates, that program searches the exact
   threshold key by bisection and fills the buffer itself.

``method="sort"``, the previous path, kept for comparison in ``bench_attention.py``: a
combine kernel packing (score, index) into int64 keys, ``_block_topk_kernel`` (each block's
``KP`` best by sorting network) and ``_scope_table_kernel`` (the ``KP`` best of those, then
the table), after a zero fill.

Top-k uses ``tl.topk`` / ``tl.sort`` where this Triton has them; the interpreter ranks.

Semantics: ``select_scope_ref``. Ties between equal combined scores go to the lower index
here; ``torch.topk`` in the reference breaks them arbitrarily.
"""

from __future__ import annotations

import numpy as np
import torch

from ._triton_compat import (
    INTERPRETED,
    aligned,
    check,
    next_pow2,
    resting_zeros,
    tl,
    tl_cumsum,
    tl_sum,
    triton,
)
from .score_chunks import (
    _check_score_inputs,
    chunk_scores_ref,
    combine_head_scores,
    launch_scorer,
    select_topk,
)


@triton.jit
def _sort_compiled(x, N: tl.constexpr, DESCENDING: tl.constexpr):
    return tl.sort(x, descending=DESCENDING)


@triton.jit
def _sort_by_rank(x, N: tl.constexpr, DESCENDING: tl.constexpr):
    # The interpreter cannot run tl.sort when triton was imported before TRITON_INTERPRET was
    # set (see _triton_compat.py), so under it a [N] vector is sorted by ranks: O(N^2) work,
    # only ever on the tests' small shapes.
    i = tl.arange(0, N)
    xi = x[:, None]
    xj = x[None, :]
    if DESCENDING:
        first = xj > xi
    else:
        first = xj < xi
    before = first | ((xj == xi) & (i[None, :] < i[:, None]))
    rank = tl_sum(before.to(tl.int32), 1)
    return tl_sum(tl.where(rank[:, None] == i[None, :], xi, 0), 0)


_sort = _sort_by_rank if INTERPRETED else _sort_compiled


@triton.jit
def _first(x, N: tl.constexpr, K: tl.constexpr):
    """The first K of a [N] vector (N, K powers of two)."""
    if N == K:
        out = x
    else:
        rows = tl.reshape(x, [N // K, K])
        out = tl_sum(tl.where(tl.arange(0, N // K)[:, None] == 0, rows, 0), 0)
    return out


@triton.jit
def _topk_builtin(x, N: tl.constexpr, K: tl.constexpr):
    return tl.topk(x, K)  # bitonic: sorts runs of K and merges them, halving as it goes


@triton.jit
def _topk_by_sort(x, N: tl.constexpr, K: tl.constexpr):
    return _first(_sort(x, N, True), N, K)


# The K largest of a [N] vector, largest first.
_topk = _topk_by_sort if INTERPRETED or not hasattr(tl, "topk") else _topk_builtin


@triton.jit
def _order_bits(v):
    """A float32's bits (int32) -> an int32 key ordered as the floats are, and back: the
    map is its own inverse."""
    return tl.where(v >= 0, v, v ^ 0x7FFFFFFF)


@triton.jit
def _packed(okey, offs, N: tl.constexpr):
    """(score key, candidate index) as one int64: larger is better, equal scores prefer the
    lower index (its complement is the low half)."""
    low = ((tl.full([N], 1, tl.int64) << 32) - 1) - offs.to(tl.int64)
    return (okey.to(tl.int64) << 32) | low


@triton.jit
def _combined(scores_ptr, scale_ptr, pid_b, offs, valid, num_q_heads, stride_sr, stride_sh,
              stride_scr, REPS: tl.constexpr, MAX_COMBINE: tl.constexpr, BLOCK: tl.constexpr,
              HEAD_TILE: tl.constexpr):
    """Combined scores of candidates `offs` of sequence pid_b: the heads' scores, each
    divided by its max |score| and summed (MAX_COMBINE) or already summed, then the max over
    the sequence's REPS query rows."""
    offs_h = tl.arange(0, HEAD_TILE)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for r in range(REPS):
        row = (pid_b * REPS + r).to(tl.int64)
        if MAX_COMBINE:
            comb = tl.full([BLOCK], 0.0, tl.float32)
            for h0 in range(0, num_q_heads, HEAD_TILE):  # heads in tiles, loads issued together
                h = h0 + offs_h
                h_ok = h < num_q_heads
                scale = tl.load(scale_ptr + row * stride_scr + h, mask=h_ok, other=1.0)
                scale = tl.maximum(scale, 1e-30)
                sc = tl.load(scores_ptr + row * stride_sr + h[:, None] * stride_sh
                             + offs[None, :], mask=h_ok[:, None] & valid[None, :],
                             other=float("-inf"))
                sc = tl.where(h_ok[:, None], sc / scale[:, None], 0.0)
                comb += tl_sum(sc, 0)
        else:
            comb = tl.load(scores_ptr + row * stride_sr + offs, mask=valid, other=float("-inf"))
        best = tl.maximum(best, comb)
    return best


@triton.jit
def _combine_kernel(
    scores_ptr, scale_ptr, num_cands_ptr, keys_ptr,
    max_cands, num_q_heads,
    stride_sr, stride_sh,  # scores [B * REPS, Hq, N] (MAX_COMBINE) or [B * REPS, N]
    stride_scr,  # scale [B * REPS, Hq]: max |score| of each row and head
    stride_kb,  # keys [B, N] int64
    REPS: tl.constexpr, MAX_COMBINE: tl.constexpr, BLOCK: tl.constexpr,
    HEAD_TILE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_cands = tl.load(num_cands_ptr + pid_b)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_cands
    best = _combined(scores_ptr, scale_ptr, pid_b, offs, valid, num_q_heads, stride_sr,
                     stride_sh, stride_scr, REPS, MAX_COMBINE, BLOCK, HEAD_TILE)
    # (score, index) packed into int64; past num_cands the smallest key (its index decodes
    # as 2^32 - 1)
    pad = tl.full([BLOCK], -2147483648, tl.int32).to(tl.int64) << 32
    packed = _packed(_order_bits(best.to(tl.int32, bitcast=True)), offs, BLOCK)
    tl.store(keys_ptr + pid_b.to(tl.int64) * stride_kb + offs, tl.where(valid, packed, pad),
             mask=offs < max_cands)


@triton.jit
def _block_topk_kernel(
    keys_ptr, num_cands_ptr, out_ptr, max_cands,
    stride_kb, stride_ob,  # keys [B, N]; out [B, num_blocks * KP], each block's best first
    BLOCK: tl.constexpr, KP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    pad = tl.full([BLOCK], -2147483648, tl.int32).to(tl.int64) << 32
    out = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_n * KP + tl.arange(0, KP)
    if pid_n * BLOCK < tl.load(num_cands_ptr + pid_b):
        x = tl.load(keys_ptr + pid_b.to(tl.int64) * stride_kb + offs, mask=offs < max_cands,
                    other=0)
        tl.store(out, _topk(tl.where(offs < max_cands, x, pad), BLOCK, KP))
    else:  # wholly past the sequence's candidates (a padded width): no sort
        tl.store(out, tl.full([KP], -2147483648, tl.int32).to(tl.int64) << 32)


@triton.jit
def _best_of_tile(best, m0, end, W: tl.constexpr, KP: tl.constexpr):
    """The KP best of the first pass's picks m0 .. m0 + W - 1 (those from `end` on read as
    padding), best first."""
    m = m0 + tl.arange(0, W)
    pad = tl.full([W], -2147483648, tl.int32).to(tl.int64) << 32
    return _topk(tl.where(m < end, tl.load(best + m, mask=m < end, other=0), pad), W, KP)


@triton.jit
def _store_pages(ptrs, page, mask, map_ptr, map_base, HAS_MAP: tl.constexpr):
    """Store selected pages into the table; with HAS_MAP, pages from map_base on are
    virtual and the table gets their mapped page (page 0 where the map holds -1)."""
    if HAS_MAP:
        virt = mask & (page >= map_base)
        mapped = tl.load(map_ptr + (page - map_base), mask=virt, other=0)
        tl.store(ptrs, tl.where(virt, tl.maximum(mapped, 0), page), mask=mask)
    else:
        tl.store(ptrs, page, mask=mask)


@triton.jit
def _scope_table_kernel(
    best_ptr, num_cands_ptr, cand_ptr, head_table_ptr, head_pages_ptr, local_table_ptr,
    local_tokens_ptr, table_ptr, lens_ptr, sel_ptr, nsel_ptr, map_ptr, spare_ptr,
    num_best, topk, chunk_size, local_width, width, map_base, num_spare,
    stride_bb, stride_cb, stride_hb, stride_lb, stride_tb, stride_selb, stride_spb,
    KP: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr, MULTI: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_W: tl.constexpr, HAS_MAP: tl.constexpr, HAS_SPARE: tl.constexpr,
):
    b = tl.program_id(0)
    n_cands = tl.load(num_cands_ptr + b)
    # Only the first pass's blocks that hold candidates are merged (a padded width, such
    # as a streamed graph's virtual pages, costs nothing here), M keys at a time into a
    # running best KP.
    end = tl.minimum((n_cands + BLOCK - 1) // BLOCK * KP, num_best)
    j = tl.arange(0, KP)
    best = best_ptr + b.to(tl.int64) * stride_bb
    if HALF and end <= M // 2:  # few blocks hold candidates (a padded width): half a tile
        x = _best_of_tile(best, 0, end, M // 2, KP)
    else:
        x = _best_of_tile(best, 0, end, M, KP)  # [KP], best first
        if MULTI:  # more picks than one tile holds: the rest, tile by tile
            for m0 in range(M, end, M):
                t = _best_of_tile(best, m0, end, M, KP)
                x = _topk(tl.reshape(tl.join(x, t), [2 * KP]), 2 * KP, KP)
    mask32 = (tl.full([KP], 1, tl.int64) << 32) - 1
    idx = mask32 - (x & mask32)  # padding decodes to 2^32 - 1, never a valid index
    if HAS_SPARE:  # ranks topk .. topk + num_spare - 1: the runners-up, best first
        ranked = (j >= topk) & (j < topk + num_spare)
        ok = ranked & (idx < n_cands)
        runner = tl.load(cand_ptr + b.to(tl.int64) * stride_cb + idx, mask=ok, other=0)
        tl.store(spare_ptr + b.to(tl.int64) * stride_spb + (j - topk), tl.where(ok, runner, -1),
                 mask=ranked)
    valid = (j < topk) & (idx < n_cands)
    nsel = tl_sum(valid.to(tl.int32), 0)
    idx = _sort(tl.where(valid, idx, 2147483647), KP, False)  # selected, in original order
    m = j
    keep = m < nsel
    page = tl.load(cand_ptr + b.to(tl.int64) * stride_cb + idx, mask=keep, other=0)
    head = tl.load(head_pages_ptr + b)
    row = table_ptr + b.to(tl.int64) * stride_tb
    _store_pages(row + head + m, page, keep, map_ptr, map_base, HAS_MAP)
    tl.store(sel_ptr + b.to(tl.int64) * stride_selb + m, tl.where(keep, page, -1), mask=m < topk)
    tl.store(nsel_ptr + b, nsel)
    # the rest of the row: sink pages before the selection, local pages right after it, zeros
    lo = head + nsel
    hi = lo + local_width
    for p0 in range(0, width, BLOCK_W):
        p = p0 + tl.arange(0, BLOCK_W)
        sink = tl.load(head_table_ptr + b.to(tl.int64) * stride_hb + p, mask=p < head, other=0)
        loc = tl.load(local_table_ptr + b.to(tl.int64) * stride_lb + (p - lo),
                      mask=(p >= lo) & (p < hi), other=0)
        outside = (p < head) | (p >= lo)  # the selection itself is written above
        tl.store(row + p, tl.where(p < head, sink, loc), mask=outside & (p < width))
    tl.store(lens_ptr + b, lo * chunk_size + tl.load(local_tokens_ptr + b))


# Most first-pass picks the scope table merges in one pass (one top-k over them all beat
# two passes over halves at 1M on the H200: 90 against 111 us a selection).
MERGE_TILE = 4096


# ----------------------------------------------------------------------------- radix path
# The default top-k, without sorting networks over the candidates. Launches after the scorer:
# - _combine_hist_kernel: combines the heads (as _combine_kernel) and counts the keys into a
#   per-row histogram of SELECT_BINS bins, a monotone function of the combined score;
# - _radix_select_kernel: every program finds, from the histogram, the bin holding the
#   (topk + spare)-th best key and appends the candidates of its block at or above that
#   bin to a small buffer. The row's last program to finish (an atomic counter, so no
#   program waits for another) sorts that buffer, takes the top k and the runners-up, and
#   writes the scope table. When more than SELECT_CAP candidates reach the bin (ties, or a
#   "sum" combine, whose scale is unknown), that program instead searches the exact
#   threshold key over the row by bisection and fills the buffer itself.

SELECT_BINS = 2048  # bins of the histogram
SELECT_CAP = 1024  # most candidates the buffer holds (rounded up to topk + spare)
_SELECT_SMALL = 256  # a buffer of at most this many is sorted at this width
_SELECT_BLOCK = 2048  # candidates per program of the select kernel
# Histograms per row: block j of the combine kernel counts into copy j % SELECT_HIST_COPIES
# (its keys cluster in a few bins, whose atomic adds serialize). The selection of one 8B
# layer, CUDA graph, H200 (bench_attention.py, 2026-12-01), us at 32K / 128K / 1M / 4M:
# 1 copy 14.6 / 16.7 / 44.1 / 117, 4 copies 14.8 / 16.6 / 41.9 / 107, 16 copies 17.0 /
# 18.8 / 43.7 / 108 (the select kernel reads every copy).
SELECT_HIST_COPIES = 4


@triton.jit
def _score_bin(okey, inv_range, LINEAR: tl.constexpr, NBINS: tl.constexpr,
               LOG_BINS: tl.constexpr):
    """Bin of an order-preserving int32 score key: non-decreasing in the score. LINEAR
    spreads [-1 / inv_range, 1 / inv_range] evenly over the bins (a max-normalized combine
    of Hq heads lies in [-Hq, Hq]); otherwise the key's top bits (a float's sign, exponent
    and leading mantissa bits)."""
    if LINEAR:
        x = _order_bits(okey).to(tl.float32, bitcast=True)
        t = tl.fma(x, inv_range, 1.0) * (NBINS // 2)  # one rounding, the same at every call
        t = tl.where(t == t, t, 0.0)  # NaN -> the lowest bin
        b = tl.minimum(tl.maximum(t, 0.0), NBINS - 1.0).to(tl.int32)
    else:
        b = (okey >> (32 - LOG_BINS)) + NBINS // 2  # arithmetic shift of the signed key
    return b


@triton.jit
def _excl_cumsum(x):
    x = x.to(tl.int32)
    return tl_cumsum(x, 0) - x


@triton.jit
def _combine_hist_kernel(
    scores_ptr, scale_ptr, num_cands_ptr, keys_ptr, hist_ptr, num_q_heads, inv_range,
    stride_sr, stride_sh,  # scores [B * REPS, Hq, N] (MAX_COMBINE) or [B * REPS, N]
    stride_scr,  # scale [B * REPS, Hq]: max |score| of each row and head
    stride_kb,  # keys [B, >= N] int32
    REPS: tl.constexpr, MAX_COMBINE: tl.constexpr, BLOCK: tl.constexpr,
    HEAD_TILE: tl.constexpr, NBINS: tl.constexpr, LOG_BINS: tl.constexpr,
    COPIES: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_cands = tl.load(num_cands_ptr + pid_b)
    if pid_n * BLOCK < n_cands:
        offs = pid_n * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_cands
        best = _combined(scores_ptr, scale_ptr, pid_b, offs, valid, num_q_heads, stride_sr,
                         stride_sh, stride_scr, REPS, MAX_COMBINE, BLOCK, HEAD_TILE)
        okey = _order_bits(best.to(tl.int32, bitcast=True))
        tl.store(keys_ptr + pid_b.to(tl.int64) * stride_kb + offs, okey, mask=valid)
        # one global atomic per key. With tl.histogram over 2048 bins (its cross-warp pass
        # gives each lane 64 consecutive bins in shared memory, so a warp's adds meet in
        # one bank) this kernel took 8.5 us at 32K on the H200, against 2.5 us so
        bn = _score_bin(okey, inv_range, MAX_COMBINE, NBINS, LOG_BINS)
        # (COPIES histograms per row, a block adding to copy pid_n % COPIES: fewer adds
        # meet at one address; the select kernel sums them)
        hist = hist_ptr + (pid_b.to(tl.int64) * COPIES + pid_n % COPIES) * NBINS
        tl.atomic_add(hist + bn, 1, mask=valid, sem="relaxed")


@triton.jit
def _count_at_least(keys, n, d1, t, inv_range, LINEAR: tl.constexpr, NBINS: tl.constexpr,
                    LOG_BINS: tl.constexpr, TILE: tl.constexpr):
    """How many of the first n keys lie in bin d1 with a key >= t."""
    cnt = 0
    for t0 in range(0, n, TILE):
        offs = t0 + tl.arange(0, TILE)
        ok = tl.load(keys + offs, mask=offs < n, other=-2147483648, cache_modifier=".cg")
        hit = (offs < n) & (_score_bin(ok, inv_range, LINEAR, NBINS, LOG_BINS) == d1) & (ok >= t)
        cnt += tl_sum(hit.to(tl.int32), 0)
    return cnt


@triton.jit
def _fill_exact(keys, comp, n, d1, need, inv_range, LINEAR: tl.constexpr,
                NBINS: tl.constexpr, LOG_BINS: tl.constexpr, TILE: tl.constexpr):
    """Bin d1 holds too many keys for the buffer: find by bisection the exact key t of rank
    `need` in it, then copy to `comp` the keys above bin d1, those above t in it, and the
    first ties at t in candidate order, `need` in all from bin d1. Returns the count."""
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok_mid = _count_at_least(keys, n, d1, mid.to(tl.int32), inv_range, LINEAR, NBINS,
                                 LOG_BINS, TILE) >= need
        lo = tl.where(ok_mid, mid, lo)
        hi = tl.where(ok_mid, hi, mid - 1)
    t = lo.to(tl.int32)
    above_t = _count_at_least(keys, n, d1, tl.minimum(lo + 1, 2147483647).to(tl.int32),
                              inv_range, LINEAR, NBINS, LOG_BINS, TILE)
    rem = need - tl.where(lo < 2147483647, above_t, 0)  # ties at t to take
    mc = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    for t0 in range(0, n, TILE):
        offs = t0 + tl.arange(0, TILE)
        live = offs < n
        ok = tl.load(keys + offs, mask=live, other=-2147483648, cache_modifier=".cg")
        bn = _score_bin(ok, inv_range, LINEAR, NBINS, LOG_BINS)
        in_d1 = live & (bn == d1)
        tie = in_d1 & (ok == t)
        take = (live & (bn > d1)) | (in_d1 & (ok > t)) | (tie & (ties + _excl_cumsum(tie) < rem))
        tl.store(comp + mc + _excl_cumsum(take), _packed(ok, offs, TILE), mask=take)
        mc += tl_sum(take.to(tl.int32), 0)
        ties += tl_sum(tie.to(tl.int32), 0)
    return mc


@triton.jit
def _rank_and_write(comp, mc, k1, k2, ordered, cand, row, head, sel_out, spare_out, map_ptr,
                    map_base, CW: tl.constexpr, HAS_MAP: tl.constexpr,
                    HAS_SPARE: tl.constexpr):
    """The `mc` packed keys of `comp` sorted: the k1 best go to the table and `sel_out` in
    candidate order, ranks k1 .. k2 - 1 to `spare_out`, best first. `ordered`: `comp` is
    in candidate order already (filled by one program), so the chosen keys need no second
    sort to be put in that order."""
    j = tl.arange(0, CW)
    live = j < mc
    pad = tl.full([CW], -2147483648, tl.int32).to(tl.int64) << 32
    keys = tl.where(live, tl.load(comp + j, mask=live, other=0, cache_modifier=".cg"), pad)
    ranked = _sort(keys, CW, True)  # best first
    thr = tl_sum(tl.where(j == k1 - 1, ranked, 0), 0)  # the k1-th best key
    mask32 = (tl.full([CW], 1, tl.int64) << 32) - 1
    chosen = live & (keys >= thr) & (tl.full([CW], 0, tl.int32) < k1)
    if ordered:  # the chosen ones in place: slot = how many chosen ones come before
        first = chosen
        slot = _excl_cumsum(chosen)
        idx = mask32 - (keys & mask32)
    else:
        idx = _sort(tl.where(chosen, mask32 - (keys & mask32), mask32), CW, False)  # ascending
        first = j < k1
        slot = j
    page = tl.load(cand + idx, mask=first, other=0)
    _store_pages(row + head + slot, page, first, map_ptr, map_base, HAS_MAP)
    tl.store(sel_out + slot, page, mask=first)
    if HAS_SPARE:  # ranks k1 .. k2 - 1, best first
        run = (j >= k1) & (j < k2)
        page = tl.load(cand + (mask32 - (ranked & mask32)), mask=run, other=0)
        tl.store(spare_out + (j - k1), page, mask=run)


@triton.jit
def _radix_select_kernel(
    num_cands_ptr, keys_ptr, hist_ptr, count_ptr, fill_ptr, comp_ptr, scale_ptr, num_q_heads,
    reps,  # scale [B * reps, Hq] (LINEAR: a max-normalized combine's per-head maxima)
    cand_ptr, head_table_ptr, head_pages_ptr, local_table_ptr, local_tokens_ptr, table_ptr,
    lens_ptr, sel_ptr, nsel_ptr, map_ptr, spare_ptr,
    inv_range, topk, chunk_size, local_width, width, map_base, num_spare,
    stride_kb, stride_cb, stride_hb, stride_lb, stride_tb, stride_selb, stride_spb,
    LINEAR: tl.constexpr, NBINS: tl.constexpr, LOG_BINS: tl.constexpr, BLOCK: tl.constexpr,
    CAP: tl.constexpr, SMALL: tl.constexpr, BLOCK_W: tl.constexpr, HAS_MAP: tl.constexpr,
    HAS_SPARE: tl.constexpr, COPIES: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    b64 = pid_b.to(tl.int64)
    n_cands = tl.load(num_cands_ptr + pid_b)
    keys = keys_ptr + b64 * stride_kb
    comp = comp_ptr + b64 * CAP
    k1 = tl.minimum(topk, n_cands)
    k2 = tl.minimum(topk + num_spare, n_cands)
    # the bin of the k2-th best key, from the histogram (every program computes the same)
    bins = tl.arange(0, NBINS)
    hist = hist_ptr + b64 * COPIES * NBINS
    hh = tl.load(hist + bins, cache_modifier=".cg")
    for c in range(1, COPIES):
        hh += tl.load(hist + c * NBINS + bins, cache_modifier=".cg")
    c_ge = tl_sum(hh, 0) - tl_cumsum(hh, 0) + hh  # keys in this bin or above
    d1 = tl_sum((c_ge >= k2).to(tl.int32), 0) - 1
    h_d1 = tl_sum(tl.where(bins == d1, hh, 0), 0)
    above = tl_sum(tl.where(bins == d1, c_ge, 0), 0) - h_d1
    exact = above + h_d1 > CAP
    if (k2 > 0) & (~exact) & (pid_n * BLOCK < n_cands):  # this block's keys from bin d1 up
        offs = pid_n * BLOCK + tl.arange(0, BLOCK)
        live = offs < n_cands
        ok = tl.load(keys + offs, mask=live, other=-2147483648, cache_modifier=".cg")
        take = live & (_score_bin(ok, inv_range, LINEAR, NBINS, LOG_BINS) >= d1)
        cnt = tl_sum(take.to(tl.int32), 0)
        if cnt > 0:
            base = tl.atomic_add(fill_ptr + pid_b, cnt, sem="relaxed")
            tl.store(comp + base + _excl_cumsum(take), _packed(ok, offs, BLOCK), mask=take)
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + pid_b, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:  # the row's last program: rank, write the table
        if exact & (k2 > 0):
            mc = _fill_exact(keys, comp, n_cands, d1, k2 - above, inv_range, LINEAR, NBINS,
                             LOG_BINS, BLOCK)
            tl.debug_barrier()
        else:
            mc = tl.atomic_add(fill_ptr + pid_b, 0, sem="acquire")
        head = tl.load(head_pages_ptr + pid_b)
        row = table_ptr + b64 * stride_tb
        cand = cand_ptr + b64 * stride_cb
        sel_out = sel_ptr + b64 * stride_selb
        spare_out = spare_ptr + b64 * stride_spb
        # one program filled the buffer (in candidate order) when the row has one block
        # or the exact search ran
        ordered = exact | (tl.num_programs(1) == 1)
        if mc <= SMALL:
            _rank_and_write(comp, mc, k1, k2, ordered, cand, row, head, sel_out, spare_out,
                            map_ptr, map_base, SMALL, HAS_MAP, HAS_SPARE)
        else:
            _rank_and_write(comp, mc, k1, k2, ordered, cand, row, head, sel_out, spare_out,
                            map_ptr, map_base, CAP, HAS_MAP, HAS_SPARE)
        j = tl.arange(0, BLOCK_W)
        for j0 in range(0, topk, BLOCK_W):  # -1 after the selected ones
            tl.store(sel_out + j0 + j, tl.full([BLOCK_W], -1, tl.int32),
                     mask=(j0 + j >= k1) & (j0 + j < topk))
        if HAS_SPARE:
            for j0 in range(0, num_spare, BLOCK_W):
                tl.store(spare_out + j0 + j, tl.full([BLOCK_W], -1, tl.int32),
                         mask=(j0 + j >= k2 - k1) & (j0 + j < num_spare))
        tl.store(nsel_ptr + pid_b, k1)
        # the rest of the row: sink pages before the selection, local pages right after it
        lo_w = head + k1
        hi_w = lo_w + local_width
        for p0 in range(0, width, BLOCK_W):
            p = p0 + j
            sink = tl.load(head_table_ptr + b64 * stride_hb + p, mask=p < head, other=0)
            loc = tl.load(local_table_ptr + b64 * stride_lb + (p - lo_w),
                          mask=(p >= lo_w) & (p < hi_w), other=0)
            outside = (p < head) | (p >= lo_w)
            tl.store(row + p, tl.where(p < head, sink, loc), mask=outside & (p < width))
        tl.store(lens_ptr + pid_b, lo_w * chunk_size + tl.load(local_tokens_ptr + pid_b))
        # leave this row's workspace zeroed for the next call (every other program of the
        # row is done with it: each arrived after its last read)
        tl.debug_barrier()
        for c in range(COPIES):
            tl.store(hist + c * NBINS + bins, tl.full([NBINS], 0, tl.int32))
        if LINEAR:
            for h0 in range(0, reps * num_q_heads, BLOCK_W):
                tl.store(scale_ptr + b64 * reps * num_q_heads + h0 + j,
                         tl.full([BLOCK_W], 0.0, tl.float32), mask=h0 + j < reps * num_q_heads)
        tl.store(fill_ptr + pid_b, 0)
        tl.store(count_ptr + pid_b, 0)


def _check_scope_inputs(cand_pages, head_table, head_pages, local_table, local_tokens,
                        chunk_size, page_map=None) -> None:
    b = cand_pages.shape[0]
    for name, t in (("head_table", head_table), ("local_table", local_table)):
        check(t.dtype == torch.int32 and t.dim() == 2 and t.shape[0] == b and t.shape[1] >= 1
              and t.stride(1) == 1, f"{name} must be int32 [B, >=1] with contiguous rows, got "
              f"{t.dtype} {tuple(t.shape)}")
    for name, t in (("head_pages", head_pages), ("local_tokens", local_tokens)):
        check(t.dtype == torch.int32 and t.shape == (b,) and t.is_contiguous(),
              f"{name} must be contiguous int32 [B], got {t.dtype} {tuple(t.shape)}")
    check(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    check(page_map is None or (page_map.dtype == torch.int32 and page_map.dim() == 1
                               and page_map.is_contiguous()),
          "page_map must be a contiguous int32 vector")


def select_scope_triton(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                        head_table: torch.Tensor, head_pages: torch.Tensor,
                        local_table: torch.Tensor, local_tokens: torch.Tensor, topk: int,
                        chunk_size: int, kmin: torch.Tensor | None = None,
                        kmax: torch.Tensor | None = None, kmean: torch.Tensor | None = None,
                        combine: str = "max", reps: int = 1, page_map: torch.Tensor | None = None,
                        map_base: int = 0, spare: int = 0, sort_block: int | None = None,
                        method: str = "radix"):
    """Triton ``select_scope``; see ``select_scope_ref`` for the semantics.
    ``method``: ``"radix"`` (histogram threshold, the default) or ``"sort"`` (sorting
    networks over blocks of candidates, kept for comparison); ``sort_block`` (a power of two
    >= the top-k rounded up) overrides the candidates per sorted block of ``"sort"``."""
    check(method in ("radix", "sort"), f"method must be 'radix' or 'sort', got {method!r}")
    use_minmax = _check_score_inputs(q, cand_pages, num_cands, topk, kmin, kmax, kmean,
                                     combine, reps)
    _check_scope_inputs(cand_pages, head_table, head_pages, local_table, local_tokens,
                        chunk_size, page_map)
    dev = q.device
    batch, n = cand_pages.shape
    rows, num_q_heads, _ = q.shape
    s_w, l_w = head_table.shape[1], local_table.shape[1]
    width = s_w + topk + l_w
    table = torch.empty(batch, width, dtype=torch.int32, device=dev)
    lens = torch.empty(batch, dtype=torch.int32, device=dev)
    sel = torch.empty(batch, topk, dtype=torch.int32, device=dev)
    nsel = torch.empty(batch, dtype=torch.int32, device=dev)
    check(spare >= 0, f"spare must be >= 0, got {spare}")
    runners = torch.empty(batch, spare, dtype=torch.int32, device=dev)
    out = (table, lens, sel, nsel) + ((runners,) if spare else ())
    if batch == 0:
        return out
    if method == "radix":
        _select_radix(q, cand_pages, num_cands, kmin, kmax, kmean, use_minmax, combine, reps,
                      head_table, head_pages, local_table, local_tokens, topk, chunk_size,
                      page_map, map_base, spare, out)
        return out
    kp = max(16, next_pow2(topk + spare))
    # candidates per block of the first pass: fixed sizes keep recompiles few as contexts grow
    block = sort_block or max(kp, 256 if n <= 4096 else 1024 if n <= 16384 else 4096)
    check(block >= kp and block == next_pow2(block),
          f"sort_block must be a power of two >= {kp}, got {block}")
    num_blocks = triton.cdiv(n, block)
    best = torch.empty(batch, max(1, num_blocks * kp), dtype=torch.int64, device=dev)
    if n:
        per_head = combine != "sum"
        # score and key rows padded to a multiple of 16 entries (aligned row strides)
        n16 = aligned(n)
        scores = torch.empty((rows, num_q_heads, n16) if per_head else (rows, n16),
                             dtype=torch.float32, device=dev)[..., :n]
        scale = (torch.zeros(rows, num_q_heads, dtype=torch.float32, device=dev)
                 if per_head else None)
        launch_scorer(q, cand_pages, num_cands, kmin if use_minmax else None,
                      kmax if use_minmax else None, None if use_minmax else kmean, scores,
                      scale, reps)
        keys = torch.empty(batch, n16, dtype=torch.int64, device=dev)[:, :n]
        cb = 256
        _combine_kernel[(batch, triton.cdiv(n, cb))](
            scores, scale if per_head else scores, num_cands, keys, n, num_q_heads,
            scores.stride(0), scores.stride(1) if per_head else 0,
            scale.stride(0) if per_head else 0, keys.stride(0),
            REPS=reps, MAX_COMBINE=per_head, BLOCK=cb,
            HEAD_TILE=max(1, min(next_pow2(num_q_heads), 32)), num_warps=4,
        )
        _block_topk_kernel[(batch, num_blocks)](
            keys, num_cands, best, n, keys.stride(0), best.stride(0), BLOCK=block, KP=kp,
            num_warps=8 if block >= 2048 else 4,
        )
    # keys merged per pass of the scope table: all of them up to MERGE_TILE, else in tiles
    m = max(kp, min(next_pow2(num_blocks) * kp, max(MERGE_TILE, kp)))
    _scope_table_kernel[(batch,)](
        best, num_cands, cand_pages, head_table, head_pages, local_table, local_tokens,
        table, lens, sel, nsel, page_map if page_map is not None else nsel,
        runners if spare else nsel,
        num_blocks * kp, topk, chunk_size, l_w, width, map_base, spare,
        best.stride(0), cand_pages.stride(0), head_table.stride(0), local_table.stride(0),
        table.stride(0), sel.stride(0) if topk else 0, runners.stride(0) if spare else 0,
        KP=kp, M=m, HALF=m // 2 >= kp, MULTI=num_blocks * kp > m, BLOCK=block,
        BLOCK_W=max(16, min(256, next_pow2(width))), HAS_MAP=page_map is not None,
        HAS_SPARE=spare > 0, num_warps=8 if m >= 2048 else 4,
    )
    return out


def _select_radix(q, cand_pages, num_cands, kmin, kmax, kmean, use_minmax, combine, reps,
                  head_table, head_pages, local_table, local_tokens, topk, chunk_size,
                  page_map, map_base, spare, out) -> None:
    """Scorer, ``_combine_hist_kernel``, ``_radix_select_kernel``, on a workspace that the
    last leaves zeroed."""
    table, lens, sel, nsel = out[:4]
    runners = out[4] if spare else nsel
    dev = q.device
    batch, n = cand_pages.shape
    rows, num_q_heads, _ = q.shape
    per_head = combine != "sum"
    # zeros the select kernel leaves zeroed: the per-head maxima, the histograms, the
    # arrival and fill counters
    n_scale = rows * num_q_heads if per_head else 0
    nh = batch * SELECT_HIST_COPIES * SELECT_BINS
    ws = resting_zeros(dev, n_scale + nh + 2 * batch, "select_scope")
    scale = ws[:n_scale].view(torch.float32).view(rows, num_q_heads) if per_head else None
    hist = ws[n_scale:n_scale + nh]
    count = ws[n_scale + nh:][:batch]
    fill = ws[n_scale + nh:][batch:]
    keys = torch.empty(batch, aligned(max(n, 1)), dtype=torch.int32, device=dev)
    try:  # a launch that fails leaves the workspace zeroed for the next call
        log_bins = SELECT_BINS.bit_length() - 1
        inv_range = 1.0 / num_q_heads
        if n:
            shape = (rows, num_q_heads, aligned(n)) if per_head else (rows, aligned(n))
            scores = torch.empty(shape, dtype=torch.float32, device=dev)[..., :n]
            launch_scorer(q, cand_pages, num_cands, kmin if use_minmax else None,
                          kmax if use_minmax else None, None if use_minmax else kmean, scores,
                          scale, reps)
            cb = 256
            _combine_hist_kernel[(batch, triton.cdiv(n, cb))](
                scores, scale if per_head else scores, num_cands, keys, hist, num_q_heads,
                inv_range, scores.stride(0), scores.stride(1) if per_head else 0,
                scale.stride(0) if per_head else 0, keys.stride(0),
                REPS=reps, MAX_COMBINE=per_head, BLOCK=cb,
                HEAD_TILE=max(1, min(next_pow2(num_q_heads), 32)), NBINS=SELECT_BINS,
                LOG_BINS=log_bins, COPIES=SELECT_HIST_COPIES, num_warps=4,
            )
        cap = max(SELECT_CAP, next_pow2(topk + spare))
        comp = torch.empty(batch, cap, dtype=torch.int64, device=dev)
        width = table.shape[1]
        _radix_select_kernel[(batch, max(1, triton.cdiv(n, _SELECT_BLOCK)))](
            num_cands, keys, hist, count, fill, comp, scale if per_head else ws, num_q_heads,
            reps, cand_pages, head_table, head_pages, local_table, local_tokens, table, lens,
            sel, nsel,
            page_map if page_map is not None else nsel, runners,
            inv_range, topk, chunk_size, local_table.shape[1], width, map_base, spare,
            keys.stride(0), cand_pages.stride(0), head_table.stride(0), local_table.stride(0),
            table.stride(0), sel.stride(0) if topk else 0, runners.stride(0) if spare else 0,
            LINEAR=per_head, NBINS=SELECT_BINS, LOG_BINS=log_bins, BLOCK=_SELECT_BLOCK,
            CAP=cap, SMALL=min(_SELECT_SMALL, cap), BLOCK_W=max(16, min(256, next_pow2(width))),
            HAS_MAP=page_map is not None, HAS_SPARE=spare > 0, COPIES=SELECT_HIST_COPIES,
            num_warps=8,
        )
    except BaseException:
        ws.zero_()
        raise


def assemble_scope_ref(head_table: torch.Tensor, head_pages: torch.Tensor,
                       sel_pages: torch.Tensor, num_sel: torch.Tensor,
                       local_table: torch.Tensor, local_tokens: torch.Tensor,
                       chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scope page table ``[B, S + K + L]``: row b is ``head_table[b, :head_pages[b]]``, then
    ``sel_pages[b, :num_sel[b]]``, then all of ``local_table[b]``, then zeros; its length
    in tokens is ``(head_pages + num_sel) * chunk_size + local_tokens``."""
    b, s_w = head_table.shape
    topk, l_w = sel_pages.shape[1], local_table.shape[1]
    p = torch.arange(s_w + topk + l_w, device=head_table.device)[None, :].expand(b, -1)
    head = head_pages.long()[:, None]
    lo = head + num_sel.long()[:, None]
    sel = torch.cat([sel_pages, sel_pages.new_zeros(b, 1)], 1)
    table = torch.where(
        p < head, head_table.gather(1, p.clamp(max=s_w - 1)),
        torch.where(p < lo, sel.gather(1, (p - head).clamp(0, topk)),
                    torch.where(p < lo + l_w, local_table.gather(1, (p - lo).clamp(0, l_w - 1)),
                                0)))
    lens = lo[:, 0] * chunk_size + local_tokens
    return table.to(torch.int32), lens.to(torch.int32)


def assemble_scope_host(head_table: np.ndarray, head_pages: np.ndarray, sel_pages: np.ndarray,
                        num_sel: np.ndarray, local_table: np.ndarray, local_tokens: np.ndarray,
                        chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`assemble_scope_ref` on host (numpy) arrays, for a selection already on the host
    (a streamed eager step maps its virtual pages there): a row's slices copied in place
    of about twenty small device operations per layer."""
    b, s_w = head_table.shape
    width = s_w + sel_pages.shape[1] + local_table.shape[1]
    table = np.zeros((b, width), dtype=np.int32)
    for i in range(b):
        h, n = int(head_pages[i]), int(num_sel[i])
        table[i, :h] = head_table[i, :h]
        table[i, h:h + n] = sel_pages[i, :n]
        table[i, h + n:h + n + local_table.shape[1]] = local_table[i]
    lens = ((head_pages.astype(np.int64) + num_sel) * chunk_size + local_tokens).astype(np.int32)
    return table, lens


def map_pages(pages: torch.Tensor, page_map: torch.Tensor | None, map_base: int
              ) -> torch.Tensor:
    """Pages with the virtual ones (``>= map_base``) replaced by ``page_map[page -
    map_base]``, or by page 0 where that is ``-1``; ``-1`` entries stay."""
    if page_map is None:
        return pages
    virt = pages >= map_base
    mapped = page_map[torch.where(virt, pages - map_base, 0).long()].clamp_min(0)
    return torch.where(virt, mapped, pages).to(pages.dtype)


def scope_scores_ref(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                     kmin=None, kmax=None, kmean=None, combine: str = "max",
                     reps: int = 1) -> torch.Tensor:
    """Combined scores ``[B, N]`` (``-inf`` past ``num_cands``): per-head scores of each
    query row, combined over heads by ``combine``, max over a sequence's ``reps`` rows."""
    cand = cand_pages if reps == 1 else cand_pages.repeat_interleave(reps, 0)
    num = num_cands if reps == 1 else num_cands.repeat_interleave(reps, 0)
    scores = chunk_scores_ref(q, cand, num, kmin, kmax, kmean, per_head=combine != "sum")
    if combine != "sum":
        scores = combine_head_scores(scores, combine)
    return scores.view(cand_pages.shape[0], reps, -1).amax(1)


def select_scope_ref(q: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
                     head_table: torch.Tensor, head_pages: torch.Tensor,
                     local_table: torch.Tensor, local_tokens: torch.Tensor, topk: int,
                     chunk_size: int, kmin: torch.Tensor | None = None,
                     kmax: torch.Tensor | None = None, kmean: torch.Tensor | None = None,
                     combine: str = "max", reps: int = 1, page_map: torch.Tensor | None = None,
                     map_base: int = 0, spare: int = 0):
    """Select one layer's scope for each sequence (torch).

    Args:
        q: ``[B * reps, Hq, D]`` un-rotated queries, ``reps`` consecutive rows per sequence
            (a prefill piece's representative queries; 1 for decode).
        cand_pages, num_cands, kmin, kmax, kmean, combine: as in ``score_chunks_ref``.
        head_table: int32 ``[B, S]`` sink pages, ``head_pages [B]`` of them valid.
        local_table: int32 ``[B, L]`` local-window pages (every entry is copied);
            local_tokens: int32 ``[B]`` tokens in them.
        topk, chunk_size: chunks to select; tokens per chunk.
        page_map, map_base: optional int32 map of virtual pages (candidates ``>= map_base``;
            the streaming tier's) to the pages holding them: the table gets
            ``page_map[page - map_base]``, or page 0 where that is ``-1`` (not resident: the
            caller sees it in ``sel_pages``, which keep the candidates' own pages).
        spare: also return the pages of the candidates ranked just below the top k (the
            streaming tier loads them ahead of the steps likely to select them).
    Returns:
        ``(table [B, S + topk + L], lens [B], sel_pages [B, topk], num_sel [B])``, all int32:
        the scope page table and length (``assemble_scope_ref``), and the selected pages
        in original order, ``-1`` after the first ``num_sel = min(topk, num_cands)``.
        With ``spare`` > 0 a fifth, ``runners [B, spare]``: the candidates ranked ``topk``
        to ``topk + spare - 1``, best first (their own pages), then ``-1``.
    """
    _check_score_inputs(q, cand_pages, num_cands, topk, kmin, kmax, kmean, combine, reps)
    _check_scope_inputs(cand_pages, head_table, head_pages, local_table, local_tokens,
                        chunk_size, page_map)
    scores = scope_scores_ref(q, cand_pages, num_cands, kmin, kmax, kmean, combine, reps)
    sel, nsel = select_topk(scores, num_cands, topk)
    pages = cand_pages.gather(1, sel.clamp_min(0).long()) if cand_pages.shape[1] else sel
    sel_pages = torch.where(sel >= 0, pages, -1).to(torch.int32)
    table, lens = assemble_scope_ref(head_table, head_pages,
                                     map_pages(sel_pages, page_map, map_base), nsel,
                                     local_table, local_tokens, chunk_size)
    if not spare:
        return table, lens, sel_pages, nsel
    return table, lens, sel_pages, nsel, runners_up(scores, cand_pages, num_cands, topk, spare)


def runners_up(scores: torch.Tensor, cand_pages: torch.Tensor, num_cands: torch.Tensor,
               topk: int, spare: int) -> torch.Tensor:
    """Pages of the candidates ranked ``topk .. topk + spare - 1`` by ``scores [B, N]``,
    best first; ``-1`` where a row has fewer candidates."""
    b, n = scores.shape
    out = torch.full((b, spare), -1, dtype=torch.int32, device=scores.device)
    k = min(n, topk + spare)
    if k <= topk:
        return out
    masked = torch.where(torch.arange(n, device=scores.device)[None, :] < num_cands[:, None],
                         scores, float("-inf"))
    idx = masked.topk(k, dim=1).indices[:, topk:]
    ok = idx < num_cands[:, None].long()
    out[:, : k - topk] = torch.where(ok, cand_pages.gather(1, idx), -1).to(torch.int32)
    return out
