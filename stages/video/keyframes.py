"""Key frames: a few cropped stills per clip, taken where the picture changes most.

The first frame is always a key frame; the others are the frames right after
the largest consecutive differences, so a clip with an event or a camera move
shows it instead of four near-identical stills. JPEGs are written to
`{run_dir}/keyframes/{item_id}/{k}.jpg` through a tmp file and a rename, with
deterministic bytes, so a re-run rewrites the same files and a killed run never
leaves a half-written one. `keyframe_paths` are relative to the run directory,
so a run directory can move. Stills are cut from the analysis frames (the
resolution the clips stage sampled at), not re-decoded from the source.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from weft.schemas.video import KEYFRAME_FIELDS
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig
from weft.stages.video.quality import cropped_frames, resize_short_side, to_gray


class KeyframesConfig(StageConfig):
    """How many key frames, how they are compared and how they are encoded."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4))
    num_keyframes: int = Field(4, ge=1, description="key frames per clip (fewer if it has fewer)")
    diff_side: int = Field(64, ge=8, description="short side frames are compared at")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of the written stills")


def frame_changes(frames: np.ndarray, side: int = 64) -> np.ndarray:
    """Mean absolute grayscale difference between consecutive frames, in 0..1 (length N-1)."""
    small = [resize_short_side(to_gray(f), side).astype(np.float32) for f in frames]
    return np.array([np.abs(b - a).mean() / 255.0 for a, b in itertools.pairwise(small)],
                    dtype=np.float64)


def choose_keyframes(changes: np.ndarray, num_frames: int, k: int) -> list[int]:
    """Frame indices: 0, then the frames after the k-1 largest changes (ties: earlier first)."""
    if num_frames <= k:
        return list(range(num_frames))
    order = np.argsort(-changes, kind="stable")  # largest change first, earlier on ties
    return sorted([0, *(int(i) + 1 for i in order[: k - 1])])


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Encode and write atomically: tmp file in the same directory, then rename."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ItemError("jpeg_encode_failed", f"cannot encode key frame {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


class KeyframesStage(Stage):
    """Pick and write key frames (policy block `keyframes`: num_keyframes, mean_change)."""

    name = "keyframes"
    version = "1"
    kind = "map"
    item_kind = "clip"
    Config = KeyframesConfig
    input_columns = ("frames", "frame_times", "frame_scale", "crop_x", "crop_y", "crop_w",
                     "crop_h")
    heavy_columns = ("frames",)  # a dropped clip does not carry its pixels on
    output_fields = KEYFRAME_FIELDS
    uses_model = False

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: KeyframesConfig = self.config  # type: ignore[assignment]
        frames = cropped_frames(row)
        times = list(row.get("frame_times") or [])
        if len(times) != len(frames):
            raise ItemError("bad_frames", f"{len(frames)} frames but {len(times)} frame_times")
        changes = frame_changes(frames, config.diff_side)
        chosen = choose_keyframes(changes, len(frames), config.num_keyframes)
        paths: list[str] = []
        for k, index in enumerate(chosen):
            relative = f"keyframes/{row['item_id']}/{k}.jpg"
            write_jpeg(Path(self.ctx.run_dir) / relative, frames[index], config.jpeg_quality)
            paths.append(relative)
        scores = {"num_keyframes": len(chosen),
                  "mean_change": float(changes.mean()) if len(changes) else 0.0}
        details = {"frame_indices": chosen,
                   "changes_at": [round(float(changes[i - 1]), 6) for i in chosen if i > 0]}
        out = {"keyframe_times": [float(times[i]) for i in chosen], "keyframe_paths": paths}
        return [Outcome(self.entry(row, scores, details=details), out)]
