"""Sample from a trained run's export: an image from a prompt, a caption of an image.

What the demo does after training, and a quick check for an operator that a run's
weights load and produce something: `sample_run(RUN_DIR, prompt, image)` loads
RUN/export (safetensors), the frozen VAE and the tokenizer named in RUN/config.json,
and drives the KV-cached `Interleaver` the way the trainer's plans lay samples out
(text, `<|vision_start|>`, image, `<|vision_end|>`, text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weft.train.config import TrainConfig
from weft.train.packer import TextTokens


@dataclass
class SampleResult:
    image_path: Path | None
    image_size: tuple[int, int] | None
    caption: str | None
    caption_ids: list[int]


@dataclass
class Loaded:
    """An exported run ready to sample: model, codec, tokenizer and its image spec."""

    model: Any
    codec: Any
    tokenizer: Any
    text: Any  # train.packer.TextTokens
    spec: Any  # train.images.ImageSpec
    guide: Any = None  # an earlier MoTModel of the run, for autoguidance (`load_guide`)


def load_guide(run_dir: str | Path, step: int, weights: str = "ema") -> Any:
    """The run's model as exported at `step` (`checkpoint.export_steps`; else exported now
    from a checkpoint of that step): the weaker version of itself that autoguidance
    steers away from."""
    from weft.train.checkpoint import (
        MARKER,
        export_checkpoint,
        load_exported,
        step_dir,
        step_export_dir,
    )

    path = step_export_dir(run_dir, step)
    if not (path / "unified_config.json").is_file():
        if not (step_dir(run_dir, step) / MARKER).is_file():
            raise FileNotFoundError(
                f"{run_dir} has no export or checkpoint of step {step} ({path}): train it "
                f"with checkpoint.export_steps: [{step}] (a run already past that step "
                "kept no weights of it and has to train again)")
        export_checkpoint(run_dir, step_dir(run_dir, step), path)
    return load_exported(path, weights).eval()


def load_run(run_dir: str | Path, weights: str = "ema", guide_step: int | None = None
             ) -> Loaded:
    """A run's export (safetensors), its frozen VAE, its tokenizer and the image spec it
    was trained with: everything that samples from a run loads it this way.
    guide_step: also load the run's export at that step as `guide` (autoguidance)."""
    from transformers import AutoTokenizer

    from weft.model.vae import LatentCodec
    from weft.train.checkpoint import load_exported
    from weft.train.images import ImageSpec

    run = Path(run_dir)
    guide = None if guide_step is None else load_guide(run, guide_step, weights)
    config = TrainConfig.model_validate_json((run / "config.json").read_text())
    if config.model.vae_path is None:
        raise ValueError(f"{run} was trained without a VAE: nothing to generate with")
    model = load_exported(run / "export", weights=weights).eval()
    codec = LatentCodec.from_pretrained(config.model.vae_path,
                                        patch=model.config.latent_patch)
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer or
                                              config.model.llm_checkpoint,
                                              local_files_only=True)
    spec = ImageSpec.from_config(config.data, model.config,
                                 model.vision.patch_size if model.vision else None)
    return Loaded(model, codec, tokenizer, TextTokens(tokenizer), spec, guide)


def _to_pixels(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> uint8 HWC."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)


def sample_run(run_dir: str | Path, prompt: str | None = None,
               image: str | Path | None = None, out_dir: str | Path | None = None,
               size: tuple[int, int] = (64, 64), steps: int = 20, max_caption_tokens: int = 30,
               weights: str = "ema", seed: int = 0) -> SampleResult:
    """Generate an image for `prompt` (saved as PNG) and caption `image` (greedy)."""
    from PIL import Image

    from weft.model.inference import Interleaver
    from weft.train.images import decode_rgb, vae_input

    run = Path(run_dir)
    loaded = load_run(run, weights)
    model, codec, tokenizer, text = loaded.model, loaded.codec, loaded.tokenizer, loaded.text
    start, end = text.markers or (None, None)
    out = Path(out_dir) if out_dir is not None else run / "samples"
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    result = SampleResult(None, None, None, [])
    if prompt is not None:
        inter = Interleaver(model, codec)
        ids = text.encode(prompt) + ([start] if start is not None else [])
        inter.append_text([ids])
        [generated] = inter.generate_image(size[0], size[1], steps=steps,
                                           generator=generator, append=False)
        path = out / "generated.png"
        Image.fromarray(_to_pixels(generated).numpy()).save(path)
        result.image_path, result.image_size = path, (size[0], size[1])
    if image is not None:
        spec = loaded.spec
        pixels = vae_input(decode_rgb(Path(image).read_bytes(), spec.max_pixels), spec)
        inter = Interleaver(model, codec)
        if start is not None:
            inter.append_text([[start]])
        inter.append_image([pixels])
        if end is not None:
            inter.append_text([[end]])
        [ids] = inter.decode_text(max_caption_tokens, eos_id=text.eos)
        if start is not None and start in ids:  # the caption ends where an image would begin
            ids = ids[:ids.index(start)]
        result.caption_ids = ids
        result.caption = tokenizer.decode(ids, skip_special_tokens=True)
    return result
