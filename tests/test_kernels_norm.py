"""The fused residual-add + RMSNorm kernel (interpreter) against its torch reference, and the
reference against transformers' LlamaRMSNorm op order."""

from __future__ import annotations

import pytest
import torch
from sglang_reattn.kernels import HAS_TRITON
from sglang_reattn.kernels.testing import load_interpreted_kernels

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
K = load_interpreted_kernels() if HAS_TRITON else None


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("rows,width", [(1, 64), (5, 100), (3, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_triton_matches_ref(rows, width, dtype, with_residual):
    g = torch.Generator().manual_seed(rows * width)
    x = (3 * torch.randn(rows, width + 7, generator=g)).to(dtype)[:, :width]  # strided rows
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype)
    res = torch.randn(rows, width, generator=g).to(dtype) if with_residual else None
    out = K.rms_norm_triton(x, w, 1e-5, res)
    ref = K.rms_norm_ref(x, w, 1e-5, res)
    if with_residual:  # the stream: one rounding of x + residual (the interpreter's bf16
        # cast truncates where GPUs round to nearest: one bf16 ulp apart at most)
        torch.testing.assert_close(out[1], ref[1], atol=0,
                                   rtol=0 if dtype == torch.float32 else 2 ** -7)
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype == dtype and out.shape == (rows, width)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_rms_norm_ref_matches_transformers_op_order():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 48, generator=g), torch.randn(48, generator=g)
    h = x.float()
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert torch.equal(K.rms_norm_ref(x, w, 1e-6), want)


def test_rms_norm_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm_triton(x, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        K.rms_norm_triton(x, torch.ones(8), 1e-6, torch.randn(2, 8).double())


@pytest.mark.parametrize("rows,inter", [(1, 64), (3, 1500), (2, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_triton_matches_ref(rows, inter, dtype):
    """SwiGLU's silu(gate) * up in one launch: blocks past the last column (1500, 2100 are
    not multiples of the 1024 block), strided rows."""
    g = torch.Generator().manual_seed(rows + inter)
    x = (4 * torch.randn(rows, 2 * inter + 5, generator=g)).to(dtype)[:, :2 * inter]
    out, ref = K.silu_mul_triton(x), K.silu_mul_ref(x)
    assert out.dtype == dtype and out.shape == (rows, inter)
    # silu rounded to the dtype before the product, as torch does (two bf16 ulps apart at
    # most: the interpreter truncates both roundings where GPUs round to nearest)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -6)
    torch.testing.assert_close(out, ref, **tol)


def test_silu_mul_rejects_bad_inputs():
    with pytest.raises(ValueError, match="gate_up"):
        K.silu_mul_triton(torch.randn(2, 7))
