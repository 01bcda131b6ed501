"""Tiny random SigLIP2 and FLUX-style VAE checkpoints, for tests and smoke runs.

They use the real classes (`Siglip2VisionModel`, `AutoencoderKL`) and are written with
`save_pretrained` (safetensors) to a local directory, so tests load them through the
exact code path a user with real weights takes (`VisionEncoder.from_pretrained`,
`LatentCodec.from_pretrained`). Building is seeded, takes well under a second, and is
skipped when the directory is already complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from weft.model.vision import quiet_transformers
from weft.schemas.run_dir import build_dir_once

# FLUX.1's VAE normalisation constants (its config sets both).
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _build_once(path: str | Path, save: Callable[[Path], None]) -> Path:
    """`save(tmp)` under a fixed torch seed, moved into place unless already there."""

    def seeded_save(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save(tmp)

    return build_dir_once(path, seeded_save, _is_complete)


def tiny_siglip2(hidden: int = 32, layers: int = 2, patch: int = 16,
                 num_patches: int = 256) -> torch.nn.Module:
    """A random `Siglip2VisionModel` without pooling head (MLP 2x wide, 2 heads)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=2,
                                 patch_size=patch, num_patches=num_patches,
                                 vision_use_head=False)
    with quiet_transformers():
        return Siglip2VisionModel(config)


def make_tiny_siglip2(path: str | Path, hidden: int = 32, layers: int = 2,
                      patch: int = 16, num_patches: int = 256) -> Path:
    """A random `tiny_siglip2` saved at path (hidden 32, 2 layers, patch 16, 16x16
    position grid by default)."""

    def save(tmp: Path) -> None:
        with quiet_transformers():
            tiny_siglip2(hidden, layers, patch, num_patches).save_pretrained(tmp)  # safetensors

    return _build_once(path, save)


def make_tiny_vae(path: str | Path) -> Path:
    """A random FLUX-shaped `AutoencoderKL`: 16 latent channels, 8x down, FLUX's factors."""
    from diffusers import AutoencoderKL

    def save(tmp: Path) -> None:
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
            latent_channels=16, sample_size=64,
            scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
            use_quant_conv=False, use_post_quant_conv=False)
        vae.save_pretrained(tmp)  # safetensors

    return _build_once(path, save)
