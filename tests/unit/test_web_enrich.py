"""Caption-first and summaries applied to a document, without a model."""

from __future__ import annotations

import json

from weft.stages.infer.types import Completion
from weft.stages.web.enrich import apply_enrichment, long_runs, text_runs


def _text(t: str) -> dict:
    return {"type": "text", "text": t, "src": None, "alt": None, "path": None, "url": None}


def _image(src: str) -> dict:
    return {"type": "image", "text": None, "src": src, "alt": None, "path": src, "url": None}


DOC = {"items": [_text("a b c"), _text("d e f g h i"), _image("1.png"), _text("j"),
                 _image("2.png")], "metadata": "{}"}


def _ok(text: str) -> Completion:
    return Completion(text, 5, 3, "stop", 1.0)


def test_text_runs_are_consecutive_text_items() -> None:
    runs = text_runs(DOC["items"])
    assert [(r.start, r.end, r.text) for r in runs] == [(0, 2, "a b c\n\nd e f g h i"),
                                                       (3, 4, "j")]
    assert [r.start for r in long_runs(DOC["items"], lambda t: len(t.split()), 3)] == [0]


def test_captions_go_before_images_and_summaries_replace_runs() -> None:
    (run,) = long_runs(DOC["items"], lambda t: len(t.split()), 3)
    out = apply_enrichment(DOC, [_ok("a cat"), _ok("a dog")], [run], [_ok("short")],
                           {"caption_first": "vlm@r", "summarize": "llm@r"})
    texts = [(i["type"], i["text"] or i["src"]) for i in out["items"]]
    assert texts == [("text", "short"), ("text", "a cat"), ("image", "1.png"), ("text", "j"),
                     ("text", "a dog"), ("image", "2.png")]
    meta = json.loads(out["metadata"])
    assert [c["item_index"] for c in meta["captions"]] == [1, 4]
    assert meta["summaries"][0]["original"] == "a b c\n\nd e f g h i"


def test_failed_empty_or_longer_answers_change_nothing() -> None:
    (run,) = long_runs(DOC["items"], lambda t: len(t.split()), 3)
    failed = Completion("", 0, 0, "error", 0.0, error="boom")
    out = apply_enrichment(DOC, [failed, _ok("  ")], [run],
                           [_ok("a much longer answer than the passage it summarises")], {})
    assert out["items"] == DOC["items"]
    meta = json.loads(out["metadata"])
    assert meta["captions"] == [] and meta["summaries"] == []
