"""`weft policy apply`: a stricter threshold re-decided from stored scores equals a full run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from weft.cli import app
from weft.pipelines import video
from weft.pipelines.audit.policy_apply import PolicyApplyError, apply_policy
from weft.schemas.ledger import read_ledger
from weft.stages.infer.cache import RequestCache

pytestmark = pytest.mark.integration

TINY_POLICY = video.CONFIGS_DIR / "policies" / "video-tiny-models.yaml"


def _ledger(run_dir: Path) -> list[tuple[Any, ...]]:
    """Every ledger row but its timing, sorted."""
    rows = read_ledger(run_dir / "ledger").to_pylist()
    return sorted(tuple((k, v) for k, v in sorted(r.items()) if k != "elapsed_ms")
                  for r in rows)


def _policy_with(tmp_path: Path, name: str, stage: str, score: str, bounds: dict) -> Path:
    policy = yaml.safe_load(TINY_POLICY.read_text())
    policy["name"] = name
    policy["rules"][stage][score] = bounds
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stricter(video_run, tmp_path_factory) -> dict[str, Any]:
    """A clarity minimum between the kept clips' middle values: about half of them go."""
    root = tmp_path_factory.mktemp("policy-apply")
    kept = sorted(json.loads(r["scores"])["clarity"]
                  for r in read_ledger(video_run["run_dir"] / "ledger").to_pylist()
                  if r["stage"] == "quality" and r["decision"] == "keep")
    assert len(kept) >= 4
    mid = len(kept) // 2
    threshold = round((kept[mid - 1] + kept[mid]) / 2, 3)
    policy = _policy_with(root, "stricter-clarity", "quality", "clarity", {"min": threshold})
    cache = yaml.safe_load(video_run["config"].read_text())["inference"]["cache_path"]
    with RequestCache(Path(cache)) as c:
        cached_before = len(c)
    result = CliRunner().invoke(app, ["policy", "apply", str(video_run["run_dir"]), "--policy",
                                      str(policy), "--out", str(root / "applied"),
                                      "--shards", str(root / "applied-shards")])
    assert result.exit_code == 0, result.output
    with RequestCache(Path(cache)) as c:
        cached_after = len(c)
    return {"root": root, "policy": policy, "threshold": threshold, "kept": kept,
            "applied": root / "applied", "output": result.output,
            "cached": (cached_before, cached_after)}


def test_apply_makes_no_model_calls_and_reports_the_difference(stricter) -> None:
    applied = json.loads((stricter["applied"] / "policy_apply.json").read_text())
    assert applied["model_calls"] == 0
    assert stricter["cached"][0] == stricter["cached"][1]  # no new answer was needed
    by = {s["stage"]: s for s in applied["stages"]}
    dropped_now = sum(1 for c in stricter["kept"] if c < stricter["threshold"])
    assert by["quality"]["kept_before"] == len(stricter["kept"])
    assert by["quality"]["kept_after"] == len(stricter["kept"]) - dropped_now
    assert by["probe"]["kept_before"] == by["probe"]["kept_after"]  # upstream unchanged
    assert "model calls: 0" in stricter["output"]
    assert "quality" in stricter["output"]


def test_applied_run_equals_a_full_run_with_that_policy(video_run, stricter) -> None:
    from weft.flows import video_flow

    config = yaml.safe_load(video_run["config"].read_text())
    config["policy"] = str(stricter["policy"])
    path = stricter["root"] / "full-config.yaml"
    path.write_text(yaml.safe_dump(config))
    full = stricter["root"] / "full"
    result = video_flow(input_dir=str(video_run["root"] / "inputs"), run_dir=str(full),
                        config_path=str(path))
    applied = stricter["applied"]
    assert json.loads((applied / "run.json").read_text())["run_id"] == result["run_id"]
    # the same decisions, scores, thresholds and ids at every stage, row for row
    differ = [(a, b) for a, b in zip(_ledger(applied), _ledger(full), strict=True) if a != b]
    assert not differ, [(dict(a), {k: v for k, v in b if dict(a).get(k) != v})
                        for a, b in differ[:2]]
    for name in ("clips.parquet", "captions.parquet"):
        assert pq.read_table(applied / "outputs" / name).equals(
            pq.read_table(full / "outputs" / name)), name
    keys = pq.read_table(stricter["root"] / "applied-shards" / "video" / "manifest.parquet")
    assert keys.num_rows == pq.read_metadata(full / "outputs" / "captions.parquet").num_rows


def test_a_looser_policy_is_refused_with_the_stage(video_run, tmp_path) -> None:
    looser = _policy_with(tmp_path, "looser", "clips", "duration_s", {"min": 0.1, "max": 600})
    with pytest.raises(PolicyApplyError, match=r"never scored|never expanded"):
        apply_policy(video_run["run_dir"], looser, tmp_path / "out")
