"""`weft audit trace KEY` and `weft audit why ID`, answered from manifests and ledgers alone.

`trace_key` finds a sample in shard manifests, checks the JSON member's bytes in the
tar against the manifest's sha256 (read in place at its offset, never extracted), and
follows the ledger of the run that decided it from the sample's item up to the source
bytes. `why` says where an item stopped and by how much it missed the policy. Both
return dataclasses with `to_dict()` (for JSON) and have plain-text/markdown renderers.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from weft.pipelines.audit.lineage import (
    AmbiguousIdError,
    BrokenBound,
    LineageItem,
    RunLedger,
    SourceIdentity,
    StageRow,
    TraceError,
    broken_bounds,
    check_prefix,
    fmt,
    fmt_bounds,
)
from weft.pipelines.shard import MANIFEST_NAME

_LIST_CANDIDATES = 20


# ---- trace: a shard sample back to its source bytes ------------------------------------------
@dataclass
class ShardLocation:
    """Where a sample lies, and whether its JSON member still has the manifest's sha256."""

    shard_dir: str
    shard: str
    offset: int
    size: int
    members: list[str]
    json_sha256: str
    json_sha256_actual: str | None  # None when the member could not be read
    read_error: str | None = None

    @property
    def json_ok(self) -> bool:
        return self.json_sha256_actual == self.json_sha256

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "json_ok": self.json_ok}


@dataclass
class SampleTrace:
    """A shard sample, the ledger chain that let it in, and the source bytes it came from."""

    key: str
    kind: str
    dataset: str | None
    run_id: str | None
    run_dir: str
    pipeline: str | None
    ledger_item_id: str
    location: ShardLocation
    chain: list[LineageItem]  # the sample's item first, the source last
    source: SourceIdentity
    manifest_scores: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what an auditor must not ignore
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "location": self.location.to_dict(), "ok": self.ok}


def read_json_member(shard: Path, offset: int, key: str) -> bytes:
    """The `{key}.json` member's bytes from the tar header at `offset` (nothing extracted)."""
    with open(shard, "rb") as fh:
        fh.seek(offset)
        info = tarfile.TarInfo.frombuf(fh.read(tarfile.BLOCKSIZE), tarfile.ENCODING,
                                       "surrogateescape")
        if info.name != f"{key}.json":
            raise ValueError(f"the member at offset {offset} is {info.name!r}, not {key}.json")
        data = fh.read(info.size)
    if len(data) != info.size:
        raise ValueError(f"{key}.json is cut off: {len(data)} of {info.size} bytes")
    return data


def find_key(key: str, shard_dirs: list[Path]) -> tuple[Path, dict[str, Any], list[str]]:
    """(shard dir, manifest row, other dirs holding the key) for a key or unique prefix."""
    query = check_prefix(key, "sample key")
    looked: list[str] = []
    hits: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    for given in shard_dirs:
        path = Path(given)
        manifest = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
        if manifest.resolve() in seen:  # the same shard set named twice (or via a link)
            continue
        seen.add(manifest.resolve())
        if not manifest.is_file():
            looked.append(f"{path} (no {MANIFEST_NAME})")
            continue
        try:
            table = pq.read_table(manifest)
        except (OSError, pa.ArrowException) as exc:
            looked.append(f"{path} (unreadable {MANIFEST_NAME}: {exc})")
            continue
        looked.append(f"{path} ({table.num_rows} keys)")
        rows = table.filter(pc.starts_with(table["key"], query)).to_pylist()
        hits += [(manifest.parent, r) for r in rows]
    exact = [h for h in hits if h[1]["key"] == query]
    hits = exact or hits
    if not hits:
        raise TraceError(f"sample key {key} is in no manifest searched: "
                         f"{'; '.join(looked) or 'no shard directories given'}")
    keys = sorted({r["key"] for _, r in hits})
    if len(keys) > 1:
        raise AmbiguousIdError(f"sample key prefix {key} matches {len(keys)} keys: "
                               f"{', '.join(keys[:_LIST_CANDIDATES])}")
    return hits[0][0], hits[0][1], [str(d) for d, _ in hits[1:]]


def _locate(shard_dir: Path, row: dict[str, Any]) -> ShardLocation:
    location = ShardLocation(str(shard_dir), row["shard"], row["offset"], row["size"],
                             list(row["members"]), row["json_sha256"], None)
    try:
        data = read_json_member(shard_dir / row["shard"], row["offset"], row["key"])
        location.json_sha256_actual = hashlib.sha256(data).hexdigest()
    except (OSError, tarfile.TarError, ValueError) as exc:
        location.read_error = f"{type(exc).__name__}: {exc}"
    return location


def trace_key(key: str, shard_dirs: list[Path], *, check_source: bool = False) -> SampleTrace:
    """A sample's shard location, its ledger chain to the source and the source bytes.

    Raises TraceError (a LookupError) when the key, the run directory, or a ledger row
    the chain needs is missing; damage the trace can still describe (a json sha256 that
    no longer matches, a sample the ledger did not keep) goes to `problems`. With
    `check_source`, the file at the recorded path is hashed again.
    """
    shard_dir, row, also_in = find_key(key, shard_dirs)
    key = row["key"]
    location = _locate(shard_dir, row)
    where = f"sample {key} ({shard_dir / row['shard']})"
    if not row.get("run_dir"):
        raise TraceError(f"{where}: the manifest records no run_dir, so which ledger decided "
                         "it is unknown (the shard set was written without provenance)")
    if not row.get("ledger_item_id"):
        raise TraceError(f"{where}: the manifest records no ledger_item_id")
    try:
        ledger = RunLedger.open(row["run_dir"])
        chain = ledger.chain(row["ledger_item_id"])
    except TraceError as exc:
        raise TraceError(f"{where}, decided by run {row.get('run_id')}: {exc}") from exc
    source = ledger.source_identity(chain)
    trace = SampleTrace(
        key=key, kind=row["kind"], dataset=row.get("dataset"), run_id=row.get("run_id"),
        run_dir=str(ledger.root), pipeline=ledger.pipeline,
        ledger_item_id=row["ledger_item_id"], location=location, chain=chain, source=source,
        manifest_scores=json.loads(row["scores"]) if row.get("scores") else {})
    _check(trace, ledger, row, also_in)
    if check_source and source.check_bytes() != "match":
        trace.problems.append(f"source bytes: {source.bytes_check}")
    return trace


def _check(trace: SampleTrace, ledger: RunLedger, row: dict[str, Any],
           also_in: list[str]) -> None:
    """Fill the trace's problems and notes: what does not add up."""
    loc, problems, notes = trace.location, trace.problems, trace.notes
    if loc.read_error:
        problems.append(f"cannot read {trace.key}.json at offset {loc.offset} of {loc.shard}: "
                        f"{loc.read_error}")
    elif not loc.json_ok:
        problems.append(f"json sha256 mismatch: the manifest says {loc.json_sha256}, the bytes "
                        f"in {loc.shard} hash to {loc.json_sha256_actual} (changed after writing)")
    if row.get("run_id") and row["run_id"] != ledger.run_id:
        problems.append(f"the manifest names run {row['run_id']}, but {ledger.root} holds run "
                        f"{ledger.run_id}")
    other_runs = {r.run_id for item in trace.chain for r in item.rows} - {ledger.run_id}
    if other_runs:
        problems.append(f"ledger rows of the chain carry other run ids: {sorted(other_runs)}")
    sample, root = trace.chain[0], trace.chain[-1]
    if sample.fate.outcome != "kept":
        problems.append(f"the ledger says item {sample.item_id} was {sample.fate.describe()}, "
                        "yet it is in a shard")
    if not ledger.has_ingest(root):
        problems.append(f"the chain ends at {root.item_id}, which has no "
                        f"{ledger.plan[0] if ledger.plan else 'ingest'} row: its bytes are "
                        "not recorded")
    seen = {r.stage for item in trace.chain for r in item.rows}
    missing = [s for s in ledger.plan if s not in seen]
    if missing:
        problems.append(f"stages of the plan with no row in the chain: {missing}")
    if row.get("source_id") and trace.source.sha256 and row["source_id"] != trace.source.sha256:
        notes.append(f"the manifest's source_id {row['source_id']} is not the ingested file's "
                     f"sha256 {trace.source.sha256} (a record may carry its own upstream id)")
    sources = {r.source_id for r in sample.rows if r.source_id}
    if len(sources) > 1:
        notes.append(f"the sample item's rows disagree on source_id: {sorted(sources)}")
    if also_in:
        notes.append(f"the key is also listed in: {', '.join(also_in)}")


# ---- why: where an item stopped -----------------------------------------------------------------
@dataclass
class ItemVerdict:
    """Where one item stopped in one run (or that nothing stopped it), and where it came from."""

    run_dir: str
    run_id: str | None
    pipeline: str | None
    item_id: str
    kinds: list[str]
    outcome: str  # kept | dropped | errored | expanded | incomplete
    stage: str | None
    summary: str
    row: StageRow | None  # the row that stopped it: scores, thresholds, model, hashes
    broken: list[BrokenBound]
    duplicate_of: str | None
    passed: list[str]
    children: dict[str, int]
    ancestors: list[dict[str, Any]]  # parent first, source last
    source: SourceIdentity | None
    notes: list[str] = field(default_factory=list)

    @property
    def decision(self) -> str | None:
        return self.row.decision if self.row else None

    @property
    def reason(self) -> str | None:
        return self.row.reason if self.row else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.decision, "reason": self.reason}


def why(item_id: str, run_dirs: list[Path]) -> list[ItemVerdict]:
    """One verdict per run whose ledger holds the item (full id or a unique prefix).

    Raises ValueError for a malformed id, TraceError when no ledger has it, and
    AmbiguousIdError (listing the candidates) when the prefix names several items.
    """
    query = check_prefix(item_id)
    if not run_dirs:
        raise ValueError("give at least one run directory to look in")
    ledgers = [RunLedger.open(d) for d in run_dirs]
    found: dict[str, list[RunLedger]] = {}
    for ledger in ledgers:
        for full in ledger.ids_with_prefix(query):
            found.setdefault(full, []).append(ledger)
    if query in found:
        found = {query: found[query]}
    if not found:
        raise TraceError(f"no item id starts with {query} in the ledgers of "
                         f"{', '.join(str(led.root) for led in ledgers)}")
    if len(found) > 1:
        lines = [f"{full} ({', '.join(dict.fromkeys(r.item_kind for r in led[0].rows_of(full)))}"
                 f" in {led[0].root})" for full, led in sorted(found.items())]
        raise AmbiguousIdError(f"item id prefix {query} matches {len(found)} items; give more "
                               f"digits: {'; '.join(lines[:_LIST_CANDIDATES])}")
    ((full, holders),) = found.items()
    return [_verdict(ledger, full) for ledger in holders]


def _verdict(ledger: RunLedger, item_id: str) -> ItemVerdict:
    notes: list[str] = []
    try:
        chain = ledger.chain(item_id)
    except TraceError as exc:  # the item's own rows still answer; say what is missing above it
        chain = [ledger.item(item_id)]
        notes.append(str(exc))
    item, fate = chain[0], chain[0].fate
    row = fate.row
    source = ledger.source_identity(chain) if ledger.has_ingest(chain[-1]) else None
    if source is None:
        notes.append(f"the chain ends at {chain[-1].item_id} without an ingest row: the source "
                     "bytes are not recorded")
    if fate.outcome == "incomplete":
        notes.append("a kept item with no row at the next stage: the ledger is incomplete "
                     "(or the run has not finished)")
    duplicate = row.details.get("duplicate_of") if row else None
    return ItemVerdict(
        run_dir=str(ledger.root), run_id=ledger.run_id, pipeline=ledger.pipeline,
        item_id=item_id, kinds=item.kinds, outcome=fate.outcome, stage=fate.stage,
        summary=fate.describe(), row=row,
        broken=broken_bounds(row.scores, row.thresholds, row.reason) if row else [],
        duplicate_of=duplicate if isinstance(duplicate, str) else None,
        passed=fate.passed, children=fate.children,
        ancestors=[i.summary() for i in chain[1:]], source=source, notes=notes)


# ---- rendering ---------------------------------------------------------------------------------
def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _scalars(values: dict[str, Any], limit: int = 240, nulls: bool = False) -> str:
    """`k=v` for the short scalar (or short list) values of a dict: the ones worth reading."""
    parts = []
    for name, value in sorted(values.items()):
        if isinstance(value, list) and 0 < len(value) <= 4 and \
                all(isinstance(v, int | float | str) for v in value):
            parts.append(f"{name}=[{', '.join(fmt(v) for v in value)}]")
        elif isinstance(value, bool | int | float):
            parts.append(f"{name}={fmt(value)}")
        elif isinstance(value, str):
            parts.append(f"{name}={_cut(value, 80)}")
        elif value is None and nulls:
            parts.append(f"{name}=null")
    return _cut(" ".join(parts), limit)


def _row_lines(row: StageRow) -> list[str]:
    decision = row.decision if row.decision == "keep" else row.decision.upper()
    lines = [f"- {row.stage} v{row.stage_version} [{row.item_kind}]: {decision} ({row.reason})"]
    if row.scores:
        lines.append(f"  scores: {_scalars(row.scores, nulls=True)}")
    if row.thresholds:
        lines.append(f"  thresholds: {_cut(fmt_bounds(row.thresholds), 240)}")
    if row.decision != "keep":  # a keep row's policy may not have applied (e.g. outside_band)
        lines += [f"  broken: {b.describe()}" for b in
                  broken_bounds(row.scores, row.thresholds, row.reason)]
    if row.error_type or row.error_message:
        lines.append(f"  error: {row.error_type}: {_cut(row.error_message or '', 300)}")
    if row.model_id:
        prompt = f", prompt {row.prompt_hash}" if row.prompt_hash else ""
        lines.append(f"  model: {row.model_id} @ {row.model_revision}{prompt}")
    details = _scalars(row.details)
    if details:
        lines.append(f"  details: {details}")
    lines.append(f"  config {row.config_hash}, policy {row.policy_hash}, {row.code_version}")
    return lines


def _source_lines(source: SourceIdentity) -> list[str]:
    lines = [f"- sha256: {source.sha256 or '(none: ingest could not read the file)'}",
             f"- path: {source.path}"]
    if source.url:
        lines.append(f"- url: {source.url}")
    lines += [f"- size: {source.size_bytes} bytes", f"- span: {source.span.describe()}"]
    if source.copies:
        lines.append(f"- byte-identical copies ingest dropped: {', '.join(source.copies)}")
    if source.bytes_check is not None:
        lines.append(f"- bytes now: {source.bytes_check}")
    return lines


def render_trace(trace: SampleTrace) -> str:
    """The trace as markdown: location, run, source bytes, then every row of the chain."""
    loc = trace.location
    check = "matches the bytes in the tar" if loc.json_ok else \
        f"MISMATCH (the tar's bytes hash to {loc.json_sha256_actual})" if not loc.read_error \
        else f"UNREADABLE ({loc.read_error})"
    lines = [f"# trace of sample {trace.key}", "",
             f"{trace.kind}, dataset {trace.dataset}, ledger item {trace.ledger_item_id}", "",
             "## where it lies",
             f"- shard: {Path(loc.shard_dir) / loc.shard}, offset {loc.offset}, {loc.size} bytes",
             f"- members: {', '.join(loc.members)}",
             f"- json sha256 {loc.json_sha256}: {check}", "",
             "## who decided", f"- run {trace.run_id} ({trace.pipeline}) at {trace.run_dir}", "",
             "## source bytes", *_source_lines(trace.source), "",
             "## chain, sample to source"]
    for n, item in enumerate(trace.chain, start=1):
        parent = f", parent {item.parent_id}" if item.parent_id else ""
        lines += ["", f"### {n}. {'/'.join(item.kinds)} {item.item_id}{parent}",
                  f"{item.fate.describe()}", ""]
        for row in item.rows:
            lines += _row_lines(row)
    for title, entries in (("problems", trace.problems), ("notes", trace.notes)):
        if entries:
            lines += ["", f"## {title}", *[f"- {e}" for e in entries]]
    if not trace.problems:
        lines += ["", "no problems: the shard bytes match and the chain reaches the source"]
    return "\n".join(lines) + "\n"


def render_why(verdicts: list[ItemVerdict]) -> str:
    """Each verdict as markdown: the stopping row and its numbers, then where it came from."""
    out: list[str] = []
    for v in verdicts:
        lines = [f"# why {v.item_id} ({'/'.join(v.kinds)})",
                 f"run {v.run_id} ({v.pipeline}) at {v.run_dir}", "", f"**{v.summary}**"]
        if v.row is not None:
            lines += ["", *_row_lines(v.row)]
        if v.duplicate_of:
            lines.append(f"- duplicate of: {v.duplicate_of}")
        lines += ["", f"kept at: {' -> '.join(v.passed) or '(no stage)'}"]
        if v.ancestors:
            lines += ["", "## came from"]
            lines += [f"- {'/'.join(a['kinds'])} {a['item_id']}: {a['fate']}" for a in v.ancestors]
        if v.source is not None:
            lines += ["", "## source bytes", *_source_lines(v.source)]
        if v.notes:
            lines += ["", "## notes", *[f"- {n}" for n in v.notes]]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


__all__ = [
    "AmbiguousIdError", "ItemVerdict", "SampleTrace", "ShardLocation", "TraceError",
    "find_key", "read_json_member", "render_trace", "render_why", "trace_key", "why",
]
