"""The generation latent path: a frozen FLUX-style VAE and the model's latent projections.

BAGEL generates in the latent space of a frozen FLUX VAE (16 channels, 8x spatial
downsampling); 2 x 2 latent patches are the generation expert's tokens, projected to
the LLM width by a linear layer (plus the 2-D sin-cos position) and back by a linear
layer initialised to zero, so a fresh model predicts zero velocity instead of noise.

`LatentCodec` is deliberately not an `nn.Module`: it is frozen, never trained, and
must stay out of the model's state dict, FSDP wrapping and optimizer. The trainer
encodes `PackedBatch.vae_images` with it and hands the latent tokens to the model.

Latent normalisation follows the VAE config (FLUX sets both factors):
    z_model = (z_vae - shift_factor) * scaling_factor,   shift_factor = 0 when absent.
Latent patches are flattened channels last, (patch_row, patch_col, channel), the same
order as the ViT patches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from weft.model.positions import SinCos2D


def patchify_latent(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[C, h, w] -> [(h/p) * (w/p), p * p * C], row-major patches, channels last."""
    channels, height, width = latent.shape
    if height % patch or width % patch:
        raise ValueError(f"latent {height}x{width} is not a multiple of the patch {patch}")
    rows, cols = height // patch, width // patch
    tokens = latent.reshape(channels, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    return tokens.reshape(rows * cols, patch * patch * channels)


def unpatchify_latent(tokens: torch.Tensor, grid: tuple[int, int], patch: int = 2
                      ) -> torch.Tensor:
    """Inverse of `patchify_latent`: [rows * cols, p * p * C] -> [C, rows * p, cols * p]."""
    rows, cols = grid
    if tokens.shape[0] != rows * cols:
        raise ValueError(f"{tokens.shape[0]} tokens for a {rows}x{cols} grid")
    channels = tokens.shape[1] // (patch * patch)
    latent = tokens.reshape(rows, cols, patch, patch, channels).permute(4, 0, 2, 1, 3)
    return latent.reshape(channels, rows * patch, cols * patch)


class LatentCodec:
    """A frozen diffusers `AutoencoderKL`: images [3, H, W] in [-1, 1] <-> normalised latents.

    encode: list of [3, H, W] -> list of [C, H/8, W/8] (float32); decode inverts.
    `sample_posterior` draws from the posterior instead of taking its mean.
    """

    def __init__(self, vae: nn.Module, sample_posterior: bool = False, patch: int = 2) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.sample_posterior = sample_posterior
        self.patch = patch
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, sample_posterior: bool = False,
                        dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", patch: int = 2) -> LatentCodec:
        """Load from a local directory: the VAE itself or a pipeline with a `vae/` folder.
        patch: latent patch side of the model it serves (`UnifiedConfig.latent_patch`)."""
        from diffusers import AutoencoderKL

        path = Path(path)
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no VAE checkpoint at {path} (config.json missing); "
                                    "point the model config at a local AutoencoderKL directory")
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        return cls(vae.to(device), sample_posterior=sample_posterior, patch=patch)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def stride(self) -> int:
        """Pixels per latent-patch side (PackBuilder's `vae_stride`): 8 x 2 for FLUX."""
        return self.downsample * self.patch

    @property
    def token_dim(self) -> int:
        """Values per latent token: C * p * p (64 for FLUX)."""
        return self.channels * self.patch * self.patch

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> LatentCodec:
        self.vae.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: Sequence[torch.Tensor],
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """[3, H, W] in [-1, 1] each -> normalised latents [C, H/8, W/8] each (float32).

        Images of the same size are encoded together; order is kept.
        """
        out: list[torch.Tensor | None] = [None] * len(images)
        for size, indices in _group_by_size(images).items():
            if size[0] % self.downsample or size[1] % self.downsample:
                raise ValueError(f"image {size[0]}x{size[1]} is not a multiple of the VAE "
                                 f"downsampling {self.downsample}")
            batch = torch.stack([images[i] for i in indices]).to(self.device, self.dtype)
            posterior = self.vae.encode(batch).latent_dist
            z = posterior.sample(generator) if self.sample_posterior else posterior.mean
            z = (z.float() - self.shift_factor) * self.scaling_factor
            for i, latent in zip(indices, z, strict=True):
                out[i] = latent
        return [z for z in out if z is not None]

    @torch.no_grad()
    def decode(self, latents: Sequence[torch.Tensor], clamp: bool = True) -> list[torch.Tensor]:
        """Normalised latents [C, h, w] each -> images [3, 8h, 8w] in [-1, 1] each (float32)."""
        out: list[torch.Tensor | None] = [None] * len(latents)
        for _, indices in _group_by_size(latents).items():
            z = torch.stack([latents[i] for i in indices]).float()
            z = z / self.scaling_factor + self.shift_factor
            images = self.vae.decode(z.to(self.device, self.dtype)).sample.float()
            if clamp:
                images = images.clamp(-1.0, 1.0)
            for i, image in zip(indices, images, strict=True):
                out[i] = image
        return [x for x in out if x is not None]

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[C, h, w] -> [(h/2) * (w/2), C * 4]."""
        return patchify_latent(latent, self.patch)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[rows * cols, C * 4] -> [C, 2 * rows, 2 * cols]."""
        return unpatchify_latent(tokens, grid, self.patch)


def _group_by_size(tensors: Sequence[torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(int(t.shape[-2]), int(t.shape[-1]))].append(i)
    return groups


class LatentProjection(nn.Module):
    """Latent tokens <-> LLM hidden states for the generation expert.

    embed(tokens [n, C*p*p], grids [n_images, 2]) -> [n, hidden]: linear in + 2-D sin-cos.
    forward(hidden [n, hidden]) -> [n, C*p*p]: the velocity prediction, zero at init.
    """

    def __init__(self, token_dim: int, hidden: int, max_rows: int = 64,
                 max_cols: int = 64) -> None:
        super().__init__()
        self.proj_in = nn.Linear(token_dim, hidden)
        self.proj_out = nn.Linear(hidden, token_dim)
        self.pos = SinCos2D(hidden, max_rows, max_cols)
        self.reset_out()

    def reset_out(self) -> None:
        """Zero the output projection (call again after any model-wide re-init)."""
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def embed(self, tokens: torch.Tensor,
              grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        x = self.proj_in(tokens.to(self.proj_in.weight.dtype))
        return x + self.pos(grids).to(x.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj_out(hidden)
