"""RoPE reference (neox / HF ``rotate_half`` layout) shared by the torch references.

Keys are stored un-rotated; every kernel rotates q and k on the fly with the *virtual*
position of the token in the assembled scope. Tables are float32 ``[max_pos, head_dim // 2]``
with any frequency scaling (llama3, linear, ...) already folded in.
"""

from __future__ import annotations

import torch


def rope_tables(max_pos: int, head_dim: int, base: float = 10000.0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (unscaled) cos/sin tables ``[max_pos, head_dim // 2]`` float32, for tests/benches."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return freqs.cos().float().to(device), freqs.sin().float().to(device)


def apply_rope_ref(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., H, D]`` by positions ``pos [...]`` (int); returns float32.

    rot(x, p) = cat(x1 * cos[p] - x2 * sin[p], x2 * cos[p] + x1 * sin[p]) with
    x1 = x[..., :D/2], x2 = x[..., D/2:].
    """
    half = x.shape[-1] // 2
    x = x.float()
    c = cos[pos.long()].unsqueeze(-2)  # [..., 1, D/2]
    s = sin[pos.long()].unsqueeze(-2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
