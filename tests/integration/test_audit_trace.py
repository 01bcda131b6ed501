"""`weft audit trace` / `why` over real video and web runs: every shard key reaches its bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from weft.pipelines.audit.trace import render_trace, render_why, trace_key, why
from weft.pipelines.shard import write_shards
from weft.pipelines.shard_samples import samples_from_captions, samples_from_docs
from weft.schemas.ids import sha256_file
from weft.schemas.ledger import read_ledger

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shard_sets(video_run, web_run, tmp_path_factory) -> dict[str, dict[str, Any]]:
    out = {}
    for name, run, make in (("video", video_run, samples_from_captions),
                            ("web", web_run, samples_from_docs)):
        shards = tmp_path_factory.mktemp(f"trace-shards-{name}")
        write_shards(make(run["run_dir"], dataset=name), shards)
        out[name] = {"run_dir": Path(run["run_dir"]), "shards": shards}
    return out


def _plan(run_dir: Path) -> list[str]:
    return [s["name"] for s in json.loads((run_dir / "run.json").read_text())["plan"]]


@pytest.mark.parametrize("name", ["video", "web"])
def test_every_shard_key_traces_to_its_source_bytes(shard_sets, name):
    mine = shard_sets[name]
    every_dir = [s["shards"] for s in shard_sets.values()]
    keys = pq.read_table(mine["shards"] / "manifest.parquet")["key"].to_pylist()
    assert keys, f"the {name} run wrote no samples"
    plan = _plan(mine["run_dir"])
    for key in keys:
        trace = trace_key(key, every_dir)
        assert trace.ok, (key, trace.problems)
        assert trace.location.json_ok
        assert Path(trace.run_dir) == mine["run_dir"].resolve()
        root = trace.chain[-1]
        ingest = [r for r in root.rows if r.stage == "ingest" and r.decision == "keep"]
        assert ingest, f"{key}: the chain ends without a kept ingest row"
        path = ingest[0].details["path"]
        assert trace.source.path == path
        assert sha256_file(path) == trace.source.sha256 == root.item_id
        stages = [r.stage for item in trace.chain for r in item.rows]
        assert stages and set(plan) <= set(stages), (key, set(plan) - set(stages))
        assert trace.chain[0].fate.outcome == "kept"
        assert trace.chain[0].rows[-1].stage == plan[-1]
    assert "no problems" in render_trace(trace_key(keys[0], every_dir, check_source=True))


def _pick(run_dir: Path, decision: str) -> dict[str, Any]:
    """A row with this decision for an item that has no keep row at the same stage."""
    table = read_ledger(run_dir / "ledger")
    kept = {(r["item_id"], r["stage"]) for r in
            table.filter(pc.equal(table["decision"], "keep")).select(["item_id", "stage"])
            .to_pylist()}
    rows = table.filter(pc.equal(table["decision"], decision)).to_pylist()
    rows = [r for r in rows if (r["item_id"], r["stage"]) not in kept]
    assert rows, f"no {decision} row in {run_dir}"
    return sorted(rows, key=lambda r: (r["stage_index"], r["item_id"]))[0]


@pytest.mark.parametrize("name", ["video", "web"])
def test_why_names_the_stage_and_reason_of_a_drop(shard_sets, name):
    run_dir = shard_sets[name]["run_dir"]
    row = _pick(run_dir, "drop")
    (verdict,) = why(row["item_id"][:16], [run_dir])
    assert verdict.item_id == row["item_id"]
    assert (verdict.outcome, verdict.stage, verdict.reason) == \
        ("dropped", row["stage"], row["reason"])
    thresholds = json.loads(row["thresholds"])
    if any(f"{score}_" in row["reason"] for score in thresholds):
        assert verdict.broken and verdict.broken[0].decisive
    text = render_why([verdict])
    assert row["stage"] in text and row["reason"] in text


@pytest.mark.parametrize("name", ["video", "web"])
def test_why_gives_the_error_type_of_an_error(shard_sets, name):
    run_dir = shard_sets[name]["run_dir"]
    row = _pick(run_dir, "error")
    (verdict,) = why(row["item_id"], [run_dir])
    assert (verdict.outcome, verdict.stage) == ("errored", row["stage"])
    assert verdict.row.error_type == row["error_type"] and verdict.row.error_type
    assert row["error_type"] in render_why([verdict])
