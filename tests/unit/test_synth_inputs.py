"""Synthesis inputs and outputs without models: parsing prompt, edit and interleaved files,
rollout seeds, and synth.parquet rows as shard samples the trainer plans with reasoning."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from weft.pipelines import synth
from weft.pipelines.shard import verify_shards, write_shards
from weft.pipelines.shard_samples import convert_run, samples_from_synth
from weft.schemas.ids import sha256_file
from weft.schemas.policy import load_policy
from weft.schemas.run_dir import RunDir
from weft.schemas.shards import validate_record
from weft.stages.base import DECISION_COLUMN, LEDGER_COLUMN, RunContext, ledger_rows_of
from weft.stages.synth.images import png_bytes
from weft.stages.synth.inputs import ParseConfig, ParseStage, pair_indices
from weft.stages.synth.rollout import RolloutConfig, RolloutStage, rollout_seed
from weft.train.plans import plan_sample

POLICY = load_policy(Path(__file__).resolve().parents[2] / "configs" / "policies" /
                     "synth.yaml")


def _picture(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (7, 7), 2.0)


def _ctx(tmp: Path) -> RunContext:
    return RunContext(run_id="run", run_dir=str(tmp), policy=POLICY, code_version="test")


def _parse(tmp: Path, *paths: Path, **config) -> list[dict]:
    stage = ParseStage(ParseConfig(**config), _ctx(tmp))
    rows = [{"item_id": sha256_file(p), "source_id": sha256_file(p), "item_kind": "source",
             "path": str(p)} for p in paths]
    return stage.process_rows(rows)


def _by_reason(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for entry in ledger_rows_of(rows):
        out.setdefault(entry["reason"], []).append(entry)
    return out


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_prompts_file_gives_one_input_per_line_and_bad_lines_are_errors(tmp_path) -> None:
    path = _jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": " a red cat "}, {"prompt": "a boat", "height": 256, "width": 512},
        {"prompt": ""}, {"prompt": 3}, {"prompt": "big", "height": 100000}, "[1, 2]",
        "{not json", ""])
    rows = _parse(tmp_path, path)
    reasons = {k: len(v) for k, v in _by_reason(rows).items()}
    assert reasons == {"ok": 2, "prompt_chars_below_min": 1, "bad_record": 2, "bad_size": 1,
                       "bad_json": 1}
    kept = [r for r in rows if r[DECISION_COLUMN] == "keep"]
    assert [r["prompt"] for r in kept] == ["a red cat", "a boat"]
    assert (kept[1]["height"], kept[1]["width"]) == (256, 512)
    assert all(r["parent_id"] == sha256_file(path) and r["task"] == "t2i" for r in kept)
    assert len({r["item_id"] for r in rows}) == len(rows)


def test_edit_paths_are_confined_to_the_file_folder(tmp_path) -> None:
    (tmp_path / "in" / "img").mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2)):
        cv2.imwrite(str(tmp_path / "in" / "img" / f"{name}.png"), _picture(seed))
    cv2.imwrite(str(tmp_path / "outside.png"), _picture(3))
    (tmp_path / "in" / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "in" / "img" / "junk.png").write_bytes(b"not an image")
    path = _jsonl(tmp_path / "in" / "edits.jsonl", [
        {"source": "img/a.png", "target": "img/b.png", "instruction": "blur it"},
        {"source": "../outside.png", "target": "img/b.png", "instruction": "x"},
        {"source": "img/link.png", "target": "img/b.png", "instruction": "x"},
        {"source": "img/a.png", "target": "img/nope.png", "instruction": "x"},
        {"source": "img/a.png", "target": "img/junk.png", "instruction": "x"},
        {"source": "img/a.png", "target": "img/b.png"}])
    rows = _parse(tmp_path, path)
    reasons = {k: len(v) for k, v in _by_reason(rows).items()}
    assert reasons == {"ok": 1, "path_escape": 2, "image_missing": 1, "image_undecodable": 1,
                       "bad_record": 1}
    [kept] = [r for r in rows if r[DECISION_COLUMN] == "keep"]
    assert kept["source_image"] == (tmp_path / "in" / "img" / "a.png").read_bytes()
    assert kept["target_sha256"] == sha256_file(tmp_path / "in" / "img" / "b.png")
    assert all(r.get("source_image") is None for r in rows if r[DECISION_COLUMN] != "keep")


def _video_run(root: Path) -> Path:
    """A finished video run as the synth pipeline reads it: run.json, captions, key frames."""
    (root / "outputs").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"pipeline": "video", "run_id": "v1"}))
    clips = []
    for c, n in (("clipa", 3), ("clipb", 1), ("clipc", 2)):
        (root / "keyframes" / c).mkdir(parents=True)
        paths = []
        for k in range(n):
            cv2.imwrite(str(root / "keyframes" / c / f"{k}.jpg"), _picture(10 * n + k))
            paths.append(f"keyframes/{c}/{k}.jpg")
        clips.append({"item_id": c, "parent_id": f"src-{c}", "source_id": f"src-{c}",
                      "keyframe_paths": paths, "keyframe_times": [0.5 * k for k in range(n)]})
    clips[2]["keyframe_paths"][1] = "../../escape.jpg"
    pq.write_table(pa.Table.from_pylist(clips), root / "outputs" / "captions.parquet")
    return root / "outputs" / "captions.parquet"


def test_video_clips_give_key_frame_pairs_that_trace_to_their_clip(tmp_path) -> None:
    rows = _parse(tmp_path, _video_run(tmp_path / "video"))
    concept = [r for r in rows if r.get("task") == "concept"]
    assert [(r["upstream_item_id"], r[DECISION_COLUMN]) for r in concept] == [
        ("clipa", "keep"), ("clipa", "keep"), ("clipc", "error")]
    first = concept[0]
    upstream = json.loads(first["upstream"])
    assert upstream["run_id"] == "v1" and upstream["source_id"] == "src-clipa"
    assert [i["keyframe"] for i in upstream["images"]] == [0, 1]
    assert first["upstream_source_id"] == "src-clipa"
    assert first["source_image"] == (tmp_path / "video" / "keyframes" / "clipa" / "0.jpg"
                                     ).read_bytes()
    assert "0.50 s apart" in first["context"]
    assert _by_reason(rows)["path_escape"][0]["parent_id"] == first["parent_id"]


def test_web_documents_give_image_pairs(tmp_path) -> None:
    root = tmp_path / "web"
    (root / "outputs").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"pipeline": "web", "run_id": "w1"}))
    item = {"type": "image", "text": None, "src": "a.png", "alt": "a", "path": None, "url": None}
    text = {"type": "text", "text": "words", "src": None, "alt": None, "path": None, "url": None}
    docs = [{"item_id": "doc1", "source_id": "page1", "title": "Tools", "items":
             [text, item, text, {**item, "src": "b.png"}, {**item, "src": "gone.png"}],
             "image_bytes": [png_bytes(_picture(1)), png_bytes(_picture(2)), None],
             "metadata": json.dumps({"licence": "cc0"})},
            {"item_id": "doc2", "source_id": "page2", "title": None, "items": [text],
             "image_bytes": [], "metadata": None}]
    pq.write_table(pa.Table.from_pylist(docs), root / "outputs" / "docs.parquet")
    rows = _parse(tmp_path, root / "outputs" / "docs.parquet")
    [pair] = [r for r in rows if r[DECISION_COLUMN] == "keep"]
    assert pair["upstream_item_id"] == "doc1" and pair["licence"] == "cc0"
    assert [i["src"] for i in json.loads(pair["upstream"])["images"]] == ["a.png", "b.png"]
    assert "Tools" in pair["context"]


def test_a_file_without_records_is_dropped_against_itself(tmp_path) -> None:
    path = _jsonl(tmp_path / "prompts.jsonl", ["", "  "])
    [row] = _parse(tmp_path, path)
    [entry] = ledger_rows_of([row])
    assert (entry["decision"], entry["reason"]) == ("drop", "no_records")
    assert entry["item_id"] == entry["parent_id"] == sha256_file(path)


def test_pair_indices() -> None:
    assert pair_indices(4, "consecutive", 2) == [(0, 1), (1, 2)]
    assert pair_indices(4, "first_last", 2) == [(0, 3)]
    assert pair_indices(1, "consecutive", 5) == []


def test_rollout_seeds_depend_on_content_not_on_file_or_order(tmp_path) -> None:
    stage = RolloutStage(RolloutConfig(rollouts=3, seed=5), _ctx(tmp_path))
    rows = [{"item_id": i, "content_id": "same", "task": "t2i", LEDGER_COLUMN: [],
             DECISION_COLUMN: "keep"} for i in ("x", "y")]
    out = stage.process_rows(rows)
    assert len(out) == 6 and {r["parent_id"] for r in out} == {"x", "y"}
    seeds = [r["seed"] for r in out]
    assert seeds[:3] == seeds[3:] and len(set(seeds[:3])) == 3
    assert seeds[0] == rollout_seed(5, "same", 0) != rollout_seed(6, "same", 0)
    assert len({r["item_id"] for r in out}) == 6


# ---- outputs -> shard samples -> sequence plans ------------------------------------------
def _sample(task: str, item: str) -> dict:
    row = {"item_id": item, "parent_id": "input", "input_id": "input", "source_id": "file",
           "task": task, "rollout": 0, "seed": 11, "reasoning": "think first",
           "target_image": png_bytes(_picture(4)), "judge_score": 1.0,
           "generators": {"reason": {"model": "m", "revision": "r", "prompt": "p@1",
                                     "prompt_hash": "h", "seed": 11}}}
    if task == "t2i":
        row.update(prompt="a cat", detailed_prompt="a red cat", render_height=96,
                   render_width=96)
    else:
        row.update(instruction="darken it", source_image=png_bytes(_picture(5)),
                   upstream_item_id="clip" if task == "concept" else None,
                   upstream_source_id="video" if task == "concept" else None)
    return row


def test_synth_rows_become_reasoning_samples_the_trainer_plans(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run.manifest_path.write_text(json.dumps({"pipeline": "synth", "run_id": "s1"}))
    rows = [_sample("t2i", "a" * 32), _sample("edit", "b" * 32), _sample("concept", "c" * 32)]
    table = synth.write_outputs(run, rows)
    assert table.column("kind").to_pylist() == ["reasoning_t2i", "reasoning_edit",
                                                "reasoning_edit"]
    assert table.column("parent_ids").to_pylist()[2] == ["input", "file", "clip", "video"]
    samples = samples_from_synth(run.root, "synth")
    for sample in samples:
        record = sample["json"]
        validate_record(record, set(sample["members"]))
        plan = plan_sample(record)
        reasoning = [i for i, it in enumerate(plan.items) if it.type == "text" and it.loss]
        target = max(i for i, it in enumerate(plan.items) if it.noised)
        assert reasoning and reasoning[-1] == target - 1, plan.items
        assert plan.items[reasoning[-1]].text == "think first"
        assert record["scores"] == {"judge_score": 1.0}
    t2i, edit, concept = (s["json"] for s in samples)
    assert [i.get("role") for i in t2i["sequence"]] == ["prompt", "reasoning", None]
    assert [i.get("role") for i in edit["sequence"]] == [None, "instruction", "reasoning", None]
    assert concept["source_id"] == "video" and edit["source_id"] == "file"
    summary = write_shards(samples, tmp_path / "shards", prefix="synth")
    assert summary.shards and verify_shards(tmp_path / "shards").ok


def test_a_bad_synth_row_is_a_conversion_error_not_a_crash(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run.manifest_path.write_text(json.dumps({"pipeline": "synth", "run_id": "s1"}))
    synth.write_outputs(run, [_sample("t2i", "a" * 32), {**_sample("t2i", "b" * 32),
                                                          "reasoning": ""}])
    out = list(convert_run(run.root))
    assert [c.reason for c in out] == ["ok", "conversion_error"]
    with pytest.raises(ValueError, match="no reasoning"):
        samples_from_synth(run.root)
