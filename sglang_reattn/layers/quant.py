"""`--quantization gguf`: compute with a GGUF file's 4-bit blocks as they are stored.

A Q4_1 block holds 32 weights as 4-bit codes q with a scale d and a minimum m (both
float16): w = d * q + m. Q4_0 has no minimum: w = d * (q - 8). torch's CPU int4 matmul
(`_weight_int4pack_mm_for_cpu`) takes group-wise (scale, zero) pairs with
w = (q - 8) * scale + zero, so a Q4_1 block maps to scale = d, zero = m + 8 d and a Q4_0
block to scale = d, zero = 0: the same weights, read as 4 bits instead of 32.

That kernel is a matrix-vector product: it beats a dense bfloat16 matmul only for a few
rows. `QuantLinear` keeps both: steps of at most `max_rows` tokens (decode at small batch,
where reading the weights is the whole cost) use the 4-bit blocks, larger ones (prefill,
large batches) the dense bfloat16 weights dequantized from the same blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP = 32


class Int4Blocks:
    """Codes [N, K] int32 (0..15), scales and zeros [N, K / 32] float32, of one matrix."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.codes, self.scale, self.zero = codes, scale, zero

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        q = self.codes.view(n, k // GROUP, GROUP).float()
        return ((q - 8) * self.scale[..., None] + self.zero[..., None]).view(n, k)

    @staticmethod
    def cat(parts: list["Int4Blocks"]) -> "Int4Blocks":
        return Int4Blocks(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]))

    def permute_rows(self, fn) -> "Int4Blocks":
        return Int4Blocks(fn(self.codes), fn(self.scale), fn(self.zero))


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class QuantLinear(nn.Module):
    """A linear layer whose weight also exists as packed 4-bit blocks (CPU, bfloat16)."""

    def __init__(self, dense: nn.Linear, blocks: Int4Blocks, max_rows: int = 8) -> None:
        super().__init__()
        n, k = blocks.codes.shape
        if tuple(dense.weight.shape) != (n, k) or k % GROUP:
            raise ValueError(f"blocks {tuple(blocks.codes.shape)} do not fit "
                             f"weight {tuple(dense.weight.shape)}")
        dtype = dense.weight.dtype
        self.in_features, self.out_features = k, n
        self.max_rows = max_rows
        # The dense weight is the blocks' own dequantization, so both paths use one model.
        self.weight = nn.Parameter(blocks.dequantize().to(dtype), requires_grad=False)
        self.bias = dense.bias
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            blocks.codes.to(torch.int32).contiguous(), 1), persistent=False)
        sz = torch.stack([blocks.scale.t(), blocks.zero.t()], dim=-1)  # [K/32, N, 2]
        self.register_buffer("scales_zeros", sz.to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(rows, self.in_features), self.packed, GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)
