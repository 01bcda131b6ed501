"""Shot detection on real videos: known cuts are found, and the stage records every item."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import decord
import pyarrow as pa
import pytest
import torch

from weft.schemas.video import PROBE_FIELDS, SHOTS_FIELDS, SOURCE_FIELDS
from weft.stages.video.shot_detectors import (
    PySceneDetectDetector,
    ShotDetector,
    TransNetV2Detector,
)
from weft.stages.video.shots import ShotsStage

pytestmark = pytest.mark.integration

# Cut times in seconds, checked by eye frame by frame.
KNOWN_CUTS = {
    "bikes.mp4": [1.16, 3.0, 5.44, 7.44, 9.64],
    "cityCC0.mpg": [4.6],
    "Megamind.avi": [4.1, 6.4, 8.3],
}
TOLERANCE_S = 0.5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as in a Ray worker with cpus=1: steady timings on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cut_f1(pred: list[float], truth: list[float], tol: float) -> float:
    """F1 of predicted cut times, each true cut matched to at most one prediction.

    Greedy on the closest pairs first, which is optimal for points on a line
    when the tolerance is below half the gap between true cuts.
    """
    if not pred and not truth:
        return 1.0
    pairs = sorted((abs(p - t), i, j) for i, p in enumerate(pred)
                   for j, t in enumerate(truth) if abs(p - t) <= tol)
    used_p, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    hits = len(used_p)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(pred), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def test_cut_f1_matches_one_to_one() -> None:
    assert cut_f1([1.0, 1.1], [1.05], 0.5) == pytest.approx(2 / 3)
    assert cut_f1([], [1.0], 0.5) == 0.0
    assert cut_f1([3.0], [1.0], 0.5) == 0.0
    assert cut_f1([1.0, 2.0], [1.2, 2.2], 0.5) == 1.0


def probe(path: Path) -> tuple[float, int]:
    reader = decord.VideoReader(str(path))
    return float(reader.get_avg_fps()), len(reader)


@pytest.fixture(scope="module")
def detectors() -> dict[str, ShotDetector]:
    return {
        "transnetv2": TransNetV2Detector(),
        "adaptive": PySceneDetectDetector("adaptive"),
        "content": PySceneDetectDetector("content"),
    }


@pytest.mark.parametrize("name", ["transnetv2", "adaptive", "content"])
@pytest.mark.parametrize("video", sorted(KNOWN_CUTS))
def test_detector_finds_the_known_cuts(detectors, asset, video: str, name: str) -> None:
    path = asset(video)
    fps, num_frames = probe(path)
    shots = detectors[name].detect(str(path), fps, num_frames)
    assert shots[0][0] == 0 and shots[-1][1] == num_frames
    assert all(a[1] == b[0] for a, b in pairwise(shots))
    assert all(end - start >= 8 for start, end in shots)
    cuts = [start / fps for start, _ in shots[1:]]
    f1 = cut_f1(cuts, KNOWN_CUTS[video], TOLERANCE_S)
    assert f1 >= 0.8, f"{name} on {video}: cuts {cuts}, F1 {f1:.2f}"


def test_ffmpeg_decoder_follows_the_stream_exactly(asset) -> None:
    """decord drops cityCC0's first GOP (its stream starts at 0.54 s); ffmpeg does not."""
    path = asset("cityCC0.mpg")
    found = TransNetV2Detector(decoder="ffmpeg").analyze(str(path), 25.0, 190)
    assert found.decoded_frames == 190
    assert cut_f1([c / 25.0 for c in found.cuts], KNOWN_CUTS["cityCC0.mpg"], 0.1) == 1.0


def _source_table(path: Path) -> pa.Table:
    fps, num_frames = probe(path)
    row = {"item_id": "src-" + path.stem, "source_id": "src-" + path.stem,
           "item_kind": "source", "path": str(path), "size_bytes": path.stat().st_size,
           "container": path.suffix.lstrip("."), "codec": "h264", "duration_s": num_frames / fps,
           "fps": fps, "width": 640, "height": 272, "num_frames": num_frames}
    return pa.Table.from_pylist([row], schema=pa.schema(SOURCE_FIELDS + PROBE_FIELDS))


def test_stage_end_to_end_on_a_real_video(asset, run_context) -> None:
    stage = ShotsStage(ShotsStage.Config(), run_context({"shots": {"num_shots": {"min": 1}}}))
    out = stage(_source_table(asset("bikes.mp4")))
    assert out.num_rows == 1
    for f in SHOTS_FIELDS:
        assert out.schema.field(f.name).type == f.type
    row = out.to_pylist()[0]
    assert row["_decision"] == "keep"
    assert len(row["shots"]) == 6
    assert row["shots"][0]["start_frame"] == 0 and row["shots"][-1]["end_frame"] == 250
    assert row["shot_detector"].startswith("transnetv2@")
    [ledger] = [json.loads(x) for x in row["_ledger"]]
    assert ledger["stage"] == "shots" and ledger["decision"] == "keep"
    assert ledger["model_id"] == "transnetv2" and len(ledger["model_revision"]) == 16
    scores, details = json.loads(ledger["scores"]), json.loads(ledger["details"])
    assert scores["num_shots"] == 6 and scores["mean_shot_s"] == pytest.approx(10 / 6, abs=0.01)
    assert cut_f1(details["cut_times_s"], KNOWN_CUTS["bikes.mp4"], TOLERANCE_S) == 1.0
    assert json.loads(ledger["thresholds"]) == {"num_shots": {"min": 1.0}}


@pytest.mark.parametrize("detector", ["transnetv2", "adaptive"])
def test_undecodable_file_is_an_error_row_not_an_exception(tmp_path, run_context, detector,
                                                           asset) -> None:
    bad = tmp_path / "random.mp4"
    bad.write_bytes(bytes(range(256)) * 1000)
    table = _source_table(asset("bikes.mp4"))
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array([str(bad)]))
    stage = ShotsStage(ShotsStage.Config(detector=detector),
                       run_context({"shots": {"num_shots": {"min": 1}}}))
    row = stage(table).to_pylist()[0]
    assert row["_decision"] == "error"
    assert row["shots"] is None
    [ledger] = [json.loads(x) for x in row["_ledger"]]
    assert ledger["reason"] == "undecodable" and ledger["error_message"]


def test_missing_weights_fail_at_setup(run_context, tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    stage = ShotsStage(ShotsStage.Config(weights_path=str(missing)), run_context())
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        stage.ensure_setup()
