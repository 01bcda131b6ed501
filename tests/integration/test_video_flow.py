"""The video flow end to end on real media: Ray + Prefect, ledger, cache, refusal, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from weft.pipelines import video
from weft.schemas.ledger import check_invariant, read_ledger
from weft.schemas.run_dir import ConfigMismatchError, RunDir

pytestmark = pytest.mark.integration


def _ledger_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = read_ledger(run_dir / "ledger").to_pylist()
    for r in rows:
        r.pop("elapsed_ms")
    return sorted(rows, key=lambda r: (r["stage_index"], r["item_id"], r["details"]))


def _by_stage(rows: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["stage"] == stage]


def test_every_input_is_accounted_for_and_invariant_holds(video_run) -> None:
    run = RunDir(video_run["run_dir"])
    manifest = run.manifest()
    plan = [video.StagePlan(**p) for p in manifest["plan"]]
    funnel = check_invariant(read_ledger(run.ledger_dir), plan, n_inputs=8)
    by = {r.stage: r for r in funnel}
    assert by["ingest"].items_in == 8
    assert by["ingest"].drop_reasons == {"exact_duplicate": 1}
    assert by["probe"].items_in == 7
    assert by["probe"].kept == 3  # bikes, Megamind, Megamind_bugy
    assert by["clips"].kept >= 6
    assert by["dedup"].items_in >= 4
    for r in funnel:
        assert r.items_in == r.kept + r.dropped + r.errored
    assert (run.summary_dir / "funnel.md").read_text().count("|") > 20
    report = (run.summary_dir / "report.html").read_text()
    assert 'id="funnel"' in report and run.manifest()["run_id"] in report


def _names(rows: list[dict[str, Any]]) -> dict[str, str]:
    """source id -> file name, from the ingest rows."""
    return {r["item_id"]: Path(json.loads(r["details"])["path"]).name
            for r in _by_stage(rows, "ingest") if r["decision"] == "keep"}


def test_bad_inputs_get_error_rows_with_reasons(video_run) -> None:
    rows = _ledger_rows(video_run["run_dir"])
    name_of = _names(rows)
    probe = _by_stage(rows, "probe")
    assert len(probe) == 7
    reasons = {name_of[r["item_id"]]: r["reason"] for r in probe if r["decision"] == "error"}
    assert reasons.get("empty.mp4") == "empty_file", reasons
    assert reasons.get("truncated.mp4") in {"truncated", "unreadable"}, reasons
    assert reasons.get("random.mp4") in {"not_a_video", "unreadable"}, reasons
    assert reasons.get("bikes_really.avi") == "extension_mismatch", reasons
    assert set(reasons) == {"empty.mp4", "truncated.mp4", "random.mp4", "bikes_really.avi"}
    for r in probe:
        if r["decision"] == "error":
            assert r["error_type"] and r["error_message"]


def test_megamind_reencode_clips_are_marked_duplicates(video_run) -> None:
    rows = _ledger_rows(video_run["run_dir"])
    name_of = _names(rows)
    dedup = _by_stage(rows, "dedup")
    dropped = [r for r in dedup if r["decision"] == "drop"]
    assert dropped
    dup_sources = {name_of[r["source_id"]] for r in dropped}
    assert dup_sources <= {"Megamind.avi", "Megamind_bugy.avi"}, dup_sources
    clip_source = {r["item_id"]: name_of[r["source_id"]] for r in dedup}
    for r in dropped:  # each duplicate points at a clip of the other Megamind file
        other = clip_source[json.loads(r["details"])["duplicate_of"]]
        assert {other, name_of[r["source_id"]]} == {"Megamind.avi", "Megamind_bugy.avi"}
    bikes = [r for r in dedup if name_of[r["source_id"]] == "bikes.mp4"]
    assert bikes and all(r["decision"] == "keep" for r in bikes)


def test_outputs_written_for_kept_clips(video_run) -> None:
    run_dir = video_run["run_dir"]
    table = pq.read_table(run_dir / "outputs" / "clips.parquet").to_pylist()
    assert table
    kept_ids = {r["item_id"] for r in _by_stage(_ledger_rows(run_dir), "dedup")
                if r["decision"] == "keep"}
    assert {r["item_id"] for r in table} == kept_ids
    for r in table:  # paths are relative to the run directory, so a run can move
        assert (run_dir / r["clip_path"]).is_file()
        assert 1 <= len(r["keyframe_paths"]) <= 4
        assert all((run_dir / p).is_file() for p in r["keyframe_paths"])
        assert r["crop_w"] > 0 and r["crop_h"] > 0


def test_rerun_with_same_config_recomputes_nothing(video_run) -> None:
    from weft.flows import video_flow

    run_dir = video_run["run_dir"]
    before = _ledger_rows(run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    result = video_flow(input_dir=str(video_run["root"] / "inputs"), run_dir=str(run_dir),
                        config_path=str(video_run["config"]))
    assert [p["state"] for p in result["partitions"]] == ["Cached"] * len(result["partitions"])
    assert result["dedup"]["state"] == "Cached"
    assert _ledger_rows(run_dir) == before
    changed = [p for p, m in mtimes.items()
               if p.exists() and p.stat().st_mtime_ns != m and "ingest" not in p.name]
    assert not changed


def test_changed_config_is_refused_for_existing_run_dir(video_run, tmp_path) -> None:
    from weft.flows import video_flow

    changed = tmp_path / "changed.yaml"
    cfg = yaml.safe_load(video_run["config"].read_text())
    cfg["clips"] = {"analysis_fps": 2.0}
    changed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigMismatchError, match=r"clips\.analysis_fps: 4\.0 -> 2\.0"):
        video_flow(input_dir=str(video_run["root"] / "inputs"),
                   run_dir=str(video_run["run_dir"]), config_path=str(changed))


def _digest_tree(run_dir: Path) -> dict[str, str]:
    out = {}
    for sub in ("clips", "keyframes"):
        for p in sorted((run_dir / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(run_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_killed_run_resumes_to_the_same_output_set(video_run, tmp_path) -> None:
    run_dir = tmp_path / "killed-run"
    cmd = [sys.executable, "-m", "weft.cli", "video", "--input",
           str(video_run["root"] / "inputs"), "--run-dir", str(run_dir),
           "--config", str(video_run["config"])]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list((run_dir / "partitions").glob("*/_SUCCESS")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.parent.name for p in (run_dir / "partitions").glob("*/_SUCCESS"))
    assert 1 <= len(done_before) < 3
    marker_mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "partitions").glob("*/_SUCCESS")}
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # finished partitions were not redone
    for p, m in marker_mtimes.items():
        assert p.stat().st_mtime_ns == m
    assert _ledger_rows(run_dir) == _ledger_rows(video_run["run_dir"])
    assert _digest_tree(run_dir) == _digest_tree(video_run["run_dir"])
    assert pq.read_table(run_dir / "outputs" / "clips.parquet").equals(
        pq.read_table(video_run["run_dir"] / "outputs" / "clips.parquet"))


def test_kept_clips_are_captioned_as_interleaved_samples(video_run) -> None:
    run_dir = video_run["run_dir"]
    caption = video_run["result"]["caption"]
    clips = pq.read_table(run_dir / "outputs" / "clips.parquet").to_pylist()
    samples = pq.read_table(run_dir / "outputs" / "captions.parquet").to_pylist()
    rows = _ledger_rows(run_dir)
    assert caption["clips_in"] == len(clips) and caption["samples"] == len(samples) > 0
    # one request per consecutive pair of key frames, each answered by the model once
    pairs = sum(len(c["keyframe_paths"]) - 1 for c in clips)
    assert caption["requests"] == pairs and caption["model_calls"] == caption["unique"]
    by_id = {r["item_id"]: r for r in _by_stage(rows, "caption")}
    clip_rows = {r["item_id"]: r for r in _by_stage(rows, "clips")}
    ingest = {r["item_id"]: r for r in _by_stage(rows, "ingest")}
    for sample in samples:
        # every caption row joins to its clip and its source in the ledger
        entry = by_id[sample["item_id"]]
        assert entry["decision"] == "keep" and entry["model_id"] == "caption-vlm"
        assert entry["model_revision"] == sample["caption_model_revision"]
        assert entry["prompt_hash"] == sample["caption_prompt_hash"]
        assert clip_rows[sample["item_id"]]["source_id"] == sample["source_id"]
        assert ingest[sample["source_id"]]["decision"] == "keep"
        sequence = json.loads(sample["sequence"])
        kinds = [item["type"] for item in sequence]
        assert kinds == ["video_frame", "text"] * len(sample["captions"]) + ["video_frame"]
        assert all(n <= 30 for n in sample["caption_tokens"])
        details = json.loads(entry["details"])["captions"]
        assert [d["completion_tokens"] for d in details] == sample["caption_tokens"]
        assert all(d["latency_ms"] > 0 for d in details)


def test_second_caption_run_makes_no_model_calls_and_same_bytes(video_run, tmp_path) -> None:
    """A fresh run directory with the same request cache pays for nothing."""
    import shutil

    from weft.pipelines.ray_runtime import RayConfig, init_ray

    copy = tmp_path / "copy"
    shutil.copytree(video_run["run_dir"], copy)
    (copy / "outputs" / "captions.parquet").unlink()
    (copy / "ledger" / "caption.parquet").unlink()
    loaded = video.load_config(video_run["config"])
    init_ray(RayConfig(progress_bars=False))
    stats = video.run_captions(loaded, RunDir(copy), video_run["result"]["run_id"])
    assert stats["model_calls"] == 0 and stats["cache_hits"] == stats["unique"] > 0
    name = "outputs/captions.parquet"
    assert (copy / name).read_bytes() == (video_run["run_dir"] / name).read_bytes()
    # the ledger says the same (all but wall-clock elapsed_ms), cached latencies included
    assert _ledger_rows(copy) == _ledger_rows(video_run["run_dir"])
