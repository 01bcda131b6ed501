"""The understanding vision path: native-aspect images → SigLIP2 NaViT → MLP → LLM tokens.

BAGEL feeds images to the understanding expert through a SigLIP2-style NaViT encoder
(each image keeps its aspect ratio and its own patch grid), a two-layer MLP connector
to the LLM width, and a 2-D sin-cos position added at the LLM input.

Patch layout (what transformers' SigLIP2 expects, see its `convert_image_to_patches`):
an image [3, H, W] already normalised with mean 0.5 / std 0.5 (pixels in [-1, 1]) is
cut into a row-major grid of p x p patches, each flattened *channels last*, i.e. in
(patch_row, patch_col, channel) order, giving [rows * cols, p * p * 3]. The model
embeds patches with one Linear over that vector and resizes its learned position grid
to (rows, cols) per image (`spatial_shapes`), so patches must come in row-major order.

The packed batch carries `vit_pixels` [n_vit_tokens, 3*p*p] for all images back to
back and `vit_grids` [n_images, 2]; `VisionEncoder` pads them to one image per row
(the `pixel_attention_mask` hides the padding) and gathers the outputs back flat.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from weft.model.positions import SinCos2D, grid_list

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


def patchify_image(image: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[3, H, W] (already normalised) -> ([rows * cols, p * p * 3], (rows, cols)).

    Row-major patches, each flattened channels last (SigLIP2's order). H and W must be
    multiples of `patch`.
    """
    channels, height, width = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch {patch}")
    rows, cols = height // patch, width // patch
    patches = image.reshape(channels, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, patch * patch * channels), (rows, cols)


def unpatchify_image(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify_image`: [rows * cols, p * p * C] -> [C, rows * p, cols * p]."""
    rows, cols = grid
    channels = patches.shape[1] // (patch * patch)
    image = patches.reshape(rows, cols, patch, patch, channels).permute(4, 0, 2, 1, 3)
    return image.reshape(channels, rows * patch, cols * patch)


def vit_grid_for(height: int, width: int, patch: int, max_patches: int,
                 max_side: int | None = None) -> tuple[int, int]:
    """The NaViT patch grid for an image: keep the aspect ratio, use at most `max_patches`.

    One common scale for both sides, sqrt(budget / patches at native size), each side
    rounded down (small images are upscaled, as SigLIP2's processor does). Each side
    has at least one patch and, with `max_side` (the connector's position table), at
    most that many (extreme aspect ratios are then squeezed).
    """
    if height <= 0 or width <= 0 or max_patches <= 0:
        raise ValueError(f"bad image size {height}x{width} or budget {max_patches}")
    scale = math.sqrt(max_patches / ((height / patch) * (width / patch)))
    rows = max(1, math.floor(height * scale / patch + 1e-6))
    cols = max(1, math.floor(width * scale / patch + 1e-6))
    # A very thin image clamps one side to 1 patch; keep the other inside the budget.
    rows = min(rows, max(1, max_patches // cols))
    cols = min(cols, max(1, max_patches // rows))
    if max_side is not None:
        rows, cols = min(rows, max_side), min(cols, max_side)
    return rows, cols


def prepare_vit_image(image: torch.Tensor, patch: int, max_patches: int,
                      max_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """A raw image -> (SigLIP2 patches [rows * cols, p * p * 3], (rows, cols)).

    image: [3, H, W], uint8 in [0, 255] or float in [0, 1]. Resized (bilinear,
    antialiased) to the NaViT grid of `vit_grid_for`, normalised to [-1, 1], patchified.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    rows, cols = vit_grid_for(pixels.shape[1], pixels.shape[2], patch, max_patches, max_side)
    size = (rows * patch, cols * patch)
    if tuple(pixels.shape[1:]) != size:
        pixels = nn.functional.interpolate(pixels[None], size=size, mode="bilinear",
                                           align_corners=False, antialias=True)[0]
    pixels = (pixels.clamp(0.0, 1.0) - SIGLIP_MEAN) / SIGLIP_STD
    return patchify_image(pixels, patch)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bar (we check the keys ourselves)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _checkpoint_dir(path: str | Path) -> Path:
    """A local SigLIP2 directory, or a FileNotFoundError that names the path."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no SigLIP2 checkpoint at {path} (config.json missing); "
                                "point the model config at a local SigLIP2 directory")
    return path


class VisionEncoder(nn.Module):
    """SigLIP2 NaViT vision tower: (vit_pixels, vit_grids) -> [n_vit_tokens, vit_dim].

    Wraps transformers' `Siglip2VisionModel` without its pooling head (BAGEL uses the
    per-patch features). Outputs are the post-layernorm last hidden states, flat, in the
    order of the input patches.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> VisionEncoder:
        """Load from a local directory (a SigLIP2 vision or full SigLIP2 checkpoint).

        Nothing is downloaded. A missing directory or missing weights fail here, with the
        path in the message, rather than at the first batch.
        """
        from transformers import Siglip2VisionModel

        path = _checkpoint_dir(path)
        with quiet_transformers():
            model, info = Siglip2VisionModel.from_pretrained(
                path, local_files_only=True, vision_use_head=False, dtype=dtype,
                attn_implementation=attn_implementation, output_loading_info=True)
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(f"{path} is not a SigLIP2 vision checkpoint: missing "
                             f"{sorted(info['missing_keys'])[:5]}, mismatched "
                             f"{[k[0] for k in info['mismatched_keys']][:5]}")
        return cls(model)

    @classmethod
    def from_config(cls, path: str | Path, attn_implementation: str = "sdpa"
                    ) -> VisionEncoder:
        """The same tower as `from_pretrained(path)`, from its config.json only: random
        init, no weights read (under `torch.device("meta")`: no memory either)."""
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        path = _checkpoint_dir(path)
        with quiet_transformers():
            config = Siglip2VisionConfig.from_pretrained(path, local_files_only=True)
        config.vision_use_head = False
        return cls(Siglip2VisionModel._from_config(config,
                                                   attn_implementation=attn_implementation))

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, pixels: torch.Tensor,
                grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """pixels [n_tokens, 3*p*p] (images back to back), grids [n_images, 2] -> [n_tokens, D]."""
        grid = torch.tensor(grid_list(grids), dtype=torch.long,
                            device=pixels.device).reshape(-1, 2)
        counts = grid.prod(dim=1)
        if pixels.shape[0] == 0:
            return pixels.new_zeros(0, self.hidden_size)
        if int(counts.sum()) != pixels.shape[0]:
            raise ValueError(f"grids cover {int(counts.sum())} patches, got {pixels.shape[0]}")
        expected = 3 * self.patch_size * self.patch_size
        if pixels.shape[1] != expected:
            raise ValueError(f"patches of {pixels.shape[1]} values, SigLIP2 expects {expected}")
        # One image per row, padded to the longest; the mask hides the padding.
        rows = pad_sequence(list(pixels.split(counts.tolist())), batch_first=True)
        mask = torch.arange(rows.shape[1], device=pixels.device)[None, :] < counts[:, None]
        out = self.model(pixel_values=rows, pixel_attention_mask=mask,
                         spatial_shapes=grid).last_hidden_state
        return out[mask]


class VisionConnector(nn.Module):
    """ViT features -> LLM hidden: Linear → GELU → Linear, plus the 2-D sin-cos position.

    forward(features [n_tokens, vit_dim], grids [n_images, 2]) -> [n_tokens, hidden].
    """

    def __init__(self, vit_dim: int, hidden: int, max_rows: int = 64,
                 max_cols: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vit_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden))
        self.pos = SinCos2D(hidden, max_rows, max_cols)

    def forward(self, features: torch.Tensor,
                grids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        x = self.mlp(features)
        return x + self.pos(grids).to(x.dtype)
