"""Shards from the video and web runs: a mixture, verify, tampering, DuckDB, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from weft.cli import app
from weft.pipelines.shard import verify_shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mixture_out(video_run, web_run, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mixture")
    docs = pq.read_table(web_run["run_dir"] / "outputs" / "docs.parquet")
    scores = sorted(s for s in docs["quality_score"].to_pylist() if s is not None)
    cut = scores[len(scores) // 2]  # keep the better half of the web documents
    mixture = root / "mixture.yaml"
    mixture.write_text(yaml.safe_dump({
        "name": "test-mixture", "seed": 7, "max_shard_bytes": 400_000,
        "sources": [
            {"name": "video", "run_dir": str(video_run["run_dir"]), "weight": 1.0},
            {"name": "web", "run_dir": str(web_run["run_dir"]), "weight": 3.0,
             "filters": {"scores": {"quality_score": {"min": cut}}}},
        ]}))
    result = CliRunner().invoke(app, ["shards", "write", "--mixture", str(mixture),
                                      "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return {"root": root, "out": root / "out", "cut": cut, "docs": docs,
            "video": video_run, "web": web_run, "output": result.output}


def test_every_output_row_is_accounted_for_in_the_shard_ledger(mixture_out) -> None:
    out = mixture_out["out"]
    captions = pq.read_table(mixture_out["video"]["run_dir"] / "outputs" / "captions.parquet")
    ledger = duckdb.sql(f"select * from read_parquet('{out}/ledger/*.parquet')").fetchall()
    assert len(ledger) == captions.num_rows + mixture_out["docs"].num_rows
    counts = dict(duckdb.sql(
        f"select decision || ':' || reason, count(*) from read_parquet('{out}/ledger/*.parquet')"
        " group by 1").fetchall())
    below = sum(1 for s in mixture_out["docs"]["quality_score"].to_pylist()
                if s is None or s < mixture_out["cut"])
    assert counts.get("drop:quality_score_below_min", 0) + \
        counts.get("drop:quality_score_missing", 0) == below
    [(manifest_rows,)] = duckdb.sql(
        f"select count(*) from read_parquet('{out}/*/manifest.parquet')").fetchall()
    assert manifest_rows == counts.get("keep:ok", 0)


def test_mixture_index_and_verify(mixture_out) -> None:
    out = mixture_out["out"]
    index = json.loads((out / "mixture.json").read_text())
    by = {d["name"]: d for d in index["datasets"]}
    assert by["video"]["probability"] == pytest.approx(0.25)
    assert by["web"]["probability"] == pytest.approx(0.75)
    for name, d in by.items():
        report = verify_shards(out / name)
        assert report.ok, report.problems
        assert report.n_samples == d["nsamples"] > 0
        assert d["nshards"] == len(json.loads((out / name / "index.json").read_text())
                                   ["shardlist"])
    assert by["video"]["nshards"] >= 2  # 400 kB roll-over: four key frames a clip
    assert "ok" in mixture_out["output"]


def test_manifest_and_ledger_join_in_duckdb(mixture_out) -> None:
    """Every manifest row joins its curation run's ledger on the sample's item id."""
    out = mixture_out["out"]
    for name in ("video", "web"):
        run_dir = mixture_out[name]["run_dir"]
        missing = duckdb.sql(
            f"select m.key from read_parquet('{out}/{name}/manifest.parquet') m "
            f"anti join (select distinct item_id from read_parquet('{run_dir}/ledger/*.parquet'))"
            " l on m.ledger_item_id = l.item_id").fetchall()
        assert missing == []
        runs = duckdb.sql(f"select distinct run_dir from "
                          f"read_parquet('{out}/{name}/manifest.parquet')").fetchall()
        assert runs == [(str(Path(run_dir).resolve()),)]


def test_flipped_byte_and_truncation_are_reported(mixture_out, tmp_path) -> None:
    copy = tmp_path / "web"
    shutil.copytree(mixture_out["out"] / "web", copy)
    shard = sorted(copy.glob("web-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["shards", "verify", str(copy)])
    assert result.exit_code == 1
    assert f"{shard.name}: sha256 differs from the index" in result.output

    last = sorted(copy.glob("web-*.tar"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    report = verify_shards(copy)
    assert any(last.name in p and ("truncated" in p or "unreadable" in p or "bytes" in p)
               for p in report.problems), report.problems

    clean = CliRunner().invoke(app, ["shards", "verify", str(mixture_out["out"])])
    assert clean.exit_code == 0, clean.output
    assert "all samples decode" in clean.output


def test_bad_mixture_fails_at_start_with_one_message(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sources": [{"name": "x/../y", "run_dir": str(tmp_path)}]}))
    result = CliRunner().invoke(app, ["shards", "write", "--mixture", str(bad), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "dataset name must match" in result.output
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"sources": [{"name": "x", "run_dir": str(tmp_path)}]}))
    result = CliRunner().invoke(app, ["shards", "write", "--mixture", str(missing), "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "not a finished run directory" in result.output
