"""Text-to-image renderers behind one interface: a diffusers pipeline, or weft's own MoT.

    render(prompts, seeds, height, width) -> one RGB uint8 image or RenderFailure each

A failure on one prompt (an out-of-memory, a size the pipeline cannot handle, a
NaN) is returned in its place and never raised, so one bad input costs one
error row. Each prompt is rendered on its own with a generator seeded by its
seed, so an image depends only on (weights, prompt, seed, size, params), never
on which prompts shared its batch: renders are reproducible and cacheable.

- `DiffusersRenderer`: `FluxPipeline.from_pretrained(dir, local_files_only=True)`
  (or another diffusers pipeline class) from a local directory; the tests use a
  tiny random FLUX pipeline (`tiny_renderer.make_tiny_flux`).
- `MoTRenderer`: a trained MoT export (`train/checkpoint.export_checkpoint`) with its
  FLUX-style VAE and tokenizer, through `model/inference.py`'s Interleaver.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from weft.stages.base import Resources, StageConfig

REVISION_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".jinja")


@dataclass(frozen=True)
class RenderFailure:
    """Why one prompt produced no image."""

    error_type: str
    message: str


RenderOutput = np.ndarray | RenderFailure


class Renderer(Protocol):
    """What the render stage needs of any text-to-image model."""

    model_id: str
    revision: str

    def params(self) -> dict[str, Any]:
        """Settings that change pixels besides prompt, seed and size (part of the cache key)."""
        ...

    def render(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int
               ) -> list[RenderOutput]:
        """One image (H x W x 3 uint8) or RenderFailure per prompt, in order."""
        ...


class RenderConfig(StageConfig):
    """Which renderer draws t2i samples, at which size and settings."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4),
                                 description="per render worker (a Ray actor); gpus: 1 on a "
                                             "GPU node")
    backend: Literal["diffusers", "mot"] = Field(
        "diffusers", description="diffusers: a local pipeline directory (FLUX); mot: a weft "
                                 "MoT export directory")
    path: str = Field("~/.cache/weft/models/tiny/flux", description="diffusers: the pipeline "
                      "directory (`weft models make-tiny-flux --out DIR` builds a tiny one); "
                      "mot: the export directory")
    pipeline_class: str = Field("FluxPipeline", description="diffusers pipeline class")
    vae_path: str | None = Field(None, description="mot: the FLUX-style VAE directory")
    tokenizer_path: str | None = Field(None, description="mot: the tokenizer directory")
    height: int = Field(512, ge=16, description="render height when a prompt gives none")
    width: int = Field(512, ge=16, description="render width when a prompt gives none")
    steps: int = Field(28, ge=1, description="denoising steps")
    guidance_scale: float = Field(3.5, ge=0, description="diffusers: FLUX guidance; mot: "
                                  "text CFG scale")
    max_sequence_length: int = Field(256, ge=8, description="diffusers FLUX: T5 tokens")
    shift: float = Field(3.0, gt=0, description="mot: timestep shift of the Euler sampler")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    device: str = Field("cpu", description="cpu, cuda, cuda:1")
    revision: str | None = Field(None, description="override; null = hash of the files")

    @model_validator(mode="after")
    def _gpu_workers(self) -> RenderConfig:
        """A renderer on cuda reserves a GPU per Ray worker unless told otherwise."""
        if self.device.startswith("cuda") and not self.resources.gpus:
            self.resources = self.resources.model_copy(update={"gpus": 1.0})
        return self


def directory_revision(*dirs: str | Path | None) -> str:
    """16 hex digits over (relative path, sha256) of every config, tokenizer and weight file."""
    digest = hashlib.sha256()
    for index, root in enumerate(d for d in dirs if d is not None):
        base = Path(os.path.expanduser(str(root)))
        files = sorted(p for p in base.rglob("*") if p.is_file()
                       and p.suffix in REVISION_SUFFIXES)
        for path in files:
            file_digest = hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    file_digest.update(block)
            digest.update(f"{index}/{path.relative_to(base)}\0{file_digest.hexdigest()}\n"
                          .encode())
    return digest.hexdigest()[:16]


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float H x W x 3 -> uint8, rounded."""
    return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _failure(exc: Exception) -> RenderFailure:
    return RenderFailure(type(exc).__name__, str(exc)[:2000])


class DiffusersRenderer:
    """A diffusers text-to-image pipeline loaded from a local directory (no hub)."""

    def __init__(self, config: RenderConfig) -> None:
        import diffusers

        path = Path(os.path.expanduser(config.path))
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"render.path {path} is not a diffusers pipeline directory "
                                    "(no model_index.json); `weft models make-tiny-flux --out "
                                    "DIR` builds a tiny one")
        pipeline_cls = getattr(diffusers, config.pipeline_class)
        self.config = config
        self.pipe = pipeline_cls.from_pretrained(
            str(path), local_files_only=True,
            torch_dtype=_dtype(config.dtype, config.device)).to(config.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.accepts = set(inspect.signature(self.pipe.__call__).parameters)
        self.model_id = f"diffusers:{config.pipeline_class}:{path.name}"
        self.revision = config.revision or directory_revision(path)

    def params(self) -> dict[str, Any]:
        return renderer_params(self.config)

    def render(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int
               ) -> list[RenderOutput]:
        import torch

        kwargs: dict[str, Any] = {"height": height, "width": width, "output_type": "np",
                                  "num_inference_steps": self.config.steps,
                                  "guidance_scale": self.config.guidance_scale}
        if "max_sequence_length" in self.accepts:
            kwargs["max_sequence_length"] = self.config.max_sequence_length
        out: list[RenderOutput] = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            try:
                generator = torch.Generator(self.config.device).manual_seed(int(seed))
                with torch.inference_mode():
                    images = self.pipe(prompt, generator=generator, **kwargs).images
                pixels = np.asarray(images[0], dtype=np.float32)
                if not np.isfinite(pixels).all():
                    raise FloatingPointError("the pipeline returned non-finite pixels")
                out.append(_to_uint8(pixels))
            except Exception as exc:  # one prompt's failure is its own
                out.append(_failure(exc))
        return out


class MoTRenderer:
    """weft's MoT model as a renderer: prompt in, Euler-sampled image out (Interleaver)."""

    def __init__(self, model: Any, codec: Any, tokenize: Callable[[str], Sequence[int]], *,
                 model_id: str, revision: str, steps: int = 28, cfg_text_scale: float = 4.0,
                 shift: float = 3.0) -> None:
        self.model, self.codec, self.tokenize = model.eval(), codec, tokenize
        self.model_id, self.revision = model_id, revision
        self.steps, self.cfg_text_scale, self.shift = steps, cfg_text_scale, shift

    @classmethod
    def from_config(cls, config: RenderConfig) -> MoTRenderer:
        """Load an export directory, its VAE and tokenizer (all local)."""
        import transformers

        from weft.model.vae import LatentCodec
        from weft.train.checkpoint import load_exported

        if not config.vae_path or not config.tokenizer_path:
            raise ValueError("render.backend mot needs render.vae_path and "
                             "render.tokenizer_path")
        path = Path(os.path.expanduser(config.path))
        model = load_exported(path, device=config.device)
        codec = LatentCodec.from_pretrained(os.path.expanduser(config.vae_path),
                                            device=config.device,
                                            patch=model.config.latent_patch)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.path.expanduser(config.tokenizer_path), local_files_only=True)

        def tokenize(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        revision = config.revision or directory_revision(path, config.vae_path,
                                                         config.tokenizer_path)
        return cls(model, codec, tokenize, model_id=f"mot:{path.name}", revision=revision,
                   steps=config.steps, cfg_text_scale=config.guidance_scale, shift=config.shift)

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg_text_scale": self.cfg_text_scale, "shift": self.shift}

    def render(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int
               ) -> list[RenderOutput]:
        import torch

        from weft.model.inference import Interleaver

        out: list[RenderOutput] = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            try:
                ids = list(self.tokenize(prompt))
                if not ids:
                    raise ValueError("the prompt tokenizes to nothing")
                inter = Interleaver(self.model, self.codec, 1)
                inter.append_text([ids])
                device = inter.device
                generator = torch.Generator(device).manual_seed(int(seed))
                [image] = inter.generate_image(height, width, steps=self.steps, shift=self.shift,
                                               cfg_text_scale=self.cfg_text_scale,
                                               cfg_image_scale=1.0, generator=generator,
                                               append=False)
                pixels = ((image.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
                out.append(_to_uint8(pixels))
            except Exception as exc:
                out.append(_failure(exc))
        return out


def build_renderer(config: RenderConfig) -> Renderer:
    """The configured renderer, loaded (a missing directory fails here, clearly)."""
    if config.backend == "mot":
        return MoTRenderer.from_config(config)
    return DiffusersRenderer(config)


def renderer_identity(config: RenderConfig) -> tuple[str, str]:
    """(model id, revision) without loading weights: what cache keys and the ledger use."""
    path = Path(os.path.expanduser(config.path))
    if config.backend == "mot":
        revision = config.revision or directory_revision(path, config.vae_path,
                                                         config.tokenizer_path)
        return f"mot:{path.name}", revision
    return (f"diffusers:{config.pipeline_class}:{path.name}",
            config.revision or directory_revision(path))


def renderer_params(config: RenderConfig) -> dict[str, Any]:
    """What `Renderer.params()` will say for this config, without loading it."""
    if config.backend == "mot":
        return {"steps": config.steps, "cfg_text_scale": config.guidance_scale,
                "shift": config.shift}
    keys = ("steps", "guidance_scale", "max_sequence_length", "dtype", "pipeline_class")
    return {k: getattr(config, k) for k in keys}
