"""Mixtures: which curation runs go into a shard set, with which weights and filters.

A mixture YAML names datasets; each dataset is one finished run directory (video or
web) plus filters on its samples (score bounds, licences, a cap). `build_mixture`
writes one shard set per dataset under OUT/<dataset>/ (shards, index.json,
manifest.parquet), a ledger row for every output row it considered (stage `shard`:
kept, dropped by a filter with the numbers, or a conversion error) under OUT/ledger/,
and OUT/mixture.json: the datasets with their weights as sampling probabilities,
which the trainer's loader reads. Weights are not applied by copying samples: each
sample is written once, and the trainer samples datasets by weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weft.pipelines.common import ConfigError, code_version
from weft.pipelines.shard import (
    DEFAULT_MAX_SHARD_BYTES,
    MIXTURE_FILE,
    ShardSetSummary,
    write_shards,
)
from weft.pipelines.shard_samples import Converted, convert_run, run_pipeline
from weft.schemas.config_doc import render_defaults, validation_problems
from weft.schemas.ids import hash_of
from weft.schemas.ledger import LedgerEntry, StagePlan, write_ledger
from weft.schemas.policy import Bounds, Policy
from weft.schemas.run_dir import write_atomic

SHARD_STAGE = StagePlan("shard", "1", "map")
MIXTURE_FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleFilter(BaseModel):
    """Which of a run's output samples go into the shards."""

    model_config = ConfigDict(extra="forbid")
    scores: dict[str, Bounds] = Field(
        default_factory=dict, description="sample score -> {min, max}; a sample without the "
                                          "score is dropped (<score>_missing)")
    licences: list[str] | None = Field(
        None, description="keep only samples whose licence is one of these; null = any "
                          "licence, including unknown")
    max_samples: int | None = Field(
        None, ge=1, description="keep at most this many (the first by key, i.e. a "
                                "content-hash order); null = all")


class MixtureSource(BaseModel):
    """One dataset of the mixture: a finished run directory and its filters."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="dataset name: shard file prefix and folder name")
    run_dir: str = Field(description="a finished video, web, synth or shapes run directory "
                                     "(relative paths are relative to the mixture file)")
    weight: float = Field(1.0, gt=0, description="relative sampling weight for the trainer")
    filters: SampleFilter = Field(default_factory=SampleFilter)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"dataset name must match {_NAME.pattern}, got {value!r}")
        return value


class MixtureConfig(BaseModel):
    """A named, versioned shard set made from curation runs."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("mixture", description="the mixture's name (goes in mixture.json)")
    version: int = Field(1, ge=1, description="bump when the mixture changes")
    seed: int = Field(0, description="seed of the shuffled assignment of samples to shards")
    max_shard_bytes: int = Field(DEFAULT_MAX_SHARD_BYTES, gt=0,
                                 description="a shard rolls over before passing this size")
    sources: list[MixtureSource] = Field(default_factory=list,
                                         description="the datasets (at least one)")

    @field_validator("sources")
    @classmethod
    def _unique(cls, value: list[MixtureSource]) -> list[MixtureSource]:
        names = [s.name for s in value]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return value

    @property
    def config_hash(self) -> str:
        """What changes the shard set: everything but where the runs lie."""
        data = self.model_dump(mode="json")
        for source in data["sources"]:
            source.pop("run_dir")
        return hash_of("mixture", data, length=16)


def example_mixture() -> MixtureConfig:
    """The documented example (configs/mixtures/example.yaml)."""
    return MixtureConfig(name="example", sources=[
        MixtureSource(name="video", run_dir="../../runs/demo", weight=1.0),
        MixtureSource(name="web", run_dir="../../runs/web", weight=2.0,
                      filters=SampleFilter(scores={"quality_score": Bounds(min=0.6)})),
    ])


def example_mixture_yaml() -> str:
    """The example mixture with every default written out and commented."""
    model = example_mixture()
    header = ("A mixture: which curation runs go into shards, with weights and filters.\n"
              "`weft shards write --mixture THIS.yaml --out DIR`; every field is shown.\n"
              "Each source: name (shard prefix and folder), run_dir (a finished video or\n"
              "web run; relative to this file), weight (relative sampling weight for the\n"
              "trainer), filters: scores (sample score -> {min, max}; a sample without\n"
              "the score is dropped), licences (allowed licences; null = any, unknown\n"
              "included), max_samples (the first N by key; null = all).")
    text = render_defaults(model, header)
    # render_defaults writes lists of models inline; spell the sources out as YAML blocks.
    head, _, _ = text.partition("sources:")
    body = yaml.safe_dump({"sources": model.model_dump(mode="json")["sources"]},
                          sort_keys=False)
    return head + body


def load_mixture(path: str | Path) -> tuple[MixtureConfig, Path]:
    """(config, base dir for relative run dirs); ConfigError with one message when bad."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read mixture {path}: {exc}") from exc
    try:
        config = MixtureConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"invalid mixture {path}: {problems}") from exc
    base = path.resolve().parent
    check_sources(config, base)
    return config, base


def source_dir(source: MixtureSource, base: Path) -> Path:
    path = Path(source.run_dir).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def check_sources(config: MixtureConfig, base: Path) -> None:
    """Every dataset's run directory is a finished run that shards (fail at start-up)."""
    if not config.sources:
        raise ConfigError("a mixture needs at least one source")
    for source in config.sources:
        root = source_dir(source, base)
        try:
            run_pipeline(root)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"dataset {source.name}: {exc}") from exc


def _filter_policy(source: MixtureSource) -> Policy:
    return Policy(name=f"shard-{source.name}", version=1,
                  rules={SHARD_STAGE.name: source.filters.scores})


@dataclass
class DatasetResult:
    """What the shard step did with one dataset."""

    name: str
    run_dir: str
    rows: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    shards: ShardSetSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "run_dir": self.run_dir, "rows": self.rows,
                "kept": self.kept, "dropped": self.dropped, "errors": self.errors,
                "shards": len(self.shards.shards) if self.shards else 0,
                "bytes": self.shards.total_bytes if self.shards else 0}


def _decide(converted: list[Converted], source: MixtureSource
            ) -> list[tuple[Converted, str, str, dict[str, Any]]]:
    """(row, decision, reason, scores) for every converted row, filters applied in order."""
    policy = _filter_policy(source)
    licences = source.filters.licences
    out = []
    for c in sorted(converted, key=lambda c: (c.sample or {}).get("key") or c.item_id):
        if c.error is not None:
            out.append((c, "error", c.reason, {}))
            continue
        if c.sample is None:
            out.append((c, "drop", c.reason, {}))
            continue
        record = c.sample["json"]
        scores = {k: record["scores"].get(k) for k in source.filters.scores}
        decision, reason = policy.decide(SHARD_STAGE.name, scores)
        if decision == "keep" and licences is not None and record.get("licence") not in licences:
            decision, reason = "drop", "licence_not_allowed"
        out.append((c, decision, reason, scores))
    cap = source.filters.max_samples
    if cap is not None:
        kept = 0
        for i, (c, decision, _, scores) in enumerate(out):
            if decision == "keep":
                kept += 1
                if kept > cap:
                    out[i] = (c, "drop", "over_max_samples", scores)
    return out


def build_dataset(source: MixtureSource, base: Path, out_dir: Path, config: MixtureConfig,
                  run_id: str) -> tuple[DatasetResult, list[dict[str, Any]]]:
    """Convert, filter and shard one dataset; returns its result and ledger rows."""
    root = source_dir(source, base)
    result = DatasetResult(source.name, str(root))
    decided = _decide(list(convert_run(root, source.name)), source)
    policy = _filter_policy(source)
    thresholds = policy.thresholds(SHARD_STAGE.name)
    config_hash = hash_of(SHARD_STAGE.name, source.filters.model_dump(mode="json"), length=16)
    ledger: list[dict[str, Any]] = []
    kept = []
    for c, decision, reason, scores in decided:
        result.rows += 1
        details: dict[str, Any] = {"dataset": source.name, "source_run": str(root)}
        if c.sample is not None:
            details["key"] = c.sample["key"]
        if decision == "keep":
            kept.append(c.sample)
        elif decision == "drop":
            result.dropped[reason] = result.dropped.get(reason, 0) + 1
        else:
            result.errors[reason] = result.errors.get(reason, 0) + 1
        entry = LedgerEntry(
            item_id=c.item_id, item_kind=c.kind, source_id=c.source_id, decision=decision,
            reason=reason, scores={k: v for k, v in scores.items() if v is not None},
            thresholds=thresholds, details=details,
            error_type=type(c.error).__name__ if c.error else None,
            error_message=str(c.error)[:2000] if c.error else None)
        ledger.append(entry.to_row(run_id=run_id, stage=SHARD_STAGE.name, stage_index=0,
                                   stage_version=SHARD_STAGE.version, config_hash=config_hash,
                                   policy_hash=policy.policy_hash, code_version=code_version()))
    result.kept = len(kept)
    result.shards = write_shards(kept, out_dir / source.name,
                                 max_shard_bytes=config.max_shard_bytes, seed=config.seed,
                                 prefix=source.name)
    return result, ledger


def write_mixture_index(config: MixtureConfig, out_dir: Path, run_id: str,
                        results: list[dict[str, Any]]) -> Path:
    """OUT/mixture.json: each dataset's index, sample count and sampling probability.

    `results` are `DatasetResult.as_dict()`s (what a Prefect task returns)."""
    total = sum(s.weight for s in config.sources)
    by_name = {r["name"]: r for r in results}
    datasets = []
    for source in config.sources:
        r = by_name[source.name]
        datasets.append({
            "name": source.name, "weight": source.weight,
            "probability": round(source.weight / total, 12),
            "index": f"{source.name}/index.json", "manifest": f"{source.name}/manifest.parquet",
            "nsamples": r["kept"], "nshards": r["shards"], "run_dir": r["run_dir"],
        })
    index = {"__kind__": "weft-mixture", "format_version": MIXTURE_FORMAT_VERSION,
             "name": config.name, "version": config.version, "seed": config.seed,
             "run_id": run_id, "config_hash": config.config_hash, "datasets": datasets}
    path = out_dir / MIXTURE_FILE
    write_atomic(path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return path


def mixture_run_id(config: MixtureConfig) -> str:
    return hash_of("shards", config.config_hash, length=16)


def start_mixture(config: MixtureConfig, base: Path, out_dir: str | Path) -> Path:
    """Check the sources and write the resolved mixture next to the shards."""
    out = Path(out_dir)
    check_sources(config, base)
    out.mkdir(parents=True, exist_ok=True)
    resolved = config.model_dump(mode="json")
    for source, data in zip(config.sources, resolved["sources"], strict=True):
        data["run_dir"] = str(source_dir(source, base))
    write_atomic(out / "mixture.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    return out


def shard_dataset(config: MixtureConfig, base: Path, out_dir: Path, name: str
                  ) -> DatasetResult:
    """One dataset: its shards and its ledger file (OUT/ledger/shard-<name>.parquet)."""
    [source] = [s for s in config.sources if s.name == name]
    result, ledger = build_dataset(source, base, out_dir, config, mixture_run_id(config))
    write_ledger(ledger, out_dir / "ledger" / f"shard-{name}.parquet")
    return result


def build_mixture(config: MixtureConfig, base: Path, out_dir: str | Path
                  ) -> list[DatasetResult]:
    """Write every dataset's shards, the shard ledger and mixture.json under out_dir."""
    out = start_mixture(config, base, out_dir)
    results = [shard_dataset(config, base, out, s.name) for s in config.sources]
    write_mixture_index(config, out, mixture_run_id(config), [r.as_dict() for r in results])
    return results


def shard_sets(path: str | Path) -> list[Path]:
    """The shard directories under a mixture output (or the one shard set at `path`)."""
    root = Path(path)
    if (root / "index.json").is_file():
        return [root]
    mixture = root / MIXTURE_FILE
    if mixture.is_file():
        try:
            datasets = json.loads(mixture.read_text())["datasets"]
            return [root / d["name"] for d in datasets]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{mixture} is unreadable: {exc}") from exc
    found = sorted(p.parent for p in root.glob("*/index.json"))
    if not found:
        raise FileNotFoundError(f"{root} holds no shard set (no index.json or {MIXTURE_FILE})")
    return found


def single_run_mixture(run_dir: str | Path, name: str | None = None, seed: int = 0,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> MixtureConfig:
    """A one-dataset mixture over one run directory (`weft shards write --run-dir`)."""
    root = Path(run_dir).resolve()
    pipeline = run_pipeline(root)
    return MixtureConfig(name=name or pipeline, seed=seed, max_shard_bytes=max_shard_bytes,
                         sources=[MixtureSource(name=name or pipeline, run_dir=str(root))])


__all__ = ["MIXTURE_FILE", "SHARD_STAGE", "DatasetResult", "MixtureConfig", "MixtureSource",
           "SampleFilter", "build_mixture", "example_mixture_yaml", "load_mixture",
           "shard_dataset", "shard_sets", "single_run_mixture", "start_mixture"]
