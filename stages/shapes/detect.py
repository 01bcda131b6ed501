"""The toy detector: colour segmentation + shape templates, deterministic and exact on renders.

Segmentation: a pixel belongs to colour c when it lies on the line from the
background to c (a blend of the two, as blur or a VAE makes at an edge) and at
least halfway along it; otherwise to nothing. Halfway is where a blurred edge
crosses, so a component is the shape's 50 % level set whatever its colour.
Each colour's connected components are candidates; specks (a few pixels of noise)
and fringes (thin components that a 3x3 erosion wipes out) are dropped.

Shape: the component is compared (IoU, best of 3x3 one-pixel shifts) with every
shape's template at nearby sizes, drawn by the renderer and, when no sharp
template fits (IoU < 0.97), blurred at a few strengths and cut at the same 50 %
level. The best template gives the shape, the size and the exact box, so a clean
render reads back exactly, and a blurred one keeps its size. A component no
template fits (IoU < 0.7: a smear, a ring) is still an object, of shape "unknown",
so it counts against a scene that should not have it.

A detection is an `Obj` in the scene's own terms, so it compares with ground
truth directly (`match_scene`).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from weft.stages.shapes.render import object_mask
from weft.stages.shapes.scene import BACKGROUNDS, PALETTE, SHAPES, Obj, Scene

MIN_BLEND = 0.5  # a pixel is a colour's when at least this far from the background to it
MAX_OFF_LINE = 0.3  # ... and no further off that line than this share of the line's length
MIN_AREA_FRACTION = 0.006  # of the image: a smaller component is a speck (24 px at 64 x 64)
MIN_CORE = 0.2  # share of a component that survives a 3x3 cross erosion: less is a fringe
SHARP_IOU = 0.97  # a sharp template this good ends the search
BLURS = (0.7, 1.2, 1.8)  # template blur strengths (pixels) tried after the sharp ones
MIN_IOU = 0.7  # a component no template fits this well is an object of UNKNOWN shape
UNKNOWN = "unknown"
_PAD = 4


def background_of(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(the named background nearest the border's median colour, that median colour)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    median = np.median(border, axis=0)
    name = min(BACKGROUNDS, key=lambda n: float(np.sum((median - BACKGROUNDS[n]) ** 2)))
    return name, median


def segment(image: np.ndarray, colours: list[str], background: np.ndarray) -> np.ndarray:
    """Per pixel: the index of its colour in `colours`, or -1 (background, or no colour)."""
    bg = np.asarray(background, np.float32)
    lines = np.array([PALETTE[c] for c in colours], np.float32) - bg  # (K, 3)
    length2 = (lines ** 2).sum(axis=1)
    d = image.astype(np.float32) - bg  # (H, W, 3)
    along = d @ lines.T / length2  # (H, W, K): how far along each line
    off = np.linalg.norm(d[:, :, None, :] - along[..., None] * lines, axis=-1)
    best = off.argmin(axis=-1)
    a = np.take_along_axis(along, best[..., None], axis=-1)[..., 0]
    o = np.take_along_axis(off, best[..., None], axis=-1)[..., 0]
    ok = (a >= MIN_BLEND) & (o <= MAX_OFF_LINE * np.sqrt(length2)[best])
    return np.where(ok, best, -1)


@lru_cache(maxsize=16384)
def template(shape: str, size: int, blur: float) -> tuple[np.ndarray, int, int] | None:
    """(mask cropped to its pixels, crop x and y offset from the ideal box); None if empty."""
    import cv2

    side = size + 2 * _PAD
    mask = object_mask(Obj(shape, "red", size, _PAD + size / 2, _PAD + size / 2), side)
    if blur > 0:
        mask = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), blur) >= 0.5
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    y0, x0 = int(ys.min()), int(xs.min())
    crop = mask[y0:int(ys.max()) + 1, x0:int(xs.max()) + 1]
    return crop, x0 - _PAD, y0 - _PAD


def _best_shift(part: np.ndarray, tmpl: np.ndarray) -> tuple[float, int, int]:
    """(IoU, template x and y offset from the part's origin) at the best 1 px shift."""
    h, w = part.shape
    th, tw = tmpl.shape
    cy, cx = (th - h) // 2, (tw - w) // 2  # centre the template on the part
    canvas = np.zeros((max(h, th) + 4, max(w, tw) + 4), bool)
    py, px = 2 + max(0, cy), 2 + max(0, cx)
    canvas[py:py + h, px:px + w] = part
    n_part, n_tmpl = int(part.sum()), int(tmpl.sum())
    best = (-1.0, 0, 0)
    for dy, dx in itertools.product((0, -1, 1), repeat=2):
        ty, tx = py - cy + dy, px - cx + dx
        if ty < 0 or tx < 0 or ty + th > canvas.shape[0] or tx + tw > canvas.shape[1]:
            continue
        inter = int(canvas[ty:ty + th, tx:tx + tw][tmpl].sum())
        iou = inter / (n_part + n_tmpl - inter)
        if iou > best[0]:
            best = (iou, tx - px, ty - py)
    return best


def classify(part: np.ndarray, x: int, y: int, shapes: tuple[str, ...] = SHAPES
             ) -> tuple[Obj, float]:
    """The object a component at (x, y) is (colour left blank), with its template IoU.

    Clean renders fit a sharp template with IoU >= 0.97; blurred ones (sigma 1-2 px)
    fit a blurred one with >= 0.84."""
    h, w = part.shape
    side = max(h, w)
    best: tuple[float, Obj] | None = None
    for blur in (0.0, *BLURS):
        sizes = range(side - 1, side + 2) if blur == 0 else range(side - 1, side + 7)
        for shape, size in itertools.product(shapes, sizes):
            found = template(shape, size, blur) if size > 0 else None
            if found is None:
                continue
            mask, ox, oy = found
            if abs(mask.shape[0] - h) > 2 or abs(mask.shape[1] - w) > 2:
                continue
            iou, dx, dy = _best_shift(part, mask)
            if best is None or iou > best[0]:
                box_x, box_y = x + dx - ox, y + dy - oy
                best = (iou, Obj(shape, "", size, box_x + size / 2, box_y + size / 2))
        if best is not None and blur == 0 and best[0] >= SHARP_IOU:
            break
    if best is None or best[0] < MIN_IOU:  # a blob like no shape: an object all the same
        return Obj(UNKNOWN, "", side, x + w / 2, y + h / 2), 0.0 if best is None else best[0]
    return best[1], best[0]


def detect(image: np.ndarray, colours: list[str] | None = None,
           background: str | None = None, shapes: tuple[str, ...] = SHAPES) -> list[Obj]:
    """The objects in an RGB image, sorted by position (y, then x).

    `colours` limits the palette (default: every palette colour); `background`
    defaults to the median colour of the image border.
    """
    import cv2

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    names = list(colours or PALETTE)
    bg = np.asarray(BACKGROUNDS[background], np.float32) if background else \
        background_of(image)[1]
    labels = segment(image, names, bg)
    min_area = MIN_AREA_FRACTION * image.shape[0] * image.shape[1]
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    found: list[Obj] = []
    for index, colour in enumerate(names):
        mask = (labels == index).astype(np.uint8)
        if not mask.any():
            continue
        count, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for c in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[c])
            if area < min_area:
                continue
            part = comp[y:y + h, x:x + w] == c
            if cv2.erode(np.pad(part, 1).astype(np.uint8), kernel).sum() < MIN_CORE * area:
                continue
            obj, _ = classify(part, x, y, shapes)
            found.append(Obj(obj.shape, colour, obj.size, obj.x, obj.y))
    return sorted(found, key=lambda o: (o.y, o.x, o.colour, o.shape))


def detect_scene(image: np.ndarray, colours: list[str] | None = None,
                 background: str | None = None) -> Scene:
    """The detected objects as a Scene (comparable with a ground-truth one)."""
    name = background or background_of(image)[0]
    return Scene(int(image.shape[0]), name, tuple(detect(image, colours, background)))


def match_scene(truth: Scene | list[Obj] | tuple[Obj, ...], found: Scene | list[Obj],
                pos_tol: float, size_tol: float | None = None) -> bool:
    """Same (colour, shape) multiset, and each object paired with one within the tolerances.

    `pos_tol`: largest centre distance (pixels); `size_tol`: largest size difference
    (None: sizes are not compared).
    """
    want = list(truth.objects if isinstance(truth, Scene) else truth)
    got = list(found.objects if isinstance(found, Scene) else found)
    if sorted(o.label for o in want) != sorted(o.label for o in got):
        return False
    for label in {o.label for o in want}:
        a = [o for o in want if o.label == label]
        b = [o for o in got if o.label == label]
        if not any(all(_close(p, q, pos_tol, size_tol) for p, q in zip(a, perm, strict=True))
                   for perm in itertools.permutations(b)):
            return False
    return True


def _close(a: Obj, b: Obj, pos_tol: float, size_tol: float | None) -> bool:
    if np.hypot(a.x - b.x, a.y - b.y) > pos_tol:
        return False
    return size_tol is None or abs(a.size - b.size) <= size_tol


__all__ = ["UNKNOWN", "background_of", "classify", "detect", "detect_scene", "match_scene",
           "segment", "template"]
