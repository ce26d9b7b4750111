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


# Whether the kernels of this import were decorated for the interpreter (see testing.py).
INTERPRETED = HAS_TRITON and interpret_mode()


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should run for tensors living where ``x`` lives.

    CUDA tensors always use Triton; CPU tensors only when these kernels were decorated for
    the interpreter and ``TRITON_INTERPRET`` is still set.
    """
    if not HAS_TRITON:
        return False
    if INTERPRETED:
        return interpret_mode()
    return x.is_cuda


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def aligned(n: int, m: int = 16) -> int:
    """n rounded up to a multiple of m: a row of that many elements gives its tensor an
    aligned row stride, which Triton specializes on and vectorizes loads for."""
    return -(-n // m) * m


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side query, no sync; cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(x: torch.Tensor) -> int:
    if x.is_cuda:
        index = x.device.index
        return num_sms(index if index is not None else torch.cuda.current_device())
    return 8  # interpreter: small grids keep the tests fast while still exercising split-K


def dot_dtype(dtype: torch.dtype):
    """Operand dtype for ``tl.dot``: the tensor dtype, except bf16 under the interpreter.

    Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly, so interpreted kernels round
    operands to bf16 and multiply them in fp32 (same products, exact in fp32).
    """
    if dtype == torch.bfloat16:
        return tl.float32 if INTERPRETED else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def check(cond: bool, msg: str) -> None:
    """Host-side argument check that survives ``python -O`` (unlike ``assert``)."""
    if not cond:
        raise ValueError(msg)


# Reductions used by the kernels. On GPUs these are exactly tl.max / tl.min / tl.sum. For the
# interpreter they call tl.reduce with the combine functions that the interpreter evaluates
# in numpy, because tl.max & co. are @jit functions of triton.language.standard: when triton
# was imported before TRITON_INTERPRET was set (another test module imported it first) they
# are compiled-mode functions that the interpreter cannot call. (tl.zeros and tl.cdiv have the
# same problem, so kernels use tl.full and integer arithmetic instead.)
@triton.jit
def _max_std(x, axis: tl.constexpr):
    return tl.max(x, axis)


@triton.jit
def _min_std(x, axis: tl.constexpr):
    return tl.min(x, axis)


@triton.jit
def _sum_std(x, axis: tl.constexpr):
    return tl.sum(x, axis)


@triton.jit
def _max_interp(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min_interp(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _sum_interp(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


tl_max = _max_interp if INTERPRETED else _max_std
tl_min = _min_interp if INTERPRETED else _min_std
tl_sum = _sum_interp if INTERPRETED else _sum_std


@triton.jit
def _cumsum_std(x, axis: tl.constexpr):
    return tl.cumsum(x, axis)


@triton.jit
def _cumsum_interp(x, axis: tl.constexpr):
    return tl.associative_scan(x, axis, tl.standard._sum_combine)


tl_cumsum = _cumsum_interp if INTERPRETED else _cumsum_std  # inclusive prefix sums


_RESTING: dict[tuple[str, str], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # replaced buffers stay allocated: graphs may use them


def resting_zeros(device: torch.device, numel: int, key: str) -> torch.Tensor:
    """An int32 ``[numel]`` view of zeros that the kernels using it leave zeroed again, so no
    fill runs before them (one launch fewer, in every layer of a CUDA graph). One buffer per
    device and ``key``, grown as needed outside a graph capture; inside one, a buffer that
    is too small is replaced by ``torch.zeros`` (a fill recorded in the graph). An outgrown
    buffer is never freed, as a captured graph may still use it. Calls that use one buffer
    must run in one stream order, as the engine's do."""
    slot = (str(torch.device(device)), key)
    buf = _RESTING.get(slot)
    if buf is None or buf.numel() < numel:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(numel, dtype=torch.int32, device=device)
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                          dtype=torch.int32, device=device)
        _RESTING[slot] = buf
    return buf[:numel]
