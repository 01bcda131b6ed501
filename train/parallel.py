"""Process group, device, and the parallelisms applied to a plain MoTModel from outside.

torchtitan's order, block by block, then the root:

    activation checkpointing (checkpoint_wrapper, non-reentrant)   per decoder block
    torch.compile                                                  per decoder block
    FSDP2 fully_shard                                              per decoder block, then root

The root FSDP unit holds everything outside the decoder blocks: token embedding, LM
head, final norms, ViT encoder and connector, latent projections, timestep embedder.
The frozen VAE (LatentCodec) is not a module of the model and is never wrapped.

Ranks see different packs, so an expert, the ViT or the LM head may get no gradient
on one rank and a gradient on another. FSDP2 reduce-scatters only the gradients a
rank has, so the collectives would disagree and hang; `set_reduce_scatter_unused_params`
makes every rank contribute zeros for its unused parameters (like DDP's
find_unused_parameters).

Gradients: FSDP2 averages gradients over ranks (reduce-scatter with a 1/world_size
scale). The loop scales each rank's loss by world_size / global token count, so the
average is the gradient of the global per-token mean (see `train/loop.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from weft.train.config import ParallelConfig

log = logging.getLogger("weft.train")


class ParallelConfigError(ValueError):
    """A parallel setting this world or device cannot honour (reported at start-up)."""


@dataclass
class DistInfo:
    """Where this process sits: rank, world, device, and whether we own the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is there (or asked for), else cpu."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ParallelConfigError("parallel.device is 'cuda' but CUDA is not available")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto", need_group: bool = False,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group from torchrun's env vars.

    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun (and Ray
    Train) set them. A group that already exists (Ray Train makes one) is reused. A
    single process gets a group only when `need_group` (FSDP2 needs a mesh even for
    one rank); it is an in-memory one (HashStore), no port needed.
    Backend: gloo on CPU; nccl for CUDA tensors plus gloo for CPU ones on GPU.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not need_group:
        return DistInfo(0, 1, local_rank, dev, None)
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    else:
        dist.init_process_group(init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local_rank, dev, backend, owns_group=True)


def destroy_distributed(info: DistInfo) -> None:
    """Tear down the group if this module created it (Ray Train owns its own)."""
    if info.owns_group and info.initialized:
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


# ---- what to apply ------------------------------------------------------------------------

@dataclass
class ParallelPlan:
    """The resolved parallel settings for this run (what the start-up line reports)."""

    fsdp: bool
    param_dtype: torch.dtype
    activation_checkpointing: bool
    compile: bool
    reshard_after_forward: bool = True

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 without FSDP runs under autocast (FSDP2 casts the weights itself)."""
        return self.param_dtype if (not self.fsdp and self.param_dtype != torch.float32) \
            else None


def plan_parallelism(config: ParallelConfig, info: DistInfo) -> ParallelPlan:
    """Resolve the `auto` values for this world size and device; refuse what cannot work."""
    fsdp = {"on": True, "off": False, "auto": info.world_size > 1}[config.fsdp]
    if info.world_size > 1 and not fsdp:
        raise ParallelConfigError(
            f"parallel.fsdp is 'off' with {info.world_size} ranks: plain data parallelism is "
            "not implemented; use fsdp 'auto' or 'on' (FSDP2), or run one process")
    if config.mixed_precision == "auto":
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    else:
        dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    return ParallelPlan(fsdp=fsdp, param_dtype=dtype,
                        activation_checkpointing=config.activation_checkpointing,
                        compile=config.compile,
                        reshard_after_forward=config.reshard_after_forward)


def apply_parallelism(model: nn.Module, plan: ParallelPlan, info: DistInfo) -> nn.Module:
    """AC, compile and FSDP2 on `model.backbone.layers` and the root; moves to the device.

    Works in place (blocks are replaced inside the ModuleList) and returns the model.
    Parameter names seen by `get_state_dict` stay those of the plain model: DCP strips
    the wrapper prefixes (`_checkpoint_wrapped_module.`, `_orig_mod.`).

    With FSDP over several ranks, rank 0's weights and buffers are what every rank
    trains from: the other ranks may pass a model built on the meta device
    (`MoTModel.build(on_meta=True)`), which is allocated here, shard by shard, and
    filled from rank 0 (`broadcast_from_rank0`).
    """
    multi_rank = plan.fsdp and info.world_size > 1
    rank0_state = rank0_full_state(model, info) if multi_rank else {}
    layers = model.backbone.layers
    for i, block in enumerate(layers):
        if plan.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl,
                checkpoint_wrapper,
            )

            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if plan.compile:
            block = torch.compile(block)
        layers[i] = block
    if not plan.fsdp:
        return model.to(info.device)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not info.initialized:
        raise ParallelConfigError("FSDP2 needs a process group: call init_distributed("
                                  "need_group=True) first")
    mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    block_mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=torch.float32)
    # The root's inputs are the latents and noise: keep them fp32 so the flow target
    # ε − x0 is exact; the root's own weights still compute in param_dtype.
    root_mp = MixedPrecisionPolicy(param_dtype=plan.param_dtype, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
    for block in layers:
        fully_shard(block, mesh=mesh, mp_policy=block_mp,
                    reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
    else:  # older torch: ranks must then use the same parameters every step
        log.warning("this torch's FSDP2 lacks set_reduce_scatter_unused_params; ranks that "
                    "skip a part of the model (no ViT tokens, no labels) may hang")
    if multi_rank:
        broadcast_from_rank0(model, rank0_state, info)
        if info.is_main:
            others = info.world_size - 1
            log.info("model: rank 0's weights and buffers broadcast to %d other rank%s after "
                     "sharding", others, "s" if others > 1 else "")
    return model


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def rank0_full_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Rank 0's full state dict, taken before sharding (others: empty). Rank 0 must hold
    real weights: it is the one copy every rank receives."""
    if not info.is_main:
        return {}
    if _has_meta_tensors(model):
        raise ParallelConfigError("rank 0 built its model on the meta device; rank 0 must "
                                  "build (and load) the real weights that it broadcasts")
    return model.state_dict()


def broadcast_from_rank0(model: nn.Module, rank0_state: dict[str, torch.Tensor],
                         info: DistInfo) -> None:
    """Give every rank rank 0's weights and buffers, after `fully_shard`.

    A rank whose model is on the meta device allocates its shards (`to_empty`) first.
    Parameters and persistent buffers arrive one tensor at a time through
    `set_model_state_dict(broadcast_from_rank0=True)`, each rank keeping its shard, so no
    rank but 0 ever holds the full model; buffers that no state dict carries (RoPE
    frequencies) are broadcast whole. Ranks whose models were built for real end up
    with rank 0's values too (the same init whatever their seeds).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    if _has_meta_tensors(model):
        model.to_empty(device=info.device)
    set_model_state_dict(model, rank0_state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def autocast(plan: ParallelPlan, device: torch.device) -> Iterator[None]:
    """bf16 autocast when mixed precision is on without FSDP; a no-op otherwise."""
    if plan.autocast_dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=plan.autocast_dtype):
        yield


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` by the global L2 norm over all ranks' shards; returns the norm.

    With FSDP2 the gradients are DTensor shards: their norm is a partial value that
    `full_tensor()` reduces over the mesh (torchtitan's recipe).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def describe(plan: ParallelPlan, info: DistInfo, attention: str) -> str:
    """One start-up line: what was applied, so a log shows how the run really ran."""
    parts = [f"world {info.world_size}", f"rank {info.rank}", f"device {info.device}",
             f"backend {info.backend or 'none'}",
             "FSDP2 on (per block + root, "
             f"{'reshard' if plan.reshard_after_forward else 'keep'} after forward)"
             if plan.fsdp else "FSDP2 off",
             f"params {str(plan.param_dtype).removeprefix('torch.')}"
             + (" (FSDP2 mixed precision, fp32 reduce)" if plan.fsdp and
                plan.param_dtype != torch.float32 else
                " (autocast)" if plan.autocast_dtype is not None else ""),
             f"activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
             f"compile {'on' if plan.compile else 'off'}",
             attention]
    return "parallel: " + " | ".join(parts)
