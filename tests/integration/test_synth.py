"""The synthesis pipeline end to end on CPU: tiny Qwen2.5 / Qwen2.5-VL, the tiny FLUX
renderer, real curated clips of the session's video run; shards the trainer plans with
reasoning; the ledger; a cached, byte-identical re-run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from weft.pipelines import synth
from weft.pipelines.audit.report import write_report
from weft.pipelines.audit.trace import trace_key
from weft.pipelines.mixture import build_mixture, single_run_mixture
from weft.pipelines.shard import verify_shards
from weft.schemas.ids import sha256_file
from weft.schemas.ledger import StagePlan, check_invariant, read_ledger
from weft.schemas.run_dir import RunDir
from weft.stages.synth.tiny_renderer import make_tiny_flux
from weft.train.plans import plan_sample
from weft.train.shard_loader import ShardDataset

pytestmark = pytest.mark.integration
PROMPTS = [
    {"prompt": "a red cat on a sofa"},
    {"prompt": "a red cat on a sofa"},  # an exact copy: input_dedup drops it
    {"prompt": "a bowl of ramen, top view"},
    {"prompt": "a lighthouse at dusk", "height": 8, "width": 8},  # the renderer crashes
    {"prompt": "snowy mountains", "height": 16, "width": 16},  # verify: image too small
]


def _inputs(root: Path, video_run_dir: Path) -> Path:
    """prompts.jsonl, and edits.jsonl over two real key frames of the video run."""
    inputs = root / "inputs"
    (inputs / "img").mkdir(parents=True)
    captions = pq.read_table(video_run_dir / "outputs" / "captions.parquet").to_pylist()
    frames = [video_run_dir / c["keyframe_paths"][0] for c in captions[:2]]
    for name, frame in zip(("before.jpg", "after.jpg"), frames, strict=True):
        shutil.copyfile(frame, inputs / "img" / name)
    (inputs / "prompts.jsonl").write_text(
        "\n".join(json.dumps(p) for p in PROMPTS) + "\n{not json\n")
    (inputs / "edits.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"source": "img/before.jpg", "target": "img/after.jpg",
         "instruction": "cut to the next scene of the film"},
        {"source": "../../escape.jpg", "target": "img/after.jpg", "instruction": "escape"},
        {"source": "img/before.jpg", "target": "img/gone.jpg", "instruction": "missing"},
    ]) + "\n")
    return inputs


@pytest.fixture(scope="module")
def synth_setup(tmp_path_factory, video_run, tiny_models) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("synth")
    flux = make_tiny_flux(root / "flux")
    (root / "models.yaml").write_text(yaml.safe_dump({"models": {
        "caption-vlm": {"path": str(tiny_models["qwen2_5_vl"]), "kind": "vlm",
                        "batch_size": 8, "max_tokens": 16},
        "filter-llm": {"path": str(tiny_models["qwen2_5"]), "kind": "llm",
                       "batch_size": 8, "max_tokens": 16}}}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        # tiny random models write random words: this policy records, not decides, on them
        "policy": str(synth.CONFIGS_DIR / "policies" / "synth-tiny-models.yaml"),
        "models": str(root / "models.yaml"),
        "inference": {"cache_path": str(root / "requests.sqlite")},  # shared by both runs
        "interleaved_runs": [str(video_run["run_dir"])],
        "parse": {"max_pairs_per_item": 1, "max_pairs_per_run": 3},
        "render": {"path": str(flux), "height": 32, "width": 32, "steps": 2,
                   "max_sequence_length": 32},
        "ray": {"progress_bars": False},
    }))
    inputs = _inputs(root, Path(video_run["run_dir"]))
    started = time.perf_counter()
    result = synth.run(str(inputs), str(root / "run"), str(config))
    seconds = time.perf_counter() - started
    print(f"synth run: {seconds:.1f} s; {json.dumps(result['synth'], sort_keys=True)}")
    return {"root": root, "config": config, "inputs": inputs, "run_dir": root / "run",
            "result": result, "seconds": seconds}


def _ledger(run_dir: Path) -> list[dict[str, Any]]:
    return read_ledger(Path(run_dir) / "ledger").to_pylist()


def _stage(rows: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["stage"] == stage]


def _samples(run_dir: Path) -> list[dict[str, Any]]:
    return pq.read_table(Path(run_dir) / "outputs" / "synth.parquet").to_pylist()


def test_every_kind_lands_in_shards_the_trainer_plans_with_reasoning(synth_setup) -> None:
    samples = _samples(synth_setup["run_dir"])
    assert {s["task"] for s in samples} == {"t2i", "edit", "concept"}
    out = synth_setup["root"] / "shards"
    [result] = build_mixture(single_run_mixture(synth_setup["run_dir"]), Path("/"), out)
    assert result.kept == len(samples) and not result.errors
    assert verify_shards(out / "synth").ok
    seen: dict[str, int] = {}
    for sample in ShardDataset(out / "synth", seed=0, rank=0, world_size=1):
        record = sample["json"]
        plan = plan_sample(record)
        target = max(i for i, item in enumerate(plan.items) if item.noised)
        before = plan.items[target - 1]
        assert before.type == "text" and before.loss and not before.enable_cfg, plan.items
        assert record["sequence"][-2]["role"] == "reasoning"
        seen[record["kind"]] = seen.get(record["kind"], 0) + 1
        condition = [i for i in plan.items if i.enable_cfg]
        assert condition, "the prompt / instruction (and source image) are CFG conditions"
    assert set(seen) == {"reasoning_t2i", "reasoning_edit"} and sum(seen.values()) == len(samples)
    # a shard sample traces back through the synth ledger to the bytes it came from
    manifest = pq.read_table(out / "synth" / "manifest.parquet").to_pylist()
    for row in manifest[:3]:
        trace = trace_key(row["key"], [out / "synth"], check_source=True)
        assert not trace.problems and trace.source.bytes_check == "match"


def test_the_ledger_holds_and_every_failure_has_its_reason(synth_setup) -> None:
    run = RunDir(synth_setup["run_dir"])
    plan = [StagePlan(**p) for p in run.manifest()["plan"]]
    funnel = {r.stage: r for r in check_invariant(read_ledger(run.ledger_dir), plan,
                                                  n_inputs=3)}
    assert funnel["ingest"].kept == 3  # prompts, edits, the video run's captions table
    assert funnel["parse"].error_reasons == {"bad_json": 1, "image_missing": 1,
                                             "path_escape": 1}
    assert funnel["input_dedup"].drop_reasons.get("prompt_jaccard_above_max") == 1
    assert funnel["render"].error_reasons == {"render_failed": 2}  # both rollouts of 8x8
    assert funnel["verify"].drop_reasons.get("image_min_side_below_min") == 2
    rows = _ledger(run.root)
    crash = [r for r in _stage(rows, "render") if r["decision"] == "error"]
    assert all(r["error_type"] == "RuntimeError" and r["error_message"] for r in crash)
    # model answers are scored in the ledger even where the tiny-model policy does not decide
    judged = [json.loads(r["scores"]) for r in _stage(rows, "verify")]
    assert all("judge_parsed" in s and "judge_ok" in s for s in judged)
    reasons = _stage(rows, "reason")
    assert all(r["model_id"] and r["model_revision"] and r["prompt_hash"] for r in reasons)
    assert {r["model_id"] for r in reasons} == {"filter-llm", "caption-vlm"}
    # the flow's end-of-run audit report reads a synth run as it is
    assert write_report(run.root).is_file()


def test_conceptual_edits_trace_to_their_clip_and_source_bytes(synth_setup, video_run) -> None:
    video_ledger = _ledger(video_run["run_dir"])
    captioned = {r["item_id"]: r for r in _stage(video_ledger, "caption")
                 if r["decision"] == "keep"}
    video_sources = {sha256_file(p) for p in video_run["inputs"].values()
                     if p.stat().st_size}
    candidates = [r for r in _stage(_ledger(synth_setup["run_dir"]), "parse")
                  if json.loads(r["details"]).get("upstream")]
    assert len(candidates) == 3
    for row in candidates:
        upstream = json.loads(row["details"])["upstream"]
        clip = captioned[upstream["item_id"]]  # a clip the video run curated and captioned
        assert upstream["source_id"] == clip["source_id"] in video_sources
        assert upstream["run_id"] == RunDir(video_run["run_dir"]).manifest()["run_id"]
        assert next(i["path"] for i in upstream["images"]).startswith(
            f"keyframes/{upstream['item_id']}/")
    concept = [s for s in _samples(synth_setup["run_dir"]) if s["task"] == "concept"]
    assert concept
    for sample in concept:
        assert sample["upstream_item_id"] in captioned
        assert sample["upstream_source_id"] in video_sources
        assert sample["parent_ids"][-2:] == [sample["upstream_item_id"],
                                             sample["upstream_source_id"]]


def test_every_sample_records_generators_seed_and_parents(synth_setup) -> None:
    samples = _samples(synth_setup["run_dir"])
    by_input: dict[str, set[int]] = {}
    for s in samples:
        assert s["generator_model"] and s["generator_revision"] and s["seed"] is not None
        hashes = json.loads(s["prompt_hashes"])
        assert "reason" in hashes and "verify" in hashes
        assert s["parent_ids"][:2] == [s["input_id"], s["source_id"]]
        if s["task"] == "t2i":
            assert s["renderer_model"].startswith("diffusers:FluxPipeline")
            assert s["renderer_revision"] and s["target_image"].startswith(b"\x89PNG")
        by_input.setdefault(s["input_id"], set()).add(s["seed"])
    assert any(len(seeds) == 2 for seeds in by_input.values())  # N rollouts, own seeds


def test_a_rerun_asks_no_model_and_writes_the_same_bytes(synth_setup) -> None:
    first = synth_setup["run_dir"] / "outputs" / "synth.parquet"
    before = synth_setup["result"]["synth"]["render"]
    again = synth.run(str(synth_setup["inputs"]), str(synth_setup["root"] / "run-again"),
                      str(synth_setup["config"]))["synth"]
    assert again["model_calls"] == 0, again["inference"]
    assert sum(s["cache_hits"] for s in again["inference"].values()) > 0
    # every render that succeeded is a cache hit; only the failed ones are tried again
    assert again["render"]["cache_hits"] == before["unique"] - before["errors"] > 0
    assert again["render"]["renderer_calls"] == before["errors"] == again["render"]["errors"]
    second = synth_setup["root"] / "run-again" / "outputs" / "synth.parquet"
    assert second.read_bytes() == first.read_bytes()
