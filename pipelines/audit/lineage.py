"""Lineage over one run's ledger: an item's rows, its chain to the source bytes, its fate.

Everything here is answered from the run directory alone (run.json for the stage
plan, ledger/*.parquet for the decisions), so `weft audit trace`, `weft audit why`
and the HTML report read exactly what the run recorded, nothing recomputed.

Chains follow `parent_id`: a clip's parent is its source video, a record's parent is
its records file. An item may share its id with its parent (an HTML page's document
*is* the page's bytes), and a failed expansion is recorded against the parent as its
own parent; rows are therefore grouped by item id, and a link is a parent id that
differs from the item's own.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from weft.schemas.ids import sha256_file
from weft.schemas.ledger import read_ledger
from weft.schemas.run_dir import RunDir

MIN_PREFIX = 8
_HEX = re.compile(r"^[0-9a-f]+$")
_LATE = 10_000  # sort position of a stage the plan does not name


class TraceError(LookupError):
    """Something a trace needs is missing (run dir, ledger row, key): said plainly."""


class AmbiguousIdError(TraceError):
    """A prefix that names more than one item."""


def check_prefix(value: str, what: str = "item id") -> str:
    """The id lower-cased when it is at least MIN_PREFIX hex digits; else ValueError."""
    query = value.strip().lower()
    if len(query) < MIN_PREFIX or not _HEX.match(query):
        raise ValueError(f"{what} {value!r}: give the full id or a prefix of at least "
                         f"{MIN_PREFIX} hex digits")
    return query


def _json(text: str | None) -> Any:
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return {"_unparsed": text}


def fmt(value: Any) -> str:
    """A number short enough to read (6 significant digits), anything else as str."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass
class StageRow:
    """One ledger row with its JSON columns decoded."""

    stage: str
    stage_index: int
    stage_version: str
    item_kind: str
    decision: str
    reason: str
    scores: dict[str, Any]
    thresholds: dict[str, Any]
    details: dict[str, Any]
    parent_id: str | None = None
    source_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    model_id: str | None = None
    model_revision: str | None = None
    prompt_hash: str | None = None
    config_hash: str | None = None
    policy_hash: str | None = None
    code_version: str | None = None
    run_id: str | None = None

    @classmethod
    def from_ledger(cls, row: dict[str, Any]) -> StageRow:
        names = cls.__dataclass_fields__.keys() - {"scores", "thresholds", "details"}
        return cls(**{k: row.get(k) for k in names}, scores=_json(row.get("scores")),
                   thresholds=_json(row.get("thresholds")), details=_json(row.get("details")))


@dataclass
class BrokenBound:
    """A score outside its policy bound, and by how much."""

    score: str
    value: float | None
    bound: str  # "min" | "max" | "missing"
    limit: float | None
    by: float | None
    decisive: bool = False  # the bound the row's reason names

    def describe(self) -> str:
        if self.bound == "missing":
            return f"{self.score} has no value (the policy needs one)"
        sign = "<" if self.bound == "min" else ">"
        return (f"{self.score} = {fmt(self.value)} {sign} {self.bound} {fmt(self.limit)} "
                f"(by {fmt(self.by)})")


def broken_bounds(scores: dict[str, Any], thresholds: dict[str, Any],
                  reason: str = "") -> list[BrokenBound]:
    """Every `{score: {min, max}}` bound the scores break; the one `reason` names first."""
    out = []
    for name, bounds in thresholds.items():
        if not isinstance(bounds, dict) or name not in scores:
            continue
        value = scores[name]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(BrokenBound(name, None, "missing", None, None,
                                   reason == f"{name}_missing"))
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        low, high = bounds.get("min"), bounds.get("max")
        if low is not None and value < low:
            out.append(BrokenBound(name, value, "min", low, round(low - value, 9),
                                   reason == f"{name}_below_min"))
        if high is not None and value > high:
            out.append(BrokenBound(name, value, "max", high, round(value - high, 9),
                                   reason == f"{name}_above_max"))
    return sorted(out, key=lambda b: not b.decisive)


def fmt_bounds(thresholds: dict[str, Any]) -> str:
    """`score in [lo, hi]; other >= lo` for the usual bounds, JSON for anything else."""
    parts = []
    for name, bounds in thresholds.items():
        if isinstance(bounds, dict) and set(bounds) <= {"min", "max"}:
            low, high = bounds.get("min"), bounds.get("max")
            if low is not None and high is not None:
                parts.append(f"{name} in [{fmt(low)}, {fmt(high)}]")
            elif low is not None:
                parts.append(f"{name} >= {fmt(low)}")
            elif high is not None:
                parts.append(f"{name} <= {fmt(high)}")
        else:
            parts.append(f"{name}: {json.dumps(bounds, sort_keys=True)}")
    return "; ".join(parts)


@dataclass
class Span:
    """Which bytes of the source file an item stands for."""

    kind: str  # "whole_file" | "time" | "record" | "unknown"
    start_s: float | None = None
    end_s: float | None = None
    start_frame: int | None = None
    end_frame: int | None = None
    record_index: int | None = None

    def describe(self) -> str:
        if self.kind == "time":
            frames = (f" (frames {self.start_frame}-{self.end_frame})"
                      if self.start_frame is not None else "")
            return f"{self.start_s:.3f} s - {self.end_s:.3f} s{frames}"
        if self.kind == "record":
            return f"record #{self.record_index} (0-based) of the file"
        if self.kind == "whole_file":
            return "the whole file"
        return "a part of the file the ledger does not locate"


@dataclass
class SourceIdentity:
    """The source bytes at the root of a chain, as the ingest row recorded them."""

    item_id: str
    sha256: str | None
    path: str | None
    url: str | None
    size_bytes: int | None
    span: Span
    ingest_decision: str | None
    copies: list[str] = field(default_factory=list)  # byte-identical files ingest dropped
    bytes_check: str | None = None  # None: not checked; "match"; or what is wrong

    def check_bytes(self) -> str:
        """Hash the file at the recorded path now and say whether it still is the source."""
        if not self.path:
            self.bytes_check = "no path recorded"
        elif not Path(self.path).is_file():
            self.bytes_check = f"missing: {self.path} is not a file now"
        else:
            digest = sha256_file(self.path)
            self.bytes_check = "match" if digest == self.sha256 else \
                f"mismatch: {self.path} now hashes to {digest}"
        return self.bytes_check


@dataclass
class Fate:
    """How far an item got: where it stopped and why, or what it became."""

    outcome: str  # "kept" | "dropped" | "errored" | "expanded" | "incomplete"
    stage: str | None  # where it stopped / expanded / lacks a row; None when kept
    row: StageRow | None  # the row that stopped it
    passed: list[str]  # stages it was kept at, in order
    children: dict[str, int] = field(default_factory=dict)  # child decisions, when expanded

    def describe(self) -> str:
        if self.outcome == "kept":
            last = self.passed[-1] if self.passed else "-"
            return f"kept at all {len(self.passed)} stages it went through, up to the " \
                   f"plan's last ({last})"
        if self.outcome == "expanded":
            counts = ", ".join(f"{n} {d}" for d, n in sorted(self.children.items()))
            return f"expanded at {self.stage} into {sum(self.children.values())} items " \
                   f"({counts})"
        if self.outcome == "incomplete":
            return (f"kept at {self.passed[-1] if self.passed else 'no stage'}, but the ledger "
                    f"has no row for it at {self.stage}")
        assert self.row is not None
        return f"{self.outcome} at {self.stage}: {self.row.reason}"


@dataclass
class LineageItem:
    """An item of a chain: all its ledger rows in stage order, its parent, its fate."""

    item_id: str
    kinds: list[str]
    parent_id: str | None
    rows: list[StageRow]
    fate: Fate

    def summary(self) -> dict[str, Any]:
        """The item without its rows: what an ancestor list shows."""
        return {"item_id": self.item_id, "kinds": self.kinds, "parent_id": self.parent_id,
                "outcome": self.fate.outcome, "stage": self.fate.stage,
                "reason": self.fate.row.reason if self.fate.row else None,
                "fate": self.fate.describe()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunLedger:
    """One run directory's plan and ledger, with lookups by item id."""

    def __init__(self, root: Path, manifest: dict[str, Any], table: pa.Table) -> None:
        self.root = root
        self.manifest = manifest
        self.table = table
        self.plan = [s["name"] for s in manifest.get("plan") or []]
        self.order = {name: i for i, name in enumerate(self.plan)}

    @classmethod
    def open(cls, run_dir: str | Path) -> RunLedger:
        """Read run.json and the ledger; TraceError says what is missing."""
        run = RunDir(Path(run_dir))
        if not run.root.is_dir():
            raise TraceError(f"run directory {run.root} does not exist (moved or deleted?): "
                             "its ledger is what records the decisions")
        if not run.manifest_path.is_file():
            raise TraceError(f"{run.root} is not a weft run directory: it has no run.json")
        if not any(run.ledger_dir.glob("*.parquet")):
            raise TraceError(f"run directory {run.root} has no ledger: no parquet files "
                             f"under {run.ledger_dir}")
        return cls(run.root.resolve(), run.manifest(), read_ledger(run.ledger_dir))

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def pipeline(self) -> str | None:
        return self.manifest.get("pipeline")

    def label(self) -> str:
        return f"run {self.run_id} ({self.pipeline}) at {self.root}"

    def _sorted(self, rows: list[StageRow]) -> list[StageRow]:
        return sorted(rows, key=lambda r: (self.order.get(r.stage, _LATE + r.stage_index),
                                           r.decision != "keep"))

    def _where(self, mask: pa.ChunkedArray) -> list[dict[str, Any]]:
        return self.table.filter(mask).to_pylist()

    def rows_of(self, item_id: str) -> list[StageRow]:
        """Every row recorded under this item id, in plan order."""
        rows = self._where(pc.equal(self.table["item_id"], item_id))
        return self._sorted([StageRow.from_ledger(r) for r in rows])

    def ids_with_prefix(self, prefix: str) -> list[str]:
        """The distinct item ids that start with `prefix`."""
        ids = pc.unique(self.table["item_id"])
        return sorted(ids.filter(pc.starts_with(ids, prefix)).to_pylist())

    def children_of(self, item_id: str) -> tuple[str | None, dict[str, int]]:
        """(expand stage, child count per decision there) of the items derived from this one."""
        rows = self._where(pc.and_(pc.equal(self.table["parent_id"], item_id),
                                   pc.not_equal(self.table["item_id"], item_id)))
        by_child: dict[str, dict[str, Any]] = {}
        for raw in rows:
            best = by_child.get(raw["item_id"])
            if best is None or self._pos(raw) < self._pos(best):
                by_child[raw["item_id"]] = raw
        if not by_child:
            return None, {}
        stage = min(by_child.values(), key=self._pos)["stage"]
        return stage, dict(Counter(r["decision"] for r in by_child.values()))

    def _pos(self, raw: dict[str, Any]) -> int:
        return self.order.get(raw["stage"], _LATE + raw["stage_index"])

    def fate(self, rows: list[StageRow], item_id: str) -> Fate:
        """Where the item stopped: the first stage with no keep row (ingest may also have
        dropped a byte-identical copy under the same id, which does not stop the item)."""
        passed: list[str] = []
        stages = list(dict.fromkeys(r.stage for r in rows))
        for stage in stages:
            mine = [r for r in rows if r.stage == stage]
            if any(r.decision == "keep" for r in mine):
                passed.append(stage)
                continue
            stop = next((r for r in mine if r.decision == "error"), mine[0])
            outcome = "errored" if stop.decision == "error" else "dropped"
            return Fate(outcome, stage, stop, passed)
        child_stage, children = self.children_of(item_id)
        if children:
            return Fate("expanded", child_stage, None, passed, children)
        if passed and self.plan and passed[-1] != self.plan[-1]:
            later = self.plan[self.order.get(passed[-1], len(self.plan) - 1) + 1:]
            return Fate("incomplete", later[0] if later else None, None, passed)
        return Fate("kept", None, None, passed)

    def item(self, item_id: str) -> LineageItem:
        rows = self.rows_of(item_id)
        if not rows:
            raise TraceError(f"the ledger of {self.label()} has no row for item {item_id}")
        parents = sorted({r.parent_id for r in rows if r.parent_id and r.parent_id != item_id})
        return LineageItem(item_id, list(dict.fromkeys(r.item_kind for r in rows)),
                           parents[0] if parents else None, rows, self.fate(rows, item_id))

    def chain(self, item_id: str) -> list[LineageItem]:
        """The item, its parent, ... up to the source (the item without a parent)."""
        chain = [self.item(item_id)]
        while chain[-1].parent_id is not None:
            parent = chain[-1].parent_id
            if any(i.item_id == parent for i in chain):
                raise TraceError(f"the ledger of {self.label()} has a parent cycle at {parent}")
            try:
                chain.append(self.item(parent))
            except TraceError as exc:
                raise TraceError(f"{exc}: it is the parent of {chain[-1].item_id}, so the chain "
                                 "to the source bytes is broken there") from exc
        return chain

    def has_ingest(self, item: LineageItem) -> bool:
        return bool(self.plan) and any(r.stage == self.plan[0] for r in item.rows)

    def source_identity(self, chain: list[LineageItem]) -> SourceIdentity:
        """The root's bytes as ingest recorded them, and the span the first child covers."""
        root = chain[-1]
        first = self.plan[0] if self.plan else "ingest"
        ingest = [r for r in root.rows if r.stage == first]
        main = next((r for r in ingest if r.decision == "keep"), ingest[0] if ingest else None)
        details = main.details if main else {}
        url = next((r.details["url"] for item in reversed(chain) for r in item.rows
                    if isinstance(r.details.get("url"), str)), None)
        return SourceIdentity(
            item_id=root.item_id,
            sha256=main.source_id if main and main.decision != "error" else None,
            path=details.get("path"), url=url, size_bytes=details.get("size_bytes"),
            span=_span(chain[-2] if len(chain) > 1 else None, root),
            ingest_decision=main.decision if main else None,
            copies=[r.details["path"] for r in ingest if r is not main and r.details.get("path")])


def _span(child: LineageItem | None, root: LineageItem) -> Span:
    """The span the root's direct child covers, from its first (expand-stage) row."""
    if child is None:
        return Span("whole_file")
    details = child.rows[0].details
    start_f, end_f = details.get("start_frame"), details.get("end_frame")
    start_s, end_s = details.get("start_s"), details.get("end_s")
    if start_s is None and start_f is not None:
        # older runs recorded frames only: seconds from the fps the probe measured
        fps = next((r.scores["fps"] for r in root.rows
                    if isinstance(r.scores.get("fps"), int | float) and r.scores["fps"] > 0),
                   None)
        if fps is not None and end_f is not None:
            start_s, end_s = start_f / fps, end_f / fps
    if start_s is not None and end_s is not None:
        return Span("time", float(start_s), float(end_s), start_f, end_f)
    if isinstance(details.get("index"), int):
        return Span("record", record_index=details["index"])
    return Span("unknown")


__all__ = [
    "MIN_PREFIX", "AmbiguousIdError", "BrokenBound", "Fate", "LineageItem", "RunLedger",
    "SourceIdentity", "Span", "StageRow", "TraceError", "broken_bounds", "check_prefix", "fmt",
    "fmt_bounds",
]
