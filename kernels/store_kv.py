"""Write new tokens' K/V into the paged cache and fold their keys into the chunk summaries.

A page is one chunk of ``page_size`` tokens. Its summary, per KV head, describes the page's
*un-rotated* keys: per-channel ``kmin`` / ``kmax`` (Quest-style bound) and ``kmean``, each
``[num_pages, Hkv, D]``. Pages fill in order, so a page's first ``off`` tokens are already
summarized when a token arrives at offset ``off``: the kernel folds a run of consecutive
new tokens into the stored summary (offset 0 starts a fresh one), reading only the new keys.

Kernel ``_store_kv_kernel``, grid ``(T, Hkv)``: program (t, h) copies token t's K/V of head
h, and if t starts a run (its slot is not the previous token's slot + 1 in the same page)
it also updates the run's page summary for head h. Slots < 0 are padding and are skipped
(CUDA-graph decode pads the batch that way).

Assumption (as in every paged engine): the tokens of one page that arrive in one call are
consecutive in ``slot_mapping`` and in slot order. A page reached by two separate runs in
one call would be updated by two programs and race.
"""

from __future__ import annotations

import torch

from ._triton_compat import check, next_pow2, tl, tl_max, tl_min, tl_sum, triton


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    kmin_ptr, kmax_ptr, kmean_ptr,
    num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcp, stride_kct, stride_kch,
    stride_vcp, stride_vct, stride_vch,
    stride_sp, stride_sh,  # summaries [num_pages, Hkv, D] (all three share strides)
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_MINMAX: tl.constexpr, HAS_MEAN: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, SUB_T: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    slot = tl.load(slot_ptr + t)
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    if slot >= 0:
        kx = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + offs_d, mask=d_mask)
        vx = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + offs_d, mask=d_mask)
        tl.store(k_cache_ptr + page * stride_kcp + off * stride_kct + h * stride_kch + offs_d,
                 kx.to(k_cache_ptr.dtype.element_ty), mask=d_mask)
        tl.store(v_cache_ptr + page * stride_vcp + off * stride_vct + h * stride_vch + offs_d,
                 vx.to(v_cache_ptr.dtype.element_ty), mask=d_mask)

    if HAS_MINMAX or HAS_MEAN:
        prev = tl.load(slot_ptr + t - 1, mask=t > 0, other=-2)
        is_start = (slot >= 0) & ((off == 0) | (prev != slot - 1))
        if is_start:
            # run = the longest prefix of tokens t, t+1, ... whose slots continue this page
            offs_c = tl.arange(0, BLOCK_C)
            nxt = tl.load(slot_ptr + t + offs_c, mask=(t + offs_c) < num_tokens, other=-2)
            cont = (nxt == slot + offs_c) & (offs_c < PAGE_SIZE - off)
            run_len = tl_min(tl.where(cont, BLOCK_C, offs_c), 0)

            mn = tl.full([BLOCK_D], float("inf"), tl.float32)
            mx = tl.full([BLOCK_D], float("-inf"), tl.float32)
            total = tl.full([BLOCK_D], 0.0, tl.float32)
            for i0 in range(0, run_len, SUB_T):
                rows = i0 + tl.arange(0, SUB_T)
                rmask = rows < run_len
                x = tl.load(k_ptr + (t + rows).to(tl.int64)[:, None] * stride_kt + h * stride_kh
                            + offs_d[None, :], mask=rmask[:, None] & d_mask[None, :],
                            other=0.0).to(tl.float32)
                mn = tl.minimum(mn, tl_min(tl.where(rmask[:, None], x, float("inf")), 0))
                mx = tl.maximum(mx, tl_max(tl.where(rmask[:, None], x, float("-inf")), 0))
                total += tl_sum(x, 0)

            s_off = page * stride_sp + h * stride_sh + offs_d
            if HAS_MINMAX:
                if off > 0:
                    mn = tl.minimum(mn, tl.load(kmin_ptr + s_off, mask=d_mask).to(tl.float32))
                    mx = tl.maximum(mx, tl.load(kmax_ptr + s_off, mask=d_mask).to(tl.float32))
                tl.store(kmin_ptr + s_off, mn.to(kmin_ptr.dtype.element_ty), mask=d_mask)
                tl.store(kmax_ptr + s_off, mx.to(kmax_ptr.dtype.element_ty), mask=d_mask)
            if HAS_MEAN:
                if off > 0:
                    old = tl.load(kmean_ptr + s_off, mask=d_mask).to(tl.float32)
                    total += old * off.to(tl.float32)
                mean = total / (off + run_len).to(tl.float32)
                tl.store(kmean_ptr + s_off, mean.to(kmean_ptr.dtype.element_ty), mask=d_mask)


def _check_summaries(k_cache: torch.Tensor, kmin, kmax, kmean) -> None:
    check((kmin is None) == (kmax is None), "kmin and kmax must be given together")
    want = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, t in (("kmin", kmin), ("kmax", kmax), ("kmean", kmean)):
        if t is None:
            continue
        # rows past the pool's pages may follow (the streaming tier's virtual pages)
        check(t.dim() == 3 and t.shape[0] >= want[0] and tuple(t.shape[1:]) == want[1:],
              f"{name} must be [>= num_pages, Hkv, D] = [>= {want[0]}, {want[1]}, {want[2]}], "
              f"got {tuple(t.shape)}")
        check(t.dtype in (torch.float32, torch.bfloat16, torch.float16),
              f"{name} must be a float tensor, got {t.dtype}")
        check(t.is_contiguous(), f"{name} must be contiguous")
        check(t.device == k_cache.device, f"{name} must be on the cache's device")


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                    kmean: torch.Tensor | None = None) -> None:
    """Triton ``store_kv``; see ``store_kv_ref`` for the semantics."""
    check(k.dim() == 3 and k.shape == v.shape, f"k, v must be [T, Hkv, D], got "
          f"{tuple(k.shape)} and {tuple(v.shape)}")
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
          "k_cache, v_cache must both be [num_pages, page_size, Hkv, D]")
    check(tuple(k.shape[1:]) == tuple(k_cache.shape[2:]),
          f"k heads/dim {tuple(k.shape[1:])} != cache {tuple(k_cache.shape[2:])}")
    check(slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],)
          and slot_mapping.is_contiguous(), "slot_mapping must be contiguous int64 [T]")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check(t.stride(-1) == 1, f"{name} must be contiguous in head_dim")
        check(t.device == k_cache.device, f"{name} must be on the cache's device")
    check(slot_mapping.device == k_cache.device, "slot_mapping must be on the cache's device")
    _check_summaries(k_cache, kmin, kmax, kmean)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    page_size = k_cache.shape[1]
    summ = kmin if kmin is not None else kmean
    dummy = k_cache  # never dereferenced when the matching HAS_* flag is off
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        kmin if kmin is not None else dummy, kmax if kmax is not None else dummy,
        kmean if kmean is not None else dummy,
        num_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        summ.stride(0) if summ is not None else 0, summ.stride(1) if summ is not None else 0,
        PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        HAS_MINMAX=kmin is not None, HAS_MEAN=kmean is not None,
        BLOCK_D=next_pow2(head_dim), BLOCK_C=max(2, next_pow2(page_size)), SUB_T=16,
        num_warps=2,
    )


def chunk_summaries_ref(k_cache: torch.Tensor, pages: torch.Tensor, num_valid: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summaries of whole pages recomputed from the cache (vectorized torch, any device).

    Args:
        k_cache: ``[num_pages, page_size, Hkv, D]`` un-rotated keys.
        pages: int ``[N]`` page ids; num_valid: int ``[N]`` valid tokens of each (>= 1).
    Returns:
        ``(kmin, kmax, kmean)``, each float32 ``[N, Hkv, D]``.
    """
    keys = k_cache[pages.long()].float()  # [N, page_size, Hkv, D]
    valid = (torch.arange(k_cache.shape[1], device=keys.device)[None, :]
             < num_valid.to(keys.device)[:, None])[..., None, None]  # [N, page_size, 1, 1]
    kmin = keys.masked_fill(~valid, float("inf")).amin(1)
    kmax = keys.masked_fill(~valid, float("-inf")).amax(1)
    kmean = keys.masked_fill(~valid, 0.0).sum(1) / num_valid.to(keys)[:, None, None]
    return kmin, kmax, kmean


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None,
                 kmean: torch.Tensor | None = None) -> None:
    """Store K/V of new tokens and refresh the summaries of the pages they touch (in place).

    Args:
        k, v: ``[T, Hkv, D]`` un-rotated keys and values of the new tokens.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; written at the slots.
        slot_mapping: int64 ``[T]``, flat slot ``page * page_size + offset``; < 0 skips.
        kmin, kmax, kmean: optional ``[num_pages, Hkv, D]`` summaries of each page's keys.
            A touched page is summarized over offsets ``[0, last written offset]``, i.e.
            pages are assumed to fill in order. kmin/kmax must be given together.
    """
    page_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    pages, offs = slots // page_size, slots % page_size
    k_cache[pages, offs] = k[keep].to(k_cache.dtype)
    v_cache[pages, offs] = v[keep].to(v_cache.dtype)
    if (kmin is None and kmean is None) or slots.numel() == 0:
        return
    touched = pages.unique()
    num_valid = torch.zeros(k_cache.shape[0], dtype=torch.int64, device=k_cache.device)
    num_valid.scatter_reduce_(0, pages, offs + 1, reduce="amax")
    mn, mx, mean = chunk_summaries_ref(k_cache, touched, num_valid[touched])
    if kmin is not None:
        kmin[touched] = mn.to(kmin.dtype)
        kmax[touched] = mx.to(kmax.dtype)
    if kmean is not None:
        kmean[touched] = mean.to(kmean.dtype)
