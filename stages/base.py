"""The stage contract.

A stage is a class with a name, a version, a pydantic Config, declared
resources and columns, a `setup()` that loads models once per worker, and
`__call__(batch) -> batch` over a pyarrow batch. Its core is `process(row)`, a
plain function of one row that scores the item; the policy decides keep, drop
or error, and the stage never drops silently.

Rows travel through a pipeline with two bookkeeping columns: `_decision` (the
item's current decision; only `keep` rows are processed further) and `_ledger`
(the ledger rows written about the item so far, as JSON). The pipeline's sink
flattens `_ledger` into the run's ledger, so the ledger needs no shared
filesystem and is exactly what the data saw.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ids import hash_of, stable_json
from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy

DECISION_COLUMN = "_decision"
LEDGER_COLUMN = "_ledger"
BOOKKEEPING_FIELDS = [
    pa.field("item_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("item_kind", pa.string()),
    pa.field(DECISION_COLUMN, pa.string()),
    pa.field(LEDGER_COLUMN, pa.list_(pa.string())),
]


# Pointers that native libraries print ("[mov @ 0x55e3...]") differ run to run.
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def stable_message(message: str) -> str:
    """An error message without memory addresses, so a re-run's ledger is identical."""
    return _ADDRESS.sub("0x…", message)


class Resources(BaseModel):
    """What one worker of a stage needs; the Ray plan reserves exactly this."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(1.0, ge=0)
    concurrency: int = Field(1, ge=1, description="workers (actors) for stages with models")
    batch_size: int = Field(1, ge=1, description="rows per batch handed to the stage")


class StageConfig(BaseModel):
    """Base for every stage's Config: unknown keys are a start-up error."""

    model_config = ConfigDict(extra="forbid")
    resources: Resources = Field(default_factory=Resources)


class ItemError(Exception):
    """A bad input: recorded as decision=error with this reason code, never fatal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RunContext:
    """Run-level facts every ledger row carries."""

    run_id: str
    run_dir: str
    policy: Policy
    code_version: str
    stage_index: int = 0


@dataclass
class Outcome:
    """A stage's result for one item: the ledger entry and the row passed on."""

    entry: LedgerEntry
    row: dict[str, Any] = field(default_factory=dict)


class Stage(ABC):
    """Base class: subclasses set the ClassVars and implement `process`."""

    name: ClassVar[str]
    version: ClassVar[str]
    kind: ClassVar[Literal["map", "expand"]] = "map"
    item_kind: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    input_columns: ClassVar[tuple[str, ...]] = ()
    # map: columns added to the row; expand: the child rows' columns.
    output_fields: ClassVar[list[pa.Field]] = []
    # Columns emptied once an item is no longer kept (large frames, pixels).
    heavy_columns: ClassVar[tuple[str, ...]] = ()
    uses_model: ClassVar[bool] = False

    def __init__(self, config: StageConfig | None, ctx: RunContext) -> None:
        self.config = config if config is not None else self.Config()
        self.ctx = ctx
        self._ready = False

    # ---- declared facts -------------------------------------------------
    @property
    def resources(self) -> Resources:
        return self.config.resources

    @property
    def config_hash(self) -> str:
        """Hash of what changes this stage's output: name, version, config (not resources)."""
        return hash_of(self.name, self.version,
                       self.config.model_dump(mode="json", exclude={"resources"}), length=16)

    def model_identity(self) -> tuple[str | None, str | None]:
        """(model id, revision) recorded on every ledger row; None for rule stages."""
        return None, None

    # ---- lifecycle ------------------------------------------------------
    def setup(self) -> None:  # noqa: B027 - optional hook, most rule stages load nothing
        """Load models once per worker. Missing models must fail here, clearly."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    # ---- the core -------------------------------------------------------
    @abstractmethod
    def process(self, row: dict[str, Any]) -> list[Outcome]:
        """Score one kept item. Map stages return one outcome, expand stages any number."""

    def decide(self, scores: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(decision, reason, thresholds) from the run's policy for this stage."""
        decision, reason = self.ctx.policy.decide(self.name, scores)
        return decision, reason, self.ctx.policy.thresholds(self.name)

    def entry(self, row: dict[str, Any], scores: dict[str, Any], *,
              item_id: str | None = None, parent_id: str | None = None,
              details: dict[str, Any] | None = None,
              override: tuple[str, str] | None = None) -> LedgerEntry:
        """A ledger entry for `row` decided by the policy (or by `override`)."""
        decision, reason, thresholds = self.decide(scores)
        if override is not None:
            decision, reason = override
        model_id, revision = self.model_identity()
        return LedgerEntry(
            item_id=item_id or row["item_id"], item_kind=self.item_kind,
            parent_id=parent_id if parent_id is not None else row.get("parent_id"),
            source_id=row.get("source_id"), decision=decision, reason=reason,
            scores=scores, thresholds=thresholds, details=details or {},
            model_id=model_id, model_revision=revision,
        )

    # ---- batch adapter (what Ray calls) -----------------------------------
    def _error_outcome(self, row: dict[str, Any], exc: Exception) -> Outcome:
        reason = exc.reason if isinstance(exc, ItemError) else f"exception_{type(exc).__name__}"
        message = str(exc) if isinstance(exc, ItemError) else (
            f"{exc}\n{''.join(traceback.format_exception_only(exc)).strip()}")
        model_id, revision = self.model_identity()
        # In an expand stage a failure to expand is recorded against the parent,
        # as its own parent, so "every kept parent has rows" still holds.
        expand = self.kind == "expand"
        return Outcome(LedgerEntry(
            item_id=row["item_id"], item_kind=row.get("item_kind") or self.item_kind,
            parent_id=row["item_id"] if expand else row.get("parent_id"),
            source_id=row.get("source_id"),
            decision="error", reason=reason, error_type=type(exc).__name__,
            error_message=stable_message(message)[:2000], model_id=model_id,
            model_revision=revision,
        ))

    def _ledger_json(self, entry: LedgerEntry) -> str:
        return stable_json(entry.to_row(
            run_id=self.ctx.run_id, stage=self.name, stage_index=self.ctx.stage_index,
            stage_version=self.version, config_hash=self.config_hash,
            policy_hash=self.ctx.policy.policy_hash, code_version=self.ctx.code_version))

    def process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the stage over plain rows: what `__call__` does without pyarrow."""
        self.ensure_setup()
        out: list[dict[str, Any]] = []
        for row in rows:
            carried = list(row.get(LEDGER_COLUMN) or [])
            if row.get(DECISION_COLUMN, "keep") != "keep":
                out.append(self._carry(row, carried))
                continue
            started = time.perf_counter()
            try:
                outcomes = self.process(row)
                if self.kind == "map" and len(outcomes) != 1:
                    raise RuntimeError(f"map stage {self.name} returned {len(outcomes)} outcomes")
            except Exception as exc:  # a bad item never stops the run
                outcomes = [self._error_outcome(row, exc)]
            elapsed = (time.perf_counter() - started) * 1000 / max(1, len(outcomes))
            for i, outcome in enumerate(outcomes):
                outcome.entry.elapsed_ms = round(elapsed, 3)
                if self.kind == "expand":
                    # A child row is built from scratch; a failed expansion carries the parent.
                    new = dict(outcome.row) or {"item_id": row["item_id"],
                                                "source_id": row.get("source_id")}
                else:
                    new = {**row, **outcome.row}
                new.setdefault("item_id", outcome.entry.item_id)
                new.setdefault("source_id", row.get("source_id"))
                new.setdefault("item_kind", outcome.entry.item_kind)
                new[DECISION_COLUMN] = outcome.entry.decision
                # Parents' ledger rows ride on the first child so they are kept exactly once.
                history = carried if i == 0 else []
                new[LEDGER_COLUMN] = [*history, self._ledger_json(outcome.entry)]
                if outcome.entry.decision != "keep":
                    for col in self.heavy_columns:
                        new[col] = None
                out.append(new)
        return out

    def _carry(self, row: dict[str, Any], carried: list[str]) -> dict[str, Any]:
        """A row that is no longer kept passes through untouched (children schema for expand)."""
        if self.kind == "expand":
            return {"item_id": row["item_id"], "source_id": row.get("source_id"),
                    "item_kind": row.get("item_kind"), DECISION_COLUMN: row[DECISION_COLUMN],
                    LEDGER_COLUMN: carried}
        return row

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        """Map: input + added fields (heavy input columns kept). Expand: declared fields."""
        if self.kind == "expand":
            fields = list(self.output_fields)
        else:
            added = {f.name for f in self.output_fields}
            fields = [f for f in input_schema if f.name not in added] + list(self.output_fields)
        names = {f.name for f in fields}
        return pa.schema(fields + [f for f in BOOKKEEPING_FIELDS if f.name not in names])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.process_rows(batch.to_pylist())
        schema = self.output_schema(batch.schema)
        return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows],
                                    schema=schema)


def ledger_rows_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten the `_ledger` column of final rows into ledger rows."""
    return [json.loads(entry) for row in rows for entry in (row.get(LEDGER_COLUMN) or [])]
