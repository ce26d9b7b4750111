"""Guarded Triton import shared by the kernel modules.

Importing ``sglang_reattn.kernels`` must work where Triton is missing (CPU-only installs,
macOS): the torch references are then the only path. Kernel modules therefore import
``triton`` / ``tl`` from here; without Triton these are stubs whose ``jit`` returns the
function unchanged, so ``@triton.jit`` definitions still import and are simply never launched.
``TRITON_INTERPRET=1`` must be set before this module is first imported for the interpreter
to be used (Triton reads it when a kernel is decorated).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(int(n) - 1, 0).bit_length()

    class _TLStub:
        constexpr = object  # only used as an annotation in kernel signatures

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TLStub()  # type: ignore[assignment]


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should run for tensors living where ``x`` lives."""
    return HAS_TRITON and (x.is_cuda or interpret_mode())


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side query, no sync; cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(x: torch.Tensor) -> int:
    if x.is_cuda:
        return num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 8  # interpreter: small grids keep the tests fast while still exercising split-K


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the tensor dtype, except bf16 under the interpreter.

    Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly, so interpreted kernels round
    operands to bf16 and multiply them in fp32 (same products, exact in fp32).
    """
    if dtype == torch.bfloat16:
        return tl.float32 if interpret_mode() else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def check(cond: bool, msg: str) -> None:
    """Host-side argument check that survives ``python -O`` (unlike ``assert``)."""
    if not cond:
        raise ValueError(msg)
