"""The shapes ViT pretraining: patch labels against a brute-force reference, a short run
that learns shape and object centres beyond chance, and a tower that loads as SigLIP2
weights."""

from __future__ import annotations

import numpy as np
import torch

from weft.model.vision import VisionEncoder, prepare_vit_image
from weft.stages.shapes.render import object_mask, render
from weft.stages.shapes.scene import Obj, Scene, SceneConfig, sample_scene
from weft.stages.shapes.vit_train import (
    MIN_COVER,
    load_stats,
    patch_centres,
    patch_classes,
    patch_labels,
    scene_batch,
    train_shapes_vit,
)

WORLD = SceneConfig(image_size=32, shapes=["circle", "square", "triangle"],
                    colours=["red", "green", "blue", "yellow"], max_objects=3,
                    min_size=0.3, max_size=0.45)


def test_an_aligned_square_labels_exactly_its_four_patches() -> None:
    scene = Scene(32, "white", (Obj("square", "blue", 8, 12.0, 12.0),))  # box 8..16
    labels = patch_labels(scene, WORLD, 4).reshape(8, 8)
    blue_square = patch_classes(WORLD).index("blue square")
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[2:4, 2:4] = blue_square
    np.testing.assert_array_equal(labels, expected)
    centres = patch_centres(scene, 4).reshape(8, 8, 2)
    np.testing.assert_allclose(centres[2:4, 2:4], 12 / 32)  # the square's centre, both axes
    assert not centres[labels == 0].any()


def test_patch_labels_match_a_pixel_count_reference() -> None:
    rng = np.random.default_rng(3)
    classes = patch_classes(WORLD)
    for _ in range(20):
        scene = sample_scene(rng, WORLD)
        labels = patch_labels(scene, WORLD, 4).reshape(8, 8)
        expected = np.zeros((8, 8), dtype=np.int64)
        for obj in scene.objects:
            mask = object_mask(obj, 32)
            for r in range(8):
                for c in range(8):
                    if mask[4 * r:4 * r + 4, 4 * c:4 * c + 4].sum() > MIN_COVER * 16:
                        expected[r, c] = classes.index(f"{obj.colour} {obj.shape}")
        np.testing.assert_array_equal(labels, expected)


def test_scene_batch_patches_are_what_the_model_reads() -> None:
    rng = np.random.default_rng(5)
    pixels, labels, centres = scene_batch(rng, WORLD, 2, 4)
    assert pixels.shape == (2, 64, 48) and labels.shape == (2, 64)
    assert centres.shape == (2, 64, 2)
    scene = sample_scene(np.random.default_rng(5), WORLD)
    image = torch.from_numpy(render(scene)).permute(2, 0, 1)
    torch.testing.assert_close(pixels[0], prepare_vit_image(image, 4, 64)[0])


def test_pretraining_learns_shape_and_loads_as_siglip2(tmp_path) -> None:
    out = train_shapes_vit(tmp_path / "vit", WORLD, hidden=32, layers=2, patch=4, steps=300,
                           batch_size=32, lr=5e-3)
    stats = load_stats(out)
    assert stats.classes == patch_classes(WORLD)
    assert stats.last_loss < stats.first_loss / 4
    # chance for the shape of an object patch is 1/3 (3 shapes); colour alone is easy
    assert stats.shape_accuracy > 0.6, stats
    _, labels, _ = scene_batch(np.random.default_rng(9), WORLD, 256, 4)
    background = float((labels == 0).float().mean())  # what "all background" scores
    assert stats.patch_accuracy > background + 0.1, (stats.patch_accuracy, background)
    assert np.isnan(stats.centre_error_px)  # not trained, not reported
    encoder = VisionEncoder.from_pretrained(out)
    assert (encoder.patch_size, encoder.hidden_size) == (4, 32)
    patches, grid = prepare_vit_image(torch.zeros(3, 32, 32, dtype=torch.uint8), 4, 64)
    assert encoder(patches, [grid]).shape == (64, 32)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert train_shapes_vit(out, WORLD, hidden=32, layers=2, patch=4, steps=300) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained


def test_location_pretraining_finds_object_centres(tmp_path) -> None:
    out = train_shapes_vit(tmp_path / "vit", WORLD, hidden=32, layers=2, patch=4, steps=200,
                           batch_size=32, lr=5e-3, location_weight=10.0)
    stats = load_stats(out)
    # an object patch points at its object's centre far closer than the object's side
    # (10-14 px; guessing the image centre is off by ~9 px)
    assert stats.centre_error_px < 4.0, stats.centre_error_px
    assert stats.patch_accuracy > 0.8, stats.patch_accuracy
