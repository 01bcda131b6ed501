"""Re-decide a finished run under a new policy, from the scores its ledger stored.

`weft policy apply --policy NEW.yaml RUN_DIR` makes a new run directory that is what
a full run with NEW.yaml would have made, without decoding any media or calling any
model for what the first run already answered:

1. Per-item stages (ingest and every per-partition stage) are re-decided from the
   scores in the ledger, stage by stage: an item enters a stage only if the new
   decisions kept it at the one before. Errors stay errors; a drop for a reason that
   is not a threshold (e.g. `empty_clip`) stays a drop.
2. The partition tables are copied with their new decisions (clip files and key
   frames are hard-linked, or copied across file systems).
3. The steps that compare items with each other (dedup, cross-document images) and
   the model steps run again through the pipeline's own code over the stored
   features, with the first run's request cache: duplicates are judged among the
   items the new policy kept, exactly as a full run would, and every model answer
   comes from the cache.

A looser policy can keep an item that the first run never scored at a later stage;
that needs the pipeline, not a re-decision, and is refused with the stage and count.
So is a change to a block scored inside a stage (web `image_rules_per_image`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from weft.pipelines.common import ConfigError, code_version, read_policy
from weft.schemas.ids import hash_of, stable_json
from weft.schemas.ledger import (
    FunnelRow,
    StagePlan,
    check_invariant,
    read_ledger,
    write_ledger,
)
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir, write_atomic
from weft.stages.base import DECISION_COLUMN

APPLY_FILE = "policy_apply.json"
# Keys that load_config derives from the user's config; the new config leaves them out.
_DERIVED = ("policy_resolved", "caption_model_resolved", "models_resolved")
# Policy blocks that a stage scores internally; the ledger's row scores cannot re-decide them.
_INNER_BLOCKS = {"web": ("image_rules_per_image",)}
_POLICY_REASON = re.compile(r"^(?P<score>.+)_(?:below_min|above_max|missing)$")
_TABLES = {"video": ("clips", ("clips", "keyframes")), "web": ("docs", ())}


class PolicyApplyError(ValueError):
    """The new policy cannot be applied from stored scores (says why and what to run)."""


@dataclass
class StageDiff:
    stage: str
    kept_before: int
    kept_after: int
    dropped_before: int
    dropped_after: int
    errored_before: int
    errored_after: int


@dataclass
class PolicyApplyResult:
    run_dir: str
    source_run_dir: str
    policy: str
    policy_hash: str
    stages: list[StageDiff]
    model_calls: int
    global_steps: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pipeline_module(name: str) -> Any:
    from weft.pipelines import video, web

    modules = {"video": video, "web": web}
    if name not in modules:
        raise PolicyApplyError(f"policy apply knows video and web runs, not {name!r}")
    return modules[name]


def _new_config(source: RunDir, policy_path: Path, out: Path) -> Path:
    """The first run's resolved config with the new policy, and its request cache."""
    config = yaml.safe_load(source.config_path.read_text())
    for key in _DERIVED:
        config.pop(key, None)
    config["policy"] = str(policy_path.resolve())
    inference = dict(config.get("inference") or {})
    if not inference.get("cache_path"):
        inference["cache_path"] = str((source.root / "cache" / "requests.sqlite").resolve())
    config["inference"] = inference
    path = out / "policy-apply-config.yaml"
    write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


def _is_threshold_drop(row: dict[str, Any], old: Policy) -> bool:
    """Whether a drop came from a policy bound (and so may change under a new one)."""
    match = _POLICY_REASON.match(row["reason"])
    return bool(match) and match.group("score") in old.rules.get(row["stage"], {})


def _redecide(row: dict[str, Any], old: Policy, new: Policy) -> dict[str, Any]:
    """A ledger row under the new policy (errors and non-threshold drops unchanged)."""
    out = dict(row)
    out["policy_hash"] = new.policy_hash
    stage = row["stage"]
    if row["decision"] == "error" or (stage not in new.rules and stage not in old.rules):
        return out  # an error row records no thresholds: the stage never decided
    out["thresholds"] = stable_json(new.thresholds(stage))
    if row["decision"] == "drop" and not _is_threshold_drop(row, old):
        return out
    try:
        decision, reason = new.decide(stage, json.loads(row["scores"]))
    except KeyError as exc:
        raise PolicyApplyError(f"{exc.args[0]}: stage {stage} never produced that score, so "
                               "it cannot be decided from the ledger") from exc
    out["decision"], out["reason"] = decision, reason
    return out


def redecide_ledger(rows: list[dict[str, Any]], plan: list[StagePlan], old: Policy,
                    new: Policy) -> list[dict[str, Any]]:
    """Re-decide per-item stages in plan order; items the new policy stops leave.

    Raises PolicyApplyError when an item the new policy keeps was never seen by the
    next stage (a looser policy: the first run has no scores for it there).
    """
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    out: list[dict[str, Any]] = []
    kept: set[str] | None = None
    for stage in plan:
        mine = by_stage.get(stage.name)
        if mine is None:
            continue
        if kept is None:
            entering = mine
        elif stage.kind == "map":
            entering = [r for r in mine if r["item_id"] in kept]
            missing = kept - {r["item_id"] for r in mine}
            if missing:
                raise PolicyApplyError(
                    f"the new policy keeps {len(missing)} item(s) that stage {stage.name} "
                    f"never scored (e.g. {sorted(missing)[0]}): it is looser than the "
                    "first run's before this stage. Run the pipeline with the new policy.")
        else:
            entering = [r for r in mine if r["parent_id"] in kept]
            missing = kept - {r["parent_id"] for r in mine}
            if missing:
                raise PolicyApplyError(
                    f"the new policy keeps {len(missing)} item(s) that stage {stage.name} "
                    f"never expanded (e.g. {sorted(missing)[0]}). Run the pipeline with the "
                    "new policy.")
        decided = [_redecide(r, old, new) for r in entering]
        out += decided
        kept = {r["item_id"] for r in decided if r["decision"] == "keep"}
    return out


def _check_blocks(pipeline: str, old: Policy, new: Policy) -> None:
    for block in _INNER_BLOCKS.get(pipeline, ()):
        if old.rules.get(block) != new.rules.get(block):
            raise PolicyApplyError(
                f"policy block {block} is scored inside its stage, per image; the ledger's "
                "row scores cannot re-decide it. Run the pipeline with the new policy.")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy across file systems) every file of src under dst."""
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        target = dst / path.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _rewrite_partition(source: RunDir, new: RunDir, pid: str, table_name: str,
                       rows: list[dict[str, Any]]) -> None:
    """Copy a partition's item table with each item's new decision, then its marker."""
    write_ledger(rows, new.ledger_dir / f"part-{pid}.parquet")
    src = source.partition_dir(pid) / f"{table_name}.parquet"
    final: dict[str, str] = {}
    for row in rows:  # in plan order: the last row of an item is its final decision
        final[row["item_id"]] = row["decision"]
    if src.exists():
        table = pq.read_table(src)
        decisions = [final.get(i, "drop") if d == "keep" else d
                     for i, d in zip(table["item_id"].to_pylist(),
                                     table[DECISION_COLUMN].to_pylist(), strict=True)]
        index = table.column_names.index(DECISION_COLUMN)
        table = table.set_column(index, DECISION_COLUMN, pa.array(decisions, pa.string()))
        dst = new.partition_dir(pid) / f"{table_name}.parquet"
        dst.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, dst)
    new.partition_dir(pid).mkdir(parents=True, exist_ok=True)
    summary = {"partition_id": pid, "policy_applied_from": str(source.root),
               "kept": sum(1 for d in final.values() if d == "keep")}
    write_atomic(new.partition_dir(pid) / "_SUCCESS", json.dumps(summary).encode())


def _run_global_steps(pipeline: str, module: Any, loaded: Any, run: RunDir, run_id: str,
                      pids: list[str]) -> dict[str, Any]:
    if pipeline == "video":
        dedup = module.run_dedup(loaded, run, run_id, pids)
        caption = module.run_captions(loaded, run, run_id)
        return {"dedup": dedup, "caption": caption}
    return {"global": module.run_global(loaded, run, run_id, pids)}


def _count_model_calls(value: Any) -> int:
    if isinstance(value, dict):
        return sum(int(v) if k == "model_calls" else _count_model_calls(v)
                   for k, v in value.items())
    if isinstance(value, list):
        return sum(_count_model_calls(v) for v in value)
    return 0


def _diff(before: list[FunnelRow], after: list[FunnelRow]) -> list[StageDiff]:
    old = {r.stage: r for r in before}
    return [StageDiff(r.stage, old[r.stage].kept, r.kept, old[r.stage].dropped, r.dropped,
                      old[r.stage].errored, r.errored) for r in after if r.stage in old]


def default_out_dir(run_dir: Path, policy: Policy) -> Path:
    return run_dir.parent / f"{run_dir.name}-policy-{policy.policy_hash[:8]}"


def apply_policy(run_dir: str | Path, policy_path: str | Path,
                 out_dir: str | Path | None = None) -> PolicyApplyResult:
    """Make OUT (default RUN_DIR-policy-<hash>): RUN_DIR's run re-decided under the policy."""
    from weft.pipelines.ray_runtime import init_ray

    source = RunDir(Path(run_dir).resolve())
    if not source.manifest_path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    manifest = source.manifest()
    pipeline = manifest["pipeline"]
    module = _pipeline_module(pipeline)
    resolved = yaml.safe_load(source.config_path.read_text()) or {}
    if "policy_resolved" not in resolved:
        raise ConfigError(f"{source.config_path} does not record the run's policy")
    old_policy = Policy.model_validate(resolved["policy_resolved"])
    policy_path = Path(policy_path)
    new_policy = read_policy(policy_path, set(old_policy.rules) |
                             {p["name"] for p in manifest["plan"]} |
                             set(_INNER_BLOCKS.get(pipeline, ())))
    _check_blocks(pipeline, old_policy, new_policy)
    out = Path(out_dir) if out_dir else default_out_dir(source.root, new_policy)
    out = out.resolve()
    if out == source.root:
        raise ConfigError("the new run directory must differ from the first run's")
    out.mkdir(parents=True, exist_ok=True)
    loaded = module.load_config(_new_config(source, policy_path, out))
    plan = [StagePlan(**p) for p in manifest["plan"]]
    new_plan = module.plan(loaded) if pipeline == "web" else module.plan()
    if [p.name for p in new_plan] != [p.name for p in plan]:
        raise PolicyApplyError("the pipeline's stages changed since the first run; rerun it")
    run_id = hash_of(pipeline, loaded.config_hash, length=16)
    new = RunDir(out)
    new.claim(pipeline=pipeline, config=loaded.resolved, config_hash=loaded.config_hash,
              run_id=run_id, plan=[p.__dict__ for p in plan], code_version=code_version())
    if source.inputs_path.exists():
        shutil.copyfile(source.inputs_path, new.inputs_path)

    table_name, linked = _TABLES[pipeline]
    ingest = pq.read_table(source.ledger_dir / "ingest.parquet").to_pylist()
    ingest_new = [dict(r, run_id=run_id, policy_hash=new_policy.policy_hash) for r in ingest]
    write_ledger(ingest_new, new.ledger_dir / "ingest.parquet")
    kept_sources = {r["item_id"] for r in ingest_new if r["decision"] == "keep"}
    pids = []
    for path in sorted(source.ledger_dir.glob("part-*.parquet")):
        pid = path.stem.removeprefix("part-")
        pids.append(pid)
        rows = pq.read_table(path).to_pylist()
        first = [r for r in ingest_new if r["item_id"] in
                 {x["item_id"] for x in rows if x["stage"] == plan[1].name}]
        decided = redecide_ledger(first + rows, plan, old_policy, new_policy)
        decided = [dict(r, run_id=run_id) for r in decided if r["stage"] != plan[0].name]
        _rewrite_partition(source, new, pid, table_name, decided)
        kept_sources -= {r["item_id"] for r in first}
    if kept_sources:
        raise PolicyApplyError(f"{len(kept_sources)} kept sources have no partition ledger; "
                               "the first run did not finish")
    for name in linked:
        if (source.root / name).is_dir():
            _link_tree(source.root / name, new.root / name)

    init_ray(loaded.config.ray)
    steps = _run_global_steps(pipeline, module, loaded, new, run_id, sorted(pids))
    n_inputs = len(ingest)
    after = check_invariant(read_ledger(new.ledger_dir), plan, n_inputs=n_inputs)
    before = check_invariant(read_ledger(source.ledger_dir), plan, n_inputs=n_inputs)
    result = PolicyApplyResult(
        run_dir=str(new.root), source_run_dir=str(source.root), policy=str(policy_path),
        policy_hash=new_policy.policy_hash, stages=_diff(before, after),
        model_calls=_count_model_calls(steps), global_steps=steps)
    write_atomic(new.root / APPLY_FILE, (json.dumps(result.as_dict(), indent=2, default=str)
                                         + "\n").encode())
    return result
