"""Quality: sharpness, motion and camera shake of a clip's cropped analysis frames.

Scores only; the policy decides. Every measure is taken at a fixed reference
size and in resolution-free units, so the same thresholds hold whatever the
analysis resolution or crop size:

- `clarity`: mean variance of the Laplacian of the grayscale frames, each
  resized to `clarity_side` pixels on its short side (blur lowers it). Measured
  on real clips it moves by at most ~1.5× between 240- and 640-px-wide analysis
  frames, while a 1.5 px Gaussian blur lowers it 5-12×; frames smaller than
  `clarity_side` are upscaled and read softer, so keep it below the analysis
  short side.
- `motion`: mean Farneback optical-flow magnitude between consecutive frames at
  `flow_side` pixels, as a fraction of the frame diagonal per second (static
  shots are near 0).
- `instability`: standard deviation over frame pairs of the global (median)
  flow vector, same units: a steady pan moves the median evenly and scores
  low, a shaking hand-held camera scores high.

The entry's scores also carry `duration_s` and `min_side` (of the crop, in
source pixels) so one policy block thresholds length and resolution too.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from weft.schemas.video import QUALITY_FIELDS, decode_frames
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig


class QualityConfig(StageConfig):
    """How quality is measured (thresholds live in the policy, not here)."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4))
    clarity_side: int = Field(128, ge=16, description="short side frames are resized to for "
                              "the Laplacian; keep it at or below the analysis short side")
    flow_side: int = Field(128, ge=16, description="short side frames are resized to for flow")
    flow_pyr_scale: float = Field(0.5, gt=0, lt=1, description="Farneback pyramid scale")
    flow_levels: int = Field(3, ge=1, description="Farneback pyramid levels")
    flow_winsize: int = Field(15, ge=3, description="Farneback averaging window (pixels)")
    flow_iterations: int = Field(3, ge=1, description="Farneback iterations per level")
    flow_poly_n: int = Field(5, ge=3, description="Farneback polynomial neighbourhood")
    flow_poly_sigma: float = Field(1.2, gt=0, description="Farneback polynomial sigma")


def crop_box(row: dict[str, Any], height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in analysis pixels of the row's crop (source pixels × frame_scale).

    A row without a crop uses the whole frame; the box is clamped to the frame
    and is never empty.
    """
    if row.get("crop_w") is None or row.get("crop_h") is None:
        return 0, 0, width, height
    scale = row.get("frame_scale")
    if scale is None:
        source_w = row.get("width")
        scale = width / source_w if source_w else 1.0
    left, top = float(row.get("crop_x") or 0), float(row.get("crop_y") or 0)
    x0, y0 = round(left * scale), round(top * scale)
    x1, y1 = round((left + row["crop_w"]) * scale), round((top + row["crop_h"]) * scale)
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    x1, y1 = min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    return x0, y0, x1, y1


def cropped_frames(row: dict[str, Any]) -> np.ndarray:
    """The row's analysis frames (uint8 N×H×W×3 RGB) cut to its crop rectangle.

    Raises ItemError for a row without decodable frames: the item is bad, not the run.
    """
    data = row.get("frames")
    if not data:
        raise ItemError("no_frames", f"clip {row.get('item_id')} has no analysis frames")
    try:
        frames = decode_frames(data)
    except (ValueError, OSError, EOFError) as exc:
        raise ItemError("bad_frames", f"cannot decode analysis frames: {exc}") from exc
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ItemError("bad_frames", f"frames must be uint8 NxHxWx3, got "
                                      f"{frames.dtype} {frames.shape}")
    x0, y0, x1, y1 = crop_box(row, frames.shape[1], frames.shape[2])
    return frames[:, y0:y1, x0:x1]


def resize_short_side(image: np.ndarray, side: int) -> np.ndarray:
    """Resize so the short side is `side` pixels, keeping the aspect ratio."""
    h, w = image.shape[:2]
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def to_gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def clarity_of(frames: np.ndarray, side: int = 128) -> float:
    """Mean variance of the Laplacian at a fixed short side (intensity² units, 0..255 scale)."""
    values = [cv2.Laplacian(resize_short_side(to_gray(f), side), cv2.CV_64F).var()
              for f in frames]
    return float(np.mean(values))


def motion_of(frames: np.ndarray, times: list[float],
              config: QualityConfig | None = None) -> tuple[float | None, float | None]:
    """(motion, instability) in frame diagonals per second; None for fewer than two frames."""
    config = config or QualityConfig()
    if len(frames) < 2:
        return None, None
    grays = [resize_short_side(to_gray(f), config.flow_side) for f in frames]
    h, w = grays[0].shape
    diagonal = math.hypot(h, w)
    speeds: list[float] = []
    medians: list[np.ndarray] = []
    for k in range(len(grays) - 1):
        dt = times[k + 1] - times[k]
        if dt <= 0:
            continue
        flow = cv2.calcOpticalFlowFarneback(
            grays[k], grays[k + 1], None, config.flow_pyr_scale, config.flow_levels,
            config.flow_winsize, config.flow_iterations, config.flow_poly_n,
            config.flow_poly_sigma, 0)
        per_second = flow.reshape(-1, 2) / (diagonal * dt)
        speeds.append(float(np.linalg.norm(per_second, axis=1).mean()))
        medians.append(np.median(per_second, axis=0))
    if not speeds:
        return None, None
    spread = np.std(np.stack(medians), axis=0)  # per axis, over pairs
    return float(np.mean(speeds)), float(np.hypot(spread[0], spread[1]))


class QualityStage(Stage):
    """Score clarity, motion and instability of each clip (policy block `quality`)."""

    name = "quality"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = QualityConfig
    input_columns = (
        "frames", "frame_times", "frame_scale", "start_s", "end_s", "width", "height",
        "crop_x", "crop_y", "crop_w", "crop_h")
    heavy_columns = ("frames",)  # a dropped clip does not carry its pixels on
    output_fields = QUALITY_FIELDS
    uses_model = False

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: QualityConfig = self.config  # type: ignore[assignment]
        frames = cropped_frames(row)
        times = list(row.get("frame_times") or [])
        if len(times) != len(frames):
            raise ItemError("bad_frames", f"{len(frames)} frames but {len(times)} frame_times")
        clarity = clarity_of(frames, config.clarity_side)
        motion, instability = motion_of(frames, times, config)
        crop_w = row.get("crop_w") if row.get("crop_w") is not None else row.get("width")
        crop_h = row.get("crop_h") if row.get("crop_h") is not None else row.get("height")
        min_side = min(crop_w, crop_h) if crop_w is not None and crop_h is not None else None
        scores = {
            "duration_s": round(float(row["end_s"]) - float(row["start_s"]), 6),
            "min_side": min_side,
            "clarity": clarity,
            "motion": motion,
            "instability": instability,
        }
        details = {"num_frames": len(frames), "analysis_size": list(frames.shape[1:3])}
        out = {"clarity": clarity, "motion": motion, "instability": instability}
        return [Outcome(self.entry(row, scores, details=details), out)]
