"""Scenes: what a shapes image shows, exactly, and a seeded sampler of them.

A scene is its image size, a background and 1-4 objects; an object is a shape, a
colour, a size (its bounding box side in pixels) and the centre of that box. Boxes
start on whole pixels (centre = corner + size / 2), so the renderer's pixels and the
detector's boxes agree exactly. Objects never overlap: boxes keep a gap, so two
objects of one colour never touch and the detector sees them apart.

Everything random takes a numpy Generator: a seed gives the same scene on any
machine. Positions relate GenEval's way (`relations`): box centres, less a tenth of
the two boxes' sides, then the dominant direction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# well apart in RGB (nearest pair: yellow / orange, 94 apart); white / black backgrounds
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 220, 0), "purple": (140, 50, 180), "orange": (250, 130, 20),
    "cyan": (0, 190, 200), "pink": (250, 120, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
POSITION_THRESHOLD = 0.1  # GenEval's: a tenth of both boxes' sides is "no offset"
# 3 x 3 named regions (row, column) for edits: "move the red circle to the top left"
REGIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}


class SceneConfig(BaseModel):
    """What scenes look like: image size, object count, shapes, colours, sizes, spacing."""

    model_config = ConfigDict(extra="forbid")
    image_size: int = Field(64, ge=32, le=512, description="square images, pixels (64 or "
                                                           "128 for training)")
    min_objects: int = Field(1, ge=1, le=8)
    max_objects: int = Field(4, ge=1, le=8)
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES),
                              description=f"a subset of {list(SHAPES)}")
    colours: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"],
        description=f"a subset of {list(PALETTE)}")
    background: str = Field("white", description=f"one of {list(BACKGROUNDS)}")
    min_size: float = Field(0.17, gt=0, le=1, description="smallest object side, a fraction "
                                                         "of the image side")
    max_size: float = Field(0.34, gt=0, le=1, description="largest object side, a fraction "
                                                         "of the image side")
    gap: float = Field(0.04, ge=0, description="least gap between two objects' boxes, a "
                                               "fraction of the image side (at least 2 px)")
    margin: float = Field(0.02, ge=0, description="least gap between a box and the border, "
                                                  "a fraction of the image side")
    max_tries: int = Field(200, ge=1, description="placement attempts before a scene is "
                                                  "given up (the caller draws another)")

    @field_validator("shapes", "colours")
    @classmethod
    def _at_least_two_known(cls, value: list[str], info: ValidationInfo) -> list[str]:
        known = list(SHAPES) if info.field_name == "shapes" else list(PALETTE)
        bad = sorted(set(value) - set(known))
        if bad or len(set(value)) < 2:
            raise ValueError(f"{info.field_name} must be at least two of {known}; "
                             f"unknown: {bad}")
        return value

    @field_validator("background")
    @classmethod
    def _background(cls, value: str) -> str:
        if value not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> SceneConfig:
        if self.min_objects > self.max_objects or self.min_size > self.max_size:
            raise ValueError("min_objects / min_size must not exceed max_objects / max_size")
        if self.size_range[0] < 8:
            raise ValueError(f"min_size gives {self.size_range[0]} px objects; the detector "
                             "needs at least 8 px")
        return self

    @property
    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) object side in pixels."""
        return round(self.min_size * self.image_size), round(self.max_size * self.image_size)

    @property
    def gap_px(self) -> int:
        return max(2, round(self.gap * self.image_size))

    @property
    def margin_px(self) -> int:
        return round(self.margin * self.image_size)


@dataclass(frozen=True)
class Obj:
    """One shape: its box is [x - size/2, x + size/2] x [y - size/2, y + size/2]."""

    shape: str
    colour: str
    size: int
    x: float
    y: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return self.x - half, self.y - half, self.x + half, self.y + half

    @property
    def label(self) -> tuple[str, str]:
        return self.colour, self.shape

    def moved_to(self, x: float, y: float) -> Obj:
        return replace(self, x=x, y=y)


@dataclass(frozen=True)
class Scene:
    """An image's exact content: size, background and objects (in drawing order)."""

    image_size: int
    background: str
    objects: tuple[Obj, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "background": self.background,
                "objects": [asdict(o) for o in self.objects]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(int(data["image_size"]), str(data["background"]),
                   tuple(Obj(**o) for o in data["objects"]))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))

    def labels(self) -> list[tuple[str, str]]:
        """The (colour, shape) multiset, sorted."""
        return sorted(o.label for o in self.objects)

    def unique(self, obj: Obj) -> bool:
        """No other object shares its colour and shape (so "the red circle" names it)."""
        return sum(o.label == obj.label for o in self.objects) == 1

    def with_objects(self, objects: list[Obj] | tuple[Obj, ...]) -> Scene:
        return replace(self, objects=tuple(objects))


def relations(a: Obj, b: Obj) -> set[str]:
    """Where a lies relative to b, GenEval's way (image y grows downwards)."""
    offset = np.array([a.x - b.x, a.y - b.y], dtype=float)
    norm = float(np.linalg.norm(offset))
    if norm == 0:
        return set()
    slack = POSITION_THRESHOLD * (a.size + b.size)
    revised = np.maximum(np.abs(offset) - slack, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def fits(obj: Obj, others: list[Obj] | tuple[Obj, ...], cfg: SceneConfig) -> bool:
    """Inside the margins and at least `gap` away from every other box."""
    x0, y0, x1, y1 = obj.box
    m, side = cfg.margin_px, cfg.image_size
    if x0 < m or y0 < m or x1 > side - m or y1 > side - m:
        return False
    g = cfg.gap_px
    for o in others:
        a0, b0, a1, b1 = o.box
        if x0 < a1 + g and a0 < x1 + g and y0 < b1 + g and b0 < y1 + g:
            return False
    return True


def corner_to_centre(corner: int, size: int) -> float:
    """Box centres sit on whole or half pixels so box edges fall on pixel edges."""
    return corner + size / 2


def snap(centre: float, size: int, cfg: SceneConfig) -> float:
    """The nearest centre whose box starts on a whole pixel inside the margins."""
    low, high = cfg.margin_px, cfg.image_size - cfg.margin_px - size
    corner = int(np.clip(round(centre - size / 2), low, max(low, high)))
    return corner_to_centre(corner, size)


def random_size(rng: np.random.Generator, cfg: SceneConfig) -> int:
    low, high = cfg.size_range
    return int(rng.integers(low, high + 1))


def place(rng: np.random.Generator, cfg: SceneConfig, shape: str, colour: str,
          others: list[Obj] | tuple[Obj, ...] = (), size: int | None = None) -> Obj | None:
    """The object at a random free position (None when `max_tries` find none)."""
    for _ in range(cfg.max_tries):
        side = size if size is not None else random_size(rng, cfg)
        high = cfg.image_size - cfg.margin_px - side
        if high < cfg.margin_px:
            return None
        x = corner_to_centre(int(rng.integers(cfg.margin_px, high + 1)), side)
        y = corner_to_centre(int(rng.integers(cfg.margin_px, high + 1)), side)
        obj = Obj(shape, colour, side, x, y)
        if fits(obj, others, cfg):
            return obj
    return None


def region_centre(region: str, size: int, cfg: SceneConfig) -> tuple[float, float]:
    """Where an object of this size goes for a named region (snapped inside the image)."""
    row, col = REGIONS[region]
    step = cfg.image_size / 3
    return snap((col + 0.5) * step, size, cfg), snap((row + 0.5) * step, size, cfg)


def region_of(obj: Obj, cfg: SceneConfig) -> str:
    """The named region the object's centre lies in."""
    step = cfg.image_size / 3
    row = min(2, int(obj.y // step))
    col = min(2, int(obj.x // step))
    return next(name for name, rc in REGIONS.items() if rc == (row, col))


def pick(rng: np.random.Generator, options: list[Any] | tuple[Any, ...]) -> Any:
    """One element, uniformly (rng.choice would turn strings into numpy strings)."""
    return options[int(rng.integers(len(options)))]


def sample_objects(rng: np.random.Generator, cfg: SceneConfig,
                   labels: list[tuple[str | None, str | None]]) -> Scene | None:
    """A scene of exactly these (colour, shape) objects; None fills in at random."""
    objects: list[Obj] = []
    for colour, shape in labels:
        obj = place(rng, cfg, shape or pick(rng, cfg.shapes), colour or pick(rng, cfg.colours),
                    objects)
        if obj is None:
            return None
        objects.append(obj)
    return Scene(cfg.image_size, cfg.background, tuple(objects))


def sample_scene(rng: np.random.Generator, cfg: SceneConfig, n_objects: int | None = None,
                 max_objects: int | None = None) -> Scene:
    """A random scene of `n_objects` (or min..max) objects; redraws until one fits."""
    high = min(cfg.max_objects, max_objects or cfg.max_objects)
    for _ in range(cfg.max_tries):
        n = n_objects or int(rng.integers(min(cfg.min_objects, high), high + 1))
        scene = sample_objects(rng, cfg, [(None, None)] * n)
        if scene is not None:
            return scene
    raise RuntimeError(f"no scene of {n_objects or high} objects fits a {cfg.image_size} px "
                       "image: lower max_size, gap or max_objects")


__all__ = ["BACKGROUNDS", "OPPOSITE", "PALETTE", "REGIONS", "RELATIONS", "SHAPES", "Obj",
           "Scene", "SceneConfig", "fits", "pick", "place", "random_size", "region_centre",
           "region_of", "relations", "sample_objects", "sample_scene", "snap"]
