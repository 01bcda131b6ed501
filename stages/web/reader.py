"""Read OmniCorpus-style records (schemas/web.py) from parquet or jsonl files.

Each record is validated on its own: a bad one (not JSON, not an object, a
wrong field, an item of neither type) becomes a RecordError with a reason and
the rest of the file is still read. Only a file that cannot be opened at all
is a file-level error; a parquet file that breaks part way yields its good
records and one error for the unreadable rest.

Accepted: `.parquet`/`.pq`, `.jsonl`/`.ndjson` (optionally `.gz`). Records
may use the `items` list or OmniCorpus's aligned `texts`/`images` lists.

Reason codes: missing_file, unsupported_format, unreadable_file, empty_file (file level);
invalid_json, record_too_large, invalid_record, duplicate_doc_id (per record).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from weft.schemas.ids import hash_of, sha256_file, stable_json
from weft.schemas.web import WEB_DOC_FIELDS, RecordValidationError, validate_record
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class RecordError:
    """A record that could not be read: where it was, why, and its first characters."""

    index: int  # 0-based record position (the jsonl line number - 1, or the parquet row)
    reason: str
    message: str
    excerpt: str | None = None


@dataclass
class ReadResult:
    """Everything read from one file."""

    path: str
    source_id: str
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)


def file_format(path: str | Path) -> Literal["parquet", "jsonl"]:
    """The format a file's name announces; ItemError(unsupported_format) otherwise."""
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    if name.endswith(PARQUET_SUFFIXES):
        if str(path).lower().endswith(".gz"):
            raise ItemError("unsupported_format", f"{Path(path).name}: gzip around parquet")
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise ItemError("unsupported_format", f"{Path(path).name}: expected one of "
                    f"{PARQUET_SUFFIXES + JSONL_SUFFIXES} (optionally .gz for jsonl)")


def _validated(obj: Any, index: int, source_id: str,
               unknown_fields: str) -> dict[str, Any] | RecordError:
    try:
        return validate_record(obj, source_id=source_id, unknown_fields=unknown_fields)
    except RecordValidationError as exc:
        try:
            excerpt = stable_json(obj)[:200]
        except (TypeError, ValueError):
            excerpt = repr(obj)[:200]
        return RecordError(index, exc.reason, str(exc)[:500], excerpt)


def _iter_jsonl(fh: IO[bytes], source_id: str, max_record_bytes: int,
                unknown_fields: str) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    index = -1
    while True:
        line = fh.readline(max_record_bytes + 1)
        if not line:
            return
        index += 1
        if len(line) > max_record_bytes and not line.endswith(b"\n"):
            # Skip the rest of the oversized line without holding it in memory.
            while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield index, RecordError(index, "record_too_large", f"line {index + 1} is over "
                                     f"{max_record_bytes} bytes", None)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield index, RecordError(index, "invalid_json", f"line {index + 1} is not UTF-8: "
                                     f"{exc}", line[:200].decode("utf-8", "replace"))
            continue
        except json.JSONDecodeError as exc:
            yield index, RecordError(index, "invalid_json", f"line {index + 1}: {exc}",
                                     line[:200].decode("utf-8", "replace"))
            continue
        yield index, _validated(obj, index, source_id, unknown_fields)


def _iter_parquet(path: Path, source_id: str, batch_size: int,
                  unknown_fields: str) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ItemError("unreadable_file", f"{path.name} is not a readable parquet file: "
                        f"{exc}") from exc
    index = 0
    batches = pf.iter_batches(batch_size=batch_size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            yield index, RecordError(index, "unreadable_file", f"{path.name}: rows from "
                                     f"{index} on cannot be read: {exc}"[:500], None)
            return
        for row in batch.to_pylist():
            yield index, _validated(row, index, source_id, unknown_fields)
            index += 1


def iter_records(path: str | Path, *, source_id: str | None = None,
                 max_record_bytes: int = 64 * 1024 * 1024, batch_size: int = 256,
                 unknown_fields: str = "metadata",
                 ) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    """(index, record or RecordError) for every record of a file, in file order.

    File-level failures (missing, unsupported, unreadable) raise ItemError.
    `source_id` defaults to the file's sha256 and fills records that lack one.
    """
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise ItemError("missing_file", f"{path} does not exist or is not a file")
    sid = source_id or sha256_file(path)
    if fmt == "parquet":
        yield from _iter_parquet(path, sid, batch_size, unknown_fields)
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            yield from _iter_jsonl(fh, sid, max_record_bytes, unknown_fields)
    except (OSError, EOFError) as exc:  # a broken gzip stream
        raise ItemError("unreadable_file", f"{path.name}: {exc}") from exc


def read_records(path: str | Path, **kwargs: Any) -> ReadResult:
    """All of a file's records and errors (see iter_records for the arguments)."""
    path = Path(path)
    sid = kwargs.pop("source_id", None) or (sha256_file(path) if path.is_file() else "")
    result = ReadResult(path=str(path), source_id=sid)
    for _, rec in iter_records(path, source_id=sid or None, **kwargs):
        (result.errors if isinstance(rec, RecordError) else result.records).append(rec)
    return result


class ReadRecordsConfig(StageConfig):
    """How records are read; every record, good or bad, gets a ledger row."""

    max_record_bytes: int = Field(64 * 1024 * 1024, gt=0, description="longer jsonl lines "
                                  "are record_too_large")
    batch_size: int = Field(256, ge=1, description="parquet rows decoded at a time")
    unknown_fields: Literal["metadata", "error"] = Field(
        "metadata", description="top-level fields outside the schema: kept in metadata, "
                                "or invalid_record")
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=1))


class ReadRecordsStage(Stage):
    """Expand one records file into one row per record (bad records as error rows)."""

    name: ClassVar[str] = "read_records"
    version: ClassVar[str] = "1"
    kind = "expand"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = ReadRecordsConfig
    input_columns: ClassVar[tuple[str, ...]] = ("path",)
    output_fields: ClassVar[list[pa.Field]] = [
        pa.field("item_id", pa.string()), pa.field("parent_id", pa.string()),
        pa.field("item_kind", pa.string()), *WEB_DOC_FIELDS]
    heavy_columns: ClassVar[tuple[str, ...]] = ("items",)
    config: ReadRecordsConfig

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path = Path(row["path"])
        file_id = row.get("source_id") or row["item_id"]
        outcomes: list[Outcome] = []
        seen: set[str] = set()
        for index, rec in iter_records(path, source_id=file_id,
                                       max_record_bytes=self.config.max_record_bytes,
                                       batch_size=self.config.batch_size,
                                       unknown_fields=self.config.unknown_fields):
            base = {"parent_id": row["item_id"], "source_id": file_id,
                    "item_kind": self.item_kind}
            if isinstance(rec, RecordError):
                item_id = hash_of("web_record", file_id, index, length=64)
                entry = self.entry(base, {}, item_id=item_id, parent_id=row["item_id"],
                                   details={"index": index, "excerpt": rec.excerpt},
                                   override=("error", rec.reason))
                entry.error_type = "RecordError"
                entry.error_message = rec.message
                outcomes.append(Outcome(entry, {**base, "item_id": item_id}))
                continue
            child = {**base, **{k: rec[k] for k in ("doc_id", "url", "path", "title", "lang",
                                                     "items")},
                     "item_id": rec["doc_id"], "metadata": stable_json(rec["metadata"])}
            child["source_id"] = rec["source_id"] or file_id
            n_text = sum(1 for i in rec["items"] if i["type"] == "text")
            scores = {"n_text_items": n_text, "n_images": len(rec["items"]) - n_text}
            override, item_id = None, rec["doc_id"]
            details = {"index": index, "url": rec["url"]}  # where the record says it came from
            if rec["doc_id"] in seen:  # a second copy gets its own id and is dropped, visibly
                override = ("drop", "duplicate_doc_id")
                item_id = child["item_id"] = hash_of("web_record", file_id, index, length=64)
                details["duplicate_of"] = rec["doc_id"]
            seen.add(rec["doc_id"])
            entry = self.entry({**base, "source_id": file_id}, scores, item_id=item_id,
                               parent_id=row["item_id"], details=details, override=override)
            outcomes.append(Outcome(entry, child))
        if not outcomes:
            raise ItemError("empty_file", f"{path.name} holds no records")
        return outcomes
