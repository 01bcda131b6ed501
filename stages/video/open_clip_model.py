"""An open_clip image encoder loaded from a local directory, never downloaded.

The directory is open_clip's own `local-dir:` format (what `hf-hub:` repos
hold): `open_clip_config.json` with `model_cfg` (and optional
`preprocess_cfg`) plus one weights file (`open_clip_model.safetensors`
preferred; `.bin`/`.pth` load with `weights_only=True`). Loading goes through
open_clip's public `create_model_from_pretrained`, which refuses to return a
randomly initialised model when the weights are missing.

The revision recorded on every ledger row is a hash of the config and weight
files, so two runs that embedded with different weights never look alike.
`save_tiny_open_clip` writes a tiny random-init CLIP in exactly this format for
tests and the demo (`weft models make-tiny-clip`). Its embeddings exercise the
plumbing, not semantics: identical clips score cosine 1, different videos far
less, but shots of one film all score above 0.99, so do not calibrate the
semantic threshold on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weft.schemas.ids import files_revision

if TYPE_CHECKING:  # torch is imported only when a model is used
    import torch

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")

# A tiny CLIP: a 2-layer ViT on 32 px images, 32-d embeddings. The text tower
# keeps the standard vocabulary so open_clip's tokenizer still fits it.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32,
                   "layers": 2, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


class ModelDirError(FileNotFoundError):
    """The model directory is missing or incomplete (a start-up error, not an item error)."""


def model_files(model_dir: str | Path) -> list[Path]:
    """The files that define the model: the config and every weights file, sorted by name."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"open_clip model directory {root} does not exist; point "
                            f"embed.model_dir at a directory with {CONFIG_NAME} and weights "
                            "(`weft models make-tiny-clip --out DIR` writes a tiny one)")
    config = root / CONFIG_NAME
    if not config.is_file():
        raise ModelDirError(f"{root} has no {CONFIG_NAME}: not an open_clip local model directory")
    weights = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ModelDirError(f"{root} has {CONFIG_NAME} but no weights file "
                            f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return [config, *weights]


def model_revision(model_dir: str | Path) -> str:
    """sha256 over (name, sha256) of the config and weight files, first 16 hex digits."""
    return files_revision(model_files(model_dir))


@dataclass
class OpenClipImageModel:
    """A loaded image tower with its preprocessing and identity."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    model_id: str
    revision: str
    device: str

    def encode(self, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """L2-normalised embeddings (N × D float32) of uint8 H×W×3 RGB images."""
        import torch
        from PIL import Image

        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(im)))
                                 for im in images[start:start + batch_size]]).to(self.device)
            with torch.inference_mode():
                feats = self.model.encode_image(batch, normalize=True)  # type: ignore[operator]
            out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def load_open_clip(model_dir: str | Path, device: str = "cpu") -> OpenClipImageModel:
    """Load an open_clip model from a local directory; fails clearly if it is not one."""
    root = Path(model_dir).resolve()
    revision = model_revision(root)  # checks the directory first: fails fast and clearly
    import open_clip
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"embed.device={device} but CUDA is not available")
    model, preprocess = open_clip.create_model_from_pretrained(
        f"local-dir:{root}", device=device, weights_only=True)
    model.eval()
    return OpenClipImageModel(model=model, preprocess=preprocess,  # type: ignore[arg-type]
                              model_id=f"open_clip:{root.name}", revision=revision,
                              device=device)


def save_tiny_open_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-init CLIP (open_clip's own classes) in the `local-dir:` format.

    Deterministic for a given seed, so its revision is stable across machines.
    """
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_MODEL_CFG)))
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        # Random position/class embeddings dominate an untrained ViT's output (every
        # image then embeds at cosine ~0.94 to every other); zeroed, the random
        # tower follows the pixels and different videos land far apart.
        model.visual.positional_embedding.zero_()
        model.visual.class_embedding.zero_()
    config = {
        "model_cfg": TINY_MODEL_CFG,
        "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out
