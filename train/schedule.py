"""Learning-rate schedule: linear warm-up, then constant or cosine down to a floor.

A pure function of the step, so a resumed run gets exactly the lr it would have had
(the LambdaLR around it only stores the step). Step s (0-based) is the s-th optimizer
step:

    warm-up   s < W:        lr · (s + 1) / (W + 1)     never 0, so step 0 still learns
    constant  s >= W:       lr
    cosine    s >= W:       lr · (m + (1 - m) · ½(1 + cos(π · p))),  p = (s - W) / (T - W)
                            reaching lr · m at s = T (and staying there past T)

with W = warmup_steps, T = decay_steps (default: the run's steps), m = min_lr_ratio.
"""

from __future__ import annotations

import math

import torch

from weft.train.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int,
              schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    """The multiplier of the peak lr at optimizer step `step` (see the module doc)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; its state (the step) goes into each checkpoint."""
    decay = config.decay_steps or total_steps

    def factor(step: int) -> float:
        return lr_factor(step, config.warmup_steps, decay, config.schedule,
                         config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
