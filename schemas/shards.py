"""The one training-sample format the shard writer emits and the trainer reads (version 1).

A sample is a group of WebDataset tar members that share one key:

    {key}.json        the sample record (UTF-8 JSON, sorted keys, no whitespace):
        key             str   the sample key (below)
        kind            str   one of KINDS (what the trainer's sequence plan makes of it):
                                video_clip       frame, caption, frame, caption, frame ...
                                web_doc          title / text / caption, images between
                                text_to_image    prompt, image
                                image_edit       image (source), instruction, image (target)
                                vqa              image(s), then question / answer turns
                                reasoning_t2i    prompt, reasoning, image
                                reasoning_edit   image (source), instruction, reasoning,
                                                 image (target)
        source_id       str   the source the sample came from
        parent_ids      list  ids of what the sample was derived from
        ledger_item_id  str   the item id the ledger recorded decisions under
        sequence        list  ordered items, each one of
                                {"type": "text", "role": str, "text": str,
                                 "from_s"?: float, "to_s"?: float}
                                {"type": "image", "member": "<key>.<n>.<ext>", "alt"?: str}
                                {"type": "video_frame", "member": "<key>.<n>.<ext>",
                                 "time_s": float}
        scores          dict  str -> finite number or null (quality, language ...); may be
                              empty
        licence         str?  the source's licence when known
    {key}.{n}.{ext}   one image per image / video-frame item, n = 0, 1, ... in sequence
                      order, ext one of jpg, png, webp

Text roles (TEXT_ROLES) say what a text item is for; the trainer's plan decides loss and
condition dropout from them:
    prompt       what to generate (a condition: dropped for classifier-free guidance)
    instruction  what to change in the source image (a condition, dropped alike)
    reasoning    the model's own thinking before it generates (trained on)
    question     asked about the image(s) (context, no loss)
    answer       the reply to the question before it (trained on)
    caption      describes what comes next (a video transition, or the image after it)
    title        a document's title
    text         body text of a document
The record validator checks that a role is a string; `weft.train.plans` refuses a role
outside TEXT_ROLES, or one its kind does not use.

Keys are content-addressed lowercase hex (16 to 64 digits): dot-free, so WebDataset
splits `{key}.0.jpg` into key and suffix `0.jpg`. Member names never hold a path
separator, `..`, or an absolute path (`safe_member_name`).

The shard set's manifest (`manifest.parquet`, `MANIFEST_SCHEMA`) has one row per
sample: where it lies (shard, byte offset of its first tar header, bytes it spans),
its members, its ledger and source ids, the sha256 of its JSON member, and where its
decisions are recorded (dataset, run id and run directory: `weft audit trace KEY`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pyarrow as pa

SHARD_FORMAT_VERSION = 1
KINDS = ("video_clip", "web_doc", "text_to_image", "image_edit", "vqa", "reasoning_t2i",
         "reasoning_edit")
TEXT_ROLES = ("prompt", "instruction", "reasoning", "question", "answer", "caption",
              "title", "text")
IMAGE_EXTS = ("jpg", "png", "webp")
SEQUENCE_TYPES = ("text", "image", "video_frame")
INDEX_KIND = "wids-shard-index-v1"

_KEY = re.compile(r"^[0-9a-f]{16,64}$")
_SUFFIX = re.compile(r"^(?:json|(?:0|[1-9][0-9]{0,5})\.(?:jpg|png|webp))$")
_TEXT_KEYS = {"type", "role", "text", "from_s", "to_s"}
_IMAGE_KEYS = {"type", "member", "alt"}
_FRAME_KEYS = {"type", "member", "time_s"}
_RECORD_KEYS = {"key", "kind", "source_id", "parent_ids", "ledger_item_id", "sequence",
                "scores", "licence"}

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # file name inside the shard dir
        pa.field("shard_index", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),  # first tar header of the sample
        pa.field("size", pa.int64(), nullable=False),  # bytes of all its headers and data
        pa.field("members", pa.list_(pa.string()), nullable=False),  # in tar order
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source_id", pa.string()),
        pa.field("ledger_item_id", pa.string()),
        pa.field("json_sha256", pa.string(), nullable=False),
        pa.field("scores", pa.string()),  # JSON object
        pa.field("dataset", pa.string()),  # the mixture source it was written for
        pa.field("run_id", pa.string()),  # the curation run whose ledger decided it
        pa.field("run_dir", pa.string()),  # where that run's ledger lies (absolute)
    ],
    metadata={"weft.table": "shard_manifest",
              "weft.schema_version": str(SHARD_FORMAT_VERSION)},
)


class ShardFormatError(ValueError):
    """A key, member name or sample record outside the shard format."""


def check_key(key: Any) -> str:
    """The key itself when it is 16-64 lowercase hex digits (dot-free); else ShardFormatError."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ShardFormatError(f"sample key must be 16-64 lowercase hex digits, got {key!r}")
    return key


def safe_member_name(name: Any, key: str | None = None) -> str:
    """The name itself when it is a safe member `{key}.json` / `{key}.{n}.{ext}`.

    Refuses absolute paths, `..`, path separators, NUL, a key that is not lowercase
    hex (so no dots in keys) and suffixes outside the format. With `key`, the name must
    also belong to that key.
    """
    if not isinstance(name, str) or not name:
        raise ShardFormatError(f"member name must be a non-empty string, got {name!r}")
    if name.startswith("/") or "/" in name or "\\" in name or "\0" in name or ".." in name:
        raise ShardFormatError(f"unsafe member name {name!r}")
    stem, dot, suffix = name.partition(".")
    if not dot:
        raise ShardFormatError(f"member name {name!r} has no suffix")
    check_key(stem)
    if key is not None and stem != key:
        raise ShardFormatError(f"member {name!r} does not belong to key {key!r}")
    if not _SUFFIX.match(suffix):
        raise ShardFormatError(f"member {name!r}: suffix must be 'json' or '<n>.<ext>' with "
                               f"ext in {IMAGE_EXTS}")
    return name


def image_member(key: str, n: int, ext: str) -> str:
    """The member name of a sample's n-th image."""
    if ext not in IMAGE_EXTS:
        raise ShardFormatError(f"image extension must be one of {IMAGE_EXTS}, got {ext!r}")
    return safe_member_name(f"{key}.{n}.{ext}", key)


def json_member(key: str) -> str:
    return safe_member_name(f"{key}.json", key)


def _number(value: Any) -> bool:
    """A finite int or float (JSON has no NaN or infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def validate_record(record: Any, members: set[str] | None = None) -> list[str]:
    """The sample record's image members in sequence order; ShardFormatError when invalid.

    With `members` (the sample's image member names), every image item must name one
    of them and every one of them must be named exactly once.
    """
    if not isinstance(record, dict):
        raise ShardFormatError(f"sample record must be an object, got {type(record).__name__}")
    missing = {"key", "kind", "sequence"} - record.keys()
    if missing:
        raise ShardFormatError(f"sample record misses {sorted(missing)}")
    unknown = record.keys() - _RECORD_KEYS
    if unknown:
        raise ShardFormatError(f"sample record has unknown fields {sorted(unknown)}")
    key = check_key(record["key"])
    if record["kind"] not in KINDS:
        raise ShardFormatError(f"kind must be one of {KINDS}, got {record['kind']!r}")
    for field in ("source_id", "ledger_item_id", "licence"):
        if record.get(field) is not None and not isinstance(record[field], str):
            raise ShardFormatError(f"{field} must be a string or null")
    parents = record.get("parent_ids") or []
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ShardFormatError("parent_ids must be a list of strings")
    scores = record.get("scores") or {}
    if not isinstance(scores, dict) or not all(
            isinstance(k, str) and (v is None or _number(v)) for k, v in scores.items()):
        raise ShardFormatError("scores must map strings to finite numbers (or null)")
    sequence = record["sequence"]
    if not isinstance(sequence, list) or not sequence:
        raise ShardFormatError("sequence must be a non-empty list")
    named: list[str] = []
    for i, item in enumerate(sequence):
        where = f"sequence[{i}]"
        if not isinstance(item, dict) or item.get("type") not in SEQUENCE_TYPES:
            raise ShardFormatError(f"{where} must be an object with type in {SEQUENCE_TYPES}")
        kind = item["type"]
        allowed = {"text": _TEXT_KEYS, "image": _IMAGE_KEYS, "video_frame": _FRAME_KEYS}[kind]
        if item.keys() - allowed:
            raise ShardFormatError(f"{where} ({kind}) has unknown fields "
                                   f"{sorted(item.keys() - allowed)}")
        if kind == "text":
            if not isinstance(item.get("text"), str) or not isinstance(item.get("role"), str):
                raise ShardFormatError(f"{where}: a text item needs string text and role")
            for f in ("from_s", "to_s"):
                if item.get(f) is not None and not _number(item[f]):
                    raise ShardFormatError(f"{where}.{f} must be a number")
            continue
        member = safe_member_name(item.get("member"), key)
        if member.endswith(".json"):
            raise ShardFormatError(f"{where}: an image member cannot be the json member")
        if kind == "video_frame" and not _number(item.get("time_s")):
            raise ShardFormatError(f"{where}: a video_frame needs a numeric time_s")
        if kind == "image" and item.get("alt") is not None and not isinstance(item["alt"], str):
            raise ShardFormatError(f"{where}.alt must be a string or null")
        named.append(member)
    if len(set(named)) != len(named):
        raise ShardFormatError("sequence names an image member twice")
    if members is not None and set(named) != set(members):
        raise ShardFormatError(f"image members {sorted(members)} do not match the sequence's "
                               f"{sorted(named)}")
    return named
