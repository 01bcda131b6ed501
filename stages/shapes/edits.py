"""Changes to scenes and their words: edits (source, instruction, target) and short clips.

An edit names one object the scene has exactly one of ("the red circle") and does
one thing to it: recolour, move (to a named region of a 3x3 grid, a fifth of the
image or more away), add (a new object in a named region) or remove. Its target
scene is exact, so an edited image is scored by detecting it and comparing with
the target.

A clip is one object moving a fixed step per frame, a direction per transition, with
a caption for each transition ("the red circle moves right"): what the trainer's
video_clip plan reads as frame, caption, frame, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weft.stages.shapes.scene import (
    REGIONS,
    Obj,
    Scene,
    SceneConfig,
    fits,
    pick,
    random_size,
    region_centre,
    region_of,
    sample_scene,
)
from weft.stages.shapes.text import noun, the

EDIT_OPS = ("recolour", "move", "add", "remove")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1),
                                          "down": (0, 1)}
MIN_MOVE = 0.2  # a move goes at least this far (a fraction of the image side): never a no-op


@dataclass(frozen=True)
class Edit:
    """A scene, what to change in words, and the scene after the change."""

    op: str
    instruction: str
    source: Scene
    target: Scene


def _others(scene: Scene, obj: Obj) -> list[Obj]:
    return [o for o in scene.objects if o is not obj]


def _swap(scene: Scene, old: Obj, new: Obj) -> Scene:
    return scene.with_objects([new if o is old else o for o in scene.objects])


def sample_edit(rng: np.random.Generator, scene: Scene, cfg: SceneConfig,
                op: str) -> Edit | None:
    """A random edit of this kind to the scene (None when the scene allows none)."""
    named = [o for o in scene.objects if scene.unique(o)]
    if op == "recolour":
        if not named:
            return None
        obj = pick(rng, named)
        colour = pick(rng, [c for c in cfg.colours if c != obj.colour])
        new = Obj(obj.shape, colour, obj.size, obj.x, obj.y)
        return Edit(op, f"make {the(obj)} {colour}", scene, _swap(scene, obj, new))
    if op == "move":
        if not named:
            return None
        obj = pick(rng, named)
        here = region_of(obj, cfg)
        options = []
        far = MIN_MOVE * cfg.image_size
        for region in REGIONS:
            moved = obj.moved_to(*region_centre(region, obj.size, cfg))
            if region != here and region_of(moved, cfg) == region and \
                    np.hypot(moved.x - obj.x, moved.y - obj.y) >= far and \
                    fits(moved, _others(scene, obj), cfg):
                options.append((region, moved))
        if not options:
            return None
        region, moved = pick(rng, options)
        return Edit(op, f"move {the(obj)} to the {region}", scene, _swap(scene, obj, moved))
    if op == "add":
        if len(scene.objects) >= cfg.max_objects:
            return None
        colour, shape = pick(rng, cfg.colours), pick(rng, cfg.shapes)
        size = random_size(rng, cfg)
        options = []
        for region in REGIONS:
            new = Obj(shape, colour, size, *region_centre(region, size, cfg))
            if region_of(new, cfg) == region and fits(new, scene.objects, cfg):
                options.append((region, new))
        if not options:
            return None
        region, new = pick(rng, options)
        return Edit(op, f"add {noun(colour, shape)} to the {region}", scene,
                    scene.with_objects([*scene.objects, new]))
    if op == "remove":
        if len(scene.objects) < 2 or not named:
            return None
        obj = pick(rng, named)
        return Edit(op, f"remove {the(obj)}", scene, scene.with_objects(_others(scene, obj)))
    raise ValueError(f"edit op must be one of {EDIT_OPS}, got {op!r}")


@dataclass(frozen=True)
class Clip:
    """Frames of one object moving, and what happens between each frame and the next."""

    scenes: tuple[Scene, ...]
    captions: tuple[str, ...]


def sample_clip(rng: np.random.Generator, cfg: SceneConfig, frames: int, step: float,
                max_objects: int) -> Clip | None:
    """A clip of `frames` scenes; `step` is the move per frame, a fraction of the image."""
    scene = sample_scene(rng, cfg, max_objects=max_objects)
    named = [o for o in scene.objects if scene.unique(o)]
    if not named:
        return None
    index = scene.objects.index(pick(rng, named))
    px = max(1, round(step * cfg.image_size))
    scenes, captions = [scene], []
    for _ in range(frames - 1):
        current = scenes[-1]
        obj = current.objects[index]
        others = [o for i, o in enumerate(current.objects) if i != index]
        options = [(name, obj.moved_to(obj.x + dx * px, obj.y + dy * px))
                   for name, (dx, dy) in DIRECTIONS.items()]
        options = [(n, m) for n, m in options if fits(m, others, cfg)]
        if not options:
            return None
        name, moved = pick(rng, options)
        scenes.append(_swap(current, obj, moved))
        captions.append(f"{the(obj)} moves {name}")
    return Clip(tuple(scenes), tuple(captions))


__all__ = ["DIRECTIONS", "EDIT_OPS", "Clip", "Edit", "sample_clip", "sample_edit"]
