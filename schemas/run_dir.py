"""The run directory: one folder holds everything a run made and decided.

    run.json               run id, pipeline, stage plan, config and policy hashes
    config.yaml            the resolved config (every default written out)
    inputs.parquet         every discovered input file with its sha256
    ledger/*.parquet       the decision ledger (one file per partition / global step)
    partitions/<pid>/      per-partition item tables, written atomically
    clips/<clip_id>.mp4    clip files (video pipeline)
    keyframes/<clip_id>/   key frame JPEGs
    outputs/               final tables (e.g. clips.parquet)
    summary/               funnel table (json + markdown)
    .prefect/              Prefect result storage, so the task cache travels with the run

A run directory belongs to one config: opening it with another is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from weft.schemas.ids import stable_json

RUN_MANIFEST_VERSION = 1


class ConfigMismatchError(RuntimeError):
    """The run directory was made with a different config; outputs would mix."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 10) -> list[str]:
    """Human-readable `key: old -> new` lines for two nested configs."""
    a, b = _flatten(old), _flatten(new)
    lines = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_dir_once(path: str | Path, build: Callable[[Path], None],
                   is_complete: Callable[[Path], bool]) -> Path:
    """`build(tmp)` in a sibling temp dir, then rename it to path; nothing when path is
    already complete.

    The rename makes a half-written directory impossible, so `is_complete` can be
    trusted. An incomplete directory already at path (another version's, or one written
    before this rule) is replaced; losing the rename to a writer that finished is fine.
    """
    path = Path(path)
    if is_complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        if path.exists() and not is_complete(path):
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if not is_complete(path):  # lost a race to a writer that did not finish
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "run.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def inputs_path(self) -> Path:
        return self.root / "inputs.parquet"

    @property
    def ledger_dir(self) -> Path:
        return self.root / "ledger"

    @property
    def partitions_dir(self) -> Path:
        return self.root / "partitions"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def summary_dir(self) -> Path:
        return self.root / "summary"

    @property
    def prefect_dir(self) -> Path:
        return self.root / ".prefect"

    def partition_dir(self, partition_id: str) -> Path:
        return self.partitions_dir / partition_id

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def claim(self, *, pipeline: str, config: dict[str, Any], config_hash: str,
              run_id: str, plan: list[dict[str, str]], code_version: str) -> dict[str, Any]:
        """Create the run directory for this config, or confirm it already is.

        Raises ConfigMismatchError (listing what changed) when the directory
        holds a run made with another config or another pipeline.
        """
        if self.manifest_path.exists():
            manifest = self.manifest()
            if manifest.get("pipeline") != pipeline or manifest.get("config_hash") != config_hash:
                old = yaml.safe_load(self.config_path.read_text()) if self.config_path.exists() \
                    else {}
                changes = config_differences(old or {}, config)
                raise ConfigMismatchError(
                    f"run directory {self.root} holds a {manifest.get('pipeline')} run made with "
                    f"config {manifest.get('config_hash')}, not {config_hash}; refusing to mix "
                    f"outputs. Changed: {'; '.join(changes) or 'pipeline'}. "
                    "Use a new --run-dir, or rerun with the original config.")
            return manifest
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "manifest_version": RUN_MANIFEST_VERSION,
            "pipeline": pipeline,
            "run_id": run_id,
            "config_hash": config_hash,
            "code_version": code_version,
            "plan": plan,
        }
        write_atomic(self.config_path, yaml.safe_dump(config, sort_keys=False).encode())
        write_atomic(self.manifest_path, (stable_json(manifest) + "\n").encode())
        return manifest
