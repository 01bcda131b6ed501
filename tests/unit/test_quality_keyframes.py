"""Quality scores and key frames on synthetic frames with known motion, blur and cuts."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from weft.schemas.video import encode_frames
from weft.stages.base import ledger_rows_of
from weft.stages.video.keyframes import KeyframesConfig, KeyframesStage, choose_keyframes
from weft.stages.video.quality import (
    QualityConfig,
    QualityStage,
    clarity_of,
    crop_box,
    cropped_frames,
    motion_of,
)

H, W = 180, 320


def texture(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth random RGB texture: structure at several scales, like a natural image."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for cell in (4, 16, 48):
        small = rng.uniform(0, 255, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        out += cv2.resize(small, (w + 2 * cell, h + 2 * cell),
                          interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]
    return np.clip(out / 3, 0, 255).astype(np.uint8)


def pan(n: int, dx: float, seed: int = 0, jitter: float = 0.0) -> np.ndarray:
    """n frames of a window sliding dx px per frame over a big texture (plus random jitter)."""
    big = texture(seed, H + 80, W + 40 + int(abs(dx) * n) + 80)
    rng = np.random.default_rng(seed + 1)
    frames = []
    for k in range(n):
        x = 40 + dx * k + rng.uniform(-jitter, jitter)
        y = 40 + rng.uniform(-jitter, jitter)
        m = np.float32([[1, 0, -x], [0, 1, -y]])
        frames.append(cv2.warpAffine(big, m, (W, H), flags=cv2.INTER_LINEAR))
    return np.stack(frames)


def row_of(frames: np.ndarray, fps: float = 4.0, **extra: object) -> dict:
    times = [k / fps for k in range(len(frames))]
    row = {"item_id": "clip0", "source_id": "src0", "parent_id": "src0", "start_s": 0.0,
           "end_s": len(frames) / fps, "width": frames.shape[2], "height": frames.shape[1],
           "frames": encode_frames(frames), "frame_times": times, "frame_scale": 1.0}
    row.update(extra)
    return row


def test_static_frames_have_no_motion_or_shake() -> None:
    frames = np.stack([texture(1)] * 8)
    motion, instability = motion_of(frames, [k / 4 for k in range(8)])
    assert motion is not None and motion < 1e-3
    assert instability is not None and instability < 1e-3


def test_panning_frames_move_at_the_expected_speed_and_are_stable() -> None:
    frames = pan(8, dx=6.0)
    motion, instability = motion_of(frames, [k / 4 for k in range(8)])
    expected = 6.0 * 4 / np.hypot(H, W)  # px/frame × frames/s over the diagonal
    assert motion == pytest.approx(expected, rel=0.25)
    assert instability is not None and instability < 0.2 * expected


def test_shaking_camera_scores_higher_instability_than_a_steady_pan() -> None:
    times = [k / 4 for k in range(10)]
    _, steady = motion_of(pan(10, dx=4.0), times)
    _, shaky = motion_of(pan(10, dx=4.0, jitter=6.0), times)
    assert shaky is not None and steady is not None
    assert shaky > 5 * steady and shaky > 0.02


def test_motion_does_not_depend_on_the_analysis_resolution() -> None:
    frames = pan(6, dx=8.0)
    half = np.stack([cv2.resize(f, (W // 2, H // 2), interpolation=cv2.INTER_AREA)
                     for f in frames])
    times = [k / 4 for k in range(6)]
    full_motion, _ = motion_of(frames, times)
    half_motion, _ = motion_of(half, times)
    assert half_motion == pytest.approx(full_motion, rel=0.15)


def test_blur_lowers_clarity() -> None:
    sharp = np.stack([texture(2)] * 2)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in sharp])
    assert clarity_of(blurred) < 0.3 * clarity_of(sharp)


def test_crop_is_scaled_from_source_pixels_to_analysis_pixels() -> None:
    frames = np.zeros((2, 90, 160, 3), np.uint8)  # analysis = source / 4
    row = row_of(frames, width=640, height=360, frame_scale=0.25,
                 crop_x=80, crop_y=40, crop_w=320, crop_h=200)
    assert crop_box(row, 90, 160) == (20, 10, 100, 60)
    assert cropped_frames(row).shape == (2, 50, 80, 3)
    no_crop = row_of(frames)
    assert crop_box(no_crop, 90, 160) == (0, 0, 160, 90)


def test_quality_stage_scores_and_policy_decides(run_context) -> None:
    ctx = run_context({"quality": {"duration_s": {"min": 1.0}, "min_side": {"min": 100},
                                   "clarity": {"min": 1.0}, "motion": {"min": 0.002},
                                   "instability": {"max": 0.05}}})
    stage = QualityStage(QualityConfig(), ctx)
    moving = row_of(pan(8, dx=6.0), item_id="moving", crop_x=0, crop_y=0, crop_w=300,
                    crop_h=150)
    still = row_of(np.stack([texture(3)] * 8), item_id="still")
    one = row_of(pan(1, dx=0.0), item_id="one")
    out = {r["item_id"]: r for r in stage.process_rows([moving, still, one])}
    entries = {r["item_id"]: r for r in ledger_rows_of(list(out.values()))}
    assert entries["moving"]["decision"] == "keep"
    scores = json.loads(entries["moving"]["scores"])
    assert scores["min_side"] == 150 and scores["duration_s"] == pytest.approx(2.0)
    assert set(scores) == {"duration_s", "min_side", "clarity", "motion", "instability"}
    assert out["moving"]["motion"] > 0.002
    assert (entries["still"]["decision"], entries["still"]["reason"]) == (
        "drop", "motion_below_min")
    # A single frame has no motion to measure: recorded as missing, not as static.
    assert entries["one"]["reason"] == "duration_s_below_min"
    assert out["one"]["motion"] is None


def test_quality_stage_records_bad_frames_as_an_error(run_context) -> None:
    stage = QualityStage(None, run_context())
    bad = row_of(pan(3, dx=1.0))
    bad["frame_times"] = [0.0]
    garbage = {**row_of(pan(2, dx=1.0)), "item_id": "garbage", "frames": b"not npy"}
    rows = ledger_rows_of(stage.process_rows([bad, garbage]))
    assert [(r["decision"], r["reason"]) for r in rows] == [("error", "bad_frames")] * 2


def cut_clip() -> np.ndarray:
    """12 frames: three shots (cuts before frames 4 and 8), each slowly panning."""
    return np.concatenate([pan(4, dx=1.0, seed=s) for s in (10, 20, 30)])


def test_keyframes_pick_the_frames_after_cuts(run_context) -> None:
    stage = KeyframesStage(KeyframesConfig(num_keyframes=3), run_context())
    out = stage.process_rows([row_of(cut_clip())])[0]
    entry = ledger_rows_of([out])[0]
    assert json.loads(entry["details"])["frame_indices"] == [0, 4, 8]
    assert out["keyframe_times"] == [0.0, 1.0, 2.0]
    assert json.loads(entry["scores"])["num_keyframes"] == 3


def test_keyframes_are_cropped_jpegs_written_deterministically(run_context, tmp_path) -> None:
    ctx = run_context()
    row = row_of(cut_clip(), crop_x=10, crop_y=20, crop_w=200, crop_h=100)
    first = KeyframesStage(KeyframesConfig(num_keyframes=4), ctx).process_rows([row])[0]
    assert first["keyframe_paths"] == [f"keyframes/clip0/{k}.jpg" for k in range(4)]
    paths = [tmp_path / p for p in first["keyframe_paths"]]
    blobs = [p.read_bytes() for p in paths]
    image = cv2.imdecode(np.frombuffer(blobs[0], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (100, 200, 3)
    again = KeyframesStage(KeyframesConfig(num_keyframes=4), ctx).process_rows([row])[0]
    assert again["keyframe_paths"] == first["keyframe_paths"]
    assert [p.read_bytes() for p in paths] == blobs
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [f"{k}.jpg" for k in range(4)]


def test_short_clips_get_every_frame_as_a_keyframe() -> None:
    assert choose_keyframes(np.array([0.5]), 2, 4) == [0, 1]
    assert choose_keyframes(np.array([]), 1, 4) == [0]
    # ties go to the earlier change, output sorted by time
    assert choose_keyframes(np.array([0.1, 0.3, 0.3, 0.2]), 5, 3) == [0, 2, 3]
