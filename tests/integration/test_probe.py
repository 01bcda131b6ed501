"""The probe stage on real videos and on every kind of bad input, in one batch."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from weft.schemas.policy import Policy
from weft.schemas.video import PROBE_FIELDS
from weft.stages.base import RunContext
from weft.stages.video.probe import ProbeConfig, ProbeStage

pytestmark = pytest.mark.integration

GOOD = {"bikes.mp4", "cityCC0.mpg", "Megamind.avi"}
EXPECTED_ERRORS = {
    "empty.mp4": "empty_file",
    "bikes_cut.mp4": "truncated",  # moov at the end: the container itself is cut
    "bikes_faststart_cut.mp4": "truncated",  # moov first: ffprobe is fooled, the mdat box is not
    "Megamind_cut.avi": "truncated",  # RIFF header declares more bytes than remain
    "Megamind_cut_patched.avi": "truncated",  # header fixed up: the decode check catches it
    "random.mp4": "not_a_video",
    "bikes.avi": "extension_mismatch",
    "notes.txt": "unsupported_extension",
    "essay.mkv": "not_a_video",
}


def _row(path: Path) -> dict[str, Any]:
    return {"item_id": path.name, "source_id": path.name, "item_kind": "source",
            "path": str(path), "size_bytes": path.stat().st_size}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, asset, ffmpeg) -> dict[str, Path]:
    """The real videos plus one file of each bad kind, all in one folder."""
    root = tmp_path_factory.mktemp("probe-inputs")
    bikes = asset("bikes.mp4").read_bytes()
    megamind = asset("Megamind.avi").read_bytes()
    files = {name: root / name for name in [*sorted(GOOD), *EXPECTED_ERRORS]}
    files["bikes.mp4"].write_bytes(bikes)
    files["cityCC0.mpg"].write_bytes(asset("cityCC0.mpg").read_bytes())
    files["Megamind.avi"].write_bytes(megamind)
    files["empty.mp4"].write_bytes(b"")
    files["bikes_cut.mp4"].write_bytes(bikes[: len(bikes) * 2 // 5])
    faststart = root / "faststart.tmp.mp4"
    ffmpeg("-i", str(files["bikes.mp4"]), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    faststart.unlink()
    files["bikes_faststart_cut.mp4"].write_bytes(data[: len(data) * 2 // 5])
    cut = bytearray(megamind[: len(megamind) * 2 // 5])
    files["Megamind_cut.avi"].write_bytes(bytes(cut))
    cut[4:8] = struct.pack("<I", len(cut) - 8)
    files["Megamind_cut_patched.avi"].write_bytes(bytes(cut))
    files["random.mp4"].write_bytes(os.urandom(300_000))
    files["bikes.avi"].write_bytes(bikes)
    files["notes.txt"].write_text("not a video\n" * 100)
    files["essay.mkv"].write_text("lorem ipsum dolor sit amet " * 4000)
    return files


@pytest.fixture(scope="module")
def probed(inputs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Every input through one `ProbeStage.__call__` on a pyarrow table, rows by file name."""
    policy = Policy(name="test", version=1, rules={"probe": {
        "duration_s": {"min": 1.0}, "width": {"min": 128}, "height": {"min": 96}}})
    ctx = RunContext(run_id="test-run", run_dir=str(tmp_path_factory.mktemp("probe-run")),
                     policy=policy, code_version="test")
    stage = ProbeStage(None, ctx)
    table = pa.Table.from_pylist([_row(p) for p in inputs.values()])
    out = stage(table)
    assert out.num_rows == len(inputs)
    for f in PROBE_FIELDS:
        assert out.schema.field(f.name).type == f.type
    return {r["item_id"]: r for r in out.to_pylist()}


def _entry(row: dict[str, Any]) -> dict[str, Any]:
    assert len(row["_ledger"]) == 1
    return json.loads(row["_ledger"][0])


def test_good_video_keeps_with_its_real_properties(probed) -> None:
    row = probed["bikes.mp4"]
    entry = _entry(row)
    assert row["_decision"] == entry["decision"] == "keep" and entry["reason"] == "ok"
    assert (row["fps"], row["width"], row["height"]) == (25.0, 640, 272)
    assert row["duration_s"] == pytest.approx(10.0, abs=0.05)
    assert row["num_frames"] == 250
    assert (row["container"], row["codec"]) == ("mp4", "h264")
    scores = json.loads(entry["scores"])
    assert scores == {"duration_s": row["duration_s"], "width": 640, "height": 272,
                      "fps": 25.0, "num_frames": 250}
    details = json.loads(entry["details"])
    assert details["pix_fmt"] == "yuv420p" and details["bit_rate"] > 0
    assert details["checked_frames"] == [0, 124, 249]  # start, middle, end
    assert json.loads(entry["thresholds"])["duration_s"] == {"min": 1.0}


def test_other_containers_keep(probed) -> None:
    city, mega = probed["cityCC0.mpg"], probed["Megamind.avi"]
    assert city["_decision"] == mega["_decision"] == "keep"
    assert (city["container"], city["codec"], city["width"], city["height"]) == (
        "mpeg", "mpeg2video", 720, 405)
    assert city["fps"] == 25.0 and city["num_frames"] == 190  # MPEG-PS has no nb_frames
    assert (mega["container"], mega["codec"]) == ("avi", "mpeg4")
    assert mega["fps"] == pytest.approx(2997 / 125) and mega["num_frames"] == 270


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_bad_input_is_an_error_row_with_its_reason(probed, name) -> None:
    row = probed[name]
    entry = _entry(row)
    assert row["_decision"] == entry["decision"] == "error"
    assert entry["reason"] == EXPECTED_ERRORS[name], entry["error_message"]
    assert entry["error_type"] == "ItemError" and entry["error_message"]
    assert entry["item_id"] == name and entry["stage"] == "probe"
    assert row["fps"] is None and row["num_frames"] is None


def test_policy_drops_with_the_score_kept(inputs, run_context) -> None:
    stage = ProbeStage(None, run_context({"probe": {"duration_s": {"min": 10.5}}}))
    rows = stage.process_rows([_row(inputs["bikes.mp4"]), _row(inputs["Megamind.avi"])])
    entries = [json.loads(r["_ledger"][0]) for r in rows]
    assert [(e["decision"], e["reason"]) for e in entries] == [
        ("drop", "duration_s_below_min"), ("keep", "ok")]
    assert json.loads(entries[0]["scores"])["duration_s"] == pytest.approx(10.0)


def test_extension_check_can_be_turned_off(inputs, run_context) -> None:
    stage = ProbeStage(ProbeConfig(require_extension_match=False), run_context())
    rows = stage.process_rows([_row(inputs["bikes.avi"])])
    assert rows[0]["_decision"] == "keep" and rows[0]["container"] == "mp4"


def test_file_changed_since_discovery_is_an_error(inputs, run_context) -> None:
    row = {**_row(inputs["bikes.mp4"]), "size_bytes": 123}
    entry = json.loads(ProbeStage(None, run_context()).process_rows([row])[0]["_ledger"][0])
    assert (entry["decision"], entry["reason"]) == ("error", "size_changed")
