"""Image rules: score every image of a web document, drop the failing images, keep the doc.

The ledger row is per *document*; images are decided inside it. For each image
item (aligned with `image_status` / `image_bytes` from the `image_load` stage)
the stage measures

- `decode_ok`: 1.0 when the image loaded (`image_status.reason == "ok"`) and
  decodes here, else 0.0 (every other measure is then null);
- `width`, `height`, `min_side`: pixels, from the image header;
- `aspect_ratio`: long side / short side (>= 1, so one `max` bound covers
  banners and towers alike);
- `clarity`: variance of the Laplacian at `clarity_side` pixels on the short
  side, the video quality stage's measure (`quality.clarity_of`), so one scale
  holds for every resolution: blur, flat spacers and upscaled thumbnails score
  low; screenshots and plots score hundreds to thousands;
- `doc_phash_distance`: Hamming distance of the image's 64-bit pHash (the
  video embed stage's `phash`) to the nearest *better-ranked* image of the
  same document, 64 when there is none (rank: larger area first, then reading
  order). Of two copies the larger survives, wherever it sits. Nearly flat
  images (grayscale std < `phash_min_std`) are not hashed: all blanks hash alike;
- `unsafe_score` (only with `safety: true`): the highest NudeNet detection
  score among the exposed-body classes in `safety_classes`, 0.0 when none;
- `text_similarity` (only with `clip_model_dir`): the CLIP cosine between the
  image and its neighbouring text (the tail of the nearest text item before it
  and the head of the nearest one after it; the larger of the two), null when
  the image has no text on either side. With the tiny random CLIP that tests
  build (`save_tiny_open_clip`) the number is computed end to end but means
  nothing; calibrate a threshold only on a real CLIP.

Each image is decided by policy block `image_rules_per_image` (first rule
broken is the reason). An image that did not decode is removed even under a
policy that forgets `decode_ok` (reason `not_decoded`): it has no pixels to
train on. Removed images leave `items`, `image_status`, `image_bytes` (which
stay aligned); every image, kept or not, stays in the `image_decisions`
column with its `dropped_reason`, and in the ledger details with its scores.
The document is then decided by block `image_rules` on document scores:
`num_images`, `num_images_kept`, `num_images_dropped`, `kept_image_fraction`
(1.0 for a document without images: nothing was removed), plus
`max_unsafe_score` with safety and `mean_text_similarity` with CLIP.

Cross-document duplicates need every document at once:
`cross_doc_image_duplicates(docs)` scores each kept image against better-ranked
images of *other* documents (same rank rule, across the run) and
`image_dedup_entries` applies policy block `image_dedup` per image; the
pipeline calls them after the per-partition stages.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy
from weft.schemas.web import ITEM_TYPE
from weft.stages.base import ItemError, Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.video.embed import phash
from weft.stages.video.quality import clarity_of, resize_short_side, to_gray
from weft.stages.web.images import IMAGE_FIELDS

if TYPE_CHECKING:
    from weft.stages.video.open_clip_model import OpenClipImageModel

STAGE = "image_rules"
PER_IMAGE_BLOCK = "image_rules_per_image"
IMAGE_DEDUP_STAGE = "image_dedup"
NO_MATCH = 64  # the distance recorded when there is no better-ranked image to compare with
# NudeNet 3.x (320n) labels of exposed intimate body parts: what `unsafe_score` looks for.
UNSAFE_CLASSES = ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
                  "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
BASE_IMAGE_SCORES = ("decode_ok", "width", "height", "min_side", "aspect_ratio", "clarity",
                     "doc_phash_distance")
BASE_DOC_SCORES = ("num_images", "num_images_kept", "num_images_dropped", "kept_image_fraction")

IMAGE_DECISION_TYPE = pa.struct([
    pa.field("item_index", pa.int32()),  # index in the items list *before* this stage
    pa.field("src", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("kept", pa.bool_()),
    pa.field("dropped_reason", pa.string()),  # null while kept
])
IMAGE_RULES_FIELDS = [
    pa.field("items", pa.list_(ITEM_TYPE)),  # kept items only
    *IMAGE_FIELDS,  # image_status, image_bytes: aligned with the kept image items
    pa.field("image_phashes", pa.list_(pa.uint64())),  # aligned too; null for flat images
    pa.field("image_decisions", pa.list_(IMAGE_DECISION_TYPE)),  # every image ever seen
]


class ImageRulesConfig(StageConfig):
    """How images are measured and which optional models run; thresholds live in the policy."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4))
    clarity_side: int = Field(128, ge=16, description="short side images are resized to for the "
                              "Laplacian (the video quality stage's reference size)")
    analysis_side: int = Field(512, ge=64, description="images are analysed at most this many "
                               "pixels on the short side (JPEGs decode straight to it)")
    phash_min_std: float = Field(2.0, ge=0, description="images whose grayscale std is below "
                                 "this are flat and not pHashed")
    safety: bool = Field(False, description="score unsafe_score with NudeNet (needs the "
                         "`safety` extra: pip install 'weft[safety]')")
    safety_model_path: str | None = Field(None, description="a NudeNet ONNX detector; null = "
                                          "the 320n model shipped inside the nudenet package")
    safety_classes: list[str] = Field(default_factory=lambda: list(UNSAFE_CLASSES),
                                      description="NudeNet labels that count as unsafe")
    clip_model_dir: str | None = Field(None, description="local open_clip directory for "
                                       "image-text relevance; null disables text_similarity")
    device: str = Field("cpu", description="torch device for the CLIP model")
    clip_batch_size: int = Field(16, ge=1, description="images or texts per CLIP forward pass")
    context_chars: int = Field(300, ge=1, description="characters of neighbouring text (tail "
                               "before, head after) compared with an image")


def image_score_names(config: ImageRulesConfig) -> tuple[str, ...]:
    """Per-image scores this configuration produces (what `image_rules_per_image` may name)."""
    extra = (("unsafe_score",) if config.safety else ()) + (
        ("text_similarity",) if config.clip_model_dir else ())
    return BASE_IMAGE_SCORES + extra


def doc_score_names(config: ImageRulesConfig) -> tuple[str, ...]:
    """Document scores this configuration produces (what `image_rules` may name)."""
    extra = (("max_unsafe_score",) if config.safety else ()) + (
        ("mean_text_similarity",) if config.clip_model_dir else ())
    return BASE_DOC_SCORES + extra


def check_policy(policy: Policy, config: ImageRulesConfig) -> None:
    """Fail at start-up when a policy rule names a score this configuration never computes."""
    for block, names in ((PER_IMAGE_BLOCK, image_score_names(config)),
                         (STAGE, doc_score_names(config))):
        missing = [s for s in policy.rules.get(block, {}) if s not in names]
        if missing:
            hint = ("; unsafe scores need image_rules.safety: true" if any(
                "unsafe" in s for s in missing) else "") + (
                "; text_similarity needs image_rules.clip_model_dir" if any(
                    "text_similarity" in s for s in missing) else "")
            raise ValueError(f"policy {policy.name} block {block} has rules for {missing}, which "
                             f"image_rules does not compute with this config{hint}")


# ---- one image ---------------------------------------------------------------------------
def _flatten(im: Image.Image) -> Image.Image:
    """RGB, transparent pixels composited on white (a transparent logo is not a black square)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_for_analysis(data: bytes, analysis_side: int = 512) -> tuple[np.ndarray, int, int]:
    """(RGB uint8 array at most `analysis_side` on its short side, width, height of the original).

    JPEGs decode at a reduced DCT scale (PIL draft) when that still covers the
    analysis size: a 50-megapixel photo costs a thumbnail's decode. Raises on
    undecodable bytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # palette-transparency notices
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            short = min(width, height)
            if short > analysis_side and im.format == "JPEG":
                scale = analysis_side / short
                im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            rgb = np.asarray(_flatten(im))
    if min(rgb.shape[:2]) > analysis_side:
        rgb = resize_short_side(rgb, analysis_side)
    return np.ascontiguousarray(rgb), width, height


@dataclass
class ImageMeasure:
    """What the stage knows about one image of a document (pixels only while scoring)."""

    position: int  # ordinal among the document's image items
    item_index: int  # index in the document's items
    src: str | None
    sha256: str | None
    load_reason: str
    scores: dict[str, Any]
    phash: int | None = None
    better_copy: int | None = None  # position of the better-ranked near copy in the document
    message: str = ""
    rgb: np.ndarray | None = field(default=None, repr=False)


def measure_image(position: int, item_index: int, item: dict[str, Any],
                  status: dict[str, Any] | None, data: bytes | None,
                  config: ImageRulesConfig) -> ImageMeasure:
    """Decode and score one image (pure; never raises): decode_ok, sizes, clarity, pHash."""
    status = status or {}
    load_reason = status.get("reason") or "no_status"
    measure = ImageMeasure(position=position, item_index=item_index,
                           src=item.get("src") or status.get("src"), sha256=status.get("sha256"),
                           load_reason=load_reason,
                           scores={name: None for name in BASE_IMAGE_SCORES})
    measure.scores["decode_ok"] = 0.0
    measure.scores["doc_phash_distance"] = NO_MATCH
    if load_reason != "ok" or not data:
        measure.message = status.get("message") or ("no image bytes" if load_reason == "ok"
                                                     else "")
        return measure
    try:
        rgb, width, height = decode_for_analysis(data, config.analysis_side)
    except Exception as exc:  # loaded once but not here: the bytes changed or PIL disagrees
        measure.message = f"{type(exc).__name__}: {exc}"[:300]
        return measure
    gray = to_gray(rgb)
    measure.rgb = rgb
    measure.phash = phash(gray) if float(gray.std()) >= config.phash_min_std else None
    measure.scores.update({
        "decode_ok": 1.0, "width": width, "height": height, "min_side": min(width, height),
        "aspect_ratio": round(max(width, height) / min(width, height), 6),
        "clarity": round(clarity_of(rgb[None], config.clarity_side), 6),
    })
    return measure


# ---- within a document -------------------------------------------------------------------
def area_of(scores: dict[str, Any]) -> int:
    """Pixels of an image (0 when unknown): the duplicate keep-rule's first key."""
    return int(scores.get("width") or 0) * int(scores.get("height") or 0)


def doc_duplicates(measures: Sequence[ImageMeasure]) -> list[tuple[int, int | None]]:
    """Per image: (Hamming distance to the nearest better-ranked hashed image, its position).

    Better-ranked = larger area, then earlier in reading order; (NO_MATCH, None)
    for an image without a hash or without a better hashed image.
    """
    order = sorted(range(len(measures)),
                   key=lambda i: (-area_of(measures[i].scores), measures[i].position))
    out: list[tuple[int, int | None]] = [(NO_MATCH, None)] * len(measures)
    better: list[int] = []
    for i in order:
        h = measures[i].phash
        if h is None:
            continue
        if better:
            hashes = np.array([measures[j].phash for j in better], dtype=np.uint64)
            dist = np.bitwise_count(hashes ^ np.uint64(h))
            k = int(np.argmin(dist))  # first minimum: the better-ranked one wins ties
            out[i] = (int(dist[k]), measures[better[k]].position)
        better.append(i)
    return out


def neighbour_texts(items: Sequence[dict[str, Any]], item_index: int,
                    chars: int) -> tuple[str | None, str | None]:
    """(tail of the nearest text item before, head of the nearest text item after) an item."""

    def find(indices: range) -> str | None:
        for j in indices:
            item = items[j]
            if item.get("type") == "text" and (item.get("text") or "").strip():
                return " ".join(item["text"].split())
        return None

    before = find(range(item_index - 1, -1, -1))
    after = find(range(item_index + 1, len(items)))
    return (before[-chars:] if before else None, after[:chars] if after else None)


# ---- optional models ---------------------------------------------------------------------
class SafetyModel:
    """NudeNet's ONNX detector: max detection score over the unsafe classes, per image."""

    def __init__(self, model_path: str | None, classes: Sequence[str]) -> None:
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise RuntimeError("image_rules.safety is true but nudenet is not installed: pip "
                               "install 'weft[safety]' (or set safety: false)") from exc
        import nudenet

        path = Path(model_path) if model_path else Path(nudenet.__file__).parent / "320n.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"NudeNet model {path} does not exist "
                                    "(image_rules.safety_model_path)")
        from weft.schemas.ids import sha256_file

        self.detector = NudeDetector(model_path=str(path))
        self.classes = frozenset(classes)
        self.model_id = f"nudenet:{path.stem}"
        self.revision = sha256_file(path)[:16]

    def unsafe_scores(self, images: Sequence[np.ndarray]) -> list[float]:
        """Per RGB image, the highest score of an unsafe detection (0.0 when none)."""
        out: list[float] = []
        for rgb in images:
            # NudeNet's own path reads files with OpenCV: hand it the same BGR layout.
            detections = self.detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            scores = [float(d["score"]) for d in detections if d["class"] in self.classes]
            out.append(round(max(scores, default=0.0), 6))
        return out


class ClipRelevance:
    """An open_clip model from a local directory: image and text embeddings, cosine between."""

    def __init__(self, model_dir: str, device: str = "cpu") -> None:
        from weft.stages.video.open_clip_model import load_open_clip

        self.image_model: OpenClipImageModel = load_open_clip(model_dir, device=device)
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{Path(model_dir).resolve()}")
        self.model_id = self.image_model.model_id
        self.revision = self.image_model.revision

    def encode_images(self, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
        return self.image_model.encode(list(images), batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        out: list[np.ndarray] = []
        model = self.image_model.model
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size]))
            with torch.inference_mode():
                feats = model.encode_text(tokens.to(self.image_model.device),  # type: ignore[operator]
                                          normalize=True)
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def text_similarities(clip: ClipRelevance, items: Sequence[dict[str, Any]],
                      measures: Sequence[ImageMeasure], chars: int,
                      batch_size: int) -> list[float | None]:
    """Per image: max CLIP cosine to its neighbouring texts; None without pixels or text."""
    sims: list[float | None] = [None] * len(measures)
    todo: list[tuple[int, np.ndarray, list[str]]] = []  # (index, pixels, its texts)
    for i, m in enumerate(measures):
        texts = [t for t in neighbour_texts(items, m.item_index, chars) if t]
        if m.rgb is not None and texts:
            todo.append((i, m.rgb, texts))
    if not todo:
        return sims
    image_feats = clip.encode_images([rgb for _, rgb, _ in todo], batch_size)
    text_feats = clip.encode_texts([t for _, _, ts in todo for t in ts], batch_size)
    offset = 0
    for row, (i, _, ts) in enumerate(todo):
        cos = text_feats[offset:offset + len(ts)] @ image_feats[row]
        sims[i] = round(float(cos.max()), 6)
        offset += len(ts)
    return sims


# ---- the document ------------------------------------------------------------------------
def image_items(row: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(item index, item) of every image item, in reading order."""
    return [(n, item) for n, item in enumerate(row.get("items") or [])
            if item.get("type") == "image"]


def measure_document(row: dict[str, Any], config: ImageRulesConfig,
                     safety: SafetyModel | None = None,
                     clip: ClipRelevance | None = None) -> list[ImageMeasure]:
    """Score every image of a row (items + image_status + image_bytes); pure without models.

    Raises ItemError when the load stage's columns do not line up with the items.
    """
    images = image_items(row)
    statuses = row.get("image_status")
    blobs = row.get("image_bytes")
    if images and statuses is None:
        raise ItemError("no_image_status", "the document has image items but no image_status "
                        "column: run image_load first")
    statuses = list(statuses or [])
    blobs = list(blobs) if blobs is not None else [None] * len(statuses)
    if len(statuses) != len(images) or len(blobs) != len(images):
        raise ItemError("image_status_mismatch", f"{len(images)} image items but "
                        f"{len(statuses)} image_status and {len(blobs)} image_bytes entries")
    measures = [measure_image(p, n, item, statuses[p], blobs[p], config)
                for p, (n, item) in enumerate(images)]
    for m, (distance, better) in zip(measures, doc_duplicates(measures), strict=True):
        m.scores["doc_phash_distance"], m.better_copy = distance, better
    decoded = [m for m in measures if m.rgb is not None]
    if safety is not None:
        for m in measures:
            m.scores["unsafe_score"] = None
        for m, score in zip(decoded, safety.unsafe_scores([m.rgb for m in decoded]),  # type: ignore[misc]
                            strict=True):
            m.scores["unsafe_score"] = score
    if clip is not None:
        sims = text_similarities(clip, row.get("items") or [], measures, config.context_chars,
                                 config.clip_batch_size)
        for m, sim in zip(measures, sims, strict=True):
            m.scores["text_similarity"] = sim
    for m in measures:
        m.rgb = None  # pixels are not carried past scoring
    return measures


def decide_image(policy: Policy, scores: dict[str, Any]) -> tuple[str, str]:
    """(decision, reason) for one image by block `image_rules_per_image`; undecoded always drops."""
    decision, reason = policy.decide(PER_IMAGE_BLOCK, scores)
    if decision == "keep" and not scores.get("decode_ok"):
        return "drop", "not_decoded"
    return decision, reason


def document_scores(measures: Sequence[ImageMeasure], kept: Sequence[bool],
                    config: ImageRulesConfig) -> dict[str, Any]:
    """Document scores from per-image measures and decisions (block `image_rules`)."""
    n, n_kept = len(measures), sum(kept)
    scores: dict[str, Any] = {"num_images": n, "num_images_kept": n_kept,
                              "num_images_dropped": n - n_kept,
                              "kept_image_fraction": round(n_kept / n, 6) if n else 1.0}
    if config.safety:
        unsafe = [m.scores.get("unsafe_score") for m in measures]
        scores["max_unsafe_score"] = max((u for u in unsafe if u is not None), default=0.0)
    if config.clip_model_dir:
        sims = [s for m in measures if (s := m.scores.get("text_similarity")) is not None]
        scores["mean_text_similarity"] = round(float(np.mean(sims)), 6) if sims else None
    return scores


def phash_hex(value: int | None) -> str | None:
    """A 64-bit hash as 16 hex digits: JSON-safe in the ledger (JSON numbers lose bits)."""
    return None if value is None else f"{value:016x}"


def drop_images(row: dict[str, Any], drops: dict[int, str]) -> dict[str, Any]:
    """The row's image columns without the kept images at `drops` (position -> reason).

    Positions are ordinals among the row's *current* image items; `image_status`,
    `image_bytes` and `image_phashes` stay aligned with the image items, and the
    dropped images stay in `image_decisions` with their reason. Shared by the
    stage and the pipeline's cross-document step.
    """
    items = list(row.get("items") or [])
    status = list(row.get("image_status") or [])
    blobs = list(row.get("image_bytes") or [None] * len(status))
    hashes = list(row.get("image_phashes") or [None] * len(status))
    decisions = [dict(d) for d in row.get("image_decisions") or []]
    kept_decisions = [d for d in decisions if d.get("kept")]
    out_items: list[dict[str, Any]] = []
    out_status: list[Any] = []
    out_blobs: list[Any] = []
    out_hashes: list[Any] = []
    position = 0
    for item in items:
        if item.get("type") != "image":
            out_items.append(item)
            continue
        if position in drops:
            if position < len(kept_decisions):
                kept_decisions[position].update(kept=False, dropped_reason=drops[position])
        else:
            out_items.append(item)
            if position < len(status):
                out_status.append(status[position])
                out_blobs.append(blobs[position])
                out_hashes.append(hashes[position])
        position += 1
    return {"items": out_items, "image_status": out_status, "image_bytes": out_blobs,
            "image_phashes": out_hashes, "image_decisions": decisions}


def score_images(row: dict[str, Any], policy: Policy, config: ImageRulesConfig,
                 safety: SafetyModel | None = None, clip: ClipRelevance | None = None,
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(document scores, ledger details, new columns) for one row: the stage's pure core."""
    measures = measure_document(row, config, safety, clip)
    per_image: list[dict[str, Any]] = []
    drops: dict[int, str] = {}
    for m in measures:
        decision, reason = decide_image(policy, m.scores)
        if decision != "keep":
            drops[m.position] = reason
        per_image.append({
            "position": m.position, "item_index": m.item_index, "src": m.src,
            "decision": decision, "dropped_reason": None if decision == "keep" else reason,
            "scores": m.scores, "phash": phash_hex(m.phash), "load_reason": m.load_reason,
            "message": m.message or None, "better_copy": m.better_copy})
    kept = [m.position not in drops for m in measures]
    scores = document_scores(measures, kept, config)
    details = {
        "images": per_image,
        "dropped_reasons": dict(sorted(Counter(drops.values()).items())),
        "per_image_thresholds": policy.thresholds(PER_IMAGE_BLOCK),
    }
    base = {**row, "image_phashes": [m.phash for m in measures],
            "image_decisions": [{"item_index": m.item_index, "src": m.src, "sha256": m.sha256,
                                 "phash": m.phash, "kept": True, "dropped_reason": None}
                                for m in measures]}
    return scores, details, drop_images(base, drops)


class ImageRulesStage(Stage):
    """Score and filter a document's images (policy blocks image_rules_per_image, image_rules)."""

    name: ClassVar[str] = STAGE
    version: ClassVar[str] = "1"
    kind = "map"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = ImageRulesConfig
    input_columns: ClassVar[tuple[str, ...]] = ("items", "image_status", "image_bytes")
    output_fields: ClassVar[list[pa.Field]] = IMAGE_RULES_FIELDS
    heavy_columns: ClassVar[tuple[str, ...]] = ("image_bytes",)
    uses_model = True  # only with safety or clip_model_dir; rule-only otherwise
    config: ImageRulesConfig

    def __init__(self, config: StageConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        check_policy(ctx.policy, self.config)  # a bad policy/config pair fails at start-up
        self.safety: SafetyModel | None = None
        self.clip: ClipRelevance | None = None

    def setup(self) -> None:
        """Load the optional models once per worker; a missing model fails here."""
        if self.config.safety:
            self.safety = SafetyModel(self.config.safety_model_path, self.config.safety_classes)
        if self.config.clip_model_dir:
            self.clip = ClipRelevance(self.config.clip_model_dir, self.config.device)

    def model_identity(self) -> tuple[str | None, str | None]:
        models = [m for m in (self.clip, self.safety) if m is not None]
        if not models:
            return None, None
        return "+".join(m.model_id for m in models), "+".join(m.revision for m in models)

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        scores, details, out = score_images(row, self.ctx.policy, self.config, self.safety,
                                            self.clip)
        return [Outcome(self.entry(row, scores, details=details), out)]


# ---- across documents --------------------------------------------------------------------
class ImageDedupConfig(BaseModel):
    """How near two pHashes must be to count as a copy when counting copies across documents."""

    model_config = ConfigDict(extra="forbid")
    copy_hamming: int = Field(4, ge=0, le=64, description="cross_doc_copies counts documents "
                              "holding an image within this many bits")


def _doc_id(row: dict[str, Any]) -> str:
    return str(row.get("item_id") or row.get("doc_id"))


def cross_doc_image_duplicates(docs: Sequence[dict[str, Any]],
                               config: ImageDedupConfig | None = None,
                               ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(document scores, details) per doc, in input order: each kept image vs other documents.

    Images are ranked across the run by the within-document rule (larger area,
    then document id, then position), so the result does not depend on the input
    order. Per image (details["images"], with `scores` for block `image_dedup`):
    `cross_doc_phash_distance`, the distance to the nearest better-ranked image
    of another document (NO_MATCH=64 when none or unhashed) with `duplicate_of`
    = {doc_id, position}; `cross_doc_copies`, how many other documents hold an
    image within `copy_hamming` bits (logos, banners). O(n²) popcounts over n
    hashed images in numpy: fine for tens of thousands; beyond, bucket hashes
    by bands first (multi-index hashing) and compare only candidates.
    """
    config = config or ImageDedupConfig()
    flat: list[tuple[int, int, int, int]] = []  # (doc index, position, area, hash)
    for d, row in enumerate(docs):
        status = list(row.get("image_status") or [])
        for p, h in enumerate(row.get("image_phashes") or []):
            if h is None:
                continue
            st = status[p] if p < len(status) else {}
            flat.append((d, p, int(st.get("width") or 0) * int(st.get("height") or 0), int(h)))
    ids = [_doc_id(r) for r in docs]
    flat.sort(key=lambda t: (-t[2], ids[t[0]], t[1]))
    hashes = np.array([t[3] for t in flat], dtype=np.uint64)
    owners = np.array([t[0] for t in flat], dtype=np.int64)
    per_image: dict[tuple[int, int], dict[str, Any]] = {}
    for r, (d, p, _, h) in enumerate(flat):
        dist = np.bitwise_count(hashes ^ np.uint64(h)).astype(np.int64)
        other = owners != d
        copies = len(np.unique(owners[other & (dist <= config.copy_hamming)]))
        prefix = np.flatnonzero(other[:r])
        distance, duplicate_of = NO_MATCH, None
        if len(prefix):
            k = prefix[int(np.argmin(dist[prefix]))]
            distance = int(dist[k])
            duplicate_of = {"doc_id": ids[flat[k][0]], "position": flat[k][1]}
        per_image[(d, p)] = {"position": p, "phash": phash_hex(h),
                             "scores": {"cross_doc_phash_distance": distance,
                                        "cross_doc_copies": copies},
                             "duplicate_of": duplicate_of}
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for d, row in enumerate(docs):
        n = len(row.get("image_phashes") or [])
        images = [per_image[(d, p)] for p in range(n) if (d, p) in per_image]
        scores = {"num_images": n, "num_images_hashed": len(images),
                  "min_cross_doc_phash_distance": min(
                      (i["scores"]["cross_doc_phash_distance"] for i in images), default=NO_MATCH),
                  "max_cross_doc_copies": max(
                      (i["scores"]["cross_doc_copies"] for i in images), default=0)}
        results.append((scores, {"images": images, "copy_hamming": config.copy_hamming}))
    return results


def image_dedup_entries(rows: Sequence[dict[str, Any]], policy: Policy,
                        config: ImageDedupConfig | None = None,
                        ) -> list[tuple[LedgerEntry, dict[str, Any]]]:
    """(ledger entry of stage `image_dedup`, new image columns) per row, in input order.

    Each image is decided by policy block `image_dedup` on its own scores; a
    dropped image leaves the row through `drop_images`. The document itself is
    kept here (its image count is judged again by `structure`, which should run
    after this step); the entry's scores are the per-document summary and its
    thresholds the per-image ones.
    """
    entries: list[tuple[LedgerEntry, dict[str, Any]]] = []
    for row, (scores, details) in zip(rows, cross_doc_image_duplicates(rows, config),
                                      strict=True):
        drops: dict[int, str] = {}
        for image in details["images"]:
            decision, reason = policy.decide(IMAGE_DEDUP_STAGE, image["scores"])
            image["decision"] = decision
            if decision != "keep":
                drops[image["position"]] = reason  # e.g. cross_doc_copies_above_max
            else:
                image["duplicate_of"] = None
        scores = {**scores, "num_images_dropped": len(drops)}
        entry = LedgerEntry(
            item_id=_doc_id(row), item_kind="web_doc", parent_id=row.get("parent_id"),
            source_id=row.get("source_id"), decision="keep", reason="ok", scores=scores,
            thresholds=policy.thresholds(IMAGE_DEDUP_STAGE), details=details)
        entries.append((entry, drop_images(row, drops) if drops else {}))
    return entries
