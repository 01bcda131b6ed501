"""Structure: the shape of an interleaved document, as scores the policy can bound.

An interleaved sample is useful when images and text alternate in sensible
proportions: a gallery of forty thumbnails with three words of caption, or a
page whose every image failed the image rules, teaches little. The stage
measures the document as it stands after `image_rules` (so image items are the
*kept* images):

- `num_items`, `num_text_items`, `num_images_kept`: item counts;
- `text_chars`: characters of all text items; `text_words`: their words
  (the heuristics stage's definition: whitespace tokens without surrounding
  punctuation, so the two stages count alike);
- `images_per_1k_words`: num_images_kept × 1000 / max(text_words, 1) (a document
  with images and no words scores 1000 per image, above any sane bound);
- `longest_text_run_words`: words of the longest stretch of consecutive text
  items between two images (or the ends), the longest span of text without
  visual context; its characters go to the details.

Policy block `structure` decides; the published interleaved corpora bound
images per document, weft adds the balance bound (see configs/policies/web.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from weft.stages.base import Outcome, Resources, Stage, StageConfig
from weft.stages.web.heuristics import split_words


def structure_scores(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, details) of an item list (schemas/web.py items); pure, hand-checkable."""
    n_text = n_images = chars = words = 0
    run_words = run_chars = best_words = best_chars = 0
    runs = 0
    in_run = False
    for item in items:
        if item.get("type") == "image":
            n_images += 1
            run_words = run_chars = 0
            in_run = False
            continue
        text = item.get("text") or ""
        n_words = len(split_words(text))
        n_text += 1
        chars += len(text)
        words += n_words
        if not in_run:
            runs, in_run = runs + 1, True
        run_words += n_words
        run_chars += len(text)
        if (run_words, run_chars) > (best_words, best_chars):
            best_words, best_chars = run_words, run_chars
    scores = {
        "num_items": len(items),
        "num_text_items": n_text,
        "num_images_kept": n_images,
        "text_chars": chars,
        "text_words": words,
        "images_per_1k_words": round(n_images * 1000 / max(words, 1), 6),
        "longest_text_run_words": best_words,
    }
    details = {"longest_text_run_chars": best_chars, "text_runs": runs}
    return scores, details


class StructureConfig(StageConfig):
    """Nothing to tune in how structure is measured; thresholds live in the policy."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=64))


class StructureStage(Stage):
    """Score the image/text layout of each document (policy block `structure`)."""

    name: ClassVar[str] = "structure"
    version: ClassVar[str] = "1"
    kind = "map"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = StructureConfig
    input_columns: ClassVar[tuple[str, ...]] = ("items",)  # adds no columns: scores -> ledger
    uses_model = False

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        scores, details = structure_scores(list(row.get("items") or []))
        return [Outcome(self.entry(row, scores, details=details), {})]
