"""SwiGLU's gate: ``silu(gate) * up`` from the fused gate/up projection, one launch.

``gate_up`` is ``[T, 2 * I]`` (gate columns first). The result is rounded as torch rounds
``F.silu(gate) * up`` in 16-bit dtypes: silu in float32, rounded to the dtype, then the
product in float32, rounded again. Two elementwise kernels and a strided read of the
gate half become one pass.
"""

from __future__ import annotations

import torch

from ._triton_compat import check, tl, triton

SILU_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs,
             (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu_mul``; see ``silu_mul_ref``."""
    check(gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0,
          f"gate_up must be [T, 2 * I] with contiguous rows, got {tuple(gate_up.shape)}")
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    if t and inter:
        _silu_mul_kernel[(t, triton.cdiv(inter, SILU_BLOCK))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=SILU_BLOCK,
            num_warps=4)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I] -> [T, I]``: ``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
