"""The generalized causal attention rule over a packed batch, as a dense reference mask.

The rule (see `model/packed.py`): token i attends to token j iff they share a document
and either j lies in an earlier split and is not a noised latent (causal across
splits; noised latents stay hidden from everything after them), or j lies in the same
split and that split is full attention (an image) or j <= i (text). Every token also
attends to itself, so no row is empty (padding attends only to itself).

`allowed(...)` is written over index tensors so the same function is the dense mask
(over a full grid) and the FlexAttention `mask_mod` (over scalars).
"""

from __future__ import annotations

import torch

from weft.model.packed import PackedBatch, TokenKind


def allowed(q: torch.Tensor, kv: torch.Tensor, doc: torch.Tensor, split: torch.Tensor,
            full: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
    """Whether query positions q may attend to key positions kv (broadcasting)."""
    same_doc = (doc[q] == doc[kv]) & (doc[q] >= 0)
    earlier = (split[kv] < split[q]) & ~noised[kv]
    same_split = (split[kv] == split[q]) & (full[q] | (kv <= q))
    return (same_doc & (earlier | same_split)) | (q == kv)


def mask_fields(batch: PackedBatch) -> tuple[torch.Tensor, ...]:
    """(doc, split, full, noised) per token: what the rule reads."""
    return (batch.doc_ids, batch.split_ids, batch.full_attention,
            batch.kind == TokenKind.VAE_NOISED)


def dense_mask(batch: PackedBatch) -> torch.Tensor:
    """The [length, length] boolean mask (True = may attend): the reference."""
    n = batch.length
    idx = torch.arange(n, device=batch.kind.device)
    return allowed(idx[:, None], idx[None, :], *mask_fields(batch))
