"""Sampling pieces that need no model: two-scale classifier-free guidance, renormalisation,
the guidance interval, and the Euler loop.

Guidance (InstructPix2Pix's two-scale CFG, Brooks et al. 2023). Three velocities of the
same noised latents, predicted under three contexts:

    v_full         every condition (text and images)
    v_text_uncond  the images only: the text conditions dropped
    v_uncond       no conditions at all

    v = v_uncond + s_img · (v_text_uncond − v_uncond) + s_txt · (v_full − v_text_uncond)

It follows from p(x | I, T) ∝ p(x) · p(I | x) · p(T | I, x), one scale per factor, so
each scale pushes along its own condition. Why this one: with both scales 1 it is
v_full; with no image conditions the two unconditional contexts are the same context,
the image term vanishes and it is ordinary text CFG with scale s_txt (a sequential
"text CFG, then image CFG against a text-only context" form instead multiplies the
text scale by s_img in that case); and the three contexts are what a context that
drops its conditions gives, so nothing else is needed at inference.

Renormalisation: large scales inflate the velocity; `renormalize` scales the guided
velocity down so its norm is at most the conditional one (v_full), over the whole image
("global") or per token ("token"). It never scales up.

Interval: guidance is applied only for t inside `interval` (t = 1 noise, t = 0 data);
outside it the sampler uses v_full and can skip the unconditional forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from weft.model.flow import euler_step

RenormMode = Literal["none", "global", "token"]


def cfg_combine(v_full: torch.Tensor, v_text_uncond: torch.Tensor, v_uncond: torch.Tensor,
                text_scale: float, image_scale: float) -> torch.Tensor:
    """Two-scale CFG (see the module doc): all inputs the same shape."""
    return (v_uncond + image_scale * (v_text_uncond - v_uncond)
            + text_scale * (v_full - v_text_uncond))


def renormalize(guided: torch.Tensor, conditional: torch.Tensor,
                mode: RenormMode = "global", eps: float = 1e-8) -> torch.Tensor:
    """Scale `guided` down where its norm exceeds the conditional velocity's.

    guided, conditional: [n_tokens, dim] for one image. global: one factor from the
    norms over the whole image; token: one factor per token (row); none: unchanged.
    """
    if mode == "none":
        return guided
    if mode == "global":
        factor = conditional.norm() / (guided.norm() + eps)
    elif mode == "token":
        factor = conditional.norm(dim=-1, keepdim=True) / (
            guided.norm(dim=-1, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown renorm mode {mode!r}")
    return guided * factor.clamp(max=1.0)


@dataclass(frozen=True)
class Guidance:
    """Scales, the interval of t where they apply, and the renormalisation."""

    text_scale: float = 4.0
    image_scale: float = 1.5
    interval: tuple[float, float] = (0.4, 1.0)
    renorm: RenormMode = "global"

    def __post_init__(self) -> None:
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval {self.interval} is not inside [0, 1]")
        if self.renorm not in ("none", "global", "token"):
            raise ValueError(f"unknown renorm mode {self.renorm!r}")

    def active(self, t: float) -> bool:
        """Whether guidance applies at t (and the unconditional velocities are needed)."""
        low, high = self.interval
        scaled = self.text_scale != 1.0 or self.image_scale != 1.0
        return scaled and low <= float(t) <= high

    def __call__(self, t: float, v_full: torch.Tensor, v_text_uncond: torch.Tensor | None,
                 v_uncond: torch.Tensor | None) -> torch.Tensor:
        """The velocity to integrate at t: v_full outside the interval, else guided."""
        if not self.active(t):
            return v_full
        if v_text_uncond is None or v_uncond is None:
            raise ValueError(f"guidance is active at t={float(t):.3f} but the "
                             "unconditional velocities are missing")
        guided = cfg_combine(v_full, v_text_uncond, v_uncond, self.text_scale,
                             self.image_scale)
        return renormalize(guided, v_full, self.renorm)


Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def euler_sample(x: torch.Tensor, velocity: Velocity, timesteps: torch.Tensor
                 ) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) over `timesteps` (from 1 down to 0, e.g.
    `flow.euler_timesteps`), starting from noise x; returns the final x (the data)."""
    for t, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist(), strict=True):
        x = euler_step(x, velocity(x, t), t, t_next)
    return x
