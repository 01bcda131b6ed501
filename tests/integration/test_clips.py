"""The clips stage on real videos: one decode pass, exact frames, deterministic mp4s."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from weft.schemas.ids import clip_id
from weft.schemas.video import CLIP_FIELDS, decode_frames
from weft.stages.base import RunContext
from weft.stages.video.clips import ClipsConfig, ClipsStage, analysis_indices

pytestmark = pytest.mark.integration

BIKES_CUTS = [0, 29, 75, 136, 186, 241, 250]  # the known cuts of bikes.mp4 (25 fps)
POLICY = {"clips": {"duration_s": {"min": 1.5, "max": 60.0}}}


def _source_row(path: Path, fps: float, num_frames: int, width: int, height: int,
                cuts: list[int]) -> dict[str, Any]:
    return {"item_id": f"src-{path.stem}", "source_id": f"src-{path.stem}",
            "item_kind": "source", "path": str(path), "fps": fps, "num_frames": num_frames,
            "width": width, "height": height, "shot_detector": "given",
            "shots": [{"start_frame": a, "end_frame": b} for a, b in itertools.pairwise(cuts)]}


def _run(stage: ClipsStage, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Through `__call__` on a pyarrow table, as Ray calls it."""
    out = stage(pa.Table.from_pylist([row]))
    for f in CLIP_FIELDS:
        assert out.schema.field(f.name).type == f.type
    return out.to_pylist()


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["_ledger"][-1])


def _ffmpeg_frames(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame as ffmpeg decodes it: the reference the clip frames must match."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-fps_mode", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True, timeout=120).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def _ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=width,height,nb_read_frames,duration",
                          "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)["streams"][0]


def _context(run_dir: Path, rules: dict | None = POLICY) -> RunContext:
    from weft.schemas.policy import Policy

    return RunContext(run_id="test-run", run_dir=str(run_dir), code_version="test",
                      policy=Policy(name="test", version=1, rules=rules or {}))


@pytest.fixture(scope="module")
def bikes(asset) -> Path:
    return asset("bikes.mp4")


@pytest.fixture(scope="module")
def bikes_run(bikes, tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("clips-run")
    stage = ClipsStage(None, _context(run_dir))
    rows = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, BIKES_CUTS))
    return {"rows": rows, "stage": stage, "run_dir": run_dir}


def test_every_candidate_gets_a_row_and_short_ones_drop(bikes_run) -> None:
    rows = bikes_run["rows"]
    # Trimmed by round(0.1 s * 25) = 2 frames at each interior cut.
    spans = [(r["start_frame"], r["end_frame"]) for r in rows]
    assert spans == [(0, 27), (31, 73), (77, 134), (138, 184), (188, 239), (243, 250)]
    decisions = [(r["_decision"], _entry(r)["reason"]) for r in rows]
    assert decisions == [("drop", "duration_s_below_min"), ("keep", "ok"), ("keep", "ok"),
                         ("keep", "ok"), ("keep", "ok"), ("drop", "duration_s_below_min")]
    for r in rows:
        entry = _entry(r)
        assert entry["item_id"] == r["item_id"] and entry["item_kind"] == "clip"
        assert r["parent_id"] == entry["parent_id"] == "src-bikes"
        assert json.loads(entry["scores"]) == {
            "duration_s": pytest.approx((r["end_frame"] - r["start_frame"]) / 25)}
        splitter = f"given|clips1|{ClipsConfig().rules.rules_hash}"
        assert r["item_id"] == clip_id("src-bikes", r["start_s"], r["end_s"], splitter)
        if r["_decision"] == "drop":  # never decoded
            assert r["frames"] is None and r["clip_path"] is None and r["content_hash"] is None


def test_one_reader_for_the_whole_video(bikes_run) -> None:
    assert bikes_run["stage"].readers_opened == 1


def test_kept_clips_carry_the_exact_source_frames(bikes_run, bikes) -> None:
    reference = _ffmpeg_frames(bikes, 640, 272)
    for r in (r for r in bikes_run["rows"] if r["_decision"] == "keep"):
        frames = decode_frames(r["frames"])
        picks = analysis_indices(r["start_frame"], r["end_frame"], 25.0, 4.0, 32)
        assert frames.shape == (len(picks), 272, 640, 3) and frames.dtype == np.uint8
        assert len(picks) == round((r["end_frame"] - r["start_frame"]) * 4 / 25)
        assert r["frame_times"] == pytest.approx([i / 25 for i in picks])
        assert r["frame_scale"] == 1.0 and (r["width"], r["height"]) == (640, 272)
        assert np.array_equal(frames, reference[picks])


def test_mp4s_have_the_clip_length_and_content(bikes_run, bikes) -> None:
    reference = _ffmpeg_frames(bikes, 640, 272)
    for r in (r for r in bikes_run["rows"] if r["_decision"] == "keep"):
        path = bikes_run["run_dir"] / r["clip_path"]
        assert r["clip_path"] == f"clips/{r['item_id']}.mp4" and path.is_file()
        info = _ffprobe(path)
        n = r["end_frame"] - r["start_frame"]
        assert (info["width"], info["height"]) == (640, 272)
        assert int(info["nb_read_frames"]) == n
        assert float(info["duration"]) == pytest.approx(n / 25, abs=1 / 25)
        decoded = _ffmpeg_frames(path, 640, 272).astype(np.float64)
        mse = ((decoded - reference[r["start_frame"]:r["end_frame"]]) ** 2).mean(axis=(1, 2, 3))
        assert (10 * np.log10(255**2 / np.maximum(mse, 1e-9))).min() > 30  # same frames, aligned
    leftovers = [p.name for p in (bikes_run["run_dir"] / "clips").iterdir()
                 if not p.name.endswith(".mp4") or ".tmp." in p.name]
    assert leftovers == []


def test_rerun_is_byte_identical(bikes_run, bikes, tmp_path) -> None:
    stage = ClipsStage(None, _context(tmp_path))
    again = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, BIKES_CUTS))
    first = bikes_run["rows"]
    assert [r["item_id"] for r in again] == [r["item_id"] for r in first]
    for a, b in zip(first, again, strict=True):
        assert (a["frames"], a["content_hash"], a["clip_path"]) == (
            b["frames"], b["content_hash"], b["clip_path"])
        if a["clip_path"]:
            assert (bikes_run["run_dir"] / a["clip_path"]).read_bytes() == (
                tmp_path / b["clip_path"]).read_bytes()


def test_frames_output_writes_no_mp4(bikes_run, bikes, tmp_path) -> None:
    stage = ClipsStage(ClipsConfig(output="frames"), _context(tmp_path))
    rows = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, BIKES_CUTS))
    assert stage.readers_opened == 1
    assert all(r["clip_path"] is None for r in rows)
    assert not (tmp_path / "clips").exists()
    # The same frames as the mp4 run: output mode changes files, not analysis.
    assert [r["content_hash"] for r in rows] == [r["content_hash"] for r in bikes_run["rows"]]


def test_avi_frames_are_exact_and_resized(asset, tmp_path) -> None:
    """Megamind.avi is where decord's seeks land on wrong frames: the forward read must not."""
    path = asset("Megamind.avi")
    fps = 2997 / 125
    config = ClipsConfig(analysis_max_side=256, max_analysis_frames=5)
    stage = ClipsStage(config, _context(tmp_path))
    rows = _run(stage, _source_row(path, fps, 270, 720, 528, [0, 100, 200, 270]))
    assert [r["_decision"] for r in rows] == ["keep"] * 3 and stage.readers_opened == 1
    reference = _ffmpeg_frames(path, 720, 528)
    for r in rows:
        n = r["end_frame"] - r["start_frame"]
        info = _ffprobe(tmp_path / r["clip_path"])  # a fractional rate (2997/125) survives
        assert int(info["nb_read_frames"]) == n
        assert float(info["duration"]) == pytest.approx(n / fps, abs=1 / fps)
        picks = analysis_indices(r["start_frame"], r["end_frame"], fps, 4.0, 5)
        assert len(picks) == 5
        expected = np.stack([cv2.resize(reference[i], (256, 188), interpolation=cv2.INTER_AREA)
                             for i in picks])
        assert np.array_equal(decode_frames(r["frames"]), expected)
        assert r["frame_scale"] == pytest.approx(256 / 720)


def test_mpeg2_with_odd_height_and_max_side(asset, tmp_path) -> None:
    path = asset("cityCC0.mpg")
    stage = ClipsStage(ClipsConfig(max_side=360), _context(tmp_path))
    rows = _run(stage, _source_row(path, 25.0, 190, 720, 405, [0, 80, 190]))
    assert [r["_decision"] for r in rows] == ["keep", "keep"]
    for r in rows:
        assert decode_frames(r["frames"]).shape[1:] == (405, 720, 3)
        info = _ffprobe(tmp_path / r["clip_path"])
        assert (info["width"], info["height"]) == (360, 202)  # even sizes for yuv420p
        assert int(info["nb_read_frames"]) == r["end_frame"] - r["start_frame"]
    full = ClipsStage(None, _context(tmp_path / "full"))
    info = _ffprobe(tmp_path / "full" / _run(full, _source_row(
        path, 25.0, 190, 720, 405, [0, 190]))[0]["clip_path"])
    assert (info["width"], info["height"]) == (720, 404)  # odd height: one row cropped


def test_decode_failure_mid_way_errors_the_remaining_clips(bikes, tmp_path) -> None:
    stage = ClipsStage(None, _context(tmp_path))
    open_reader = stage._open_reader

    class Failing:
        """A real reader that breaks once the read passes frame 100."""

        def __init__(self, path: str) -> None:
            self.inner = open_reader(path)

        def __len__(self) -> int:
            return len(self.inner)

        def get_batch(self, indices: list[int]) -> Any:
            if indices[-1] >= 100:
                raise RuntimeError("corrupt packet")
            return self.inner.get_batch(indices)

    stage._open_reader = Failing  # type: ignore[method-assign]
    rows = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, BIKES_CUTS))
    outcome = [(r["_decision"], _entry(r)["reason"]) for r in rows]
    assert outcome == [("drop", "duration_s_below_min"), ("keep", "ok"),
                       ("error", "decode_failed"), ("error", "decode_failed"),
                       ("error", "decode_failed"), ("drop", "duration_s_below_min")]
    errors = [_entry(r) for r in rows if r["_decision"] == "error"]
    assert all(e["error_type"] == "RuntimeError" and "corrupt" in e["error_message"]
               for e in errors)
    assert all(r["frames"] is None for r in rows if r["_decision"] != "keep")
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [f"{rows[1]['item_id']}.mp4"]


def test_clip_past_the_decodable_end_is_an_error(bikes, tmp_path) -> None:
    stage = ClipsStage(None, _context(tmp_path))
    rows = _run(stage, _source_row(bikes, 25.0, 300, 640, 272, [0, 120, 300]))
    assert [(r["_decision"], _entry(r)["reason"]) for r in rows] == [
        ("keep", "ok"), ("error", "decode_failed")]


def test_nothing_kept_means_nothing_decoded(bikes, tmp_path) -> None:
    stage = ClipsStage(None, _context(tmp_path, {"clips": {"duration_s": {"min": 5.0}}}))
    rows = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, BIKES_CUTS))
    assert {r["_decision"] for r in rows} == {"drop"} and stage.readers_opened == 0


def test_source_without_shots_is_an_error_on_the_parent(bikes, tmp_path) -> None:
    stage = ClipsStage(None, _context(tmp_path))
    rows = _run(stage, _source_row(bikes, 25.0, 250, 640, 272, []))
    entry = _entry(rows[0])
    assert len(rows) == 1 and (entry["decision"], entry["reason"]) == ("error", "no_shots")
    assert entry["item_id"] == entry["parent_id"] == "src-bikes"
