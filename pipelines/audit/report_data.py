"""The numbers behind the audit report, gathered from a run directory alone.

Everything here is read from what the run left on disk (run.json, config.yaml,
the ledger, the model registry the config names), so an auditor can rebuild
the report long after the run, on another machine, without the pipeline.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from weft.schemas.ledger import (
    FunnelRow,
    LedgerInvariantError,
    StagePlan,
    check_invariant,
    funnel,
    read_ledger,
)
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir

MAX_EXAMPLES = 3
MAX_MESSAGE_CHARS = 400
LEDGER_COLUMNS = ["stage", "stage_index", "item_id", "parent_id", "decision", "reason",
                  "scores", "thresholds", "details", "error_type", "error_message", "model_id",
                  "model_revision", "prompt_hash", "policy_hash", "elapsed_ms"]


@dataclass
class ScoreSeries:
    """One score of one stage that the policy rules on: values split by decision."""

    stage: str
    score: str
    bounds: dict[str, float]
    unit: str = "item"  # or "image": a per-image score from the row's details
    kept: list[float] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)
    missing: int = 0


@dataclass
class StageTiming:
    """Wall time the ledger recorded for a stage (elapsed_ms is optional per row)."""

    stage: str
    timed_rows: int
    total_ms: float | None
    mean_ms: float | None


@dataclass
class ModelUse:
    """A model a stage used, as the ledger names it, with what the registry says."""

    stage: str
    model_id: str
    revision: str | None
    rows: int
    licence: str | None = None
    path: str | None = None


@dataclass
class PromptUse:
    """A prompt hash a stage recorded, matched to a template the config names."""

    stage: str
    prompt_hash: str
    rows: int
    ref: str | None = None
    config_key: str | None = None


@dataclass
class ReportData:
    """Everything the report shows, as plain values."""

    run_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_text: str
    created: str | None
    plan: list[StagePlan]
    funnel: list[FunnelRow]
    invariant: str
    unplanned_stages: list[str]
    examples: dict[str, dict[str, list[str]]]
    series: list[ScoreSeries]
    timings: list[StageTiming]
    models: list[ModelUse]
    prompts: list[PromptUse]
    policy: dict[str, Any]
    policy_hashes: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    """A score as a float for a histogram; None for missing, NaN and non-numbers."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and not math.isnan(value) and not math.isinf(value):
        return float(value)
    return None


def _clean(bounds: Any) -> dict[str, float]:
    """{min, max} as floats, without the open sides."""
    if not isinstance(bounds, dict):
        return {}
    return {k: float(v) for k, v in bounds.items()
            if k in ("min", "max") and _number(v) is not None}


def stage_bounds(rows: list[dict[str, Any]], policy: dict[str, Any],
                 plan: list[StagePlan]) -> dict[str, dict[str, dict[str, float]]]:
    """stage -> score -> {min, max}: what the ledger says was applied, else the policy.

    Besides a row's `thresholds`, a stage that rules on each image of a document
    records the per-image bounds in `details.per_image_thresholds`.
    """
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for row in rows:
        for score, bounds in json.loads(row["thresholds"] or "{}").items():
            out[row["stage"]].setdefault(score, _clean(bounds))
        if "per_image_thresholds" in (row["details"] or ""):
            per_image = json.loads(row["details"]).get("per_image_thresholds") or {}
            for score, bounds in per_image.items():
                out[row["stage"]].setdefault(score, _clean(bounds))
    names = {s.name for s in plan}
    for stage, rules in (policy.get("rules") or {}).items():
        if stage in names:
            for score, bounds in (rules or {}).items():
                out[stage].setdefault(score, _clean(bounds))
    return out


def _image_scores(row: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(scores, decision) of each image a row's details list (empty when none)."""
    if '"images"' not in (row["details"] or ""):
        return []
    images = json.loads(row["details"]).get("images")
    out = []
    for image in images if isinstance(images, list) else []:
        if isinstance(image, dict) and isinstance(image.get("scores"), dict):
            kept = image.get("decision") == "keep" or image.get("kept") is True
            out.append((image["scores"], "keep" if kept else "drop"))
    return out


def _add(series: ScoreSeries, value: Any, decision: str) -> None:
    number = _number(value)
    if number is None:
        series.missing += 1
    elif decision == "keep":
        series.kept.append(number)
    else:
        series.dropped.append(number)


def score_series(rows: list[dict[str, Any]], bounds: dict[str, dict[str, dict[str, float]]],
                 plan: list[StagePlan]) -> list[ScoreSeries]:
    """A series per (stage, ruled score) in plan order; errored rows carry no scores.

    A ruled score missing from a row's scores but present on its images (e.g.
    image_rules, image_dedup) becomes a per-image series.
    """
    series: dict[tuple[str, str, str], ScoreSeries] = {}

    def get(stage: str, score: str, unit: str) -> ScoreSeries:
        key = (stage, score, unit)
        if key not in series:
            series[key] = ScoreSeries(stage, score, bounds[stage][score], unit)
        return series[key]

    for row in rows:
        stage = row["stage"]
        if not bounds.get(stage) or row["decision"] == "error":
            continue
        scores = json.loads(row["scores"] or "{}")
        images: list[tuple[dict[str, Any], str]] | None = None
        for score in bounds[stage]:
            if score in scores:
                _add(get(stage, score, "item"), scores[score], row["decision"])
                continue
            images = _image_scores(row) if images is None else images
            found = [(s[score], d) for s, d in images if score in s]
            for value, decision in found:
                _add(get(stage, score, "image"), value, decision)
            if not found:
                get(stage, score, "item").missing += 1
    per_image = {(stage, score) for stage, score, unit in series if unit == "image"}
    kept = [s for s in series.values()
            if not (s.unit == "item" and (s.stage, s.score) in per_image
                    and not s.kept and not s.dropped)]
    order = {s.name: k for k, s in enumerate(plan)}
    return sorted(kept, key=lambda s: (order.get(s.stage, len(order)), s.stage))


def reason_examples(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """stage -> reason -> a few examples: distinct `Type: message` lines for errors,
    the first item ids (sorted) for drops, so an auditor can trace them."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for row in sorted(rows, key=lambda r: r["item_id"]):
        if row["decision"] == "keep":
            continue
        if row["decision"] == "drop":
            text = f"item {row['item_id']}"
        else:
            text = f"{row['error_type'] or 'error'}: {row['error_message'] or ''}"
            text = text[:MAX_MESSAGE_CHARS] + ("…" if len(text) > MAX_MESSAGE_CHARS else "")
        found = out[row["stage"]][row["reason"]]
        if text not in found and len(found) < MAX_EXAMPLES:
            found.append(text)
    return {stage: dict(reasons) for stage, reasons in out.items()}


def timings(rows: list[dict[str, Any]], plan: list[StagePlan]) -> list[StageTiming]:
    """Sum and mean of elapsed_ms per stage; None where no row was timed."""
    out = []
    for stage in plan:
        times = [r["elapsed_ms"] for r in rows
                 if r["stage"] == stage.name and _number(r["elapsed_ms"]) is not None]
        total = sum(times) if times else None
        out.append(StageTiming(stage.name, len(times), total,
                               total / len(times) if times else None))
    return out


def _registry(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """name -> ModelSpec from the registry the config names ({} when there is none)."""
    from weft.stages.infer.registry import load_registry

    path = config.get("models")
    if not isinstance(path, str):
        return {}
    try:
        return dict(load_registry(path).models)
    except ValueError as exc:
        notes.append(f"model registry not readable (licences from the run config only): {exc}")
        return {}


def models_used(rows: list[dict[str, Any]], config: dict[str, Any],
                notes: list[str]) -> list[ModelUse]:
    """Distinct (stage, model, revision) in the ledger, with licence and path if registered."""
    counts = Counter((r["stage"], r["model_id"], r["model_revision"]) for r in rows
                     if r["model_id"])
    registry = _registry(config, notes) if counts else {}
    resolved = _resolved_models(config)
    out = []
    for (stage, model_id, revision), n in counts.items():
        spec = registry.get(model_id)
        known = resolved.get(model_id, {})
        out.append(ModelUse(stage, model_id, revision, n,
                            licence=spec.licence if spec else known.get("licence"),
                            path=spec.path if spec else known.get("path")))
    return out


def _resolved_models(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> spec as the run config recorded it (`models_resolved`, `<step>_model_resolved`).

    The registry file a config names may be gone (a temp dir); the config keeps a copy.
    """
    out = dict(config.get("models_resolved") or {})
    for key, value in config.items():
        step = config.get(key.removesuffix("_model_resolved"))
        if key.endswith("_model_resolved") and isinstance(value, dict) \
                and isinstance(step, dict) and isinstance(step.get("model"), str):
            out.setdefault(step["model"], value)
    return out


def _config_prompts(config: Any, key: str = "") -> dict[str, str]:
    """config key path -> prompt name, for every `prompt: <name>` the config holds."""
    found: dict[str, str] = {}
    if isinstance(config, dict):
        for name, value in config.items():
            path = f"{key}.{name}" if key else str(name)
            if name == "prompt" and isinstance(value, str):
                found[path] = value
            else:
                found.update(_config_prompts(value, path))
    return found


def prompts_used(rows: list[dict[str, Any]], config: dict[str, Any]) -> list[PromptUse]:
    """Distinct (stage, prompt hash), named by the config's prompt templates when they match."""
    from weft.stages.infer.prompts import load_prompt

    counts = Counter((r["stage"], r["prompt_hash"]) for r in rows if r["prompt_hash"])
    known: dict[str, tuple[str, str]] = {}
    for key, name in sorted(_config_prompts(config).items()):
        try:
            template = load_prompt(name)
        except ValueError:
            continue
        known.setdefault(template.prompt_hash, (template.ref, key))
    out = []
    for (stage, prompt_hash), n in counts.items():
        ref, key = known.get(prompt_hash, (None, None))
        out.append(PromptUse(stage, prompt_hash, n, ref, key))
    return out


def invariant_status(table: Any, plan: list[StagePlan], run: RunDir) -> str:
    """'holds' or the problems `check_invariant` found (inputs.parquet sizes the first stage)."""
    if run.inputs_path.exists():
        n_inputs = pq.read_metadata(run.inputs_path).num_rows
    else:
        first = plan[0].name if plan else None
        n_inputs = sum(1 for s in table.column("stage").to_pylist() if s == first)
    try:
        check_invariant(table, plan, n_inputs)
    except LedgerInvariantError as exc:
        return f"broken: {exc}"
    return "holds: every stage saw exactly what the previous stage kept"


def gather(run_dir: Path) -> ReportData:
    """Read a run directory into ReportData."""
    run = RunDir(Path(run_dir))
    if not run.manifest_path.is_file():
        raise FileNotFoundError(f"{run.root} is not a run directory: it has no run.json")
    manifest = run.manifest()
    config_text = run.config_path.read_text() if run.config_path.exists() else ""
    config = (yaml.safe_load(config_text) or {}) if config_text else {}
    plan = [StagePlan(p["name"], p["version"], p.get("kind", "map"))
            for p in manifest.get("plan", [])]
    table = read_ledger(run.ledger_dir)
    rows = table.select(LEDGER_COLUMNS).to_pylist()
    policy = config.get("policy_resolved") or {}
    notes: list[str] = []
    if policy:
        try:
            computed = Policy.model_validate(policy).policy_hash
        except ValueError:
            computed = None
    else:
        computed = None
    policy_hashes = sorted({r["policy_hash"] for r in rows})
    if computed and policy_hashes and policy_hashes != [computed]:
        notes.append(f"ledger policy hash(es) {', '.join(policy_hashes)} differ from the "
                     f"config's policy ({computed}): the ledger was decided by another policy")
    planned = {s.name for s in plan}
    created = datetime.fromtimestamp(run.manifest_path.stat().st_mtime, UTC)
    return ReportData(
        run_dir=run.root,
        manifest=manifest,
        config=config,
        config_text=config_text,
        created=created.strftime("%Y-%m-%d %H:%M:%S UTC"),
        plan=plan,
        funnel=funnel(table, plan),
        invariant=invariant_status(table, plan, run),
        unplanned_stages=sorted({r["stage"] for r in rows} - planned),
        examples=reason_examples(rows),
        series=score_series(rows, stage_bounds(rows, policy, plan), plan),
        timings=timings(rows, plan),
        models=models_used(rows, config, notes),
        prompts=prompts_used(rows, config),
        policy=policy,
        policy_hashes=policy_hashes or ([computed] if computed else []),
        rows=rows,
        notes=notes,
    )
