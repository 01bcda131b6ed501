"""The model's parts: 2-D sin-cos, the SigLIP2 path, the VAE codec, rectified flow."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from weft.model.flow import (
    TimestepEmbedder,
    euler_step,
    euler_timesteps,
    noise_latents,
    sample_timesteps,
    shift_timesteps,
)
from weft.model.positions import SinCos2D, sincos_2d
from weft.model.tiny_parts import (
    FLUX_SCALING_FACTOR,
    FLUX_SHIFT_FACTOR,
    make_tiny_siglip2,
    make_tiny_vae,
)
from weft.model.vae import LatentCodec, LatentProjection, patchify_latent, unpatchify_latent
from weft.model.vision import (
    VisionConnector,
    VisionEncoder,
    patchify_image,
    prepare_vit_image,
    unpatchify_image,
    vit_grid_for,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_parts")


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> VisionEncoder:
    return VisionEncoder.from_pretrained(make_tiny_siglip2(tiny_dir / "siglip2")).eval()


@pytest.fixture(scope="module")
def codec(tiny_dir: Path) -> LatentCodec:
    return LatentCodec.from_pretrained(make_tiny_vae(tiny_dir / "vae"))


# --- 2-D sin-cos positions ---------------------------------------------------------


def test_sincos_rows_in_first_half_columns_in_second() -> None:
    table = sincos_2d(16, 3, 5)
    assert table.shape == (3, 5, 16)
    # Along a row only the column half changes, along a column only the row half.
    assert torch.equal(table[1, 0, :8], table[1, 4, :8])
    assert not torch.equal(table[1, 0, 8:], table[1, 4, 8:])
    assert torch.equal(table[0, 2, 8:], table[2, 2, 8:])
    assert not torch.equal(table[0, 2, :8], table[2, 2, :8])
    # Position 0: sin = 0, cos = 1 in each half.
    assert torch.equal(table[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))


def test_sincos_module_gathers_grids_row_major_and_is_not_checkpointed() -> None:
    pos = SinCos2D(16, max_rows=6, max_cols=6)
    out = pos(torch.tensor([[2, 3], [1, 2]]))
    assert out.shape == (2 * 3 + 1 * 2, 16)
    full = sincos_2d(16, 6, 6)
    assert torch.equal(out[:6], full[:2, :3].reshape(6, 16))
    assert torch.equal(out[6:], full[:1, :2].reshape(2, 16))
    assert len({tuple(row.tolist()) for row in out[:6]}) == 6
    assert "table" not in pos.state_dict()
    bigger = SinCos2D(16, max_rows=10, max_cols=10)
    bigger.load_state_dict(pos.state_dict())  # the max grid can change freely
    assert torch.allclose(bigger([(2, 3)]), out[:6])


def test_sincos_rejects_grids_beyond_the_table() -> None:
    with pytest.raises(ValueError, match="outside the position table"):
        SinCos2D(8, 4, 4)([(5, 1)])


# --- vision path -------------------------------------------------------------------


def test_patchify_image_matches_siglip2_processor_layout() -> None:
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    image = torch.randn(3, 32, 48)
    patches, grid = patchify_image(image, 16)
    assert grid == (2, 3)
    assert torch.equal(patches, convert_image_to_patches(image, 16))
    assert torch.equal(unpatchify_image(patches, grid, 16), image)
    # Channels last inside a patch: the first values are pixel (0, 0) in R, G, B.
    assert torch.equal(patches[0, :3], image[:, 0, 0])


def test_vit_grid_keeps_aspect_ratio_within_budget() -> None:
    assert vit_grid_for(256, 256, 16, 256) == (16, 16)
    assert vit_grid_for(64, 64, 16, 256) == (16, 16)  # small images are upscaled
    rows, cols = vit_grid_for(300, 1000, 16, 256)
    assert rows * cols <= 256 and cols > 3 * rows - 2
    assert vit_grid_for(10, 5000, 16, 64) == (1, 64)  # thin images stay in the budget
    assert vit_grid_for(10, 5000, 16, 64, max_side=32) == (1, 32)  # and in the table


def test_prepare_vit_image_normalises_to_minus_one_one() -> None:
    image = torch.full((3, 40, 80), 255, dtype=torch.uint8)
    patches, grid = prepare_vit_image(image, 16, max_patches=8)
    assert grid == (2, 4) and patches.shape == (8, 16 * 16 * 3)
    assert torch.allclose(patches, torch.ones_like(patches))


def test_vision_encoder_packs_images_of_different_shapes_in_order(
        encoder: VisionEncoder) -> None:
    torch.manual_seed(0)
    a, grid_a = patchify_image(torch.randn(3, 32, 64), 16)   # 2 x 4
    b, grid_b = patchify_image(torch.randn(3, 48, 16), 16)   # 3 x 1
    with torch.no_grad():
        both = encoder(torch.cat([a, b]), torch.tensor([grid_a, grid_b]))
        alone_a = encoder(a, [grid_a])
        alone_b = encoder(b, [grid_b])
    assert both.shape == (8 + 3, encoder.hidden_size)
    assert torch.allclose(both[:8], alone_a, atol=1e-5)
    assert torch.allclose(both[8:], alone_b, atol=1e-5)
    assert encoder(torch.zeros(0, 768), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 32)


def test_vision_encoder_fails_clearly_without_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no SigLIP2 checkpoint"):
        VisionEncoder.from_pretrained(tmp_path)


def test_vision_connector_maps_to_llm_width_with_positions() -> None:
    connector = VisionConnector(vit_dim=32, hidden=24, max_rows=8, max_cols=8)
    features = torch.zeros(6, 32)
    out = connector(features, [(2, 3)])
    assert out.shape == (6, 24)
    # Identical features, different patches: the 2-D positions tell them apart.
    assert len({tuple(row.tolist()) for row in out}) == 6


# --- VAE codec and latent projection -----------------------------------------------


def test_tiny_parts_are_idempotent(tiny_dir: Path) -> None:
    path = make_tiny_vae(tiny_dir / "vae")
    stamp = (path / "config.json").stat().st_mtime_ns
    assert make_tiny_vae(tiny_dir / "vae") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_codec_encodes_to_16_channels_at_one_eighth(codec: LatentCodec) -> None:
    assert (codec.scaling_factor, codec.shift_factor) == (FLUX_SCALING_FACTOR,
                                                          FLUX_SHIFT_FACTOR)
    assert codec.stride == 16 and codec.token_dim == 64
    assert all(not p.requires_grad for p in codec.vae.parameters())
    images = [torch.rand(3, 32, 48) * 2 - 1, torch.rand(3, 16, 16) * 2 - 1,
              torch.rand(3, 32, 48) * 2 - 1]
    latents = codec.encode(images)
    assert [tuple(z.shape) for z in latents] == [(16, 4, 6), (16, 2, 2), (16, 4, 6)]
    decoded = codec.decode(latents)
    assert [tuple(x.shape) for x in decoded] == [(3, 32, 48), (3, 16, 16), (3, 32, 48)]
    assert all(float(x.abs().max()) <= 1.0 for x in decoded)


def test_codec_normalisation_round_trips(codec: LatentCodec) -> None:
    image = torch.rand(3, 16, 32) * 2 - 1
    z = codec.encode([image])[0]
    with torch.no_grad():
        raw = codec.vae.encode(image[None]).latent_dist.mean[0]
        assert torch.allclose(z, (raw - FLUX_SHIFT_FACTOR) * FLUX_SCALING_FACTOR, atol=1e-6)
        expected = codec.vae.decode(raw[None]).sample[0].clamp(-1, 1)
    assert torch.allclose(codec.decode([z])[0], expected, atol=1e-5)


def test_codec_rejects_sizes_off_the_downsampling(codec: LatentCodec) -> None:
    with pytest.raises(ValueError, match="multiple of the VAE downsampling"):
        codec.encode([torch.zeros(3, 20, 16)])


def test_latent_patchify_round_trip_is_exact(codec: LatentCodec) -> None:
    latent = torch.randn(16, 6, 10)
    tokens = codec.patchify(latent)
    assert tokens.shape == (3 * 5, 64)
    assert torch.equal(codec.unpatchify(tokens, (3, 5)), latent)
    assert torch.equal(unpatchify_latent(patchify_latent(latent), (3, 5)), latent)
    assert torch.equal(tokens[0, :16], latent[:, 0, 0])  # channels last, like the ViT


def test_latent_projection_output_is_zero_at_init() -> None:
    proj = LatentProjection(token_dim=64, hidden=32, max_rows=8, max_cols=8)
    hidden = proj.embed(torch.randn(6, 64), [(2, 3)])
    assert hidden.shape == (6, 32)
    velocity = proj(hidden)
    assert velocity.shape == (6, 64) and not velocity.any()
    velocity.sum().backward()
    assert proj.proj_out.weight.grad is not None and proj.proj_out.weight.grad.any()


# --- rectified flow ----------------------------------------------------------------


def test_logit_normal_timesteps_and_shift() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4096, shift=1.0, generator=g)
    assert t.shape == (4096,) and bool(((t > 0) & (t < 1)).all())
    assert abs(float(t.mean()) - 0.5) < 0.02
    shifted = sample_timesteps(4096, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert bool(((shifted > 0) & (shifted < 1)).all())
    assert float(shifted.mean()) > float(t.mean()) + 0.1
    assert torch.equal(shift_timesteps(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))


def test_noised_latents_endpoints_and_target() -> None:
    x0, eps = torch.randn(5, 64), torch.randn(5, 64)
    x_t, target = noise_latents(x0, torch.zeros(5), eps)
    assert torch.equal(x_t, x0) and torch.equal(target, eps - x0)
    x_t, _ = noise_latents(x0, 1.0, eps)
    assert torch.equal(x_t, eps)
    t = torch.tensor([0.25, 0.5, 0.75, 0.1, 0.9])  # one t per token
    x_t, _ = noise_latents(x0, t, eps)
    assert torch.allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 3.0)])
def test_euler_with_exact_velocity_recovers_data(steps: int, shift: float) -> None:
    x0, eps = torch.randn(4, 64), torch.randn(4, 64)
    schedule = euler_timesteps(steps, shift)
    assert schedule.shape == (steps + 1,)
    assert float(schedule[0]) == 1.0 and float(schedule[-1]) == 0.0
    assert bool((schedule[1:] < schedule[:-1]).all())
    x = eps  # x at t = 1
    for t, t_next in itertools.pairwise(schedule):
        x = euler_step(x, eps - x0, t, t_next)
        assert torch.allclose(x, noise_latents(x0, t_next, eps)[0], atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)


def test_timestep_embedder_shape_and_sensitivity() -> None:
    torch.manual_seed(0)
    embedder = TimestepEmbedder(hidden=32)
    out = embedder(torch.tensor([0.0, 0.3, 0.31, 1.0]))
    assert out.shape == (4, 32)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j])
