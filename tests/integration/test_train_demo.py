"""The demo's training step: the tiny MoT on shards of the curated test videos learns."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae
from weft.pipelines.mixture import build_mixture, single_run_mixture
from weft.train.loop import run_training
from weft.train.recipes import tiny_recipe
from weft.train.sample import sample_run

pytestmark = pytest.mark.integration


def test_tiny_mot_trains_on_curated_video_shards_and_samples(video_run, tiny_models,
                                                              tmp_path) -> None:
    shards = tmp_path / "shards"
    build_mixture(single_run_mixture(video_run["run_dir"], "video"), Path("."), shards)
    config = tiny_recipe(tiny_models["qwen2_5"], make_tiny_siglip2(tmp_path / "siglip2"),
                         make_tiny_vae(tmp_path / "vae"), shards, tmp_path / "train",
                         overrides={"steps": 40, "checkpoint": {"every_steps": 20}})
    result = run_training(config)
    history = result.history
    assert result.step == 40 and len(history) == 40
    assert all(h.ce_tokens > 0 and h.mse_tokens > 0 for h in history)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    first, last = history[:5], history[-5:]
    assert mean([h.ce for h in last]) < 0.8 * mean([h.ce for h in first])
    assert mean([h.mse for h in last]) < 0.9 * mean([h.mse for h in first])
    assert (tmp_path / "train" / "export" / "ema.safetensors").is_file()

    frame = sorted((video_run["run_dir"] / "keyframes").glob("*/0.jpg"))[0]
    sample = sample_run(tmp_path / "train", "a frame of a video", frame, size=(32, 48),
                        steps=4)
    with Image.open(sample.image_path) as image:
        assert image.size == (48, 32)
    assert sample.caption_ids and isinstance(sample.caption, str)
