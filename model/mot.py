"""The unified model: a MoT backbone that reads text, ViT tokens and VAE latents in one
packed sequence, and is trained with next-token CE and rectified-flow MSE.

One forward over a PackedBatch:

    text ids ──embed──────────────┐
    ViT patches ──SigLIP2──MLP─+pos┤  placed at their positions in one [L, hidden]
    latents x0 ──noise to x_t──in─+pos+t-emb┘──► backbone (und / gen experts) ──►
        LM head on tokens with labels      → CE  (sum and count)
        latent out on noised latent tokens → MSE against ε − x0 (sum and count)

Losses come back as sums with their token counts, so the trainer averages per token
over the whole global batch (all-reduce the sums and the counts), not per sample.

The frozen VAE lives outside this module (`model/vae.py` LatentCodec): the caller
encodes `batch.vae_images` to normalised latents and passes them in, which keeps the
VAE out of FSDP, the optimizer and the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weft.model.attention_backends import AttentionMask, build_attention_mask
from weft.model.backbone import MoTBackbone
from weft.model.config import MoTConfig
from weft.model.flow import TimestepEmbedder, noise_latents, sample_timesteps
from weft.model.packed import IGNORE_INDEX, PackedBatch, PackError
from weft.model.vae import LatentProjection, patchify_latent
from weft.model.vision import VisionConnector, VisionEncoder


class UnifiedConfig(BaseModel):
    """Everything that shapes the unified model (the LLM part is a MoTConfig)."""

    model_config = ConfigDict(extra="forbid")
    llm: MoTConfig = Field(default_factory=MoTConfig, description="the decoder backbone")
    vit_path: str | None = Field(None, description="local SigLIP2 directory; null = a model "
                                                   "without understanding vision")
    vit_max_grid: int = Field(64, gt=0, description="largest ViT patch grid side "
                                                    "(sin-cos table size)")
    latent_channels: int = Field(16, gt=0, description="VAE latent channels (FLUX: 16)")
    latent_patch: int = Field(2, gt=0, description="latent patch side: 2x2 latents per token")
    vae_downsample: int = Field(8, gt=0, description="VAE pixel-to-latent factor (FLUX: 8)")
    latent_max_grid: int = Field(64, gt=0, description="largest latent-token grid side")
    timestep_shift: float = Field(1.0, gt=0, description="shift of the logit-normal training "
                                                         "timesteps (larger: noisier)")
    gen_expert_init: Literal["copy", "random"] = Field(
        "random", description="random init only (a checkpoint always copies): the "
        "generation expert starts as a copy of the understanding one (BAGEL) or its own draw")

    @property
    def latent_token_dim(self) -> int:
        return self.latent_channels * self.latent_patch ** 2

    @property
    def vae_stride(self) -> int:
        """Pixels per latent token side (what PackBuilder needs)."""
        return self.vae_downsample * self.latent_patch


@dataclass
class LossOutput:
    """Sums and token counts; `ce` and `mse` are the per-token means of this batch."""

    ce_sum: torch.Tensor
    ce_tokens: int
    mse_sum: torch.Tensor
    mse_tokens: int

    @property
    def ce(self) -> torch.Tensor:
        return self.ce_sum / max(self.ce_tokens, 1)

    @property
    def mse(self) -> torch.Tensor:
        return self.mse_sum / max(self.mse_tokens, 1)


def loss_masks(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens the losses count: [L] tokens with a CE label, [n VAE tokens] latent
    tokens of images with an MSE target (the forward and `loss_token_counts` share it)."""
    ce = batch.labels != IGNORE_INDEX
    mse = batch.vae_loss[batch.vae_token_image] if len(batch.vae_index) else \
        torch.zeros(0, dtype=torch.bool, device=batch.labels.device)
    return ce, mse


def loss_token_counts(batch: PackedBatch) -> tuple[int, int]:
    """(CE tokens, MSE tokens) the forward of `batch` will report, read from the batch
    alone: a trainer pooling micro-batches needs the totals before the first backward."""
    ce, mse = loss_masks(batch)
    return int(ce.sum()), int(mse.sum())


@dataclass
class FlowInputs:
    """The noised latent tokens of a batch and what the model must predict."""

    tokens: torch.Tensor  # [n_vae_tokens, token_dim]: x_t (x0 for clean images)
    target: torch.Tensor  # [n_vae_tokens, token_dim]: ε − x0 (zeros for clean images)
    timesteps: torch.Tensor  # [n_vae_images]: t per image (0 for clean)


class MoTModel(nn.Module):
    """The BAGEL-style unified model over packed batches (no VAE inside)."""

    def __init__(self, config: UnifiedConfig, vision: VisionEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        self.backbone = MoTBackbone(config.llm)
        self.vision = vision
        self.connector = VisionConnector(vision.hidden_size, hidden, config.vit_max_grid,
                                         config.vit_max_grid) if vision is not None else None
        self.latent = LatentProjection(config.latent_token_dim, hidden,
                                       config.latent_max_grid, config.latent_max_grid)
        self.time_embed = TimestepEmbedder(hidden)

    @classmethod
    def build(cls, config: UnifiedConfig, llm_checkpoint: str | Path | None = None,
              on_meta: bool = False) -> MoTModel:
        """Random init, then the ViT from `vit_path` and the LLM from a Qwen2 checkpoint.

        on_meta: the structure only, every tensor on the meta device (nothing read but
        the ViT's config.json): what FSDP ranks other than 0 build, so a 7B model is not
        made and loaded once per rank; rank 0's weights reach them after sharding
        (`train.parallel.apply_parallelism`)."""
        if on_meta:
            with torch.device("meta"):
                return cls(config, VisionEncoder.from_config(config.vit_path)
                           if config.vit_path else None)
        vision = VisionEncoder.from_pretrained(config.vit_path) if config.vit_path else None
        model = cls(config, vision)
        if llm_checkpoint is not None:
            from weft.model.loading import load_qwen2_into

            load_qwen2_into(model.backbone, llm_checkpoint)
        elif config.gen_expert_init == "copy":
            from weft.model.loading import copy_understanding_expert

            copy_understanding_expert(model.backbone)
        return model

    # ---- inputs --------------------------------------------------------------------------
    def flow_inputs(self, batch: PackedBatch, latents: list[torch.Tensor],
                    noise: list[torch.Tensor] | None = None,
                    generator: torch.Generator | None = None) -> FlowInputs:
        """x_t and ε − x0 for every VAE token; one t per noised image, t = 0 for clean ones.

        latents: normalised [C, h, w] per VAE image (LatentCodec.encode). Timesteps come
        from `batch.vae_timesteps` when set, else from the logit-normal sampler.
        """
        n_img = len(batch.vae_images)
        if len(latents) != n_img:
            raise PackError(f"{len(latents)} latents for {n_img} VAE images")
        device = self.latent.proj_in.weight.device
        if batch.vae_timesteps is not None:
            t = batch.vae_timesteps.to(device=device, dtype=torch.float32)
        else:
            t = sample_timesteps(n_img, self.config.timestep_shift, generator=generator,
                                 device=device) if n_img else torch.zeros(0, device=device)
        t = torch.where(batch.vae_noised.to(device), t, torch.zeros_like(t))
        tokens, targets = [], []
        for i, latent in enumerate(latents):
            x0 = patchify_latent(latent.to(device=device, dtype=torch.float32),
                                 self.config.latent_patch)
            rows, cols = batch.vae_grids[i].tolist()
            if x0.shape[0] != rows * cols:
                raise PackError(f"VAE image {i}: latent gives {x0.shape[0]} tokens, the pack "
                                f"has a {rows}x{cols} grid")
            if bool(batch.vae_noised[i]):
                eps = noise[i].to(x0) if noise is not None else torch.randn(
                    x0.shape, generator=generator, device=device, dtype=x0.dtype)
                x_t, target = noise_latents(x0, t[i], eps)
            else:
                x_t, target = x0, torch.zeros_like(x0)
            tokens.append(x_t)
            targets.append(target)
        dim = self.config.latent_token_dim
        empty = torch.zeros(0, dim, device=device)
        return FlowInputs(torch.cat(tokens) if tokens else empty,
                          torch.cat(targets) if targets else empty, t)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embed_tokens.weight.dtype

    def embed_vit(self, pixels: torch.Tensor, grids: torch.Tensor | list[tuple[int, int]]
                  ) -> torch.Tensor:
        """ViT patches [n, 3*p*p] of images with `grids` -> LLM inputs [n, hidden]."""
        if self.vision is None or self.connector is None:
            raise PackError("ViT tokens given but the model has no vision encoder")
        vision_dtype = next(self.vision.parameters()).dtype
        features = self.vision(pixels.to(self.latent.proj_in.weight.device, vision_dtype),
                               grids)
        return self.connector(features.to(self.dtype), grids).to(self.dtype)

    def embed_latents(self, tokens: torch.Tensor, grids: torch.Tensor | list[tuple[int, int]],
                      timesteps: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        """Latent tokens [n, token_dim] -> LLM inputs [n, hidden], plus the timestep
        embedding of the image each token belongs to (`token_image` [n] into `timesteps`)."""
        latent = self.latent.embed(tokens, grids)
        return (latent + self.time_embed(timesteps)[token_image]).to(self.dtype)

    def embed(self, batch: PackedBatch, flow: FlowInputs) -> torch.Tensor:
        """The [L, hidden] input sequence: text, ViT and latent tokens at their positions."""
        hidden = self.backbone.embed_text(batch.input_ids)
        if len(batch.vit_index):
            vit = self.embed_vit(batch.vit_pixels, batch.vit_grids)
            hidden = hidden.index_copy(0, batch.vit_index, vit)
        if len(batch.vae_index):
            latent = self.embed_latents(flow.tokens, batch.vae_grids, flow.timesteps,
                                        batch.vae_token_image)
            hidden = hidden.index_copy(0, batch.vae_index, latent)
        return hidden

    # ---- training forward ------------------------------------------------------------------
    def forward(self, batch: PackedBatch, latents: list[torch.Tensor],
                noise: list[torch.Tensor] | None = None,
                generator: torch.Generator | None = None,
                mask: AttentionMask | None = None) -> LossOutput:
        """CE on tokens with labels and MSE on the latent tokens of images with a loss."""
        flow = self.flow_inputs(batch, latents, noise, generator)
        hidden = self.embed(batch, flow)
        if mask is None:
            mask = build_attention_mask(batch, self.config.llm.attention_backend)
        out = self.backbone(hidden, batch, mask)

        labelled_mask, with_loss = loss_masks(batch)
        labelled = torch.nonzero(labelled_mask).flatten()
        if len(labelled):
            logits = self.backbone.lm_head(out[labelled]).float()
            ce_sum = F.cross_entropy(logits, batch.labels[labelled], reduction="sum")
        else:
            ce_sum = out.sum() * 0.0
        if bool(with_loss.any()):
            rows = batch.vae_index[with_loss]
            pred = self.latent(out[rows]).float()
            mse_sum = ((pred - flow.target[with_loss]) ** 2).mean(dim=-1).sum()
        else:
            mse_sum = out.sum() * 0.0
        return LossOutput(ce_sum, len(labelled), mse_sum, int(with_loss.sum()))
