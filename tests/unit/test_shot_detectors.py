"""Shot detection's pure parts: predictions -> cuts -> shots, windowed inference, config."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from weft.stages.video.shot_detectors import (
    TransNetV2Detector,
    UndecodableVideoError,
    cuts_to_shots,
    predictions_to_cuts,
)
from weft.stages.video.shots import ShotsConfig


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as in a Ray worker with cpus=1: steady timings on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiles(shots: list[tuple[int, int]], n: int) -> bool:
    return bool(shots) and shots[0][0] == 0 and shots[-1][1] == n and all(
        a[1] == b[0] and a[0] < a[1] for a, b in pairwise(shots))


def test_hard_cut_goes_after_the_scored_frame() -> None:
    pred = np.zeros(100)
    pred[29] = 0.98  # last frame of the outgoing shot
    assert predictions_to_cuts(pred, 0.5) == [(30, pytest.approx(0.98))]


def test_dissolve_is_one_cut_after_its_peak() -> None:
    pred = np.zeros(100)
    pred[40:46] = [0.6, 0.7, 0.9, 0.8, 0.7, 0.55]
    cuts = predictions_to_cuts(pred, 0.5)
    assert [c for c, _ in cuts] == [43]


def test_prediction_at_the_last_frame_makes_no_cut() -> None:
    pred = np.zeros(50)
    pred[-1] = 0.9
    shots, kept = cuts_to_shots([c for c, _ in predictions_to_cuts(pred, 0.5)], 50, 8)
    assert shots == [(0, 50)] and kept == []


def test_shots_tile_the_video_in_order() -> None:
    shots, kept = cuts_to_shots([137, 30, 76], 250, 8)
    assert shots == [(0, 30), (30, 76), (76, 137), (137, 250)]
    assert kept == [30, 76, 137]
    assert _tiles(shots, 250)


def test_min_shot_length_keeps_the_stronger_of_two_close_cuts() -> None:
    shots, kept = cuts_to_shots([100, 103], 250, 8, scores=[0.6, 0.95])
    assert kept == [103]
    assert _tiles(shots, 250)


def test_no_sliver_shot_at_the_start_or_end() -> None:
    # Megamind's first frame scores as a transition: a 1-frame shot is never made.
    shots, kept = cuts_to_shots([1, 98, 265], 270, 8)
    assert kept == [98] and shots == [(0, 98), (98, 270)]


def test_cuts_outside_the_video_are_ignored_and_empty_video_has_no_shots() -> None:
    assert cuts_to_shots([0, -3, 400], 250, 1) == ([(0, 250)], [])
    assert cuts_to_shots([10], 0, 1) == ([], [])


@pytest.fixture(scope="module")
def transnet() -> TransNetV2Detector:
    return TransNetV2Detector()  # the real weights inside the installed package


def test_streamed_windows_match_the_package_reference(transnet: TransNetV2Detector) -> None:
    """Chunked streaming gives the package's own whole-array predictions, at any chunk size."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 80, (1, 27, 48, 3), dtype=np.uint8)
    b = rng.integers(150, 255, (1, 27, 48, 3), dtype=np.uint8)
    frames = np.concatenate([np.repeat(a, 43, 0), np.repeat(b, 37, 0)])
    frames = np.clip(frames.astype(int) + rng.integers(-3, 4, frames.shape), 0, 255).astype(
        np.uint8)
    with torch.inference_mode():
        ref, _ = transnet.model.predict_frames(torch.from_numpy(frames.copy()), quiet=True)
    ref = ref.numpy()
    for chunk in (7, 80):  # 80 frames: two windows, the second padded
        chunks = (frames[i:i + chunk] for i in range(0, len(frames), chunk))
        got = transnet.predict(chunks)
        assert got.shape == (len(frames),)
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert [c for c, _ in predictions_to_cuts(ref, 0.5)] == [43]


def test_no_frames_is_undecodable(transnet: TransNetV2Detector) -> None:
    with pytest.raises(UndecodableVideoError):
        transnet.predict(iter([]))


def test_transnet_threshold_must_be_a_probability() -> None:
    with pytest.raises(ValidationError, match="probability"):
        ShotsConfig(threshold=27.0)
    assert ShotsConfig(detector="content", threshold=27.0).threshold == 27.0
    with pytest.raises(ValidationError):
        ShotsConfig(detector="adaptive", threshold=-1.0)
    with pytest.raises(ValidationError):
        ShotsConfig(detectr="content")  # unknown keys are a start-up error
