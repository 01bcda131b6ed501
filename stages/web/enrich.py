"""Caption-first and summaries: the model-written parts of a clean web document.

- **caption-first**: every kept image gets a VLM caption, inserted as a text
  item right before it, so a model reads what an image shows before it sees it;
- **summarise**: a run of text between two images (or a document's edge) longer
  than `max_run_tokens` is replaced by an LLM summary; the original text stays
  in the record's metadata (`summaries[].original`).

Pure helpers here; the pipeline sends the requests through the request cache
and records model ids, revisions and prompt hashes in the ledger. Inserted
items are listed in metadata (`captions[]`, `summaries[]`) so a reader can
tell model text from page text.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weft.stages.infer.prompts import PromptTemplate
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams


class CaptionFirstConfig(BaseModel):
    """Which VLM captions the images, and how."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    model: str = Field("caption-vlm", description="a name in the model registry")
    prompt: str = Field("image_caption", description="configs/prompts/<prompt>.yaml")
    max_tokens: int = Field(64, ge=1)
    image_max_side: int = Field(448, ge=28, description="images are resized to this long side")


class SummarizeConfig(BaseModel):
    """Which LLM summarises long text runs, and from what length."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    model: str = Field("filter-llm", description="a name in the model registry")
    prompt: str = Field("summarize_text", description="configs/prompts/<prompt>.yaml")
    max_run_tokens: int = Field(300, ge=1, description="longer text runs are summarised "
                                                       "(tokens of the model's tokenizer)")
    summary_words: int = Field(120, ge=10, description="asked-for summary length, words")
    max_tokens: int = Field(256, ge=1)
    max_input_chars: int = Field(12000, ge=100, description="longer runs are cut before asking")


def decode_rgb(data: bytes, max_side: int) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB, long side at most max_side (CPU, before the VLM)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        scale = min(1.0, max_side / max(im.size))
        if scale < 1.0:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()


def caption_requests(doc: dict[str, Any], prompt: PromptTemplate,
                     config: CaptionFirstConfig) -> list[ChatRequest]:
    """One request per image of the document, in order (images align with image_bytes)."""
    images = [i for i in doc["items"] if i["type"] == "image"]
    sampling = SamplingParams(max_tokens=config.max_tokens)
    return [ChatRequest(messages=prompt.messages(images=1, alt=(item.get("alt") or "")[:300]),
                        images=[decode_rgb(data, config.image_max_side)], sampling=sampling,
                        prompt_id=prompt.ref, prompt_hash=prompt.prompt_hash)
            for item, data in zip(images, doc["image_bytes"] or [], strict=True)]


@dataclass(frozen=True)
class TextRun:
    """Consecutive text items [start, end) of a document, and their joined text."""

    start: int
    end: int
    text: str


def text_runs(items: list[dict[str, Any]]) -> list[TextRun]:
    """The runs of consecutive text items, in order."""
    runs, start = [], None
    for k, item in enumerate([*items, {"type": "image"}]):
        if item["type"] == "text" and start is None:
            start = k
        elif item["type"] != "text" and start is not None:
            runs.append(TextRun(start, k, "\n\n".join(i["text"] or "" for i in items[start:k])))
            start = None
    return runs


def long_runs(items: list[dict[str, Any]], count_tokens: Any, max_tokens: int) -> list[TextRun]:
    return [r for r in text_runs(items) if count_tokens(r.text) > max_tokens]


def summary_requests(runs: list[TextRun], prompt: PromptTemplate,
                     config: SummarizeConfig) -> list[ChatRequest]:
    sampling = SamplingParams(max_tokens=config.max_tokens)
    return [ChatRequest(messages=prompt.messages(max_words=config.summary_words,
                                                 text=r.text[:config.max_input_chars]),
                        sampling=sampling, prompt_id=prompt.ref, prompt_hash=prompt.prompt_hash)
            for r in runs]


def usable_summary(run: TextRun, answer: Completion) -> bool:
    """A summary replaces its run only when it exists and is shorter than the original."""
    text = answer.text.strip()
    return answer.error is None and bool(text) and len(text) < len(run.text)


def _text_item(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "src": None, "alt": None, "path": None, "url": None}


def apply_enrichment(doc: dict[str, Any], captions: list[Completion],
                     runs: list[TextRun], summaries: list[Completion],
                     model_ids: dict[str, str]) -> dict[str, Any]:
    """The document's new items and metadata: summaries replace runs, captions precede images.

    Failed or empty captions, and summaries that are not shorter than their text,
    change nothing (the original stays).
    """
    items = list(doc["items"])
    meta = json.loads(doc.get("metadata") or "{}")
    replaced = {}
    for run, answer in zip(runs, summaries, strict=True):
        if usable_summary(run, answer):
            replaced[run.start] = (run, answer)
    out: list[dict[str, Any]] = []
    meta_summaries, meta_captions = [], []
    captions_iter = iter(captions)
    k = 0
    while k < len(items):
        if k in replaced:
            run, answer = replaced[k]
            meta_summaries.append({"item_index": len(out), "original": run.text,
                                   "model": model_ids.get("summarize"),
                                   "completion_tokens": answer.completion_tokens})
            out.append(_text_item(answer.text.strip()))
            k = run.end
            continue
        item = items[k]
        if item["type"] == "image":
            answer = next(captions_iter, None)
            if answer is not None and answer.error is None and answer.text.strip():
                meta_captions.append({"item_index": len(out),
                                      "model": model_ids.get("caption_first")})
                out.append(_text_item(answer.text.strip()))
        out.append(item)
        k += 1
    meta["captions"] = meta_captions
    meta["summaries"] = meta_summaries
    return {"items": out, "metadata": json.dumps(meta, sort_keys=True)}
