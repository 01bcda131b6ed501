"""The `parse` stage: an input file becomes the synthesis inputs it holds.

    *prompts.jsonl     one text-to-image request per line:
                         {"prompt": str, "height"?: int, "width"?: int, "licence"?: str}
    *edits.jsonl       one free-form edit per line, image paths relative to the file's
                       folder and confined to it:
                         {"source": path, "target": path, "instruction": str,
                          "licence"?: str}
    captions.parquet   a finished video run's curated clips: pairs of a clip's key frames
    docs.parquet       a finished web run's documents: pairs of a document's images

Every line or pair is one child item (`synth_input`) that carries its task
(`t2i | edit | concept`), its text, its images' original bytes, and for conceptual
edits where it came from (`upstream`: run, clip or document id, its source id, the
frames or image positions). A line that cannot be read is an error child with its
reason (bad_json, bad_record, bad_size, path_escape, image_missing, ...); a file with
no records is dropped against itself (`no_records`). The stage scores text lengths
and image sizes; the policy decides.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from weft.schemas.ids import hash_of, stable_json
from weft.schemas.ledger import LedgerEntry
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig
from weft.stages.synth.answers import decide
from weft.stages.synth.images import check_image_bytes, read_image_file

TASKS = ("t2i", "edit", "concept")
INPUT_KIND = "synth_input"
INPUT_FIELDS = [
    pa.field("item_id", pa.string()),
    pa.field("parent_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("item_kind", pa.string()),
    pa.field("task", pa.string()),  # t2i | edit | concept
    pa.field("content_id", pa.string()),  # hash of the content: rollout seeds derive from it
    pa.field("record_index", pa.int32()),  # line (jsonl) or row (parquet) in the file
    pa.field("prompt", pa.string()),  # t2i: the user's prompt
    pa.field("instruction", pa.string()),  # edit: the given instruction
    pa.field("height", pa.int32()),  # t2i: requested size (null: the renderer's default)
    pa.field("width", pa.int32()),
    pa.field("source_image", pa.binary()),  # original bytes
    pa.field("target_image", pa.binary()),
    pa.field("source_sha256", pa.string()),
    pa.field("target_sha256", pa.string()),
    pa.field("context", pa.string()),  # concept: where the pair comes from, for the prompts
    pa.field("upstream", pa.string()),  # concept: JSON provenance in the upstream run
    pa.field("upstream_item_id", pa.string()),
    pa.field("upstream_source_id", pa.string()),
    pa.field("licence", pa.string()),
]
INTERLEAVED_TABLES = {"captions.parquet": "video", "docs.parquet": "web"}


class ParseConfig(StageConfig):
    """Limits on input records and images; how image pairs are drawn from interleaved runs."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=1))
    max_records_per_file: int | None = Field(None, ge=1, description="read at most this many "
                                             "records (or pairs) of a file; null = all")
    max_line_bytes: int = Field(1_000_000, ge=100, description="a longer jsonl line is a "
                                "bad_record")
    max_image_bytes: int = Field(50_000_000, ge=1, description="a larger image file is "
                                 "too_large")
    max_pixels: int = Field(64_000_000, ge=1, description="a larger image is a "
                            "decompression_bomb (checked before decoding)")
    max_render_side: int = Field(4096, ge=16, description="a prompt asking for a larger "
                                 "height or width is bad_size")
    pair_mode: Literal["consecutive", "first_last"] = Field(
        "consecutive", description="pairs of a clip's key frames or a document's images: "
                                   "each with the next, or only the first with the last")
    max_pairs_per_item: int = Field(2, ge=1, description="pairs drawn from one clip or "
                                                         "document at most")
    max_pairs_per_run: int | None = Field(None, ge=1, description="pairs drawn from one "
                                          "interleaved run at most (the first clips or "
                                          "documents by row); null = all")


def _text_field(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ItemError("bad_record", f"`{name}` must be a string, got "
                                      f"{type(value).__name__}")
    return value.strip()


def _optional_size(record: dict[str, Any], name: str, cap: int) -> int | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value > cap:
        raise ItemError("bad_size", f"`{name}` must be an integer in 1..{cap}, got {value!r}")
    return value


def _licence(record: dict[str, Any]) -> str | None:
    value = record.get("licence", record.get("license"))
    return value if isinstance(value, str) else None


def pair_indices(n: int, mode: str, limit: int) -> list[tuple[int, int]]:
    """Index pairs over n ordered images: consecutive ones, or the first with the last."""
    if n < 2:
        return []
    pairs = [(0, n - 1)] if mode == "first_last" else [(i, i + 1) for i in range(n - 1)]
    return pairs[:limit]


def file_task(path: Path) -> str:
    """What a discovered input file holds: t2i | edit | video | web."""
    name = path.name.lower()
    if name.endswith("prompts.jsonl"):
        return "t2i"
    if name.endswith("edits.jsonl"):
        return "edit"
    if path.name in INTERLEAVED_TABLES and path.parent.name == "outputs":
        return INTERLEAVED_TABLES[path.name]
    raise ItemError("unknown_input", f"{path.name}: not a *prompts.jsonl, *edits.jsonl, or a "
                                     "video/web run's outputs table")


class ParseStage(Stage):
    """Expand an input file into synthesis inputs (see the module doc)."""

    name: ClassVar[str] = "parse"
    version: ClassVar[str] = "1"
    kind: ClassVar[Literal["map", "expand"]] = "expand"
    item_kind: ClassVar[str] = INPUT_KIND
    Config: ClassVar[type[StageConfig]] = ParseConfig
    input_columns: ClassVar[tuple[str, ...]] = ("item_id", "source_id", "path")
    output_fields: ClassVar[list[pa.Field]] = INPUT_FIELDS
    heavy_columns: ClassVar[tuple[str, ...]] = ("source_image", "target_image")

    def decide(self, scores: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        return decide(self.ctx.policy, self.name, scores)

    @property
    def cfg(self) -> ParseConfig:
        return self.config  # type: ignore[return-value]

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path = Path(row["path"])
        task = file_task(path)
        if task in ("t2i", "edit"):
            outcomes = self._jsonl(row, path, task)
        else:
            outcomes = self._interleaved(row, path, task)
        if not outcomes:  # nothing to expand into: recorded against the file itself
            entry = LedgerEntry(item_id=row["item_id"], item_kind="source",
                                parent_id=row["item_id"], source_id=row.get("source_id"),
                                decision="drop", reason="no_records", scores={"records": 0},
                                details={"path": str(path), "task": task})
            return [Outcome(entry, {"item_id": row["item_id"], "item_kind": "source"})]
        return outcomes

    # ---- jsonl: prompts and edits ---------------------------------------------------
    def _jsonl(self, row: dict[str, Any], path: Path, task: str) -> list[Outcome]:
        outcomes: list[Outcome] = []
        with path.open("rb") as fh:
            for index, raw in enumerate(fh):
                if not raw.strip():
                    continue
                limit = self.cfg.max_records_per_file
                if limit is not None and len(outcomes) >= limit:
                    break
                item_id = hash_of(INPUT_KIND, task, row["item_id"], index)
                base = {"item_id": item_id, "parent_id": row["item_id"],
                        "source_id": row.get("source_id"), "item_kind": INPUT_KIND,
                        "task": task, "record_index": index}
                try:
                    if len(raw) > self.cfg.max_line_bytes:
                        raise ItemError("bad_record", f"line {index} has {len(raw)} bytes, the "
                                        f"cap is {self.cfg.max_line_bytes}")
                    try:
                        record = json.loads(raw)
                    except ValueError as exc:
                        raise ItemError("bad_json", f"line {index}: {exc}") from exc
                    if not isinstance(record, dict):
                        raise ItemError("bad_record", f"line {index} is not a JSON object")
                    build = self._prompt if task == "t2i" else self._edit
                    fields, scores = build(record, path.parent)
                except ItemError as exc:
                    outcomes.append(self._record_error(base, exc, path))
                    continue
                new = {**base, **fields}
                outcomes.append(Outcome(self.entry(new, scores, details={
                    "path": str(path), "line": index, "task": task}), new))
        return outcomes

    def _prompt(self, record: dict[str, Any], _: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        prompt = _text_field(record, "prompt")
        cap = self.cfg.max_render_side
        height, width = _optional_size(record, "height", cap), _optional_size(record, "width", cap)
        fields = {"prompt": prompt, "height": height, "width": width,
                  "licence": _licence(record),
                  "content_id": hash_of("t2i", prompt, height, width)}
        return fields, {"prompt_chars": len(prompt)}

    def _edit(self, record: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        instruction = _text_field(record, "instruction")
        images: dict[str, Any] = {}
        scores: dict[str, Any] = {"instruction_chars": len(instruction)}
        for role in ("source", "target"):
            rel = record.get(role)
            if not isinstance(rel, str) or not rel:
                raise ItemError("bad_record", f"`{role}` must be a path relative to "
                                              f"{folder}")
            data, width, height = read_image_file(rel, folder, self.cfg.max_image_bytes,
                                                  self.cfg.max_pixels)
            images[f"{role}_image"] = data
            images[f"{role}_sha256"] = hash_of_bytes(data)
            scores[f"{role}_min_side"] = min(width, height)
        fields = {"instruction": instruction, "licence": _licence(record), **images,
                  "content_id": hash_of("edit", instruction, images["source_sha256"],
                                        images["target_sha256"])}
        return fields, scores

    def _record_error(self, base: dict[str, Any], exc: ItemError, path: Path) -> Outcome:
        model_id, revision = self.model_identity()
        entry = LedgerEntry(item_id=base["item_id"], item_kind=INPUT_KIND,
                            parent_id=base["parent_id"], source_id=base["source_id"],
                            decision="error", reason=exc.reason, error_type=type(exc).__name__,
                            error_message=str(exc)[:2000],
                            details={"path": str(path), "line": base["record_index"]},
                            model_id=model_id, model_revision=revision)
        return Outcome(entry, base)

    # ---- interleaved runs: image pairs -------------------------------------------------
    def _interleaved(self, row: dict[str, Any], path: Path, pipeline: str) -> list[Outcome]:
        run_dir = path.parent.parent
        manifest = json.loads((run_dir / "run.json").read_text())
        if manifest.get("pipeline") != pipeline:
            raise ItemError("unknown_input", f"{path} belongs to a {manifest.get('pipeline')!r} "
                                             f"run, not a {pipeline} run")
        origin = {"pipeline": pipeline, "run_dir": str(run_dir.resolve()),
                  "run_id": manifest.get("run_id")}
        table = pq.read_table(path)
        outcomes: list[Outcome] = []
        for index, item in enumerate(table.to_pylist()):
            images = _video_images(item, run_dir, self.cfg) if pipeline == "video" \
                else _doc_images(item)
            pairs = pair_indices(len(images), self.cfg.pair_mode, self.cfg.max_pairs_per_item)
            for n, (i, j) in enumerate(pairs):
                limits = [x for x in (self.cfg.max_records_per_file,
                                      self.cfg.max_pairs_per_run) if x is not None]
                if limits and len(outcomes) >= min(limits):
                    return outcomes
                outcomes.append(self._pair(row, path, origin, index, item, images[i],
                                           images[j], n))
        return outcomes

    def _pair(self, row: dict[str, Any], path: Path, origin: dict[str, Any], index: int,
              item: dict[str, Any], first: dict[str, Any], second: dict[str, Any],
              n: int) -> Outcome:
        upstream_id = item["item_id"]
        item_id = hash_of(INPUT_KIND, "concept", row["item_id"], upstream_id, first["at"],
                          second["at"])
        upstream = {**origin, "item_id": upstream_id, "source_id": item.get("source_id"),
                    "parent_id": item.get("parent_id"),
                    "images": [first["describe"], second["describe"]]}
        base = {"item_id": item_id, "parent_id": row["item_id"],
                "source_id": row.get("source_id"), "item_kind": INPUT_KIND, "task": "concept",
                "record_index": index, "upstream": stable_json(upstream),
                "upstream_item_id": upstream_id, "upstream_source_id": item.get("source_id"),
                "licence": first.get("licence")}
        try:
            scores: dict[str, Any] = {}
            fields: dict[str, Any] = {}
            for role, image in (("source", first), ("target", second)):
                data = image["load"]()
                width, height = check_image_bytes(data, self.cfg.max_pixels)
                fields[f"{role}_image"] = data
                fields[f"{role}_sha256"] = hash_of_bytes(data)
                scores[f"{role}_min_side"] = min(width, height)
        except ItemError as exc:
            return self._record_error(base, exc, path)
        context = first["context"](second)
        new = {**base, **fields, "context": context,
               "content_id": hash_of("concept", fields["source_sha256"],
                                     fields["target_sha256"])}
        details = {"path": str(path), "row": index, "pair": n, "upstream": upstream}
        return Outcome(self.entry(new, scores, details=details), new)


def hash_of_bytes(data: bytes) -> str:
    """The sha256 of image bytes (what a sample records of its images)."""
    return hashlib.sha256(data).hexdigest()


def _video_images(clip: dict[str, Any], run_dir: Path, config: ParseConfig
                  ) -> list[dict[str, Any]]:
    """A clip's key frames in time order, each read (lazily) from inside the run dir."""
    paths = list(clip.get("keyframe_paths") or [])
    times = list(clip.get("keyframe_times") or [])
    out = []
    for k, rel in enumerate(paths):
        time_s = float(times[k]) if k < len(times) else None

        def load(rel: str = rel) -> bytes:
            return read_image_file(rel, run_dir, config.max_image_bytes, config.max_pixels)[0]

        def context(other: dict[str, Any], t: float | None = time_s) -> str:
            dt = other["time_s"] - t if t is not None and other["time_s"] is not None else None
            return "frames of one video clip" + (f", {dt:.2f} s apart" if dt is not None else "")

        out.append({"at": k, "time_s": time_s, "load": load, "context": context,
                    "describe": {"keyframe": k, "path": rel, "time_s": time_s}})
    return out


def _doc_images(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A document's images that have bytes, in reading order (positions among its images)."""
    blobs = list(doc.get("image_bytes") or [])
    metadata = json.loads(doc["metadata"]) if doc.get("metadata") else {}
    licence = metadata.get("licence", metadata.get("license")) \
        if isinstance(metadata, dict) else None
    title = doc.get("title") or ""
    images = [i for i in doc.get("items") or [] if i.get("type") == "image"]
    out = []
    for position, item in enumerate(images):
        data = blobs[position] if position < len(blobs) else None
        if not data:
            continue

        def load(data: bytes = data) -> bytes:
            return data

        def context(_: dict[str, Any], title: str = title) -> str:
            return "images of one web page" + (f" titled {title!r}" if title else "")

        out.append({"at": position, "load": load, "context": context,
                    "licence": licence if isinstance(licence, str) else None,
                    "describe": {"image_position": position, "src": item.get("src"),
                                 "alt": item.get("alt")}})
    return out
