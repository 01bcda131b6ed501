"""What every pipeline shares: config errors and merging, input discovery, ingest, partitions.

Ingest hashes every discovered file (a source's id is the sha256 of its
bytes) and drops exact byte duplicates with a reason, so every input file has
exactly one ledger row before any stage runs; partitions are fixed groups of
sources named by their members, the unit of resume.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import weft
from weft.schemas.config_doc import deep_merge, read_yaml_mapping, validation_problems
from weft.schemas.ids import hash_of, sha256_file
from weft.schemas.ledger import LedgerEntry, StagePlan, write_ledger
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir, write_atomic
from weft.stages.base import DECISION_COLUMN, LEDGER_COLUMN, RunContext, ledger_rows_of
from weft.stages.infer.registry import ModelRegistry, load_registry

INGEST = StagePlan("ingest", "1", "map")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A bad configuration: reported once, at start-up, before any work."""


class DiscoverConfig(BaseModel):
    """Which files under --input are inputs. Every file found is accounted for."""

    model_config = ConfigDict(extra="forbid")
    recursive: bool = True
    include_hidden: bool = False
    suffixes: list[str] | None = Field(
        None, description="only files whose names end with one of these are inputs (other "
                          "files, e.g. a page's images, are not); null = every file")


class InferenceConfig(BaseModel):
    """Where answers of models are kept (not part of the config hash: it changes no output)."""

    model_config = ConfigDict(extra="forbid")
    cache_path: str | None = Field(
        None, description="request cache (sqlite); null = RUN_DIR/cache/requests.sqlite. "
                          "Share one file across runs so no run pays twice for an answer")

    def cache_file(self, run: RunDir) -> Path:
        """The request cache this run reads and writes."""
        if self.cache_path:
            return Path(os.path.expanduser(self.cache_path))
        return run.root / "cache" / "requests.sqlite"


@dataclass
class RawConfig:
    """A pipeline config merged from defaults, the user's YAML and overrides, validated."""

    config: Any
    path: Path | None
    user_keys: set[str]

    def resolve(self, value: str, key: str) -> Path:
        """A path from the config: absolute, or relative to the file that set `key`."""
        path = Path(os.path.expanduser(value))
        if path.is_absolute():
            return path
        base = self.path.parent if self.path is not None and key in self.user_keys \
            else CONFIGS_DIR
        return (base / path).resolve()


def read_config(model: type[ConfigT], default_path: Path, path: str | Path | None,
                overrides: dict[str, Any] | None, label: str) -> RawConfig:
    """Built-in defaults, then the user's YAML (partial is fine), then overrides.

    Unreadable YAML, an unknown key or a bad value raise ConfigError, one message.
    """
    data = yaml.safe_load(default_path.read_text())
    user: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        user = read_yaml_mapping(path, "config", ConfigError)
    data = deep_merge(deep_merge(data, user), overrides or {})
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(f"invalid {label} config{f' {path}' if path else ''}: "
                          f"{problems}") from exc
    return RawConfig(config=config, path=path, user_keys=set(user))


def read_policy(path: Path, stages: set[str]) -> Policy:
    """The policy at `path`; rules for stages the pipeline does not have are refused."""
    try:
        policy = Policy.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid or missing policy {path}: {exc}") from exc
    unknown = set(policy.rules) - stages
    if unknown:
        raise ConfigError(f"policy {path} has rules for unknown stages: {sorted(unknown)}")
    return policy


def resolve_policy_and_models(raw: RawConfig, policy_stages: set[str], used: set[str]
                              ) -> tuple[Policy, ModelRegistry, dict[str, Any]]:
    """A model-using pipeline's policy (its rules checked against `policy_stages`) and
    model registry, and its config as JSON with both resolved in: what the output hash
    covers, so editing a policy file or a used model's entry changes the hash, and an
    unused model's entry (or any concurrency / licence field) does not."""
    config = raw.config
    policy_path = raw.resolve(config.policy, "policy")
    policy = read_policy(policy_path, policy_stages)
    registry_path = raw.resolve(config.models, "models")
    try:
        registry = load_registry(registry_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    resolved = config.model_dump(mode="json")
    resolved.update(policy=str(policy_path), policy_resolved=policy.model_dump(mode="json"),
                    models=str(registry_path),
                    models_resolved={name: {k: v for k, v in spec.model_dump(mode="json").items()
                                            if k not in ("concurrency", "licence")}
                                     for name, spec in sorted(registry.models.items())
                                     if name in used})
    return policy, registry, resolved


def output_hash(pipeline: str, resolved: dict[str, Any], not_outputs: tuple[str, ...],
                stage_names: list[str]) -> str:
    """The config hash: what changes outputs (not where Ray runs or stage resources)."""
    hashed = {k: v for k, v in resolved.items() if k not in not_outputs}
    for name in stage_names:
        if isinstance(hashed.get(name), dict):
            hashed[name] = {k: v for k, v in hashed[name].items() if k != "resources"}
    return hash_of(pipeline, hashed, length=16)


def run_context(loaded: Any, run: RunDir, run_id: str, stage_index: int = 0) -> RunContext:
    """The run-level facts every ledger row of a pipeline's stage carries."""
    return RunContext(run_id=run_id, run_dir=str(run.root), policy=loaded.policy,
                      code_version=code_version(), stage_index=stage_index)


def code_version() -> str:
    return f"weft-{weft.__version__}"


def discover(input_dir: Path, config: DiscoverConfig) -> list[Path]:
    """Every regular file under input_dir, sorted; symlinks leaving the dir are skipped."""
    if not input_dir.is_dir():
        raise ConfigError(f"--input {input_dir} is not a directory")
    root = input_dir.resolve()
    pattern = "**/*" if config.recursive else "*"
    files = []
    for path in sorted(input_dir.glob(pattern)):
        rel = path.relative_to(input_dir)
        if not config.include_hidden and any(p.startswith(".") for p in rel.parts):
            continue
        if config.suffixes is not None and not path.name.lower().endswith(
                tuple(config.suffixes)):
            continue
        if path.is_file() and path.resolve().is_relative_to(root):
            files.append(path)
    return files


def ingest(files: list[Path], ctx: RunContext) -> tuple[list[dict[str, Any]], list[dict]]:
    """Hash every file; identical bytes are one source (the rest: exact_duplicate).

    Returns (source rows for the partitions, ingest ledger rows).
    """
    rows, ledger, seen = [], [], {}
    for path in files:
        try:
            digest = sha256_file(path)
        except OSError as exc:
            entry = LedgerEntry(item_id=hash_of("unreadable", str(path)), item_kind="source",
                                decision="error", reason="unreadable_file",
                                details={"path": str(path.resolve())},
                                error_type=type(exc).__name__, error_message=str(exc))
        else:
            size = path.stat().st_size
            # absolute, so an auditor finds the bytes from any working directory
            details = {"path": str(path.resolve()), "size_bytes": size}
            if digest in seen:
                entry = LedgerEntry(item_id=digest, item_kind="source", source_id=digest,
                                    decision="drop", reason="exact_duplicate",
                                    scores={"exact_duplicate": 1.0},
                                    details={**details, "duplicate_of": seen[digest]})
            else:
                seen[digest] = str(path.resolve())
                entry = LedgerEntry(item_id=digest, item_kind="source", source_id=digest,
                                    decision="keep", reason="ok",
                                    scores={"exact_duplicate": 0.0}, details=details)
                rows.append({"item_id": digest, "source_id": digest, "item_kind": "source",
                             "path": str(path.resolve()), "size_bytes": size})
        ledger.append(entry.to_row(run_id=ctx.run_id, stage=INGEST.name, stage_index=0,
                                   stage_version=INGEST.version, config_hash="ingest",
                                   policy_hash=ctx.policy.policy_hash,
                                   code_version=ctx.code_version))
    return rows, ledger


def partitions(sources: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Deterministic groups of sources (sorted by id); a group's id hashes its members."""
    ordered = sorted(sources, key=lambda r: r["source_id"])
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def partition_id(group: list[dict[str, Any]]) -> str:
    return hash_of("partition", [r["source_id"] for r in group], length=16)


def prune_stale_ledger(run: RunDir, partition_ids: list[str]) -> None:
    """Remove ledger files of partitions no longer in this run's input set."""
    wanted = {f"part-{pid}.parquet" for pid in partition_ids}
    for path in run.ledger_dir.glob("part-*.parquet"):
        if path.name not in wanted:
            path.unlink()




# ---------------------------------------------------------------------------
# partition and output tables (arrow end to end: python rows would lose the
# declared types, e.g. uint64 pHashes)
# ---------------------------------------------------------------------------

def collect(ds: Any) -> pa.Table:
    """A Ray dataset's blocks as one arrow table, types as the stages declared them."""
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()), promote_options="default")


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write parquet through a tmp file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_partition(run: RunDir, pid: str, table: pa.Table, item_kind: str, name: str,
                    summary: dict[str, Any]) -> dict[str, Any]:
    """Store a partition's rows of `item_kind` and its ledger, then mark it done.

    The `_SUCCESS` marker is written last, so a partition with a marker is whole.
    """
    ledger = ledger_rows_of(table.select([LEDGER_COLUMN]).to_pylist())
    items = table.filter(pc.equal(table["item_kind"], item_kind))
    items = items.drop_columns([LEDGER_COLUMN]).sort_by("item_id")
    if items.num_rows:
        write_table_atomic(items, run.partition_dir(pid) / f"{name}.parquet")
    write_ledger(ledger, run.ledger_dir / f"part-{pid}.parquet")
    kept = int(pc.sum(pc.equal(items[DECISION_COLUMN], "keep")).as_py() or 0)
    summary = {"partition_id": pid, **summary, "rows": items.num_rows, "kept": kept,
               "ledger_rows": len(ledger)}
    write_atomic(run.partition_dir(pid) / "_SUCCESS", json.dumps(summary).encode())
    return summary


def load_partitions(run: RunDir, partition_ids: list[str], name: str) -> pa.Table | None:
    """The stored rows of the given partitions as one table sorted by id; None if none."""
    tables = [pq.read_table(path) for pid in partition_ids
              if (path := run.partition_dir(pid) / f"{name}.parquet").exists()]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default").sort_by("item_id")


def ledger_row(entry: LedgerEntry, stage: StagePlan, config_hash: str,
               ctx: RunContext) -> dict[str, Any]:
    """The full ledger row of an entry decided by a global (driver-side) step."""
    return entry.to_row(run_id=ctx.run_id, stage=stage.name, stage_index=ctx.stage_index,
                        stage_version=stage.version, config_hash=config_hash,
                        policy_hash=ctx.policy.policy_hash, code_version=ctx.code_version)


@dataclass
class StartedRun:
    """A claimed run directory with its inputs ingested and partitioned: what the flows'
    partition, global-step and finish helpers take, for every pipeline."""

    run: RunDir
    run_id: str
    plan: list[StagePlan]
    n_files: int
    groups: list[list[dict[str, Any]]]
    pids: list[str]
    task_args: dict[str, Any]

    @property
    def storage(self) -> Path:
        return self.run.prefect_dir / "results"
