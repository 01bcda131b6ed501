"""Web documents: OmniCorpus-style interleaved records (text and images in reading order).

Version 1. A document is one dict (python) or one row (arrow):

    doc_id     str   content-addressed id: the sha256 of the source bytes when the
                     record was converted from one page (then doc_id == source_id),
                     else `canonical_doc_id(record)`, the sha256 of the canonical JSON
                     of (url, path, title, lang, items)
    source_id  str   id of what the record came from: the page's sha256, or the
                     sha256 of the parquet/jsonl file it was read from
    url        str?  http(s) address of the page        } at least one of the two
    path       str?  local path of the page             }
    title      str?  <title> (or the first <h1>)
    lang       str?  declared language (<html lang>), lowercased; not detected here
    items      list  ordered; each item is one of
                       {"type": "text",  "text": str}
                       {"type": "image", "src": str?, "alt": str?, "path": str?, "url": str?}
                     src is the reference as written in the page, alt is null when the
                     page gave none ("" when it gave an empty one), path is the local
                     file it resolves to, url the absolute http(s) address; an image
                     needs at least one of src, path, url
    metadata   dict  anything else (encoding facts, converter version, the
                     original OmniCorpus fields); JSON text in arrow, so any shape fits

In arrow, `items` is a list of structs (type, text, src, alt, path, url) whose
fields are all nullable: a text item has only `text`, an image item only the
four image fields. `record_to_row` / `row_to_record` go between the two forms;
`validate_record` checks a dict from any source and returns its canonical form.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from weft.schemas.ids import stable_json

WEB_SCHEMA_VERSION = 1

TEXT_FIELDS = ("text",)
IMAGE_FIELDS = ("src", "alt", "path", "url")
ITEM_TYPES = ("text", "image")

ITEM_TYPE = pa.struct([
    pa.field("type", pa.string()),
    pa.field("text", pa.string()),
    pa.field("src", pa.string()),
    pa.field("alt", pa.string()),
    pa.field("path", pa.string()),
    pa.field("url", pa.string()),
])

# The record's own columns (what a converter or reader adds to a row).
WEB_DOC_FIELDS = [
    pa.field("doc_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("url", pa.string()),
    pa.field("path", pa.string()),
    pa.field("title", pa.string()),
    pa.field("lang", pa.string()),
    pa.field("items", pa.list_(ITEM_TYPE)),
    pa.field("metadata", pa.string()),  # JSON object
]

WEB_DOC_SCHEMA = pa.schema(
    WEB_DOC_FIELDS,
    metadata={"weft.table": "web_docs", "weft.schema_version": str(WEB_SCHEMA_VERSION)},
)

RECORD_KEYS = tuple(f.name for f in WEB_DOC_FIELDS)
_ID = re.compile(r"^[0-9a-f]{64}$")


class RecordValidationError(ValueError):
    """A record that does not fit the schema; `reason` is a ledger reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def text_item(text: str) -> dict[str, Any]:
    """A text item in canonical form."""
    return {"type": "text", "text": text}


def image_item(src: str | None, alt: str | None = None, path: str | None = None,
               url: str | None = None) -> dict[str, Any]:
    """An image item in canonical form."""
    return {"type": "image", "src": src, "alt": alt, "path": path, "url": url}


def items_text(items: Iterable[dict[str, Any]] | None) -> str:
    """A document's text: its non-empty text items in order, joined by blank lines."""
    return "\n\n".join(i["text"] for i in items or [] if i.get("type") == "text" and i.get("text"))


def canonical_doc_id(record: dict[str, Any]) -> str:
    """sha256 of the record's content (url, path, title, lang, items), not of its metadata.

    Metadata (fetch times, converter facts) may change without the document changing.
    """
    content = {k: record.get(k) for k in ("url", "path", "title", "lang")}
    content["items"] = [_canonical_item(dict(i), n) for n, i in enumerate(record["items"])]
    return hashlib.sha256(stable_json(content).encode()).hexdigest()


def _optional_str(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RecordValidationError("invalid_record", f"{where} must be a string or null, "
                                f"got {type(value).__name__}")


def _canonical_item(item: Any, index: int) -> dict[str, Any]:
    """One item checked and in canonical form; nulls of the other type's fields are allowed."""
    where = f"items[{index}]"
    if not isinstance(item, dict):
        raise RecordValidationError("invalid_record", f"{where} must be an object, "
                                    f"got {type(item).__name__}")
    kind = item.get("type")
    if kind not in ITEM_TYPES:
        raise RecordValidationError("invalid_record", f"{where}.type must be one of "
                                    f"{ITEM_TYPES}, got {kind!r}")
    own = TEXT_FIELDS if kind == "text" else IMAGE_FIELDS
    stray = [k for k, v in item.items() if k != "type" and k not in own and v is not None]
    unknown = [k for k in stray if k not in TEXT_FIELDS + IMAGE_FIELDS]
    if unknown:
        raise RecordValidationError("invalid_record", f"{where} has unknown fields {unknown}")
    if stray:
        raise RecordValidationError("invalid_record", f"{where} is a {kind} item but sets "
                                    f"{stray}")
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise RecordValidationError("invalid_record", f"{where}.text must be a string, "
                                        f"got {type(text).__name__}")
        return text_item(text)
    out = image_item(*(_optional_str(item.get(k), f"{where}.{k}") for k in IMAGE_FIELDS))
    if not (out["src"] or out["path"] or out["url"]):
        raise RecordValidationError("invalid_record", f"{where} is an image with none of "
                                    "src, path, url")
    return out


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise RecordValidationError("invalid_record", f"metadata is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RecordValidationError("invalid_record", "metadata must be an object, got "
                                    f"{type(value).__name__}")
    try:
        stable_json(value)
    except (TypeError, ValueError) as exc:
        raise RecordValidationError("invalid_record", f"metadata is not JSON-able: {exc}") from exc
    return value


def items_from_parallel_lists(texts: list[Any], images: list[Any]) -> list[dict[str, Any]]:
    """OmniCorpus's native layout (aligned `texts` / `images`, one null per slot) as items.

    An image slot may be a URL string or a dict with url/src/alt/path.
    """
    if len(texts) != len(images):
        raise RecordValidationError("invalid_record", f"texts ({len(texts)}) and images "
                                    f"({len(images)}) are not aligned")
    items: list[dict[str, Any]] = []
    for n, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            raise RecordValidationError("invalid_record", f"slot {n} must hold exactly one of "
                                        "a text and an image")
        if text is not None:
            items.append({"type": "text", "text": text})
        elif isinstance(image, str):
            url = image if image.startswith(("http://", "https://")) else None
            items.append(image_item(image, None, None, url))
        elif isinstance(image, dict):
            items.append({"type": "image", **{k: image.get(k) for k in IMAGE_FIELDS}})
        else:
            raise RecordValidationError("invalid_record", f"slot {n}: image must be a string "
                                        f"or an object, got {type(image).__name__}")
    return items


def validate_record(obj: Any, *, source_id: str | None = None,
                    unknown_fields: str = "error") -> dict[str, Any]:
    """Check a record from any source and return it in canonical form.

    A missing `doc_id`, or one that is not a 64-hex-digit id, is replaced by
    `canonical_doc_id` (the original kept in metadata["original_doc_id"]), so ids
    stay content-addressed and dot-free. `source_id` fills a missing source id.
    Top-level fields the schema does not know are an error, or with
    unknown_fields="metadata" are moved into metadata (a dataset's extra columns).
    Raises RecordValidationError(reason="invalid_record") with the first problem.
    """
    if not isinstance(obj, dict):
        raise RecordValidationError("invalid_record", "a record must be an object, got "
                                    f"{type(obj).__name__}")
    if unknown_fields not in ("error", "metadata"):
        raise ValueError(f"unknown_fields must be 'error' or 'metadata', got {unknown_fields!r}")
    raw = dict(obj)
    if unknown_fields == "metadata":
        extra = {k: raw.pop(k) for k in list(raw)
                 if k not in RECORD_KEYS and k not in ("texts", "images")}
        if extra:
            raw["metadata"] = {**extra, **_metadata(raw.get("metadata"))}
    if "items" not in raw and "texts" in raw and "images" in raw:
        if not isinstance(raw["texts"], list) or not isinstance(raw["images"], list):
            raise RecordValidationError("invalid_record", "texts and images must be lists")
        raw["items"] = items_from_parallel_lists(raw.pop("texts"), raw.pop("images"))
    unknown = sorted(k for k in raw if k not in RECORD_KEYS)
    if unknown:
        raise RecordValidationError("invalid_record", f"unknown fields {unknown}; a record has "
                                    f"{list(RECORD_KEYS)}")
    items = raw.get("items")
    if not isinstance(items, list):
        raise RecordValidationError("invalid_record", "items must be a list, got "
                                    f"{type(items).__name__}")
    out: dict[str, Any] = {k: _optional_str(raw.get(k), k)
                           for k in ("doc_id", "source_id", "url", "path", "title", "lang")}
    if not (out["url"] or out["path"]):
        raise RecordValidationError("invalid_record", "a record needs a url or a path")
    out["items"] = [_canonical_item(item, n) for n, item in enumerate(items)]
    out["metadata"] = _metadata(raw.get("metadata"))
    if out["doc_id"] is None or not _ID.match(out["doc_id"]):
        if out["doc_id"] is not None:
            out["metadata"] = {**out["metadata"], "original_doc_id": out["doc_id"]}
        out["doc_id"] = canonical_doc_id(out)
    if out["source_id"] is None:
        out["source_id"] = source_id
    return out


def record_to_row(record: dict[str, Any]) -> dict[str, Any]:
    """A canonical record as an arrow row: every item struct full, metadata as JSON."""
    row = {k: record.get(k) for k in RECORD_KEYS}
    row["items"] = [{f.name: item.get(f.name) for f in ITEM_TYPE} for item in record["items"]]
    row["metadata"] = stable_json(record.get("metadata") or {})
    return row


def row_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """An arrow row back as a canonical record (the inverse of record_to_row)."""
    record = {k: row.get(k) for k in RECORD_KEYS}
    record["items"] = [_canonical_item(item, n) for n, item in enumerate(row.get("items") or [])]
    record["metadata"] = _metadata(row.get("metadata"))
    return record


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    """Records as a table with WEB_DOC_SCHEMA."""
    return pa.Table.from_pylist([record_to_row(r) for r in records], schema=WEB_DOC_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict[str, Any]]:
    """A WEB_DOC_SCHEMA table (or one with at least its columns) as records."""
    return [row_to_record(row) for row in table.select(list(RECORD_KEYS)).to_pylist()]
