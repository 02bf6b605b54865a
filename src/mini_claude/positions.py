"""Where a token is: the position encodings of the transformer (`model.py`), from scratch.

- Sinusoidal (Vaswani et al., 2017): a fixed table added to the token embeddings (the original Transformer).
- Rotary (RoPE, Su et al., 2021): each (x_i, x_{i+d/2}) pair of a query or key is rotated by an angle that
  grows with the position, so q.k depends on the distance between two tokens. Hugging Face's "rotate half"
  layout; GGUF's interleaved Llama q/k rows are undone once at load time (`checkpoint/gguf.py`), so there is
  one RoPE here. Llama 3.1's long-context rescaling of the frequencies is `rope_inv_freq(scaling=...)`.
- Learned absolute positions (GPT-2) are an `nn.Embedding` of the model itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_positions(n_positions: int, dim: int, base: float = 10_000.0) -> Tensor:
    """The fixed encoding of "Attention Is All You Need": PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos.

    Returns (n_positions, dim). Added to token embeddings; nothing is learned.
    """
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    angles = pos * inv_freq  # (P, dim/2)
    pe = torch.zeros(n_positions, dim)
    pe[:, 0::2] = angles.sin()
    pe[:, 1::2] = angles.cos()[:, : dim // 2]
    return pe


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, float] | None = None) -> Tensor:
    """Per-pair rotation speeds theta_i = base^(-2i/d); optionally Llama 3.1's long-context rescaling.

    Llama 3.1 slows the low frequencies (long wavelengths) by `factor`, keeps the high ones, and blends in
    between, so a model trained at 8k positions extrapolates to 128k.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(
    head_dim: int, n_positions: int, base: float, scaling: dict[str, float] | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, frequency) angle, duplicated to the full head: (n_positions, head_dim)."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)  # (P, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (P, hd): pairs are (i, i + hd/2), "rotate half" layout
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its position's angle. x: (B, H, T, hd); cos/sin: (B, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin
