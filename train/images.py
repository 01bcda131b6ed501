"""Shard image bytes -> what the packed batch needs: ViT patches and VAE inputs.

Sizes come from the image header alone (`image_size`), so the packer can count a
plan's tokens and cut it before paying for decoding; only the images of a plan that
will be packed are decoded (`decode_rgb`). The pixel cap is checked on the header,
before any decoding, so a decompression bomb costs nothing but a skipped sample.

VAE inputs keep the aspect ratio: the longer side shrinks to `vae_max_side`, the
shorter grows to `vae_min_side`, and both round to multiples of the VAE stride (pixels
per latent token), pixels in [-1, 1]. ViT inputs follow NaViT (`model.vision`):
the patch grid keeps the aspect ratio within `vit_max_patches`.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weft.model.mot import UnifiedConfig
from weft.model.vision import SIGLIP_MEAN, SIGLIP_STD, patchify_image, vit_grid_for
from weft.train.config import DataConfig

_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_MARKERS = 2  # <|vision_start|> and <|vision_end|> around an image


class ImageError(ValueError):
    """An image that cannot be used (unreadable, or over the pixel cap)."""


class ImageConfigError(ValueError):
    """Image settings that cannot work together (reported once, at start-up)."""


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to size and prepare images; vit_patch None = no ViT encoder."""

    vit_patch: int | None
    vit_max_patches: int
    vit_max_side: int
    vae_stride: int
    vae_max_side: int
    vae_min_side: int
    max_pixels: int

    @classmethod
    def from_config(cls, data: DataConfig, unified: UnifiedConfig,
                    vit_patch: int | None) -> ImageSpec:
        images = data.images
        return cls(vit_patch, images.vit_max_patches, unified.vit_max_grid,
                   unified.vae_stride, images.vae_max_side, images.vae_min_side,
                   images.max_pixels)

    def vit_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of ViT patches for an image of size (width, height)."""
        if self.vit_patch is None:
            raise ImageConfigError("no ViT encoder: the model config has no vit_path")
        width, height = size
        return vit_grid_for(height, width, self.vit_patch, self.vit_max_patches,
                            self.vit_max_side)

    def vae_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the VAE input: aspect kept, sides within bounds, stride multiples."""
        width, height = size
        stride = self.vae_stride
        low = math.ceil(self.vae_min_side / stride) * stride
        high = max(stride, self.vae_max_side // stride * stride)
        scale = min(1.0, self.vae_max_side / max(width, height))
        if min(width, height) * scale < self.vae_min_side:
            scale = self.vae_min_side / min(width, height)

        def side(n: int) -> int:
            return min(high, max(low, round(n * scale / stride) * stride))

        return side(width), side(height)

    def vae_tokens(self, size: tuple[int, int]) -> int:
        width, height = self.vae_size(size)
        return (width // self.vae_stride) * (height // self.vae_stride)


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), read from the header only."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable image: {exc}") from exc
    if width <= 0 or height <= 0:
        raise ImageError(f"image of size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels is over images.max_pixels "
                         f"({max_pixels:,}): refused before decoding")
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def decode_rgb(data: bytes, max_pixels: int) -> Any:
    """The decoded image, upright, as 8-bit RGB (transparency over white)."""
    from PIL import Image, ImageOps

    image_size(data, max_pixels)  # the cap, before decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"image does not decode: {exc}") from exc
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                               and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _tensor(image: Any) -> torch.Tensor:
    """PIL RGB -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def vae_input(image: Any, spec: ImageSpec) -> torch.Tensor:
    """[3, H, W] float in [-1, 1], H and W multiples of the VAE stride."""
    from PIL import Image

    size = spec.vae_size(image.size)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return (_tensor(image).float() / 127.5 - 1.0).clamp(-1.0, 1.0)


def vit_input(image: Any, spec: ImageSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """SigLIP2 patches [rows * cols, 3 * p * p] and the grid (rows, cols).

    `prepare_vit_image`'s steps, with the grid fixed from the original size (the one
    the token count used): resized here with PIL (cheap on large images), then
    normalised and patchified. Re-deriving the grid from the resized image could
    differ by a patch.
    """
    from PIL import Image

    rows, cols = spec.vit_grid(image.size)
    assert spec.vit_patch is not None
    size = (cols * spec.vit_patch, rows * spec.vit_patch)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = (_tensor(image).float() / 255.0 - SIGLIP_MEAN) / SIGLIP_STD
    patches, grid = patchify_image(pixels, spec.vit_patch)
    return patches, grid


def vit_patch_size(unified: UnifiedConfig) -> int | None:
    """The ViT patch side from the SigLIP2 checkpoint's config.json; None without a ViT."""
    if unified.vit_path is None:
        return None
    path = Path(unified.vit_path) / "config.json"
    try:
        config = json.loads(path.read_text())
        patch = config.get("patch_size") or config["vision_config"]["patch_size"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageConfigError(f"cannot read the ViT patch size from {path}: {exc}") from exc
    return int(patch)


def check_image_config(data: DataConfig, unified: UnifiedConfig,
                       vit_patch: int | None) -> None:
    """Fail at start-up, with every problem in one message, when images cannot be packed."""
    images, stride = data.images, unified.vae_stride
    problems = []
    if images.vae_min_side > images.vae_max_side:
        problems.append(f"images.vae_min_side ({images.vae_min_side}) is over "
                        f"images.vae_max_side ({images.vae_max_side})")
    if images.vae_max_side < stride:
        problems.append(f"images.vae_max_side ({images.vae_max_side}) is under the VAE "
                        f"stride ({stride} pixels per latent token)")
    elif math.ceil(images.vae_min_side / stride) * stride > images.vae_max_side:
        problems.append(f"no multiple of the VAE stride {stride} lies between "
                        f"images.vae_min_side ({images.vae_min_side}) and vae_max_side "
                        f"({images.vae_max_side})")
    side = max(1, images.vae_max_side // stride)
    if side > unified.latent_max_grid:
        problems.append(f"images.vae_max_side {images.vae_max_side} gives {side} latent "
                        f"tokens per side, over model.unified.latent_max_grid "
                        f"({unified.latent_max_grid})")
    if vit_patch is not None and vit_patch <= 0:
        problems.append(f"the ViT patch size must be positive, got {vit_patch}")
    largest = side * side + (images.vit_max_patches if vit_patch else 0) + 2 * _MARKERS
    if largest > data.pack.max_tokens_per_sample:
        problems.append(f"one image at the largest size takes up to {largest} tokens (VAE "
                        f"{side}x{side}, ViT {images.vit_max_patches if vit_patch else 0}, "
                        f"markers), over pack.max_tokens_per_sample "
                        f"({data.pack.max_tokens_per_sample}): lower images.vae_max_side "
                        "or vit_max_patches, or raise the budget")
    if problems:
        raise ImageConfigError("image settings do not work: " + "; ".join(problems))


__all__ = ["ImageConfigError", "ImageError", "ImageSpec", "check_image_config", "decode_rgb",
           "image_size", "vae_input", "vit_input", "vit_patch_size"]
