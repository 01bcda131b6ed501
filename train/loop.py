"""The training loop: packed batches in, a trained MoT model, checkpoints and metrics out.

One step on every rank, over its A = `optim.grad_accum_steps` packs (micro-batches):

    CE, MSE = loss tokens of the A packs, all-reduced            (global token counts)
    for each pack i:
        pack.to(device) → latents = codec.encode(pack.vae_images) (frozen VAE, no grad)
        → model(pack, latents, generator=noise(seed, step, rank · A + i))
                                  → ce_sum_i, mse_sum_i
        → backward of W · (ce_weight · ce_sum_i / CE + mse_weight · mse_sum_i / MSE)
          (FSDP2 reduces gradients on the last pack only)
    → all-reduce the loss sums (metrics) → clip (global norm) → AdamW step → lr step
    → EMA update → metrics (every N) → checkpoint (every N, and at the end) → export

Accumulating A packs on one rank gives the same gradient as the A packs spread over A
ranks: the tokens pool, so a pack weighs what its tokens weigh, not 1/A.

Why `W ·` (W = world size): FSDP2 averages gradients over ranks, so the applied gradient
is (1/W) Σ_r ∇loss_r = ∇(ce_weight · Σ_r ce_sum_r / CE_global + ...), the gradient of the
global per-token mean, whatever the split of tokens over ranks. A pack with few labelled
tokens therefore weighs what its tokens weigh, not as much as a full pack.

Every trainable parameter gets a gradient every step (zero where a rank's pack did not
use it: no ViT tokens, no labels), with or without FSDP, so AdamW sees the same thing
whatever the world size (FSDP2: `set_reduce_scatter_unused_params`).

Exact resume: model init is seeded, the noise generator is seeded per (seed, step,
pack), the data source restores its position, and model, optimizer, lr schedule, EMA
and RNG states come back from the checkpoint. N steps straight and k steps + resume
to N give the same losses at every step and the same weights.

The data comes from a `DataSource`: any iterable of PackedBatch with `state_dict()` /
`load_state_dict()`; by default the shard loader of `config.data` (`ShardSource`:
`weft.train.data`'s DataLoader and DataStateTracker), or a test source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from weft.model.attention_backends import describe_backend
from weft.model.mot import LossOutput, MoTModel, loss_token_counts
from weft.model.packed import PackedBatch
from weft.train.checkpoint import (
    Checkpointer,
    export_safetensors,
    latest_checkpoint,
    step_export_dir,
)
from weft.train.config import LossConfig, OptimConfig, TrainConfig, TrainConfigError
from weft.train.ema import EMA, clean_name
from weft.train.latent_cache import LatentCache
from weft.train.metrics import MetricsLogger
from weft.train.parallel import (
    DistInfo,
    apply_parallelism,
    autocast,
    barrier,
    clip_grad_norm,
    describe,
    destroy_distributed,
    init_distributed,
    plan_parallelism,
)
from weft.train.schedule import build_scheduler

log = logging.getLogger("weft.train")


@runtime_checkable
class DataSource(Protocol):
    """Packed batches for this rank, with a resumable position.

    `load_state_dict` gets this rank's saved state, or, when the world size changed
    since the checkpoint, the list of every saved rank's state (the shard loader deals
    the unread shards out again; a source that cannot should raise).
    """

    def __iter__(self) -> Iterator[PackedBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LatentEncoder(Protocol):
    """What the loop needs of the frozen VAE (`model/vae.py` LatentCodec)."""

    def encode(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


class ShardSource:
    """The shard loader (`weft.train.data`) as a DataSource.

    Its DataLoader yields DataPacks (a batch plus the state of the reader that made it);
    this yields the batches and hands every pack to a DataStateTracker, whose state is
    what checkpoints save. Packs prefetched but not consumed are made again on resume.
    """

    def __init__(self, loader: Any) -> None:
        from weft.train.data import DataStateTracker

        self.loader = loader
        self.tracker = DataStateTracker(loader)

    def __iter__(self) -> Iterator[PackedBatch]:
        for pack in self.loader:
            yield self.tracker.observe(pack).batch

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.tracker.load_state_dict(state)


@dataclass
class StepLosses:
    """One optimizer step's global numbers (identical on every rank)."""

    step: int  # the step count after this step (1 for the first)
    loss: float
    ce: float
    mse: float
    ce_tokens: int
    mse_tokens: int
    grad_norm: float
    lr: float


@dataclass
class TrainResult:
    """What a run (or one invocation of a resumed run) did."""

    step: int
    start_step: int
    run_dir: Path
    history: list[StepLosses] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None

    @property
    def last(self) -> StepLosses | None:
        return self.history[-1] if self.history else None


# ---- pieces the loop (and tests) use ------------------------------------------------------

def noise_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for (run seed, step, stream): flow noise and timesteps of one pack of
    that step. stream = rank · grad_accum_steps + micro-batch, so the packs of a step get
    the same noise whether they are spread over ranks or accumulated on one."""
    digest = hashlib.sha256(f"weft-noise:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def noise_generator(seed: int, step: int, stream: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(noise_seed(seed, step, stream))


# Optim settings a resumed run takes from the checkpoint's optimizer (param groups) and
# LambdaLR (base_lrs) state rather than from its config.
RESTORED_OPTIM = ("lr", "betas", "eps", "weight_decay", "vit_lr_scale", "implementation")


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (no decay on norm gains and biases); the
    SigLIP2 encoder's parameters at `vit_lr_scale` times the learning rate."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            vit = clean_name(name).startswith("vision.")
            decay = p.ndim >= 2 and not name.endswith(".bias")
            groups.setdefault((vit, decay), []).append(p)
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "for-loop": {"foreach": False}}[config.implementation]
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
          "lr": config.lr * (config.vit_lr_scale if vit else 1.0)}
         for (vit, decay), params in sorted(groups.items())],
        lr=config.lr, betas=config.betas, eps=config.eps, **kernel)


def global_token_counts(packs: Sequence[PackedBatch], info: DistInfo) -> tuple[float, float]:
    """(CE, MSE): the loss tokens of this step's packs summed over all ranks, read from the
    packs before any forward (`loss_token_counts`), so each pack's loss can be scaled by
    the step's totals as it is backpropagated."""
    local = [loss_token_counts(p) for p in packs]
    counts = torch.tensor([float(sum(c for c, _ in local)), float(sum(m for _, m in local))],
                          dtype=torch.float64, device=info.device)
    if info.initialized and info.world_size > 1:
        dist.all_reduce(counts)
    ce_tokens, mse_tokens = counts.tolist()
    return ce_tokens, mse_tokens


def pack_loss(out: LossOutput, weights: LossConfig, counts: tuple[float, float],
              world_size: int) -> torch.Tensor:
    """One pack's share of the step's loss: W · (ce_w · ce_sum / CE + mse_w · mse_sum / MSE)
    with CE, MSE the step's global token counts (module doc: the W undoes FSDP2's
    average over ranks)."""
    ce_n, mse_n = max(counts[0], 1.0), max(counts[1], 1.0)
    return world_size * (weights.ce_weight * out.ce_sum / ce_n +
                         weights.mse_weight * out.mse_sum / mse_n)


def global_stats(sums: torch.Tensor, counts: tuple[float, float], weights: LossConfig,
                 info: DistInfo) -> dict[str, float]:
    """The step's global numbers from this rank's [ce_sum, mse_sum] over its packs."""
    if info.initialized and info.world_size > 1:
        dist.all_reduce(sums)
    ce_sum, mse_sum = sums.tolist()
    ce_tokens, mse_tokens = counts
    ce_n, mse_n = max(ce_tokens, 1.0), max(mse_tokens, 1.0)
    return {"ce_sum": ce_sum, "ce_tokens": ce_tokens, "mse_sum": mse_sum,
            "mse_tokens": mse_tokens, "ce": ce_sum / ce_n, "mse": mse_sum / mse_n,
            "loss": weights.ce_weight * ce_sum / ce_n + weights.mse_weight * mse_sum / mse_n}


def default_data_source(config: TrainConfig, info: DistInfo) -> DataSource:
    """This rank's shard loader over `config.data`; the tokenizer is `data.tokenizer`, else
    the one in `model.llm_checkpoint` (local directories)."""
    try:
        from weft.train.data import build_dataloader
    except ImportError as exc:
        raise TrainConfigError(f"the shard loader (weft.train.data) is not available: "
                               f"{exc}") from exc
    tokenizer = config.data.tokenizer or config.model.llm_checkpoint
    if tokenizer is None:
        raise TrainConfigError("data.tokenizer or model.llm_checkpoint must name a local "
                               "tokenizer directory")
    loader = build_dataloader(config.data, tokenizer, config.model.unified, info.rank,
                              info.world_size)
    return ShardSource(loader)


def build_codec(config: TrainConfig, info: DistInfo, dtype: torch.dtype) -> Any:
    """The frozen VAE from `model.vae_path` on this rank's device, or None without one."""
    if config.model.vae_path is None:
        return None
    from weft.model.vae import LatentCodec

    return LatentCodec.from_pretrained(config.model.vae_path, dtype=dtype, device=info.device,
                                       patch=config.model.unified.latent_patch)


# ---- the trainer --------------------------------------------------------------------------

class Trainer:
    """Builds everything for a run (resuming when there is a checkpoint); `train()` runs it.

    data: this rank's DataSource (default: `data_factory(config, info)`, which defaults
    to the shard loader). codec: the frozen VAE (default: from `model.vae_path`).
    """

    def __init__(self, config: TrainConfig, data: DataSource | None = None, *,
                 codec: LatentEncoder | None = None,
                 data_factory: Callable[[TrainConfig, DistInfo], DataSource] | None = None
                 ) -> None:
        self.config = config
        self.info = init_distributed(config.parallel.device,
                                     need_group=config.parallel.fsdp == "on")
        self.plan = plan_parallelism(config.parallel, self.info)
        self.run_dir = Path(config.run_dir)
        self._check_run_dir()

        torch.manual_seed(config.seed)
        # FSDP ranks but 0 build no weights: rank 0's arrive after sharding (parallel.py)
        on_meta = self.plan.fsdp and self.info.world_size > 1 and not self.info.is_main
        model = MoTModel.build(config.model.unified, config.model.llm_checkpoint,
                               on_meta=on_meta)
        if on_meta:
            log.info("model: built on the meta device; weights from rank 0 after sharding")
        if config.model.freeze_vit and model.vision is not None:
            model.vision.requires_grad_(False)
        self.model = apply_parallelism(model, self.plan, self.info)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.steps)
        self.ema = EMA(self.model, config.model.ema_decay)

        codec_dtype = self.plan.param_dtype if self.info.device.type == "cuda" else \
            torch.float32
        self.codec = codec if codec is not None else build_codec(config, self.info,
                                                                 codec_dtype)
        self.latent_cache = LatentCache(self.codec, int(config.data.latent_cache_mb * 2**20)) \
            if self.codec is not None and config.data.latent_cache_mb > 0 else None
        self.data = data if data is not None else \
            (data_factory or default_data_source)(config, self.info)
        self.checkpointer = Checkpointer(self.run_dir, config.checkpoint, self.info)
        self.metrics = MetricsLogger(self.run_dir, config.metrics, config.model.unified.llm,
                                     self.info, (config.loss.ce_weight,
                                                 config.loss.mse_weight), config.steps)
        self.step = 0
        self.start_step = 0
        self.resumed_from: Path | None = None
        self._iterator: Iterator[PackedBatch] | None = None
        self._resume()
        if self.info.is_main:
            attention = describe_backend(config.model.unified.llm.attention_backend,
                                         self.info.device)
            log.info("%s", describe(self.plan, self.info, attention))
            log.info("%s", self.metrics.describe())
            log.info("run %s: steps %d..%d%s", self.run_dir, self.step, config.steps,
                     f" (resumed from {self.resumed_from})" if self.resumed_from else "")

    # ---- set-up ----------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        """Refuse to resume a run of another model, or to start afresh over checkpoints;
        record this run's config (with the optim values a checkpoint brings back)."""
        path = self.run_dir / "config.json"
        current = self.config.model_dump(mode="json")
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and self.config.checkpoint.resume == "never":
            raise TrainConfigError(
                f"{self.run_dir} already holds checkpoints (latest {existing.name}) and "
                "checkpoint.resume is 'never': a fresh run would mix its steps with them; "
                "use another run_dir, or resume: auto")
        if path.is_file() and self.config.checkpoint.resume == "auto":
            previous = json.loads(path.read_text())
            if previous.get("model") != current["model"]:
                raise TrainConfigError(
                    f"{self.run_dir} holds checkpoints of a different model (the 'model' "
                    f"section of {path} differs from this config): use another run_dir, "
                    "or set checkpoint.resume: never to start over")
            if previous.get("data") != current["data"]:
                log.warning("the data section changed since %s was written; the data "
                            "position is restored as saved", path)
            before = previous.get("optim", {})
            restored = sorted(key for key in RESTORED_OPTIM
                              if key in before and before[key] != current["optim"][key])
            if restored and existing is not None:
                log.warning("optim %s changed since %s was written; the optimizer and "
                            "lr-scheduler state come back from the checkpoint with the old "
                            "values, so the change takes no effect on resume (warmup, "
                            "schedule and grad_clip do take new values)",
                            ", ".join(restored), path)
                # config.json records what takes effect, so a later resume warns again
                current["optim"].update({key: before[key] for key in restored})
        barrier(self.info)
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(current, indent=1))
        barrier(self.info)

    def _resume(self) -> None:
        if self.config.checkpoint.resume != "auto":
            return
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return
        restored = self.checkpointer.load(latest, self.model, self.optimizer, self.scheduler,
                                          self.ema)
        self.step = self.start_step = restored.step
        self.resumed_from = latest
        if restored.data_state is not None:
            self.data.load_state_dict(restored.data_state)

    # ---- one step --------------------------------------------------------------------------
    def _next_batch(self) -> PackedBatch:
        if self._iterator is None:
            self._iterator = iter(self.data)
        try:
            return next(self._iterator)
        except StopIteration:
            log.info("data: end of an epoch at step %d, starting the next", self.step)
            self._iterator = iter(self.data)
            try:
                return next(self._iterator)
            except StopIteration:
                raise RuntimeError("the data source yields no batches") from None

    def _encode(self, batch: PackedBatch, host: PackedBatch | None = None
                ) -> list[torch.Tensor]:
        """Latents of the batch's VAE images (`host`: the same batch before `.to(device)`,
        whose images key the latent cache)."""
        if not batch.vae_images:
            return []
        if self.codec is None:
            raise TrainConfigError("the data has VAE images but model.vae_path is not set: "
                                   "point it at a local FLUX-style AutoencoderKL directory")
        with torch.no_grad():
            if self.latent_cache is not None:
                return self.latent_cache.encode(batch.vae_images,
                                                (host or batch).vae_images)
            return self.codec.encode(batch.vae_images)

    def _next_packs(self) -> list[PackedBatch]:
        return [self._next_batch() for _ in range(self.config.optim.grad_accum_steps)]

    def _sync_gradients(self, sync: bool) -> None:
        """FSDP2: reduce-scatter gradients on the last pack of a step only."""
        if self.plan.fsdp:
            self.model.set_requires_gradient_sync(sync)

    def train_step(self, batch: PackedBatch | Sequence[PackedBatch]) -> StepLosses:
        """Forward and backward on each pack (micro-batch) of the step, their tokens pooled
        into one per-token loss; then clip, optimizer, lr and EMA step."""
        packs = [batch] if isinstance(batch, PackedBatch) else list(batch)
        if not packs:
            raise ValueError("a training step needs at least one pack")
        counts = global_token_counts(packs, self.info)
        sums = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        labelled: list[int] = []
        for i, host in enumerate(packs):  # host: token counts and cache keys, no syncs
            self._sync_gradients(i == len(packs) - 1)
            pack = host.to(self.info.device)
            latents = self._encode(pack, host)
            generator = noise_generator(self.config.seed, self.step,
                                        self.info.rank * len(packs) + i, self.info.device)
            with autocast(self.plan, self.info.device):
                out = self.model(pack, latents, generator=generator)
            pack_loss(out, self.config.loss, counts, self.info.world_size).backward()
            sums += torch.stack([out.ce_sum.detach().double(), out.mse_sum.detach().double()])
            labelled.append(out.ce_tokens)
        stats = global_stats(sums, counts, self.config.loss, self.info)
        if not math.isfinite(stats["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"loss is {stats['loss']} at step {self.step + 1} (ce "
                                     f"{stats['ce']}, mse {stats['mse']}); the last "
                                     f"checkpoint is {latest_checkpoint(self.run_dir)}")
        if not self.plan.fsdp:  # FSDP2 fills these itself (reduce_scatter_unused_params)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grad_norm = float(clip_grad_norm(self.params, self.config.optim.grad_clip))
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        self.metrics.record(packs, labelled, stats, lr, grad_norm)
        return StepLosses(self.step, stats["loss"], stats["ce"], stats["mse"],
                          int(stats["ce_tokens"]), int(stats["mse_tokens"]), grad_norm, lr)

    # ---- the run ---------------------------------------------------------------------------
    def save(self) -> Path:
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler,
                                      self.ema, self.data.state_dict())

    def export(self, out_dir: Path | None = None) -> Path:
        return export_safetensors(out_dir or self.run_dir / "export", self.model,
                                  self.config.model.unified, self.info, self.ema,
                                  metadata={"step": self.step})

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Run to `config.steps` (or stop after step `stop_at`, as if interrupted there).

        Saves every `checkpoint.every_steps` and at the last step of this call; exports
        safetensors when the run reaches `config.steps`, and at `checkpoint.export_steps`
        to RUN/export-step-NNNNNN.
        """
        end = self.config.steps if stop_at is None else min(stop_at, self.config.steps)
        result = TrainResult(self.step, self.start_step, self.run_dir)
        t0 = time.perf_counter()
        saved_at = self.start_step if self.resumed_from is not None else None
        while self.step < end:
            result.history.append(self.train_step(self._next_packs()))
            if self.metrics.should_log(self.step):
                self.metrics.log(self.step)
            if self.step % self.config.checkpoint.every_steps == 0:
                result.checkpoint = self.save()
                saved_at = self.step
            if self.step in self.config.checkpoint.export_steps:
                self.export(step_export_dir(self.run_dir, self.step))
        if self.metrics.window.steps:  # stopped between two metric lines
            self.metrics.log(self.step)
        if saved_at != self.step:
            result.checkpoint = self.save()
        elif result.checkpoint is None:
            result.checkpoint = latest_checkpoint(self.run_dir)
        result.step = self.step
        if self.step >= self.config.steps and self.config.checkpoint.export_safetensors and \
                (result.history or not (self.run_dir / "export").is_dir()):
            result.export_dir = self.export()
        if self.info.is_main:
            log.info("run %s: steps %d..%d in %.1fs; checkpoint %s%s", self.run_dir,
                     result.start_step, self.step, time.perf_counter() - t0,
                     result.checkpoint, f"; export {result.export_dir}"
                     if result.export_dir else "")
            if self.latent_cache is not None:
                log.info("%s", self.latent_cache.describe())
            (self.run_dir / "result.json").write_text(json.dumps(
                {"step": self.step, "start_step": result.start_step,
                 "last": asdict(result.last) if result.last else None,
                 "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                 "export_dir": str(result.export_dir) if result.export_dir else None},
                indent=1))
        return result

    def close(self) -> None:
        self.metrics.close()
        destroy_distributed(self.info)


def run_training(config: TrainConfig, data: DataSource | None = None, *,
                 codec: LatentEncoder | None = None, stop_at: int | None = None,
                 data_factory: Callable[[TrainConfig, DistInfo], DataSource] | None = None
                 ) -> TrainResult:
    """Build, resume if possible, train to `config.steps` (or `stop_at`), save, export."""
    trainer = Trainer(config, data, codec=codec, data_factory=data_factory)
    try:
        return trainer.train(stop_at=stop_at)
    finally:
        trainer.close()
