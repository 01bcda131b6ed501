"""The shapes VAE trains quickly, saves, and loads back through LatentCodec normalised."""

from __future__ import annotations

import pytest
import torch

from weft.model.vae import LatentCodec
from weft.stages.shapes.scene import SceneConfig
from weft.stages.shapes.vae_train import load_stats, reconstruction_report, train_shapes_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return train_shapes_vae(tmp_path_factory.mktemp("vae") / "vae", steps=30, batch_size=4,
                            widths=(8, 16, 16, 16), seed=0)


def test_reconstruction_error_falls_during_training(vae_dir) -> None:
    stats = load_stats(vae_dir)
    assert stats.steps == 30 and len(stats.history) == 30
    assert stats.last_l1 < 0.6 * stats.first_l1
    assert stats.last_loss < 0.5 * stats.first_loss


def test_saved_vae_loads_as_a_flux_shaped_codec_with_unit_latents(vae_dir) -> None:
    codec = LatentCodec.from_pretrained(vae_dir)
    assert (codec.channels, codec.downsample, codec.stride, codec.token_dim) == (16, 8, 16, 64)
    report = reconstruction_report(vae_dir, n=4)
    assert abs(report["latent_mean"]) < 0.3
    assert 0.7 < report["latent_std"] < 1.3
    [image] = codec.decode(codec.encode([torch.zeros(3, 64, 64)]))
    assert image.shape == (3, 64, 64)


def test_training_is_reused_when_the_directory_is_complete(vae_dir) -> None:
    before = (vae_dir / "config.json").stat().st_mtime_ns
    assert train_shapes_vae(vae_dir, steps=5) == vae_dir
    assert (vae_dir / "config.json").stat().st_mtime_ns == before


def test_reconstruction_report_reads_the_asked_world_at_the_vaes_size(vae_dir) -> None:
    world = SceneConfig(image_size=64, shapes=("circle", "square"), colours=("red", "blue"))
    report = reconstruction_report(vae_dir, n=3, scene=world)
    assert 0.0 <= report["detect"] <= 1.0 and report["l1"] > 0
    noisy = reconstruction_report(vae_dir, n=3, scene=world, latent_noise=3.0)
    assert noisy["l1"] > report["l1"]  # far-off latents decode worse
    with pytest.raises(ValueError, match="sample_size 64"):
        reconstruction_report(vae_dir, n=1, scene=SceneConfig(image_size=128))
