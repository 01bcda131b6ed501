"""A shapes run of a few hundred samples becomes verified shards the trainer can plan."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from weft.cli import app
from weft.pipelines import shapes
from weft.pipelines.audit.trace import trace_key
from weft.pipelines.mixture import build_mixture, single_run_mixture
from weft.pipelines.shard import verify_shards
from weft.schemas.ledger import check_invariant, read_ledger
from weft.train.plans import plan_sample
from weft.train.shard_loader import ShardDataset

pytestmark = pytest.mark.integration

COUNTS = {"t2i": 120, "vqa": 60, "caption": 60, "edit": 80, "video": 30}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("shapes")
    started = time.perf_counter()
    config = shapes.load_config(overrides={"samples": COUNTS})
    summary = shapes.generate_run(config, root / "run")
    mixture = single_run_mixture(root / "run", max_shard_bytes=300_000)
    results = build_mixture(mixture, root, root / "out")
    return {"root": root, "run": root / "run", "out": root / "out", "summary": summary,
            "results": results, "seconds": time.perf_counter() - started}


def test_every_sample_is_sharded_and_verifies(shards) -> None:
    n = sum(COUNTS.values())
    [result] = shards["results"]
    assert (result.name, result.rows, result.kept) == ("shapes", n, n)
    assert result.dropped == {} and result.errors == {}
    report = verify_shards(shards["out"] / "shapes")
    assert report.ok, report.problems
    assert report.n_samples == n and report.n_shards >= 2
    assert shards["seconds"] < 60


def test_every_sample_has_a_valid_plan(shards) -> None:
    kinds: Counter[str] = Counter()
    for sample in ShardDataset(shards["out"] / "shapes", rank=0, world_size=1):
        record = sample["json"]
        plan = plan_sample(record, "shapes")
        kinds[plan.kind] += 1
        assert plan.has_loss
        assert len(sample["images"]) == sum(it["type"] != "text" for it in record["sequence"])
        assert record["ledger_item_id"] == record["key"]
        assert record["source_id"] in record["parent_ids"]
        if plan.kind in ("text_to_image", "image_edit"):
            assert plan.generates_image
    assert kinds == {"text_to_image": 120, "vqa": 120, "image_edit": 80, "video_clip": 30}


def test_the_ledgers_hold(shards) -> None:
    run = shards["run"]
    n = sum(COUNTS.values())
    funnel = check_invariant(read_ledger(run / "ledger"), shapes.plan(), n_inputs=n)
    assert [(f.stage, f.items_in, f.kept) for f in funnel] == [("generate", n, n)]
    shard_ledger = read_ledger(shards["out"] / "ledger").to_pylist()
    outputs = pq.read_table(run / "outputs" / "shapes.parquet", columns=["item_id"])
    assert sorted(r["item_id"] for r in shard_ledger) == sorted(outputs["item_id"].to_pylist())
    assert {r["decision"] for r in shard_ledger} == {"keep"}
    result = CliRunner().invoke(app, ["ledger", "funnel", str(run)])
    assert result.exit_code == 0, result.output


def test_a_sample_traces_back_to_its_generator_seed(shards) -> None:
    manifest = pq.read_table(shards["out"] / "shapes" / "manifest.parquet").to_pylist()
    by_kind = {row["kind"]: row for row in manifest}
    for row in by_kind.values():
        trace = trace_key(row["key"], [shards["out"] / "shapes"])
        assert trace.problems == [], trace.problems
        [item] = trace.chain
        [entry] = item.rows
        assert entry.stage == "generate" and entry.decision == "keep"
        assert trace.source.sha256 == row["source_id"] == \
            shapes.source_of(entry.details["seed"])
        assert json.loads(row["scores"])["n_objects"] >= 1
