"""Crop: cut away constant-colour borders and burnt-in text or logos at the edges.

Letterbox / pillarbox bars and edge overlays (subtitles, captions, channel
logos) waste pixels and teach a generative model to draw them, so this stage
finds the largest clean rectangle of each clip and scores what it cost:

1. `detect_borders`: scanning inward from each edge, a line is border while its
   pixels match the edge colour over space *and* time in every sampled frame. A
   bar's core must be exactly flat (flatness, not darkness, so a night sky or a
   dim wall survives); a few noisier lines are allowed where codec ringing and
   resampling blur the step into the picture.
2. Overlays: the real PP-OCR text detector (RapidOCR; each box confirmed by its
   recognizer) on a few sampled frames, keeping text that stays put over the
   clip; plus solid static corner blobs (logos) while the rest of the frame moves.
3. `plan_crop`: overlay boxes that lie in an edge band are cut away by the
   largest axis-aligned rectangle inside the border-free area that avoids them;
   the rest cannot be cropped and count toward `overlay_area_fraction`.

The stage never drops by itself: the policy reads `kept_area_fraction` (min)
and `overlay_area_fraction` (max). Everything leaves in SOURCE pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from weft.schemas.video import CROP_FIELDS, decode_frames
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig

OCR_PACKAGE = "rapidocr-onnxruntime"


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle in integer pixels: [x, x+w) × [y, y+h)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def area(self) -> int:
        return max(0, self.w) * max(0, self.h)

    @classmethod
    def from_corners(cls, x0: float, y0: float, x1: float, y1: float) -> Rect:
        """The smallest integer rectangle covering the float corners (conservative for boxes)."""
        ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
        return cls(ix0, iy0, max(0, int(np.ceil(x1)) - ix0), max(0, int(np.ceil(y1)) - iy0))

    def intersect(self, other: Rect) -> Rect:
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    def union(self, other: Rect) -> Rect:
        """The bounding rectangle of both."""
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        return Rect(x0, y0, max(self.x1, other.x1) - x0, max(self.y1, other.y1) - y0)

    def grow(self, margin: int) -> Rect:
        return Rect(self.x - margin, self.y - margin, self.w + 2 * margin, self.h + 2 * margin)

    def to_source(self, sx: float, sy: float, width: int, height: int) -> Rect:
        """Scale analysis pixels to source pixels, clamped to the source frame."""
        x0 = min(max(round(self.x * sx), 0), width)
        y0 = min(max(round(self.y * sy), 0), height)
        x1 = min(max(round(self.x1 * sx), x0), width)
        y1 = min(max(round(self.y1 * sy), y0), height)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def as_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


class CropConfig(StageConfig):
    """Every threshold of border and overlay cropping, with its default written out."""

    resources: Resources = Field(
        default_factory=lambda: Resources(cpus=1, concurrency=1, batch_size=4))
    # -- borders -------------------------------------------------------------
    border_pixel_tolerance: int = Field(
        24, ge=0, le=255,
        description="max per-channel |pixel - edge colour| for a border pixel (codec noise)")
    border_match_fraction: float = Field(
        0.98, gt=0, le=1,
        description="share of a line's pixels, over all sampled frames, that must match")
    border_core_std: float = Field(
        1.5, ge=0,
        description="max std (over space and time) of a bar's core lines: bars are exactly "
                    "flat, dark content (night sky, a dim wall) is not")
    border_max_std: float = Field(
        8.0, ge=0, description="max std of the noisier lines where a bar meets the picture")
    border_ringing_lines: int = Field(
        8, ge=0, description="how many noisier lines may follow a bar's core (codec ringing)")
    border_step_fraction: float = Field(
        0.3, gt=0, le=1,
        description="a bar without an exact core needs this share of one of the next two "
                    "lines' pixels to differ from the bar colour (a sharp step into the picture)")
    max_border_fraction: float = Field(
        0.4, gt=0, lt=0.5,
        description="a side that scans further than this share of the frame is flat content, "
                    "not a border, and is not cropped")
    # -- overlays: text --------------------------------------------------------
    use_ocr: bool = Field(True, description="detect burnt-in text with RapidOCR (PP-OCR models)")
    ocr_frames: int = Field(3, ge=1, description="evenly spaced frames given to the detector")
    ocr_short_side: int = Field(
        480, ge=32,
        description="frames are resized so their short side is this before text detection")
    min_text_box_score: float = Field(
        0.5, ge=0, le=1, description="detector box score (DB box_thresh) a text box must reach")
    ocr_verify: bool = Field(
        True, description="confirm each detected box with the recognizer: the detector alone "
                          "fires on bokeh and fine texture")
    min_text_confidence: float = Field(
        0.5, ge=0, le=1, description="recognizer score a verified text box must reach")
    max_text_height_fraction: float = Field(
        0.25, gt=0, le=1,
        description="a text line taller than this share of the frame height is not an overlay")
    ocr_min_frame_side: int = Field(
        24, ge=1, description="frames with a shorter side than this hold no readable text")
    min_text_frames: int = Field(
        2, ge=1, description="a text region must be found in this many OCR'd frames (fewer "
                             "if fewer are read): burnt-in text stays put, passing scene text "
                             "(a sign going by) does not")
    text_line_overlap: float = Field(
        0.5, gt=0, le=1, description="boxes in different frames are one region when they "
                                     "overlap across and share this much of their height")
    ocr_threads: int = Field(0, ge=0, description="onnxruntime threads; 0 = resources.cpus")
    # -- overlays: logos -------------------------------------------------------
    detect_logos: bool = Field(
        True, description="solid static textured corner blobs while the rest of the frame moves")
    logo_min_frames: int = Field(4, ge=2, description="fewer sampled frames: no logo detection")
    logo_min_scene_std: float = Field(
        10.0, ge=0, description="median temporal std (gray levels) the scene must exceed")
    logo_max_temporal_std: float = Field(
        2.5, ge=0, description="a logo pixel's temporal std stays below this")
    logo_min_gradient: float = Field(
        40.0, ge=0, description="Sobel magnitude of a logo's edges (it is a drawing, not flat)")
    logo_min_solidity: float = Field(
        0.6, gt=0, le=1, description="share of a logo's bounding box that must be static")
    logo_band: float = Field(
        0.2, gt=0, lt=0.5, description="logos are looked for in corners this share of the "
                                       "height and width")
    logo_min_area_fraction: float = Field(
        0.002, ge=0, le=1, description="smallest logo, as a share of the border-free area")
    logo_max_area_fraction: float = Field(
        0.04, ge=0, le=1, description="largest logo, as a share of the border-free area")
    # -- cropping ------------------------------------------------------------
    edge_band: float = Field(
        0.3, ge=0, lt=0.5,
        description="overlays lying wholly within this outer share of the height or width "
                    "are cropped away; others count toward overlay_area_fraction")
    box_margin: int = Field(2, ge=0, description="analysis pixels added around every overlay box")

    @model_validator(mode="after")
    def _logo_area(self) -> CropConfig:
        if self.logo_min_area_fraction > self.logo_max_area_fraction:
            raise ValueError("logo_min_area_fraction exceeds logo_max_area_fraction")
        return self


# ---------------------------------------------------------------- borders ---
def _as_frames(frames: np.ndarray) -> np.ndarray:
    """N×H×W×C uint8 view of one frame, a gray stack or an RGB stack."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[..., None] if arr.shape[-1] not in (1, 3) else arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be N×H×W×3, H×W×3 or N×H×W, got shape {arr.shape}")
    return arr


def _leading(ok: np.ndarray) -> int:
    """Number of leading True values."""
    return int(np.argmin(ok)) if not ok.all() else len(ok)


def _border_depth(lines: np.ndarray, limit: int, config: CropConfig) -> int:
    """How many leading lines of `lines` (L×N×K×C: line, frame, pixel, channel) are border.

    The edge colour is the median of the outermost line; a border line matches
    it and is flat over space and time. A bar has a core that is constant to
    within `border_core_std` (encoders code it exactly; smooth dark content such
    as a night sky or a dim wall is not that flat), followed by at most
    `border_ringing_lines` noisier lines where codec ringing and resampling blur
    the step. A bar too thin to have a core is accepted only when the picture
    starts with a sharp step, which a gradual dark area never has.
    """
    if limit <= 0 or lines.shape[0] == 0 or lines.shape[2] == 0:
        return 0
    span = min(len(lines), limit + config.border_ringing_lines + 1)
    colour = np.median(lines[0].reshape(-1, lines.shape[-1]), axis=0).astype(np.int16)
    match_parts: list[np.ndarray] = []
    flat_parts: list[np.ndarray] = []
    start, first_fail = 0, None
    while start < span:  # in chunks: most edges fail on their first line
        chunk = lines[start:min(span, start + 16)].astype(np.int16)
        dev = np.abs(chunk - colour).max(axis=-1)  # L×N×K
        chunk_match = (dev <= config.border_pixel_tolerance).reshape(len(chunk), -1).mean(axis=1)
        match_parts.append(chunk_match)
        flat_parts.append(chunk.reshape(len(chunk), -1, chunk.shape[-1]).std(axis=1).max(axis=-1))
        if first_fail is None:
            failing = np.flatnonzero(chunk_match < config.border_match_fraction)
            first_fail = start + int(failing[0]) if failing.size else None
        start += len(chunk)
        if first_fail is not None and start >= first_fail + 2:
            break  # the first non-border line and the one after it are known
    match, flat = np.concatenate(match_parts), np.concatenate(flat_parts)
    span = len(match)
    border = match >= config.border_match_fraction
    core = _leading(border & (flat <= config.border_core_std))
    depth = core + _leading(border[core:] & (flat[core:] <= config.border_max_std))
    if core == 0:
        # Resampling may blend one line between the bar and the picture.
        after = match[depth:depth + 2]
        step = after.size > 0 and 1.0 - float(after.min()) >= config.border_step_fraction
        if depth > config.border_ringing_lines or not step:
            return 0
    if core > limit:
        return 0  # flat content as far as a bar may reach (a black frame) is not a bar
    return min(depth, core + config.border_ringing_lines, limit)


def detect_borders(frames: np.ndarray, config: CropConfig | None = None) -> Rect:
    """The content rectangle inside constant-colour borders, in the frames' pixels.

    Rows are found first, then columns within the remaining rows, then rows
    again within those columns, so bars of different colours do not mask each
    other. Unbordered content returns the full frame exactly.
    """
    config = config or CropConfig()
    arr = _as_frames(frames)
    _, h, w, _ = arr.shape
    top = bottom = left = right = 0
    for _ in range(2):
        cols = arr[:, :, left:w - right]
        limit_h = int(h * config.max_border_fraction)
        rows_first = np.moveaxis(cols, 1, 0)  # H×N×W×C
        top = _border_depth(rows_first, limit_h, config)
        bottom = _border_depth(rows_first[::-1], limit_h, config)
        rows = arr[:, top:h - bottom]
        limit_w = int(w * config.max_border_fraction)
        cols_first = np.moveaxis(rows, 2, 0)  # W×N×H×C
        left = _border_depth(cols_first, limit_w, config)
        right = _border_depth(cols_first[::-1], limit_w, config)
        if left == 0 and right == 0:
            break
    return Rect(left, top, w - left - right, h - top - bottom)


# ---------------------------------------------------------------- overlays ---
OcrEngine = Callable[..., Any]


def sample_indices(n: int, k: int) -> list[int]:
    """k evenly spaced indices of n (all of them when k >= n), centred in their spans."""
    if n <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def detect_text_boxes(engine: OcrEngine, frames: np.ndarray, indices: Sequence[int],
                      config: CropConfig | None = None) -> list[list[Rect]]:
    """Axis-aligned text boxes (frame pixels) of each chosen frame.

    Each frame is resized so its short side is `ocr_short_side`: small analysis
    frames are enlarged enough for the detector, big ones shrunk for speed.
    With `ocr_verify` the recognizer must read the box with `min_text_confidence`
    (the engine applies it), which removes the detector's texture false positives.
    """
    config = config or CropConfig()
    arr = _as_frames(frames)
    per_frame: list[list[Rect]] = []
    for i in indices:
        boxes: list[Rect] = []
        per_frame.append(boxes)
        frame = arr[i]
        if frame.shape[-1] == 1:
            frame = np.repeat(frame, 3, axis=-1)
        h, w = frame.shape[:2]
        scale = config.ocr_short_side / max(1, min(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(np.ascontiguousarray(frame), size, interpolation=interpolation)
        bgr = cv2.cvtColor(resized, cv2.COLOR_RGB2BGR)
        result, _ = engine(bgr, use_det=True, use_cls=False, use_rec=config.ocr_verify)
        for item in result or []:
            quad = item[0] if config.ocr_verify else item
            pts = np.asarray(quad, dtype=np.float64).reshape(-1, 2)
            box = Rect.from_corners(pts[:, 0].min() * w / size[0], pts[:, 1].min() * h / size[1],
                                    pts[:, 0].max() * w / size[0], pts[:, 1].max() * h / size[1])
            box = box.intersect(Rect(0, 0, w, h))
            if box.area > 0 and box.h <= config.max_text_height_fraction * h:
                boxes.append(box)
    return per_frame


def _same_line(a: Rect, b: Rect, min_overlap: float) -> bool:
    across = min(a.x1, b.x1) - max(a.x, b.x)
    down = min(a.y1, b.y1) - max(a.y, b.y)
    return across > 0 and down >= min_overlap * min(a.h, b.h)


def text_regions(per_frame: Sequence[Sequence[Rect]], min_frames: int = 2,
                 line_overlap: float = 0.5) -> tuple[list[Rect], list[Rect]]:
    """(persistent, transient) text regions from each OCR'd frame's boxes.

    Boxes of the same line in different frames (a caption, or successive
    subtitles in one place) merge into one region, kept as their union. A
    region seen in fewer than `min_frames` frames (capped at the number of
    frames read) is transient: scene text passing by, not an overlay.
    """
    regions: list[tuple[Rect, set[int]]] = []
    for f, boxes in enumerate(per_frame):
        for box in boxes:
            for k, (region, seen) in enumerate(regions):
                if _same_line(box, region, line_overlap):
                    regions[k] = (region.union(box), seen | {f})
                    break
            else:
                regions.append((box, {f}))
    need = max(1, min(min_frames, len(per_frame)))
    persistent = [r for r, seen in regions if len(seen) >= need]
    transient = [r for r, seen in regions if len(seen) < need]
    return persistent, transient


def detect_logos(frames: np.ndarray, area: Rect, config: CropConfig | None = None) -> list[Rect]:
    """Solid static, textured blobs inset in the corners of `area` while the scene changes.

    A burnt-in logo keeps all its pixels while the camera or the scene moves
    around it. A static scene gives no evidence, so nothing is reported for it;
    repetitive texture under motion (a window grid while the camera tilts) looks
    static only in scattered pixels, so a blob must be mostly static.
    """
    config = config or CropConfig()
    arr = _as_frames(frames)
    if len(arr) < config.logo_min_frames or area.w < 8 or area.h < 8:
        return []
    crop = arr[:, area.y:area.y1, area.x:area.x1]
    gray = (crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            if crop.shape[-1] == 3 else crop[..., 0].astype(np.float32))
    temporal = gray.std(axis=0)
    if float(np.median(temporal)) < config.logo_min_scene_std:
        return []
    mean = gray.mean(axis=0)
    grad = cv2.magnitude(cv2.Sobel(mean, cv2.CV_32F, 1, 0), cv2.Sobel(mean, cv2.CV_32F, 0, 1))
    static = temporal <= config.logo_max_temporal_std
    band_h, band_w = int(area.h * config.logo_band), int(area.w * config.logo_band)
    corners = np.zeros_like(static)
    if band_h > 0 and band_w > 0:
        corners[:band_h, :band_w] = corners[:band_h, -band_w:] = True
        corners[-band_h:, :band_w] = corners[-band_h:, -band_w:] = True
    edge = 2  # the bar boundary is a static edge; it is not a logo
    corners[:edge] = corners[-edge:] = corners[:, :edge] = corners[:, -edge:] = False
    mask = (static & corners).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # lone pixels
    if not mask.any():
        return []
    k = max(3, (min(area.w, area.h) // 40) | 1)
    joined = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    logos: list[Rect] = []
    smallest = config.logo_min_area_fraction * area.area
    largest = config.logo_max_area_fraction * area.area
    whole = Rect(0, 0, area.w, area.h)
    for x, y, w, h, _ in stats[1:count]:
        box = Rect(int(x), int(y), int(w), int(h))
        if not smallest <= box.area <= largest:
            continue
        # A logo is inset in its corner; a blob running into the picture's edge or out of
        # the corner is scene (a window frame, a static sky) that continues beyond it.
        inset_x = edge < box.x and box.x1 < area.w - edge and (
            box.x1 < band_w or box.x > area.w - band_w)
        inset_y = edge < box.y and box.y1 < area.h - edge and (
            box.y1 < band_h or box.y > area.h - band_h)
        if not (inset_x and inset_y):
            continue
        inside = (slice(box.y, box.y1), slice(box.x, box.x1))
        if float(static[inside].mean()) < config.logo_min_solidity:
            continue  # scattered static specks, not a mark
        if float((grad[inside] >= config.logo_min_gradient).mean()) < 0.05:
            continue  # a flat static patch (sky, a wall) is not a drawing
        # A logo sits on moving content; a static patch of a static background does not.
        ring_box = box.grow(max(4, min(box.w, box.h) // 2)).intersect(whole)
        ring = np.ones((ring_box.h, ring_box.w), dtype=bool)
        ring[box.y - ring_box.y:box.y1 - ring_box.y, box.x - ring_box.x:box.x1 - ring_box.x] = False
        around = temporal[ring_box.y:ring_box.y1, ring_box.x:ring_box.x1][ring]
        if around.size == 0 or float(np.median(around)) < config.logo_min_scene_std:
            continue
        logos.append(Rect(box.x + area.x, box.y + area.y, box.w, box.h))
    return logos


# ---------------------------------------------------------------- planning ---
def _in_edge_band(box: Rect, area: Rect, band: float) -> bool:
    """Whether `box` lies wholly within one of the edge bands of `area`."""
    bh, bw = area.h * band, area.w * band
    return (box.y1 <= area.y + bh or box.y >= area.y1 - bh
            or box.x1 <= area.x + bw or box.x >= area.x1 - bw)


def largest_free_rect(area: Rect, blocked: Sequence[Rect]) -> Rect:
    """The largest axis-aligned rectangle inside `area` that overlaps no blocked box.

    Exact: coordinates are compressed to the box edges, and each row of the
    compressed grid is a histogram of free heights (largest rectangle in a
    histogram with variable bar widths).
    """
    boxes = [b.intersect(area) for b in blocked]
    boxes = [b for b in boxes if b.area > 0]
    if not boxes:
        return area
    xs = sorted({area.x, area.x1, *(b.x for b in boxes), *(b.x1 for b in boxes)})
    ys = sorted({area.y, area.y1, *(b.y for b in boxes), *(b.y1 for b in boxes)})
    nx = len(xs) - 1
    heights = [0] * nx
    best = (0, Rect(area.x, area.y, 0, 0))
    for i in range(len(ys) - 1):
        cy0, cy1 = ys[i], ys[i + 1]
        for j in range(nx):
            cx0, cx1 = xs[j], xs[j + 1]
            covered = any(b.x <= cx0 and b.x1 >= cx1 and b.y <= cy0 and b.y1 >= cy1 for b in boxes)
            heights[j] = 0 if covered else heights[j] + (cy1 - cy0)
        stack: list[tuple[int, int]] = []  # (start column, height)
        for j in range(nx + 1):
            hj = heights[j] if j < nx else 0
            start = j
            while stack and stack[-1][1] >= hj:
                s, hs = stack.pop()
                area_px = hs * (xs[j] - xs[s])
                if area_px > best[0]:
                    best = (area_px, Rect(xs[s], cy1 - hs, xs[j] - xs[s], hs))
                start = s
            stack.append((start, hj))
    return best[1]


def _union_area(boxes: Sequence[Rect], within: Rect) -> int:
    """Pixels of `within` covered by any box (exact, by rasterising in `within`)."""
    if within.area == 0:
        return 0
    mask = np.zeros((within.h, within.w), dtype=bool)
    for b in boxes:
        c = b.intersect(within)
        if c.area:
            mask[c.y - within.y:c.y1 - within.y, c.x - within.x:c.x1 - within.x] = True
    return int(mask.sum())


@dataclass
class CropPlan:
    """The chosen crop and what it cost, in source pixels (scores are JSON-ready)."""

    rect: Rect
    borders: Rect
    text_boxes: list[Rect] = field(default_factory=list)
    logo_boxes: list[Rect] = field(default_factory=list)
    cropped_boxes: list[Rect] = field(default_factory=list)
    remaining_boxes: list[Rect] = field(default_factory=list)
    scores: dict[str, float | int] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        return {
            "rect": self.rect.as_list(), "border_rect": self.borders.as_list(),
            "text_boxes": [b.as_list() for b in self.text_boxes],
            "logo_boxes": [b.as_list() for b in self.logo_boxes],
            "cropped_boxes": [b.as_list() for b in self.cropped_boxes],
            "remaining_boxes": [b.as_list() for b in self.remaining_boxes],
        }


def plan_crop(frames: np.ndarray, text_boxes: Sequence[Rect] = (),
              config: CropConfig | None = None, *, scale_x: float = 1.0,
              scale_y: float | None = None, source_size: tuple[int, int] | None = None) -> CropPlan:
    """Borders + overlays -> the final crop, in source pixels.

    `text_boxes` are in the frames' pixels; `scale_x`/`scale_y` map frame
    pixels to source pixels and `source_size` is (width, height) of the source
    (defaults: the frames themselves).
    """
    config = config or CropConfig()
    arr = _as_frames(frames)
    _, h, w, _ = arr.shape
    scale_y = scale_x if scale_y is None else scale_y
    src_w, src_h = source_size or (round(w * scale_x), round(h * scale_y))

    borders = detect_borders(arr, config)
    logos = detect_logos(arr, borders, config) if config.detect_logos else []
    overlays = [b.grow(config.box_margin).intersect(borders) for b in [*text_boxes, *logos]]
    overlays = [b for b in overlays if b.area > 0]
    croppable = [b for b in overlays if _in_edge_band(b, borders, config.edge_band)]
    rect = largest_free_rect(borders, croppable)
    if rect != borders and rect.area > 0:
        # Cutting a subtitle out of a bar leaves the rest of the bar: trim it too.
        inner = detect_borders(arr[:, rect.y:rect.y1, rect.x:rect.x1], config)
        rect = Rect(rect.x + inner.x, rect.y + inner.y, inner.w, inner.h)
    remaining = [b for b in overlays if b.intersect(rect).area > 0]
    cropped = [b for b in overlays if b.intersect(rect).area == 0]
    overlay_px = _union_area(remaining, rect)

    src_rect = rect.to_source(scale_x, scale_y, src_w, src_h)
    src_borders = borders.to_source(scale_x, scale_y, src_w, src_h)

    def to_src(boxes: Sequence[Rect]) -> list[Rect]:
        return [b.to_source(scale_x, scale_y, src_w, src_h) for b in boxes]

    scores: dict[str, float | int] = {
        "kept_area_fraction": round(src_rect.area / max(1, src_w * src_h), 6),
        "overlay_area_fraction": round(overlay_px / max(1, rect.area), 6),
        "num_text_boxes": len(text_boxes),
        "num_logo_boxes": len(logos),
        "border_top": src_borders.y,
        "border_bottom": src_h - src_borders.y1,
        "border_left": src_borders.x,
        "border_right": src_w - src_borders.x1,
    }
    return CropPlan(rect=src_rect, borders=src_borders, text_boxes=to_src(text_boxes),
                    logo_boxes=to_src(logos), cropped_boxes=to_src(cropped),
                    remaining_boxes=to_src(remaining), scores=scores)


# ------------------------------------------------------------------- stage ---
class CropStage(Stage):
    """Find each clip's clean rectangle (no bars, no edge overlays) and score its cost."""

    name = "crop"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = CropConfig
    input_columns = ("frames", "frame_scale", "width", "height")
    output_fields = CROP_FIELDS
    uses_model = True

    config: CropConfig
    _ocr: OcrEngine | None = None

    def model_identity(self) -> tuple[str | None, str | None]:
        if not self.config.use_ocr:
            return None, None
        try:
            return OCR_PACKAGE, metadata.version(OCR_PACKAGE)
        except metadata.PackageNotFoundError:
            return OCR_PACKAGE, None

    def setup(self) -> None:
        """Load the PP-OCR detector once per worker; a missing package fails here, clearly."""
        if not self.config.use_ocr:
            return
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise RuntimeError(
                f"crop stage: {OCR_PACKAGE} is not installed (it ships the PP-OCR models); "
                "install it or set crop.use_ocr: false") from exc
        threads = self.config.ocr_threads or max(1, int(self.config.resources.cpus))
        # Our own resize fixes the scale, so the detector must not rescale again.
        self._ocr = RapidOCR(
            det_box_thresh=self.config.min_text_box_score,
            text_score=self.config.min_text_confidence, det_limit_type="min", det_limit_side_len=32,
            intra_op_num_threads=threads, inter_op_num_threads=1, print_verbose=False)

    def _frames(self, row: dict[str, Any]) -> np.ndarray:
        data = row.get("frames")
        if not data:
            raise ItemError("frames_missing", "clip row has no analysis frames")
        try:
            frames = decode_frames(data)
        except Exception as exc:  # a corrupt payload is a bad item, not a crash
            raise ItemError("frames_unreadable", f"cannot decode frames: {exc}") from exc
        shape_ok = frames.ndim == 4 and frames.shape[-1] == 3 and 0 not in frames.shape
        if frames.dtype != np.uint8 or not shape_ok:
            raise ItemError("frames_invalid", f"frames must be uint8 N×H×W×3, got "
                                              f"{frames.dtype} {frames.shape}")
        return frames

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        frames = self._frames(row)
        _, h, w, _ = frames.shape
        width, height = row.get("width"), row.get("height")
        frame_scale = row.get("frame_scale")
        if width and height and width > 0 and height > 0:
            # Per-axis ratios from the real sizes: exact even when rounding made
            # the analysis height differ slightly from height × frame_scale.
            sx, sy = width / w, height / h
        elif frame_scale and frame_scale > 0:
            sx = sy = 1.0 / frame_scale
            width, height = round(w * sx), round(h * sy)
        else:
            sx = sy = 1.0
            width, height = w, h
        text_boxes: list[Rect] = []
        transient: list[Rect] = []
        indices: list[int] = []
        if self._ocr is not None and min(h, w) >= self.config.ocr_min_frame_side:
            indices = sample_indices(len(frames), self.config.ocr_frames)
            found = detect_text_boxes(self._ocr, frames, indices, self.config)
            text_boxes, transient = text_regions(found, self.config.min_text_frames,
                                                 self.config.text_line_overlap)
        plan = plan_crop(frames, text_boxes, self.config, scale_x=sx, scale_y=sy,
                         source_size=(int(width), int(height)))
        r = plan.rect
        details = {
            # Timing is in the row's elapsed_ms: details stay identical across re-runs.
            **plan.details(), "ocr_frames": indices,
            # Seen in too few frames to be an overlay; kept for the auditor, not cropped.
            "transient_text_boxes": [b.to_source(sx, sy, int(width), int(height)).as_list()
                                     for b in transient],
        }
        return [Outcome(self.entry(row, plan.scores, details=details),
                        {"crop_x": r.x, "crop_y": r.y, "crop_w": r.w, "crop_h": r.h})]
