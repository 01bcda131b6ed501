"""The toy detector reads renders back exactly (>= 0.99 of scenes) and copes with blur."""

from __future__ import annotations

import numpy as np
import pytest

from weft.stages.shapes.detect import UNKNOWN, detect, detect_scene, match_scene
from weft.stages.shapes.geneval import detector_accuracy
from weft.stages.shapes.render import render
from weft.stages.shapes.scene import SHAPES, Obj, Scene, SceneConfig


def test_detector_reads_500_rendered_scenes_back() -> None:
    """Exact object multiset, centres within 1 px and sizes exact, on >= 99 % of scenes."""
    accuracy = detector_accuracy(SceneConfig(), 500)
    print(f"detector accuracy, 500 clean 64 px scenes: {accuracy:.3f}")
    assert accuracy >= 0.99


def test_detector_reads_128px_scenes_back() -> None:
    assert detector_accuracy(SceneConfig(image_size=128), 100) >= 0.99


@pytest.mark.parametrize(("blur", "noise"), [(0.7, 4.0), (1.0, 8.0)])
def test_detector_copes_with_blur_and_noise(blur: float, noise: float) -> None:
    """What a VAE gives back is blurred and noisy; centres within 2 px, sizes within 2."""
    accuracy = detector_accuracy(SceneConfig(), 150, blur, noise, pos_tol=2, size_tol=2)
    print(f"detector accuracy, blur {blur} px + noise {noise}: {accuracy:.3f}")
    assert accuracy >= 0.95


def test_detector_finds_nothing_in_an_empty_image_and_reads_black_backgrounds() -> None:
    assert detect(render(Scene(64, "white", ()))) == []
    scene = Scene(64, "black", (Obj("star", "yellow", 20, 20, 20),
                                Obj("circle", "blue", 16, 44, 46)))
    found = detect_scene(render(scene))
    assert found.background == "black"
    assert match_scene(scene, found, pos_tol=0, size_tol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_at_the_smallest_size(shape: str) -> None:
    cfg = SceneConfig()
    size = cfg.size_range[0]
    for x0 in range(4, 8):
        scene = Scene(64, "white", (Obj(shape, "purple", size, x0 + size / 2, 30 + size / 2),))
        assert match_scene(scene, detect(render(scene)), pos_tol=0, size_tol=0)


def test_match_scene_pairs_objects_of_one_label_in_any_order() -> None:
    a, b = Obj("circle", "red", 12, 10, 10), Obj("circle", "red", 12, 50, 50)
    assert match_scene([a, b], [b, a], pos_tol=0)
    assert not match_scene([a, b], [a, a], pos_tol=1)
    assert not match_scene([a], [a, b], pos_tol=1)
    assert not match_scene([a], [Obj("circle", "red", 12, 14, 10)], pos_tol=3)


def test_a_blob_like_no_shape_is_an_unknown_object() -> None:
    image = render(Scene(64, "white", (Obj("circle", "red", 16, 40, 40),)))
    image[5:35, 5:10] = (30, 70, 220)  # a blue bar
    image[45:60, 5:20] = (30, 160, 50)
    image[48:57, 8:17] = (255, 255, 255)  # a green ring
    found = detect(image)
    assert sorted(o.label for o in found) == [("blue", UNKNOWN), ("green", UNKNOWN),
                                              ("red", "circle")]


SMALL_WORLD = SceneConfig(image_size=32, shapes=["circle", "square", "triangle"],
                          colours=["red", "green", "blue", "yellow"], max_objects=3,
                          min_size=0.3, max_size=0.45)  # the CPU recipe's world


def test_detector_reads_the_small_worlds_renders_back_in_its_vocabulary() -> None:
    """The evaluation reads a world in its own shapes: its renders still read back exactly."""
    assert detector_accuracy(SMALL_WORLD, 300) >= 0.99


def _squircle(side: int = 32, radius: float = 6.5, power: float = 4.0) -> np.ndarray:
    """A red |x|^p + |y|^p <= r^p blob: between a circle (p = 2) and a square (p -> inf),
    what an under-trained generator draws for either."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    inside = np.abs(xx - 16) ** power + np.abs(yy - 16) ** power <= radius ** power
    image = np.full((side, side, 3), 255, np.uint8)
    image[inside] = (230, 30, 30)
    return image


def test_a_blob_between_shapes_is_one_of_the_worlds_shapes() -> None:
    """In a world without diamonds or stars a blob is the world's nearest shape (or
    unknown when it fits none), not a shape that world cannot hold."""
    world = tuple(SMALL_WORLD.shapes)
    for power in (2.5, 3.0, 4.0, 6.0):
        [obj] = detect(_squircle(power=power), shapes=world)
        assert obj.shape in ("circle", "square") and obj.colour == "red", (power, obj)
        assert abs(obj.x - 16) <= 1 and abs(obj.y - 16) <= 1
    diamond = render(Scene(64, "white", (Obj("diamond", "blue", 20, 32, 32),)))
    assert [o.shape for o in detect(diamond)] == ["diamond"]  # the full vocabulary knows it
    [read] = detect(diamond, shapes=world)
    assert read.shape in (*world, UNKNOWN)
