"""RMSNorm with the residual add fused in, one program per row.

``rms_norm(x, w, eps)`` is ``w * (x * rsqrt(mean(x^2) + eps))``, computed in float32 and
rounded like transformers' ``LlamaRMSNorm`` (normalized rows back to x's dtype, then the
product with the weight). With ``residual`` it first forms ``s = x + residual`` in x's dtype
and returns ``(rms_norm(s), s)``: the pre-norm decoder's "add the sublayer output to the
stream, then normalize" in one launch instead of about eight.
"""

from __future__ import annotations

import torch

from ._triton_compat import check, next_pow2, tl, tl_sum, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_cols, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    # 16-bit operands are multiplied / added in float32 and rounded once, as torch does
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    h = x.to(tl.float32)
    if HAS_RES:
        h += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h = h.to(dtype).to(tl.float32)
        tl.store(sum_ptr + row * stride_s + offs, h.to(dtype), mask=mask)
    var = tl_sum(h * h, 0) / n_cols
    h = (h * (1.0 / tl.sqrt(var + eps))).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x, weight, residual):
    check(x.dim() == 2 and x.stride(1) == 1, f"x must be [T, H] with contiguous rows, got "
          f"{tuple(x.shape)} strides {x.stride()}")
    check(weight.shape == (x.shape[1],) and weight.is_contiguous(),
          f"weight must be contiguous [{x.shape[1]}], got {tuple(weight.shape)}")
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype
              and residual.stride(1) == 1, "residual must match x (shape, dtype, rows)")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    """Triton ``rms_norm``; see ``rms_norm_ref``."""
    _check(x, weight, residual)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else out
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            x, residual if residual is not None else x, weight, out, total,
            x.shape[1], eps, x.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0), total.stride(0),
            HAS_RES=residual is not None, BLOCK=next_pow2(x.shape[1]),
            num_warps=max(1, min(16, next_pow2(x.shape[1]) // 256)),
        )
    return out if residual is None else (out, total)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """``weight * rmsnorm(x)`` over the last dim (any leading shape), float32 statistics;
    with ``residual``: ``(rms_norm_ref(x + residual), x + residual)``."""
    if residual is not None:
        x = x + residual
        return rms_norm_ref(x, weight, eps), x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
