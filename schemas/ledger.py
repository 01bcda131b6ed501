"""The decision ledger: one row per item per stage, for 100% of items.

Rows are plain parquet (scores, thresholds and details as JSON text) so the
ledger is queryable as it is with DuckDB (`read_parquet('run/ledger/*.parquet')`)
or pandas, and every drop carries its reason and numbers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from weft.schemas.ids import stable_json

LEDGER_SCHEMA_VERSION = 1
Decision = Literal["keep", "drop", "error"]
DECISIONS: tuple[str, ...] = ("keep", "drop", "error")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("stage_index", pa.int16(), nullable=False),
        pa.field("stage_version", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("parent_id", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("item_kind", pa.string(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("scores", pa.string(), nullable=False),
        pa.field("thresholds", pa.string(), nullable=False),
        pa.field("details", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("model_id", pa.string()),
        pa.field("model_revision", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("policy_hash", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("elapsed_ms", pa.float64()),
    ],
    metadata={"weft.table": "ledger", "weft.schema_version": str(LEDGER_SCHEMA_VERSION)},
)


@dataclass
class LedgerEntry:
    """What a stage decided about one item; the runner fills in run-level fields."""

    item_id: str
    item_kind: str
    decision: Decision
    reason: str
    parent_id: str | None = None
    source_id: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error_message: str | None = None
    model_id: str | None = None
    model_revision: str | None = None
    prompt_hash: str | None = None
    elapsed_ms: float | None = None

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")

    def to_row(self, *, run_id: str, stage: str, stage_index: int, stage_version: str,
               config_hash: str, policy_hash: str, code_version: str) -> dict[str, Any]:
        """The full ledger row, JSON columns serialised canonically."""
        return {
            "run_id": run_id,
            "stage": stage,
            "stage_index": stage_index,
            "stage_version": stage_version,
            "item_id": self.item_id,
            "parent_id": self.parent_id,
            "source_id": self.source_id,
            "item_kind": self.item_kind,
            "decision": self.decision,
            "reason": self.reason,
            "scores": stable_json(self.scores),
            "thresholds": stable_json(self.thresholds),
            "details": stable_json(self.details),
            "error_type": self.error_type,
            "error_message": self.error_message,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "prompt_hash": self.prompt_hash,
            "config_hash": config_hash,
            "policy_hash": policy_hash,
            "code_version": code_version,
            "elapsed_ms": self.elapsed_ms,
        }


def ledger_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a ledger table in a deterministic order (stage, item, parent)."""
    ordered = sorted(rows, key=lambda r: (r["stage_index"], r["item_id"], r["parent_id"] or "",
                                          r["details"]))
    return pa.Table.from_pylist(ordered, schema=LEDGER_SCHEMA)


def write_ledger(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ledger rows atomically (tmp file + rename) to one parquet file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(ledger_table(rows), tmp)
    tmp.replace(path)
    return path


def read_ledger(ledger_dir: str | Path) -> pa.Table:
    """Every ledger file under a directory as one table (empty if none)."""
    files = sorted(Path(ledger_dir).glob("*.parquet"))
    if not files:
        return LEDGER_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=LEDGER_SCHEMA) for f in files])


@dataclass(frozen=True)
class StagePlan:
    """A stage's place in a pipeline: `expand` stages turn one item into many."""

    name: str
    version: str
    kind: Literal["map", "expand"] = "map"


@dataclass
class FunnelRow:
    """Per-stage counts: in = kept + dropped + errored."""

    stage: str
    items_in: int
    kept: int
    dropped: int
    errored: int
    drop_reasons: dict[str, int]
    error_reasons: dict[str, int]


def funnel(table: pa.Table, plan: list[StagePlan]) -> list[FunnelRow]:
    """The funnel of a run, one row per stage in plan order."""
    rows = table.select(["stage", "decision", "reason"]).to_pylist()
    out = []
    for stage in plan:
        mine = [r for r in rows if r["stage"] == stage.name]
        counts = Counter(r["decision"] for r in mine)
        out.append(FunnelRow(
            stage=stage.name,
            items_in=len(mine),
            kept=counts["keep"],
            dropped=counts["drop"],
            errored=counts["error"],
            drop_reasons=dict(sorted(Counter(r["reason"] for r in mine
                                             if r["decision"] == "drop").items())),
            error_reasons=dict(sorted(Counter(r["reason"] for r in mine
                                              if r["decision"] == "error").items())),
        ))
    return out


class LedgerInvariantError(AssertionError):
    """The ledger does not account for every item exactly once per stage."""


def check_invariant(table: pa.Table, plan: list[StagePlan], n_inputs: int) -> list[FunnelRow]:
    """Check that every stage saw exactly what the previous one kept.

    - the first stage has one row per discovered input;
    - a map stage has one row per item the previous stage kept, no more, no less;
    - an expand stage has rows whose parents are exactly the items the previous
      stage kept (each kept parent yields at least one child row);
    - every row's decision is keep, drop or error (so in = kept + dropped + errored).
    Returns the funnel when the invariant holds; raises LedgerInvariantError otherwise.
    """
    problems: list[str] = []
    rows = table.select(["stage", "item_id", "parent_id", "decision"]).to_pylist()
    by_stage: dict[str, list[dict[str, Any]]] = {s.name: [] for s in plan}
    for r in rows:
        if r["stage"] not in by_stage:
            problems.append(f"row for unknown stage {r['stage']!r}")
            continue
        by_stage[r["stage"]].append(r)
    previous_kept: Counter[str] | None = None
    for stage in plan:
        mine = by_stage[stage.name]
        bad = [r for r in mine if r["decision"] not in DECISIONS]
        if bad:
            problems.append(f"{stage.name}: {len(bad)} rows with an unknown decision")
        if previous_kept is None:
            if len(mine) != n_inputs:
                problems.append(f"{stage.name}: {len(mine)} rows for {n_inputs} inputs")
        elif stage.kind == "map":
            seen = Counter(r["item_id"] for r in mine)
            if seen != previous_kept:
                missing = sorted((previous_kept - seen).elements())[:5]
                extra = sorted((seen - previous_kept).elements())[:5]
                problems.append(f"{stage.name}: items in != items kept by the previous stage "
                                f"(missing {missing}, unexpected {extra})")
        else:
            parents = {r["parent_id"] for r in mine}
            if parents != set(previous_kept):
                problems.append(f"{stage.name}: parents {len(parents)} != previous kept "
                                f"{len(previous_kept)}")
        previous_kept = Counter(r["item_id"] for r in mine if r["decision"] == "keep")
    if problems:
        raise LedgerInvariantError("; ".join(problems))
    return funnel(table, plan)


def scores_of(row: dict[str, Any]) -> dict[str, Any]:
    """The decoded score dict of a ledger row."""
    return json.loads(row["scores"])
