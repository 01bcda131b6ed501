"""A small, deterministic sample of kept and dropped items, with inline thumbnails.

An auditor trusts a funnel more after looking at what it kept and threw away.
Thumbnails come from what the run stored (video key frames, web image bytes),
are downscaled here and inlined as data: URIs, so the report stays one file.
"""

from __future__ import annotations

import base64
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from weft.schemas.ledger import StagePlan

THUMB_SIDE = 160
MAX_THUMBS = 2
MAX_SOURCE_PIXELS = 64_000_000  # larger stored images are not decoded for a thumbnail
TEXT_CHARS = 240
TABLE_COLUMNS = ("item_id", "title", "url", "path", "text", "captions", "items",
                 "image_bytes", "keyframe_paths")


@dataclass
class SampleItem:
    """One item as the report shows it: its last decision, its numbers, its pictures."""

    item_id: str
    stage: str
    decision: str
    reason: str
    scores: dict[str, Any]
    label: str | None = None
    text: str | None = None
    error: str | None = None
    thumbs: list[tuple[str, str]] = field(default_factory=list)  # (data URI, alt text)


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """A JPEG data: URI at most `side` px; None for bytes that do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                return None
            image.draft("RGB", (side, side))
            rgba = image.convert("RGBA")
        rgba.thumbnail((side, side))
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        buf = io.BytesIO()
        flat.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pick(rows: list[dict[str, Any]], plan: list[StagePlan],
         n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped) ledger rows: ids sorted; dropped ones spread over (stage, reason).

    Kept means kept by the last stage. Every drop or error row ends an item's
    path, so each is a candidate (an exact duplicate shares its original's id).
    """
    final = plan[-1].name if plan else None
    kept = sorted((r for r in rows if r["stage"] == final and r["decision"] == "keep"),
                  key=lambda r: r["item_id"])[:n]
    order = {s.name: k for k, s in enumerate(plan)}
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["decision"] != "keep":
            groups[(order.get(row["stage"], len(order)), row["decision"], row["reason"])] \
                .append(row)
    queues = [sorted(groups[key], key=lambda r: r["item_id"]) for key in sorted(groups)]
    dropped: list[dict[str, Any]] = []
    while len(dropped) < n and any(queues):
        for queue in queues:
            if queue and len(dropped) < n:
                dropped.append(queue.pop(0))
    return kept, dropped


def _stored_rows(run_dir: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    """item id -> the first stored row (outputs first, then partitions) that has it."""
    files = sorted((run_dir / "outputs").glob("*.parquet")) + \
        sorted((run_dir / "partitions").glob("*/*.parquet"))
    out: dict[str, dict[str, Any]] = {}
    if not ids:
        return out
    for path in files:
        try:
            names = pq.read_schema(path).names
            if "item_id" not in names:
                continue
            table = pq.read_table(path, columns=[c for c in TABLE_COLUMNS if c in names],
                                  filters=[("item_id", "in", sorted(ids))])
        except (OSError, ValueError):
            continue
        for row in table.to_pylist():
            merged = out.setdefault(row["item_id"], {})
            for key, value in row.items():
                if value not in (None, [], "") and key not in merged:
                    merged[key] = value
    return out


def _thumbs(run_dir: Path, item_id: str, stored: dict[str, Any]) -> list[tuple[str, str]]:
    """Up to MAX_THUMBS (data URI, alt) from key frames or stored image bytes."""
    found: list[tuple[bytes, str]] = []
    frames = stored.get("keyframe_paths") or sorted(
        (p.relative_to(run_dir).as_posix() for p in (run_dir / "keyframes" / item_id).glob(
            "*.jpg")), key=lambda p: (len(p), p))
    for rel in frames[:MAX_THUMBS]:
        path = run_dir / rel
        if path.is_file() and path.resolve().is_relative_to(run_dir.resolve()):
            found.append((path.read_bytes(), f"key frame {Path(rel).stem}"))
    if not found:
        alts = [i.get("alt") or i.get("src") or "" for i in stored.get("items") or []
                if isinstance(i, dict) and i.get("type") == "image"]
        blobs = stored.get("image_bytes") or []
        for k, blob in enumerate(blobs):
            if blob and len(found) < MAX_THUMBS:
                found.append((blob, alts[k] if k < len(alts) else f"image {k}"))
    out = []
    for data, alt in found:
        uri = thumbnail(data)
        if uri:
            out.append((uri, alt))
    return out


def _label(row: dict[str, Any], stored: dict[str, Any], paths: dict[str, str]) -> str | None:
    """A human handle: the stored title, the row's own input path, a stored url or path,
    else the path its parent was ingested from."""
    own = json.loads(row["details"]).get("path") if '"path"' in (row["details"] or "") else None
    for value in (stored.get("title"), own, stored.get("url"), stored.get("path"),
                  paths.get(row["item_id"]), paths.get(row.get("parent_id") or "")):
        if isinstance(value, str) and value:
            return value
    return None


def _text(stored: dict[str, Any]) -> str | None:
    captions = stored.get("captions")
    text = captions[0] if captions else stored.get("text")
    if not text:
        return None
    return text[:TEXT_CHARS] + ("…" if len(text) > TEXT_CHARS else "")


def sample_items(run_dir: Path, rows: list[dict[str, Any]], plan: list[StagePlan],
                 n: int = 12) -> tuple[list[SampleItem], list[SampleItem]]:
    """(kept, dropped) sample items with labels, a text snippet and thumbnails."""
    kept, dropped = pick(rows, plan, n)
    stored = _stored_rows(run_dir, {r["item_id"] for r in kept + dropped})
    paths = {r["item_id"]: json.loads(r["details"]).get("path") for r in rows
             if '"path"' in (r["details"] or "")}
    paths = {k: v for k, v in paths.items() if isinstance(v, str)}

    def item(row: dict[str, Any]) -> SampleItem:
        mine = stored.get(row["item_id"], {})
        error = f"{row['error_type']}: {row['error_message']}" if row["error_type"] else None
        return SampleItem(row["item_id"], row["stage"], row["decision"], row["reason"],
                          json.loads(row["scores"] or "{}"), _label(row, mine, paths),
                          _text(mine), error, _thumbs(run_dir, row["item_id"], mine))

    return [item(r) for r in kept], [item(r) for r in dropped]
