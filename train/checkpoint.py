"""Sharded training checkpoints (DCP), auto-resume, and safetensors export for inference.

A checkpoint is one directory per step, complete only once its marker exists:

    RUN/checkpoints/step-000123/
        .metadata, __0_0.distcp, ...   DCP: model, optimizer and EMA, each rank its shards
        rank-00000.pt ...              per rank: RNG states and the data source's state
        train_state.json               step, lr-scheduler state, world size (rank 0)
        COMPLETE                       written last, by rank 0, after every rank finished

Every rank writes only its own shards (`get_state_dict` gives DTensor shards under
FSDP2): nothing is gathered on rank 0. A directory without COMPLETE is a save that was
cut off; resume skips it and pruning removes it. Keys are the plain model's names, so
a checkpoint loads whatever the world size, activation checkpointing or compile (DCP
reshards on load). With another world size, the data source gets the list of every
saved rank's data state to redistribute, and RNG states start fresh.

Export (`export_safetensors`) gathers the full state dict once, at the end, onto rank 0's
CPU: `RUN/export/{model,ema}.safetensors` + `unified_config.json` (+ the ViT's HF config),
which `load_exported` turns back into a MoTModel without the training code.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from weft.model.mot import MoTModel, UnifiedConfig
from weft.train.config import CheckpointConfig
from weft.train.ema import EMA, clean_name
from weft.train.parallel import DistInfo, barrier

log = logging.getLogger("weft.train")

MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (reported with its path)."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step-{step:06d}"


def step_export_dir(run_dir: str | Path, step: int) -> Path:
    """Where `checkpoint.export_steps` puts step's inference weights (RUN/export is the end)."""
    return Path(run_dir) / f"export-step-{step:06d}"


def _step_dirs(run_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every step directory, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / MARKER).is_file()))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    return [path for _, path, complete in _step_dirs(run_dir) if complete]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def read_train_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAIN_STATE).read_text())


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load; that is what we mean, so hush it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) "
                                "in a single process.*")
        yield


# ---- RNG ----------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (torch CPU and device, Python, NumPy) as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---- save / load --------------------------------------------------------------------------

def optimizer_groups(optim_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each parameter group of an optimizer state dict (`get_state_dict`'s, parameters by
    name) as its size and a digest of its parameters' names: what must match for the state
    to load into another optimizer."""
    from weft.schemas.ids import hash_of

    return [{"params": len(group["params"]), "names": hash_of(list(group["params"]),
                                                              length=12)}
            for group in optim_state["param_groups"]]


def _saved_group_count(saved_keys: Any) -> int:
    """How many parameter groups a DCP checkpoint's optimizer state has (from its keys:
    `optim.param_groups.<i>.<field>`), for checkpoints that did not record their groups."""
    prefix = "optim.param_groups."
    return len({key[len(prefix):].split(".", 1)[0] for key in saved_keys
                if key.startswith(prefix)})


def _check_optimizer_groups(path: Path, train_state: dict[str, Any], saved_keys: Any,
                            current: list[dict[str, Any]]) -> None:
    """Refuse, before loading anything, a checkpoint whose optimizer groups its parameters
    otherwise than this run's: loading it would fail deep in torch, or silently give one
    group's moments and learning rate to another's parameters."""
    saved = train_state.get("optimizer_groups")
    if saved is not None:
        if saved == current:
            return
        was = f"groups of {[group['params'] for group in saved]} parameters"
    else:
        count = _saved_group_count(saved_keys)
        if count == len(current):
            return
        was = f"{count} parameter groups"
    sizes = [group["params"] for group in current]
    raise CheckpointError(
        f"{path}: its optimizer state has {was}, this run's optimizer has groups of {sizes} "
        "parameters: the optimizer was built otherwise (another weft version, or a setting "
        "that groups parameters, such as optim.vit_lr_scale), so its state cannot be "
        "restored; resume with what saved it, or train into a new run_dir")


@dataclass
class Restored:
    """What a loaded checkpoint hands back to the loop (model and optimizer load in place)."""

    step: int
    path: Path
    data_state: Any = None
    train_state: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Saves and loads step directories for one run; all ranks call every method."""

    def __init__(self, run_dir: str | Path, config: CheckpointConfig, info: DistInfo) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.info = info

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               ema: EMA | None) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if ema is not None and ema.enabled:
            state["ema"] = ema.state_dict()
        return state

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None,
             data_state: Any = None) -> Path:
        """Write step-NNNNNN (sharded), then its marker, then prune old ones."""
        path = step_dir(self.run_dir, step)
        if self.info.is_main and path.exists():
            shutil.rmtree(path)  # a cut-off save of this step, or a re-save after resume
        barrier(self.info)
        t0 = time.perf_counter()
        state = self._state(model, optimizer, ema)
        groups = optimizer_groups(state["optim"])
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(path), no_dist=not self.info.initialized)
        torch.save({"rng": rng_state(self.info.device), "data": data_state,
                    "world_size": self.info.world_size},
                   path / f"rank-{self.info.rank:05d}.pt")
        if self.info.is_main:
            train_state = {"step": step, "world_size": self.info.world_size,
                           "scheduler": scheduler.state_dict(), "time": time.time(),
                           "optimizer_groups": groups}
            (path / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
        barrier(self.info)  # every rank's shards and files are on disk
        if self.info.is_main:
            tmp = path / f".{MARKER}.tmp"
            tmp.write_text(json.dumps({"step": step}))
            tmp.rename(path / MARKER)
            self.prune()
        barrier(self.info)
        log.info("checkpoint: step %d saved to %s in %.1fs", step, path,
                 time.perf_counter() - t0)
        return path

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older and cut-off ones."""
        dirs = _step_dirs(self.run_dir)
        complete = [step for step, _, done in dirs if done]
        if not complete:
            return
        keep = set(complete[-self.config.keep_last:])
        newest = complete[-1]
        for step, path, done in dirs:
            if (done and step not in keep) or (not done and step < newest):
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, ema: EMA | None,
             restore_rng: bool = True) -> Restored:
        """Load a complete checkpoint in place into model, optimizer, scheduler and EMA."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER})")
        t0 = time.perf_counter()
        state = self._state(model, optimizer, ema)
        saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        train_state = read_train_state(path)
        _check_optimizer_groups(path, train_state, saved_keys, optimizer_groups(state["optim"]))
        has_ema = any(key.startswith("ema.") for key in saved_keys)
        if "ema" in state and not has_ema:
            log.warning("checkpoint %s has no EMA: the EMA restarts from the loaded weights",
                        path)
            del state["ema"]
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not self.info.initialized)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if ema is not None and ema.enabled:
            if "ema" in state:
                ema.load_state_dict(state["ema"])
            else:
                ema.shadow = EMA(model, ema.decay).shadow
        scheduler.load_state_dict(train_state["scheduler"])
        data_state: Any = None
        saved_world = int(train_state.get("world_size", 0))
        if saved_world == self.info.world_size:
            per_rank = torch.load(path / f"rank-{self.info.rank:05d}.pt", weights_only=True)
            data_state = per_rank["data"]
            if restore_rng:
                set_rng_state(per_rank["rng"], self.info.device)
        else:
            # Another world size: the data source gets every rank's state to redistribute;
            # RNG states do not map to the new ranks (the flow noise is seeded per step).
            log.warning("checkpoint %s was saved by %d ranks, this run has %d: the data "
                        "source gets every saved rank's state; RNG states start fresh",
                        path, saved_world, self.info.world_size)
            states = [torch.load(path / f"rank-{r:05d}.pt", weights_only=True)["data"]
                      for r in range(saved_world)]
            data_state = None if all(s is None for s in states) else states
        log.info("checkpoint: resumed from %s (step %d) in %.1fs", path, train_state["step"],
                 time.perf_counter() - t0)
        return Restored(int(train_state["step"]), path, data_state, train_state)


# ---- export -------------------------------------------------------------------------------

def _full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU ({} on other ranks), plain names."""
    if info.initialized:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = {clean_name(k): v.detach().cpu() for k, v in model.state_dict().items()}
    return state if info.is_main else {}


def _gather_ema(ema: EMA, info: DistInfo) -> dict[str, torch.Tensor]:
    """EMA tensors gathered whole, one at a time, kept on rank 0's CPU."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in ema.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if info.is_main:
            out[name] = full.detach().cpu()
    return out


def _savable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, one storage each (safetensors refuses shared ones: tied
    embeddings are written twice)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def export_safetensors(out_dir: str | Path, model: nn.Module, unified: UnifiedConfig,
                       info: DistInfo, ema: EMA | None = None,
                       metadata: dict[str, Any] | None = None) -> Path:
    """Write model (and EMA) weights as safetensors plus the configs; all ranks call it.

    out_dir gets model.safetensors, ema.safetensors (the model's state with the EMA in
    place of the trainable weights), unified_config.json, vit/config.json when the model
    has a ViT, and export.json (step, source). Only rank 0 writes.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    full = _full_state_dict(model, info)
    ema_full = _gather_ema(ema, info) if ema is not None and ema.enabled else {}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt"}
        save_file(_savable(full), str(out / "model.safetensors"), metadata=meta)
        if ema_full:
            missing = set(ema_full) - set(full)
            if missing:
                raise CheckpointError(f"EMA names not in the model: {sorted(missing)[:5]}")
            save_file(_savable({**full, **ema_full}), str(out / "ema.safetensors"),
                      metadata=meta)
        (out / "unified_config.json").write_text(unified.model_dump_json(indent=1))
        vision = getattr(model, "vision", None)
        if vision is not None:
            (out / "vit").mkdir(exist_ok=True)
            vision.model.config.to_json_file(str(out / "vit" / "config.json"))
        (out / "export.json").write_text(json.dumps(
            {"weights": ["model"] + (["ema"] if ema_full else []), **(metadata or {})},
            indent=1))
    barrier(info)
    return out


def load_exported(path: str | Path, weights: str = "ema",
                  device: torch.device | str = "cpu") -> MoTModel:
    """A MoTModel from an export directory: `weights` "ema" (falls back to "model" when
    the run had no EMA) or "model". Safetensors only: no pickle is read."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "unified_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no exported model at {path} (unified_config.json missing)")
    unified = UnifiedConfig.model_validate_json(config_file.read_text())
    file = path / f"{weights}.safetensors"
    if weights == "ema" and not file.is_file():
        file = path / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no {file.name} in {path}")
    vision = None
    if unified.vit_path is not None:
        vision = _vision_from_config(path / "vit") if (path / "vit").is_dir() else None
        if vision is None:
            vision = MoTModel.build(unified).vision
    model = MoTModel(unified, vision)
    state = load_file(str(file))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _vision_from_config(path: Path) -> nn.Module:
    """A SigLIP2 tower shaped by an exported HF config (weights come from the export)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from weft.model.vision import VisionEncoder, quiet_transformers

    config = Siglip2VisionConfig.from_json_file(str(path / "config.json"))
    with quiet_transformers():
        return VisionEncoder(Siglip2VisionModel(config))


def export_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None,
                      out_dir: str | Path | None = None) -> Path:
    """Export a DCP checkpoint of `run_dir` (default: the latest) in one process.

    Reads RUN/config.json for the model, loads model and EMA shards (DCP reshards to
    one process), writes safetensors to `out_dir` (default RUN/export). For runs that
    were stopped before their end, or to export an older step.
    """
    from weft.train.config import TrainConfig

    run_dir = Path(run_dir)
    config = TrainConfig.model_validate_json((run_dir / "config.json").read_text())
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None or not (path / MARKER).is_file():
        raise CheckpointError(f"no complete checkpoint in {run_dir}")
    model = MoTModel.build(config.model.unified)
    if config.model.freeze_vit and model.vision is not None:
        model.vision.requires_grad_(False)
    ema = EMA(model, config.model.ema_decay)
    state: dict[str, Any] = {"model": {clean_name(k): v for k, v in
                                       model.state_dict().items()}}
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if ema.enabled and any(k.startswith("ema.") for k in saved):
        state["ema"] = ema.state_dict()
    else:
        ema = None
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    step = read_train_state(path)["step"]
    return export_safetensors(out_dir or run_dir / "export", model, config.model.unified,
                              info, ema, metadata={"step": step, "checkpoint": str(path)})
