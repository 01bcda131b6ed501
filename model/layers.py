"""Qwen2-style building blocks: RMSNorm, SwiGLU MLP and rotary position embedding.

Numerics follow Qwen2 so a loaded checkpoint reproduces its logits: RMSNorm computes
in fp32 and casts back before the gain; RoPE uses the rotate-half layout with cos/sin
computed in fp32 from arbitrary integer positions (a packed batch restarts positions
per document and gives every token of an image the same position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables [L, head_dim] for given positions (Qwen2's default RoPE).

    With `spatial_pairs` > 0 the last 2 * spatial_pairs of the head_dim / 2 frequency
    pairs rotate by a token's (row, column) in its image (FLUX-style axes; 0 for text)
    instead of its sequence position, so attention can match image tokens by where they
    are, e.g. an edit's target token with the source token at the same place.
    """

    def __init__(self, head_dim: int, theta: float, spatial_pairs: int = 0,
                 spatial_theta: float = 100.0) -> None:
        super().__init__()
        half = head_dim // 2
        if 2 * spatial_pairs >= half:
            raise ValueError(f"2 x spatial_rope_pairs ({spatial_pairs}) must leave pairs for "
                             f"the sequence position (head_dim / 2 = {half})")
        self.spatial_pairs = spatial_pairs
        seq_pairs = half - 2 * spatial_pairs
        exponents = torch.arange(0, seq_pairs, dtype=torch.float32) * 2 / head_dim
        # Non-persistent: a pure function of (head_dim, theta), kept out of checkpoints.
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)
        axis = torch.arange(spatial_pairs, dtype=torch.float32) / max(spatial_pairs, 1)
        self.register_buffer("spatial_freq", 1.0 / spatial_theta**axis, persistent=False)

    def forward(self, position_ids: torch.Tensor, spatial: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [L]; spatial [L, 2] (row, col; needed with spatial pairs)."""
        freqs = position_ids.float()[:, None] * self.inv_freq.float()[None, :]
        if self.spatial_pairs:
            if spatial is None:
                raise ValueError("spatial RoPE needs each token's (row, col)")
            f = self.spatial_freq.float()[None, :]
            freqs = torch.cat([freqs, spatial[:, :1].float() * f, spatial[:, 1:].float() * f],
                              dim=-1)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [L, heads, head_dim] by cos/sin [L, head_dim] (cast to x's dtype)."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin
