"""The training config: pydantic models loaded from YAML, every default visible.

`configs/train.yaml` is generated from these models (`weft config defaults train
--write`). A bad value fails at start-up with one message (`load_train_config`).
Sections: model (the unified model and where its parts load from), data (shards,
tokenizer, images, packing, CFG dropout), optim, loss, checkpoint, metrics, parallel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from weft.model.mot import UnifiedConfig
from weft.schemas.config_doc import deep_merge, read_yaml_mapping, validation_problems


class TrainConfigError(ValueError):
    """A bad training configuration: reported once, before any work."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    """What to train and where its pretrained parts come from (local directories)."""

    unified: UnifiedConfig = Field(default_factory=UnifiedConfig,
                                   description="the MoT model (llm, ViT, latent and flow)")
    llm_checkpoint: str | None = Field(None, description="local Qwen2/Qwen2.5 directory "
                                       "(safetensors); null = random init")
    vae_path: str | None = Field(None, description="local FLUX-style AutoencoderKL directory "
                                 "(frozen); required when the data has VAE images")
    freeze_vit: bool = Field(False, description="keep the SigLIP2 encoder frozen")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA of the trainable weights; "
                                                             "0 = no EMA")


class ImageConfig(_Strict):
    """How shard images become ViT patches and VAE inputs (sizes in pixels)."""

    vit_max_patches: int = Field(256, gt=0, description="ViT patches per image at most "
                                                        "(native aspect ratio, NaViT)")
    vae_max_side: int = Field(512, gt=0, description="longer side of a VAE image at most")
    vae_min_side: int = Field(64, gt=0, description="shorter side at least (upscaled)")
    max_pixels: int = Field(64_000_000, gt=0, description="refuse larger images before "
                                                          "decoding (decompression bombs)")


class PackConfig(_Strict):
    """Token budgets of a pack (one packed sequence per step and rank)."""

    expected_tokens: int = Field(4096, gt=0, description="close a pack once it holds this "
                                                         "many tokens")
    max_tokens: int = Field(4608, gt=0, description="a pack never holds more")
    max_tokens_per_sample: int = Field(2048, gt=0, description="longer samples are cut at "
                                                               "an item boundary or skipped")
    overflow_buffer: int = Field(32, ge=0, description="samples held back that did not fit, "
                                                       "tried first for the next pack")
    pad_multiple: int = Field(128, gt=0, description="packs are padded to a multiple of this "
                                                     "(static shapes for compiled attention)")

    @model_validator(mode="after")
    def _budgets(self) -> PackConfig:
        if not self.expected_tokens <= self.max_tokens:
            raise ValueError("pack.expected_tokens must be <= pack.max_tokens")
        if self.max_tokens_per_sample > self.max_tokens:
            raise ValueError("pack.max_tokens_per_sample must be <= pack.max_tokens")
        return self


class CfgDropoutConfig(_Strict):
    """Condition dropout for classifier-free guidance, each condition its own rate."""

    text: float = Field(0.1, ge=0, le=1, description="drop the text conditions of a "
                                                     "generated image")
    vit: float = Field(0.5, ge=0, le=1, description="drop the ViT tokens of condition images")
    vae: float = Field(0.1, ge=0, le=1, description="drop the clean latents of condition "
                                                    "images")


class DataConfig(_Strict):
    """Which shards, how they are read, planned and packed."""

    shards: str = Field("runs/demo-shards", description="a mixture folder (mixture.json) or "
                                                        "one shard set (index.json)")
    tokenizer: str | None = Field(None, description="local Hugging Face tokenizer directory; "
                                  "null = the llm_checkpoint's")
    resampled: bool = Field(False, description="sample shards with replacement forever "
                                               "instead of epochs")
    num_workers: int = Field(2, ge=0, description="DataLoader workers per rank")
    seed: int = Field(0, description="shard order, mixture sampling and dropout seed")
    images: ImageConfig = Field(default_factory=ImageConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    cfg_dropout: CfgDropoutConfig = Field(default_factory=CfgDropoutConfig)
    latent_cache_mb: float = Field(0.0, ge=0, description="keep VAE latents of images seen "
                                   "before, up to this many MiB (the frozen VAE gives the "
                                   "same latent every epoch); 0 = encode every time")


class OptimConfig(_Strict):
    """AdamW with warm-up, then constant or cosine learning rate."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    grad_accum_steps: int = Field(1, ge=1, description="packs per optimizer step on each "
                                  "rank; their tokens pool into one per-token loss")
    vit_lr_scale: float = Field(1.0, gt=0, description="the SigLIP2 encoder's learning rate "
                                "as a fraction of lr (a random-init ViT learns shapes at a "
                                "lower rate than the LLM's)")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["constant", "cosine"] = Field("constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a fraction "
                                                             "of lr")
    decay_steps: int | None = Field(None, gt=0, description="step where the cosine reaches "
                                    "its floor; null = the run's steps")
    implementation: Literal["fused", "foreach", "for-loop"] = Field(
        "fused", description="AdamW kernel: fused (one kernel over all tensors, CPU and "
        "CUDA; torchtitan's default), foreach, or the per-tensor loop")


class LossConfig(_Strict):
    ce_weight: float = Field(0.25, ge=0, description="weight of next-token CE (paper: 0.25)")
    mse_weight: float = Field(1.0, ge=0, description="weight of rectified-flow MSE "
                                                     "(paper: 1)")


class CheckpointConfig(_Strict):
    every_steps: int = Field(500, gt=0, description="save a sharded checkpoint this often")
    keep_last: int = Field(3, gt=0, description="step directories kept")
    resume: Literal["auto", "never"] = Field("auto", description="auto: continue from the "
                                                                 "latest step directory")
    export_safetensors: bool = Field(True, description="at the end, export model and EMA "
                                                       "weights for inference")
    export_steps: list[int] = Field(default_factory=list, description="also export them at "
                                    "these steps, to RUN/export-step-NNNNNN (an earlier "
                                    "model to autoguide sampling with)")

    @field_validator("export_steps")
    @classmethod
    def _positive_steps(cls, value: list[int]) -> list[int]:
        if any(step < 1 for step in value):
            raise ValueError(f"export_steps must be positive step numbers, got {value}")
        return sorted(set(value))


class MetricsConfig(_Strict):
    every_steps: int = Field(10, gt=0, description="log metrics this often")
    tensorboard: bool = Field(True, description="write TensorBoard events under RUN/tb")
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU; "
                                      "null = known GPUs' bf16 dense peak, none on CPU")


class ParallelConfig(_Strict):
    fsdp: Literal["auto", "on", "off"] = Field("auto", description="auto: FSDP2 when the "
                                               "world size is > 1")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: "
                                                             "bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = Field(False, description="recompute each decoder block "
                                                              "in backward")
    compile: bool = Field(False, description="torch.compile each decoder block")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: this rank's "
                                                   "GPU (LOCAL_RANK) when CUDA is there, "
                                                   "else CPU")
    reshard_after_forward: bool = Field(True, description="FSDP2: free each block's "
                                        "gathered weights after forward (ZeRO-3); false "
                                        "keeps them until backward (ZeRO-2, more memory, "
                                        "less communication)")


class TrainConfig(_Strict):
    """A training run."""

    run_dir: str = Field("runs/train", description="checkpoints, metrics, exports")
    steps: int = Field(1000, gt=0, description="optimizer steps")
    seed: int = Field(0, description="model init and noise seed")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _export_steps_in_run(self) -> TrainConfig:
        late = [step for step in self.checkpoint.export_steps if step >= self.steps]
        if late:
            raise ValueError(f"checkpoint.export_steps {late} are not before the last step "
                             f"({self.steps}), which exports to RUN/export anyway")
        return self


def load_train_config(path: str | Path | None = None,
                      overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML (partial is fine), then overrides; one TrainConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "training config", TrainConfigError)
    data = deep_merge(data, overrides or {})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise TrainConfigError(f"invalid training config{f' {path}' if path else ''}: "
                               f"{problems}") from exc


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train.yaml"
CONFIG_HEADER = """\
weft training: every default, written out. Generated from the pydantic models by
`weft config defaults train --write`; a test checks it still matches.
Pass a YAML with only the keys you change: `weft train --config my.yaml`, or
`--set optim.lr=3e-4` on the command line. The model defaults are BAGEL's 7B
shapes (Qwen2.5-7B, mot); configs/train-tiny.yaml is the CPU demo recipe.
"""


def default_config_yaml() -> str:
    """configs/train.yaml as the models define it (every default, commented)."""
    from weft.schemas.config_doc import render_defaults

    return render_defaults(TrainConfig(), CONFIG_HEADER)
