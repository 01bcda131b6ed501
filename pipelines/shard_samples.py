"""The curation pipelines' outputs as training samples (the shard format, one per row).

Each output row becomes one `Converted`: the sample, or the reason it could not be one
(a key frame that left the run directory or does not decode, an empty document). A bad
row never stops the others; the shard step records every row's outcome in its ledger.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from weft.schemas.ids import hash_of
from weft.schemas.shards import ShardFormatError, check_key, image_member

OUTPUT_TABLES = {"video": ("captions.parquet", "video_clip"), "web": ("docs.parquet", "web_doc"),
                 "synth": ("synth.parquet", "synth_sample"),
                 "shapes": ("shapes.parquet", "shapes_sample")}


@dataclass
class Converted:
    """One output row: its sample, or why there is none."""

    item_id: str
    source_id: str | None
    kind: str
    sample: dict[str, Any] | None = None
    reason: str = "ok"  # ok | empty_sample | conversion_error
    error: Exception | None = None


def _image_ext(data: bytes) -> str | None:
    """jpg / png / webp from the bytes' own signature; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def as_supported(data: bytes) -> tuple[bytes, str]:
    """The bytes and extension, re-encoded losslessly to PNG when not jpg/png/webp."""
    ext = _image_ext(data)
    if ext is not None:
        return data, ext
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        frame = image.convert("RGBA" if "A" in image.getbands() or
                              "transparency" in image.info else "RGB")
    buf = io.BytesIO()
    frame.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), "png"


def _sample_key(value: Any, kind: str, item_id: str) -> str:
    try:
        return check_key(value)
    except ShardFormatError:
        return hash_of("sample", kind, item_id)


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ShardFormatError(f"key frame path {rel!r} leaves the run directory")
    return path


def _scores(row: dict[str, Any], names: Iterable[str]) -> dict[str, float]:
    out = {}
    for name in names:
        value = row.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            out[name] = float(value)
    return out


def run_origin(root: Path, dataset: str | None) -> dict[str, Any]:
    """The manifest's provenance fields for samples of one run directory."""
    manifest = root / "run.json"
    run_id = json.loads(manifest.read_text()).get("run_id") if manifest.is_file() else None
    return {"dataset": dataset, "run_id": run_id, "run_dir": str(root.resolve())}


def _caption_sample(root: Path, row: dict[str, Any], score_cols: list[str]) -> dict[str, Any]:
    key = _sample_key(row.get("sample_id"), "video_clip", row["item_id"])
    members: dict[str, bytes] = {}
    sequence = []
    for item in json.loads(row["sequence"]):
        if item["type"] == "video_frame":
            data, ext = as_supported(_inside(root, item["path"]).read_bytes())
            name = image_member(key, len(members), ext)
            members[name] = data
            sequence.append({"type": "video_frame", "member": name,
                             "time_s": float(item["time_s"])})
        elif item["type"] == "text":
            text = {"type": "text", "role": item.get("role") or "caption", "text": item["text"]}
            text.update({k: float(item[k]) for k in ("from_s", "to_s")
                         if item.get(k) is not None})
            sequence.append(text)
        else:
            raise ShardFormatError(f"clip {row['item_id']}: unknown item {item['type']!r}")
    parents = [p for p in (row.get("parent_id"), row["item_id"]) if p]
    record = {"key": key, "kind": "video_clip", "source_id": row.get("source_id"),
              "parent_ids": parents, "ledger_item_id": row["item_id"], "sequence": sequence,
              "scores": _scores(row, score_cols), "licence": row.get("licence")}
    return {"key": key, "json": record, "members": members}


def _doc_sample(root: Path, row: dict[str, Any], score_cols: list[str]) -> dict[str, Any] | None:
    doc_id = row["item_id"]
    key = _sample_key(doc_id, "web_doc", doc_id)
    blobs = list(row.get("image_bytes") or [])
    members: dict[str, bytes] = {}
    sequence: list[dict[str, Any]] = []
    if row.get("title"):
        sequence.append({"type": "text", "role": "title", "text": row["title"]})
    n_image = 0
    for item in row.get("items") or []:
        if item["type"] == "text":
            if item.get("text"):
                sequence.append({"type": "text", "role": "text", "text": item["text"]})
            continue
        data = blobs[n_image] if n_image < len(blobs) else None
        n_image += 1
        if not data:
            continue
        data, ext = as_supported(data)
        name = image_member(key, len(members), ext)
        members[name] = data
        image = {"type": "image", "member": name}
        if item.get("alt") is not None:
            image["alt"] = item["alt"]
        sequence.append(image)
    if not sequence:
        return None
    metadata = json.loads(row["metadata"]) if row.get("metadata") else {}
    licence = metadata.get("licence", metadata.get("license")) \
        if isinstance(metadata, dict) else None
    record = {"key": key, "kind": "web_doc", "source_id": row.get("source_id"),
              "parent_ids": [p for p in (row.get("source_id"),) if p],
              "ledger_item_id": doc_id, "sequence": sequence,
              "scores": _scores(row, score_cols),
              "licence": licence if isinstance(licence, str) else None}
    return {"key": key, "json": record, "members": members}


def _synth_sample(root: Path, row: dict[str, Any], score_cols: list[str]) -> dict[str, Any]:
    """A synthesised sample: (prompt, reasoning, image) or (image, instruction, reasoning,
    image); the reasoning is its own text item (role `reasoning`) right before the image
    generated last, so the trainer's plan learns to think before it draws."""
    kind = row["kind"]
    key = _sample_key(row["item_id"], kind, row["item_id"])
    if not row.get("reasoning") or not row.get("target_image"):
        raise ShardFormatError(f"synth sample {row['item_id']} has no reasoning or no target")
    members: dict[str, bytes] = {}

    def image(data: bytes) -> dict[str, Any]:
        data, ext = as_supported(data)
        name = image_member(key, len(members), ext)
        members[name] = data
        return {"type": "image", "member": name}

    if kind == "reasoning_t2i":
        sequence = [{"type": "text", "role": "prompt", "text": row["prompt"]}]
    elif kind == "reasoning_edit":
        sequence = [image(row["source_image"]),
                    {"type": "text", "role": "instruction", "text": row["instruction"]}]
    else:
        raise ShardFormatError(f"synth sample {row['item_id']}: unknown kind {kind!r}")
    sequence += [{"type": "text", "role": "reasoning", "text": row["reasoning"]},
                 image(row["target_image"])]
    record = {"key": key, "kind": kind,
              "source_id": row.get("upstream_source_id") or row.get("source_id"),
              "parent_ids": list(row.get("parent_ids") or []), "ledger_item_id": row["item_id"],
              "sequence": sequence, "scores": _scores(row, score_cols),
              "licence": row.get("licence")}
    return {"key": key, "json": record, "members": members}


def _shapes_sample(root: Path, row: dict[str, Any], score_cols: list[str]) -> dict[str, Any]:
    """A shapes-world sample (text_to_image | vqa | image_edit | video_clip): the row's
    sequence already is the sample's, with images as run-relative PNG paths."""
    kind = row["kind"]
    key = _sample_key(row["item_id"], kind, row["item_id"])
    members: dict[str, bytes] = {}
    sequence: list[dict[str, Any]] = []
    for item in json.loads(row["sequence"]):
        if item["type"] == "text":
            sequence.append({k: item[k] for k in ("type", "role", "text", "from_s", "to_s")
                             if item.get(k) is not None})
            continue
        if item["type"] not in ("image", "video_frame"):
            raise ShardFormatError(f"shapes sample {row['item_id']}: unknown item "
                                   f"{item['type']!r}")
        data, ext = as_supported(_inside(root, item["path"]).read_bytes())
        name = image_member(key, len(members), ext)
        members[name] = data
        out = {"type": item["type"], "member": name}
        if item["type"] == "video_frame":
            out["time_s"] = float(item["time_s"])
        sequence.append(out)
    record = {"key": key, "kind": kind, "source_id": row.get("source_id"),
              "parent_ids": list(row.get("parent_ids") or []), "ledger_item_id": row["item_id"],
              "sequence": sequence, "scores": json.loads(row.get("scores") or "{}"),
              "licence": row.get("licence")}
    return {"key": key, "json": record, "members": members}


_BUILDERS = {"video_clip": _caption_sample, "web_doc": _doc_sample,
             "synth_sample": _synth_sample, "shapes_sample": _shapes_sample}


def run_pipeline(run_dir: str | Path) -> str:
    """The pipeline (video | web | synth | shapes) that made a run directory (run.json)."""
    path = Path(run_dir) / "run.json"
    try:
        pipeline = json.loads(path.read_text())["pipeline"]
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(f"{run_dir} is not a finished run directory (no readable "
                                f"run.json: {exc})") from exc
    if pipeline not in OUTPUT_TABLES:
        raise ValueError(f"run {run_dir} is a {pipeline!r} run; shards come from "
                         f"{sorted(OUTPUT_TABLES)} runs")
    return pipeline


def convert_run(run_dir: str | Path, dataset: str | None = None,
                pipeline: str | None = None) -> Iterator[Converted]:
    """Every row of a run's output table as a sample (or the reason it is none).

    The pipeline comes from the run's run.json unless given.
    """
    root = Path(run_dir)
    table_name, kind = OUTPUT_TABLES[pipeline or run_pipeline(root)]
    path = root / "outputs" / table_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run has not finished")
    origin = run_origin(root, dataset)
    table = pq.read_table(path)
    score_cols = [c for c in table.column_names if c.endswith("score")]
    build = _BUILDERS[kind]
    for row in table.to_pylist():
        out = Converted(row["item_id"], row.get("source_id"), kind)
        try:
            sample = build(root, row, score_cols)
        except Exception as exc:  # a bad row is recorded, the rest go on
            out.reason, out.error = "conversion_error", exc
        else:
            if sample is None:
                out.reason = "empty_sample"
            else:
                out.sample = {**sample, **origin}
                out.kind = sample["json"]["kind"]  # the sample's own kind, not the table's
        yield out


def _strict(run_dir: str | Path, dataset: str | None, pipeline: str) -> list[dict[str, Any]]:
    samples = []
    for c in convert_run(run_dir, dataset, pipeline):
        if c.error is not None:
            raise c.error
        if c.sample is not None:
            samples.append(c.sample)
    return samples


def samples_from_captions(run_dir: str | Path, dataset: str | None = None
                          ) -> list[dict[str, Any]]:
    """One `video_clip` sample per row of RUN_DIR/outputs/captions.parquet (raises on a bad row).

    The key is the row's sample_id (falls back to a hash of the clip id); key frames are
    read from the run directory (paths must stay inside it).
    """
    return _strict(run_dir, dataset, "video")


def samples_from_docs(run_dir: str | Path, dataset: str | None = None) -> list[dict[str, Any]]:
    """One `web_doc` sample per row of RUN_DIR/outputs/docs.parquet (raises on a bad row).

    Images come from `image_bytes` (aligned with the image items) in their own
    encoding; an image whose bytes are missing is left out of the sequence, a format
    other than jpg/png/webp is re-encoded to PNG. The title, when there is one, is
    the first text item (role "title"); body text has role "text". A document with
    nothing left is not a sample.
    """
    return _strict(run_dir, dataset, "web")


def samples_from_synth(run_dir: str | Path, dataset: str | None = None) -> list[dict[str, Any]]:
    """One `reasoning_t2i` / `reasoning_edit` sample per row of RUN_DIR/outputs/synth.parquet
    (raises on a bad row). Images are stored in their own encoding (renders are PNG)."""
    return _strict(run_dir, dataset, "synth")


def samples_from_shapes(run_dir: str | Path, dataset: str | None = None
                        ) -> list[dict[str, Any]]:
    """One sample per row of RUN_DIR/outputs/shapes.parquet (raises on a bad row): kinds
    text_to_image, vqa, image_edit and video_clip, images read from RUN_DIR/images/."""
    return _strict(run_dir, dataset, "shapes")
