"""Clip rules: turn detected shots into candidate clips.

Pure planning, no decoding: trim each shot away from its cut boundaries (where
transitions and detector jitter live), split shots longer than `max_s` into
equal pieces, and report every candidate's duration so the policy can drop the
too short ones with a reason instead of losing them silently.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from weft.schemas.ids import hash_of


class ClipRules(BaseModel):
    """How shots become clips. Durations in seconds."""

    model_config = ConfigDict(extra="forbid")
    trim_s: float = Field(0.1, ge=0, description="cut away this much at each cut boundary")
    max_s: float = Field(10.0, gt=0, description="shots longer than this are split evenly")
    min_piece_s: float = Field(2.0, gt=0, description="a split never makes pieces shorter")

    @model_validator(mode="after")
    def _consistent(self) -> ClipRules:
        if self.min_piece_s > self.max_s:
            raise ValueError(f"min_piece_s {self.min_piece_s} exceeds max_s {self.max_s}")
        return self

    @property
    def rules_hash(self) -> str:
        return hash_of(self.model_dump(mode="json"), length=12)


@dataclass(frozen=True)
class PlannedClip:
    """A candidate clip: frames [start_frame, end_frame) of the source."""

    start_frame: int
    end_frame: int
    fps: float
    shot_index: int

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    @property
    def duration_s(self) -> float:
        return (self.end_frame - self.start_frame) / self.fps


def plan_clips(shots: list[tuple[int, int]], fps: float, num_frames: int,
               rules: ClipRules) -> list[PlannedClip]:
    """Candidate clips for shots given as (start_frame, end_frame_exclusive).

    Trimming applies only at interior cuts (not at the very start or end of the
    video). A shot longer than `max_s` is split into the fewest equal pieces that
    are each at most `max_s`, so no short remainder is produced.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    trim = round(rules.trim_s * fps)
    out: list[PlannedClip] = []
    for index, (start, end) in enumerate(sorted(shots)):
        start, end = max(0, int(start)), min(num_frames, int(end))
        if start > 0:
            start += trim
        if end < num_frames:
            end -= trim
        if end - start <= 0:
            out.append(PlannedClip(start, max(start, end), fps, index))
            continue
        duration = (end - start) / fps
        pieces = max(1, math.ceil(duration / rules.max_s - 1e-9))
        if pieces > 1 and duration / pieces < rules.min_piece_s:
            pieces = max(1, math.floor(duration / rules.min_piece_s))
        bounds = [start + round(i * (end - start) / pieces) for i in range(pieces + 1)]
        out.extend(PlannedClip(a, b, fps, index) for a, b in itertools.pairwise(bounds))
    return out
