"""Shapes world scenes and renders: seeded, non-overlapping, pixel-exact, lossless."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from weft.stages.shapes.render import object_mask, png_bytes, read_image, render
from weft.stages.shapes.scene import (
    BACKGROUNDS,
    PALETTE,
    Obj,
    Scene,
    SceneConfig,
    fits,
    relations,
    sample_scene,
)


def _scenes(cfg: SceneConfig, n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg) for _ in range(n)]


def test_the_same_seed_gives_the_same_scenes_and_pixels() -> None:
    cfg = SceneConfig()
    a, b = _scenes(cfg, 20, seed=3), _scenes(cfg, 20, seed=3)
    assert a == b
    assert [png_bytes(render(s)) for s in a] == [png_bytes(render(s)) for s in b]
    assert _scenes(cfg, 20, seed=4) != a


def test_scene_json_round_trips() -> None:
    for scene in _scenes(SceneConfig(), 30):
        assert Scene.from_json(scene.to_json()) == scene


@pytest.mark.parametrize("side", [64, 128])
def test_scenes_keep_their_limits(side: int) -> None:
    cfg = SceneConfig(image_size=side)
    low, high = cfg.size_range
    counts = set()
    for scene in _scenes(cfg, 300):
        counts.add(len(scene.objects))
        assert scene.image_size == side
        for i, obj in enumerate(scene.objects):
            assert low <= obj.size <= high
            assert obj.shape in cfg.shapes and obj.colour in cfg.colours
            assert fits(obj, scene.objects[:i] + scene.objects[i + 1:], cfg)
            assert (obj.x - obj.size / 2).is_integer()  # box edges on pixel edges
    assert counts == {1, 2, 3, 4}


@pytest.mark.parametrize("side", [64, 128])
def test_render_is_pixel_exact(side: int) -> None:
    cfg = SceneConfig(image_size=side)
    allowed = {BACKGROUNDS["white"], *(PALETTE[c] for c in cfg.colours)}
    for scene in _scenes(cfg, 50):
        image = render(scene)
        assert image.shape == (side, side, 3) and image.dtype == np.uint8
        assert {tuple(int(v) for v in p) for p in image.reshape(-1, 3)} <= allowed
        for obj in scene.objects:
            ys, xs = np.nonzero(object_mask(obj, side))
            x0, y0, x1, y1 = obj.box
            assert x0 <= xs.min() and xs.max() + 1 <= x1 and y0 <= ys.min() and ys.max() + 1 <= y1
            extent = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
            # a star's five tips are thinner than a pixel: its pixels span a little less
            assert obj.size - extent <= (max(2, 0.1 * obj.size) if obj.shape == "star" else 0)
            assert (image[ys, xs] == PALETTE[obj.colour]).all()
        assert np.array_equal(read_image(png_bytes(image)), image)


def test_palette_colours_are_far_apart() -> None:
    colours = [np.array(c, float) for c in [*PALETTE.values(), *BACKGROUNDS.values()]]
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(colours) for b in colours[i + 1:]]
    assert min(gaps) > 90


def test_relations_follow_geneval_box_centres() -> None:
    a = Obj("circle", "red", 10, 10, 32)
    assert relations(a, Obj("square", "blue", 10, 50, 32)) == {"left of"}
    assert relations(Obj("square", "blue", 10, 50, 32), a) == {"right of"}
    assert relations(a, Obj("square", "blue", 10, 10, 55)) == {"above"}
    assert relations(a, Obj("square", "blue", 10, 13, 32)) == set()  # within a tenth of sides
    assert relations(a, Obj("square", "blue", 10, 40, 62)) == {"left of", "above"}


@pytest.mark.parametrize("change", [{"shapes": ["circle", "hexagon"]}, {"colours": ["red"]},
                                    {"background": "grey"}, {"min_size": 0.05},
                                    {"min_objects": 3, "max_objects": 2}])
def test_a_bad_scene_config_is_refused(change: dict) -> None:
    with pytest.raises(ValidationError):
        SceneConfig(**change)


def test_a_crowded_config_says_what_to_change() -> None:
    cfg = SceneConfig(min_objects=8, max_objects=8, min_size=0.3, max_size=0.34, max_tries=5)
    with pytest.raises(RuntimeError, match="max_size"):
        sample_scene(np.random.default_rng(0), cfg)
