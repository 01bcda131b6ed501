"""Mixtures: config validation, filters with reasons in the shard ledger, mixture.json."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from weft.pipelines.common import ConfigError
from weft.pipelines.mixture import (
    build_mixture,
    example_mixture_yaml,
    load_mixture,
    shard_sets,
)
from weft.pipelines.shard import verify_shards
from weft.schemas.ledger import read_ledger

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40 % 256, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _web_run(root: Path, docs: list[dict]) -> Path:
    """A finished web run directory with the given documents in outputs/docs.parquet."""
    (root / "outputs").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"pipeline": "web", "run_id": "r" * 16}))
    pq.write_table(pa.Table.from_pylist(docs), root / "outputs" / "docs.parquet")
    return root


def _doc(n: int, score: float | None, licence: str | None, image: bool = True) -> dict:
    doc_id = hashlib.sha256(f"doc{n}".encode()).hexdigest()
    items = [{"type": "text", "text": f"document {n}", "src": None, "alt": None}]
    if image:
        items.append({"type": "image", "text": None, "src": "a.png", "alt": "a"})
    return {"item_id": doc_id, "source_id": doc_id, "title": None, "items": items,
            "image_bytes": [_png(n)] if image else [],
            "metadata": json.dumps({"licence": licence} if licence else {}),
            "quality_score": score}


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    docs = [_doc(0, 0.9, "cc-by-4.0"), _doc(1, 0.2, "cc-by-4.0"), _doc(2, None, "cc-by-4.0"),
            _doc(3, 0.95, "proprietary"), _doc(4, 0.97, "cc-by-4.0"),
            _doc(5, 0.99, "cc-by-4.0"), _doc(6, 0.9, "cc0")]
    a = _web_run(tmp_path / "run-a", docs)
    bad = _doc(7, 0.9, "cc0")
    bad["image_bytes"] = [b"not an image at all"]
    b = _web_run(tmp_path / "run-b", [_doc(8, 0.5, None, image=False), bad])
    return {"a": a, "b": b}


def test_filters_decide_with_reasons_and_every_row_is_in_the_ledger(runs, tmp_path) -> None:
    mixture = tmp_path / "m.yaml"
    mixture.write_text(yaml.safe_dump({"name": "m", "sources": [
        {"name": "good", "run_dir": "run-a", "weight": 3,
         "filters": {"scores": {"quality_score": {"min": 0.5}}, "licences": ["cc-by-4.0"],
                     "max_samples": 2}},
        {"name": "other", "run_dir": "run-b", "weight": 1}]}))
    config, base = load_mixture(mixture)
    results = {r.name: r for r in build_mixture(config, base, tmp_path / "out")}
    good = results["good"]
    assert good.rows == 7 and good.kept == 2
    assert good.dropped == {"quality_score_below_min": 1, "quality_score_missing": 1,
                            "licence_not_allowed": 2, "over_max_samples": 1}
    other = results["other"]
    assert other.kept == 1 and other.errors == {"conversion_error": 1}
    ledger = read_ledger(tmp_path / "out" / "ledger").to_pylist()
    assert len(ledger) == 9
    error = next(r for r in ledger if r["decision"] == "error")
    assert error["error_type"] and error["stage"] == "shard"
    below = next(r for r in ledger if r["reason"] == "quality_score_below_min")
    assert json.loads(below["scores"]) == {"quality_score": 0.2}
    assert json.loads(below["thresholds"]) == {"quality_score": {"min": 0.5}}
    index = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert [(d["name"], d["probability"], d["nsamples"]) for d in index["datasets"]] == [
        ("good", 0.75, 2), ("other", 0.25, 1)]
    for shard_dir in shard_sets(tmp_path / "out"):
        assert verify_shards(shard_dir).ok
    assert sorted(p.name for p in (tmp_path / "out" / "good").glob("*.tar")) == \
        ["good-000000.tar"]


def test_same_mixture_twice_gives_identical_shards(runs, tmp_path) -> None:
    mixture = tmp_path / "m.yaml"
    mixture.write_text(yaml.safe_dump({"seed": 3, "max_shard_bytes": 2000,
                                       "sources": [{"name": "a", "run_dir": "run-a"}]}))
    config, base = load_mixture(mixture)
    build_mixture(config, base, tmp_path / "one")
    build_mixture(config, base, tmp_path / "two")
    one = sorted((tmp_path / "one" / "a").glob("*.tar"))
    assert len(one) >= 2  # rolled over
    assert [p.read_bytes() for p in one] == \
        [(tmp_path / "two" / "a" / p.name).read_bytes() for p in one]


@pytest.mark.parametrize("bad, message", [
    ({"sources": []}, "at least one source"),
    ({"sources": [{"name": "a", "run_dir": "run-a", "weight": 0}]}, "weight"),
    ({"sources": [{"name": "a", "run_dir": "run-a"}, {"name": "a", "run_dir": "run-b"}]},
     "unique"),
    ({"sources": [{"name": "a", "run_dir": "nowhere"}]}, "not a finished run directory"),
    ({"sources": [{"name": "a", "run_dir": "run-a", "filters": {"scores": {
        "q": {"min": 2, "max": 1}}}}]}, "greater than max"),
    ({"bogus": 1, "sources": [{"name": "a", "run_dir": "run-a"}]}, "bogus"),
])
def test_bad_mixture_is_one_clear_error(runs, tmp_path, bad, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=message):
        load_mixture(path)


def test_example_mixture_file_is_current() -> None:
    assert (CONFIGS / "mixtures" / "example.yaml").read_text() == example_mixture_yaml()
