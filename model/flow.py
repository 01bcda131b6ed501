"""Rectified flow for latent generation: timesteps, noising, the velocity target, Euler steps.

Sign conventions (used everywhere in weft):
    t = 0 is data, t = 1 is pure noise.
    x_t = (1 - t) · x0 + t · ε,        ε ~ N(0, I)
    v   = dx_t/dt = ε - x0             (the model's regression target)
Sampling integrates from t = 1 (noise) down to t = 0 (data), so dt = t_next - t < 0:
    x_{t_next} = x_t + (t_next - t) · v
With the exact velocity one step from t = 1 to 0 gives x0 = ε - v.

Training draws t logit-normal (t = sigmoid(z), z ~ N(0, 1)), then applies the
resolution shift t' = s·t / (1 + (s - 1)·t) (SD3 / FLUX); s > 1 pushes t towards the
noisy end, which larger images need because their pixels share more information.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift·t / (1 + (shift - 1)·t): monotone on [0, 1], keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(n: int, shift: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """[n] training timesteps in (0, 1): logit-normal, then shifted."""
    z = torch.randn(n, generator=generator, device=device)
    return shift_timesteps(torch.sigmoid(z), shift)


def _per_row(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t broadcast over x's trailing dims: a scalar, or one value per leading index."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def noise_latents(x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): x_t = (1 - t)·x0 + t·ε and the velocity target ε - x0.

    x0, noise: [n, ...]; t: a scalar or [n] (e.g. one value per latent token).
    """
    t = _per_row(t, x0)
    return (1.0 - t) * x0 + t * noise, noise - x0


def euler_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] timesteps from 1 down to 0: uniform, then shifted like training."""
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64),
                           shift).float()


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float,
               t_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when sampling)."""
    dt = _per_row(t_next, x_t) - _per_row(t, x_t)
    return x_t + dt * velocity


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                      scale: float = 1000.0) -> torch.Tensor:
    """[n] -> [n, dim] sinusoidal features of scale·t: [cos(scale·t·w_k), sin(scale·t·w_k)].

    t lives in [0, 1]; the scale (as in FLUX) spreads it over the frequencies, which
    were laid out for integer diffusion steps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (scale * t.float())[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=1)
    return features


class TimestepEmbedder(nn.Module):
    """t [n] -> [n, hidden]: sinusoidal features (dim 256) then Linear-SiLU-Linear.

    The result is added to the latent tokens of the image each t belongs to.
    """

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t.reshape(-1), self.freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))
