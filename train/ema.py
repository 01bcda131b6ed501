"""Exponential moving average of the trainable weights, sharded like the weights.

    ema ← decay · ema + (1 − decay) · θ        after every optimizer step

Under FSDP2 each parameter is a DTensor shard; the EMA is a clone of it, so every rank
keeps only its shard of the EMA (no extra full copy anywhere) and DCP saves and loads
it sharded like the model. Updates run on the local shards with one foreach lerp.
The EMA stays fp32 whatever the compute dtype (FSDP2 keeps fp32 sharded parameters).
Keys are the plain model's parameter names, without wrapper prefixes, so a checkpoint
does not depend on activation checkpointing or compile being on.
"""

from __future__ import annotations

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that AC, compile and FSDP1 wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """EMA of `model`'s trainable parameters; `decay` 0 disables it (update is a no-op)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        if decay > 0:
            with torch.no_grad():
                self.shadow = {clean_name(n): p.detach().clone()
                               for n, p in model.named_parameters() if p.requires_grad}

    @property
    def enabled(self) -> bool:
        return bool(self.shadow)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        if params.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(params))[:5]
            raise ValueError(f"EMA and model disagree on trainable parameters: {missing}")
        names = list(self.shadow)
        return ([_local(self.shadow[n]) for n in names],
                [_local(params[n].detach()) for n in names])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current (sharded) weights."""
        if not self.enabled:
            return
        shadow, params = self._pairs(model)
        torch._foreach_lerp_(shadow, [p.to(s.dtype) for p, s in zip(params, shadow,
                                                                   strict=True)],
                             1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable weights with the EMA (for evaluation/export)."""
        shadow, params = self._pairs(model)
        torch._foreach_copy_(params, shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by parameter name (DTensors under FSDP2: DCP saves them sharded)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy loaded values in (DCP loads in place into `state_dict()`; this also
        accepts plain tensors from elsewhere)."""
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA state does not match the model's trainable parameters")
        for name, value in state.items():
            if value is not self.shadow[name]:
                self.shadow[name].copy_(value)
