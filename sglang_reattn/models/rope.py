"""Rotary position embedding tables.

Keys are cached before RoPE; attention rotates q and k on the fly from these tables, at
*virtual* positions (the token's index inside the assembled attention scope). All RoPE
variants we support only change the inverse frequencies, so one (cos, sin) table of shape
[max_pos, head_dim // 2] serves every kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sglang_reattn.errors import ModelLoadError


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32, as Hugging Face computes them."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    if scaling is None:
        return inv_freq
    rtype = scaling.get("rope_type", "default")
    if rtype == "linear":
        return inv_freq / float(scaling["factor"])
    if rtype == "llama3":
        return _llama3(inv_freq, scaling)
    raise ModelLoadError(f"unsupported rope_scaling type {rtype!r} (supported: linear, llama3)")


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTable:
    """cos/sin tables [max_pos, head_dim // 2] float32 that grow on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device, initial: int = 4096) -> None:
        self.inv_freq = inv_frequencies(head_dim, theta, scaling).to(device)
        self.device = device
        self.cos = torch.empty(0, head_dim // 2, device=device)
        self.sin = torch.empty(0, head_dim // 2, device=device)
        self.ensure(initial)

    def ensure(self, n: int) -> None:
        if n <= self.cos.shape[0]:
            return
        size = max(n, 2 * self.cos.shape[0])
        pos = torch.arange(size, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        self.cos = freqs.cos().contiguous()
        self.sin = freqs.sin().contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, H, D]; cos/sin [n, D/2] (rows already picked by position)."""
    half = x.shape[-1] // 2
    c = cos[:, None, :].to(x.dtype)
    s = sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
