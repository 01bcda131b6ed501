"""Spatial RoPE: image tokens rotate by where they are in their image, text as before.

With `spatial_rope_pairs` = 0 the rotary tables are Qwen2's; with pairs, attention between
two image tokens depends on their offset in the image (so an edit's target token can find
the source token at the same place), and text tokens see no image axis at all.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from weft.model.config import MoTConfig
from weft.model.layers import RotaryEmbedding, apply_rotary
from weft.model.packed import IMAGE_AXIS_UNITS, PackBuilder, TokenKind, image_token_coords

HEAD_DIM, THETA = 32, 1_000_000.0


def _reference_qwen2(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = positions.float()[:, None] * inv[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def test_without_spatial_pairs_the_tables_are_qwen2s() -> None:
    positions = torch.tensor([0, 1, 5, 5, 5, 6, 300])
    cos, sin = RotaryEmbedding(HEAD_DIM, THETA)(positions)
    ref_cos, ref_sin = _reference_qwen2(positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


def _score(rope: RotaryEmbedding, q: torch.Tensor, k: torch.Tensor, pos: tuple[int, int],
           where: tuple[tuple[float, float], tuple[float, float]]) -> float:
    cos, sin = rope(torch.tensor(pos), torch.tensor(where))
    rq = apply_rotary(q[None, None], cos[:1], sin[:1])
    rk = apply_rotary(k[None, None], cos[1:], sin[1:])
    return float((rq * rk).sum())


def test_image_tokens_attend_by_their_offset_in_the_image() -> None:
    rope = RotaryEmbedding(HEAD_DIM, THETA, spatial_pairs=4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    # a target token and a source token one image apart in the sequence: the score
    # depends on (row, col) offset only, not on where in the image the pair sits
    here = _score(rope, q, k, (9, 4), ((1.0, 2.0), (3.0, 5.0)))
    moved = _score(rope, q, k, (9, 4), ((4.0, 0.5), (6.0, 3.5)))
    assert here == pytest.approx(moved, rel=1e-4, abs=1e-4)
    # another offset scores differently: position is visible to attention
    assert abs(here - _score(rope, q, k, (9, 4), ((1.0, 2.0), (1.0, 2.0)))) > 1e-3
    # BAGEL's RoPE gives every token of an image one position: no offset is visible
    flat = RotaryEmbedding(HEAD_DIM, THETA)
    assert _score(flat, q, k, (9, 4), ((1.0, 2.0), (3.0, 5.0))) == \
        _score(flat, q, k, (9, 4), ((1.0, 2.0), (1.0, 2.0)))


def test_text_tokens_see_no_image_axis() -> None:
    """Text sits at (0, 0): its image-axis pairs do not rotate, and its sequence pairs
    are Qwen2's highest frequencies."""
    rope = RotaryEmbedding(HEAD_DIM, THETA, spatial_pairs=4)
    positions = torch.arange(7)
    cos, sin = rope(positions, torch.zeros(7, 2))
    half, seq = HEAD_DIM // 2, HEAD_DIM // 2 - 8
    for table, unrotated in ((cos, 1.0), (sin, 0.0)):
        for start in (0, half):
            assert torch.all(table[:, start + seq:start + half] == unrotated)
    ref_cos, _ = _reference_qwen2(positions)
    torch.testing.assert_close(cos[:, :seq], ref_cos[:, :seq])
    with pytest.raises(ValueError, match="row, col"):
        rope(positions)


def test_a_vit_patch_and_a_latent_over_the_same_pixels_share_coordinates() -> None:
    vit, vae = image_token_coords([(8, 8)]), image_token_coords([(4, 4)])
    assert vit.shape == (64, 2) and vae.shape == (16, 2)
    # latent (r, c) covers ViT patches (2r..2r+1, 2c..2c+1): its centre is their mean
    vit_grid = vit.reshape(8, 8, 2)
    for r in range(4):
        for c in range(4):
            block = vit_grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, 2).mean(0)
            torch.testing.assert_close(vae[r * 4 + c], block)
    assert float(vae.min()) > 0 and float(vae.max()) < IMAGE_AXIS_UNITS
    wide = image_token_coords([(2, 4)])  # rows and columns each span the image
    assert wide[:, 0].unique().tolist() == [IMAGE_AXIS_UNITS / 4, 3 * IMAGE_AXIS_UNITS / 4]


def test_a_packed_batch_gives_each_image_token_its_place() -> None:
    image = torch.zeros(3, 16, 32)
    batch = (PackBuilder(vit_patch=8, vae_stride=8).new_document()
             .add_text([1, 2, 3])
             .add_vae_image(image, noised=False)
             .add_vit_image(torch.zeros(8, 3 * 8 * 8), (2, 4), True)
             .add_text([4], loss=True)
             .build(pad_to=32))
    coords = batch.spatial_coords()
    text = (batch.kind == TokenKind.TEXT) | (batch.kind == TokenKind.PAD)
    assert torch.all(coords[text] == 0)
    torch.testing.assert_close(coords[batch.vae_index], image_token_coords([(2, 4)]))
    torch.testing.assert_close(coords[batch.vit_index], image_token_coords([(2, 4)]))


def test_too_many_spatial_pairs_fail_at_config_time() -> None:
    with pytest.raises(ValidationError, match="spatial_rope_pairs 4 per image axis"):
        MoTConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                  num_heads=4, num_kv_heads=2, spatial_rope_pairs=4)  # head_dim 16: 8 pairs
    MoTConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
              num_heads=4, num_kv_heads=2, spatial_rope_pairs=3)
