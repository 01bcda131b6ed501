"""Attention over a packed batch with the generalized causal mask, by backend.

`build_attention_mask(batch, backend)` prepares what a backend needs once per batch
(every layer reuses it); `attend(q, k, v, mask)` runs attention. Shapes: q
[1, Hq, L, D], k and v [1, Hkv, L, D] with Hq a multiple of Hkv (grouped-query
attention); returns [1, Hq, L, D].

Backends:
- `dense`: the reference. A [L, L] boolean mask from `model/masks.py` through
  `scaled_dot_product_attention` (O(L^2) memory; fine for tests and short packs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from weft.model.masks import dense_mask
from weft.model.packed import PackedBatch

Backend = Literal["dense", "flex"]


@dataclass
class AttentionMask:
    """A batch's mask in the form its backend wants."""

    backend: Backend
    length: int
    dense: torch.Tensor | None = None
    block_mask: Any = None


def build_attention_mask(batch: PackedBatch, backend: Backend = "dense") -> AttentionMask:
    if backend == "dense":
        return AttentionMask("dense", batch.length, dense=dense_mask(batch))
    raise ValueError(f"unknown attention backend {backend!r}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
           scale: float | None = None) -> torch.Tensor:
    if mask.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    raise ValueError(f"unknown attention backend {mask.backend!r}")
