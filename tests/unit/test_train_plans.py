"""Sequence plans: each sample kind becomes the recipe its kind should (hand-built records)."""

from __future__ import annotations

import pytest

from weft.schemas.shards import KINDS, ShardFormatError, validate_record
from weft.train.plans import (
    CONVERTERS,
    PlanError,
    PlanItem,
    UnknownKindError,
    plan_sample,
)

KEY = "ab" * 8


def _img(n: int) -> dict:
    return {"type": "image", "member": f"{KEY}.{n}.jpg"}


def _frame(n: int, t: float) -> dict:
    return {"type": "video_frame", "member": f"{KEY}.{n}.jpg", "time_s": t}


def _text(role: str, text: str = "words") -> dict:
    return {"type": "text", "role": role, "text": text}


def _record(kind: str, sequence: list[dict]) -> dict:
    record = {"key": KEY, "kind": kind, "sequence": sequence}
    validate_record(record)  # hand-built records are valid shard records
    return record


def _shape(items: tuple[PlanItem, ...]) -> list[tuple]:
    """(type, member n or text, loss, enable_cfg, same position) per item."""
    out = []
    for it in items:
        what = it.text if it.type == "text" else int(it.image.split(".")[1])
        out.append((it.type, what, it.loss, it.enable_cfg, it.same_image_as_previous))
    return out


def test_every_shard_kind_has_a_plan():
    assert set(CONVERTERS) == set(KINDS)


def test_video_clip_conditions_on_the_first_frame_and_generates_the_rest():
    plan = plan_sample(_record("video_clip", [
        _frame(0, 1.0), _text("caption", "a"), _frame(1, 1.25), _text("caption", "b"),
        _frame(2, 1.75)]), dataset="video")
    assert plan.dataset == "video" and plan.kind == "video_clip" and plan.generates_image
    assert _shape(plan.items) == [
        ("vae_image", 0, False, True, False), ("vit_image", 0, False, True, True),
        ("text", "a", True, False, False),
        ("vae_image", 1, True, False, False),  # generated: noised, with loss
        ("vae_image", 1, False, False, True), ("vit_image", 1, False, False, True),
        ("text", "b", True, False, False),
        ("vae_image", 2, True, False, False),  # last: nothing follows, no clean copy
    ]
    assert [it.frame_delta for it in plan.items] == [0, 0, 0, 250, 250, 250, 0, 500]
    # units: condition | caption | target | its clean copy | caption | target
    assert [it.split for it in plan.items] == [0, 0, 1, 2, 3, 3, 4, 5]
    assert [it.noised for it in plan.items] == [False, False, False, True, False, False,
                                                 False, True]


def test_web_doc_trains_text_and_generates_images_conditioned_on_the_caption_before():
    plan = plan_sample(_record("web_doc", [
        _text("title", "T"), _text("caption", "c"), _img(0), _text("text", "body"),
        _img(1)]))
    assert _shape(plan.items) == [
        ("text", "T", True, False, False),
        ("text", "c", True, True, False),  # the caption-first text conditions the image
        ("vae_image", 0, True, False, False),
        ("vae_image", 0, False, False, True), ("vit_image", 0, False, False, True),
        ("text", "body", True, True, False),
        ("vae_image", 1, True, False, False),
    ]


def test_text_to_image_is_a_droppable_prompt_then_a_generated_image():
    plan = plan_sample(_record("text_to_image", [_text("prompt", "a cat"), _img(0)]))
    assert _shape(plan.items) == [("text", "a cat", False, True, False),
                                  ("vae_image", 0, True, False, False)]


def test_image_edit_conditions_on_the_source_and_the_instruction():
    plan = plan_sample(_record("image_edit", [_img(0), _text("instruction", "make it red"),
                                              _img(1)]))
    assert _shape(plan.items) == [
        ("vae_image", 0, False, True, False), ("vit_image", 0, False, True, True),
        ("text", "make it red", False, True, False),
        ("vae_image", 1, True, False, False)]


def test_vqa_reads_the_image_and_trains_only_on_answers():
    plan = plan_sample(_record("vqa", [_img(0), _text("question", "what?"),
                                       _text("answer", "a dog"), _text("question", "colour?"),
                                       _text("answer", "brown")]))
    assert _shape(plan.items) == [
        ("vit_image", 0, False, False, False), ("text", "what?", False, False, False),
        ("text", "a dog", True, False, False), ("text", "colour?", False, False, False),
        ("text", "brown", True, False, False)]
    assert not plan.generates_image


def test_reasoning_kinds_train_on_the_reasoning_before_generating():
    t2i = plan_sample(_record("reasoning_t2i", [_text("prompt", "p"), _text("reasoning", "r"),
                                                _img(0)]))
    assert _shape(t2i.items) == [("text", "p", False, True, False),
                                 ("text", "r", True, False, False),
                                 ("vae_image", 0, True, False, False)]
    edit = plan_sample(_record("reasoning_edit", [_img(0), _text("instruction", "i"),
                                                  _text("reasoning", "r"), _img(1)]))
    assert _shape(edit.items) == [
        ("vae_image", 0, False, True, False), ("vit_image", 0, False, True, True),
        ("text", "i", False, True, False), ("text", "r", True, False, False),
        ("vae_image", 1, True, False, False)]


@pytest.mark.parametrize("kind, sequence, words", [
    ("text_to_image", [_img(0), _text("prompt")], "prompt, image"),
    ("image_edit", [_img(0), _text("instruction")], "image, instruction, image"),
    ("vqa", [_img(0), _text("answer"), _text("question")], "question / answer"),
    ("text_to_image", [_text("caption"), _img(0)], "no text role 'caption'"),
    ("web_doc", [_text("answer"), _img(0)], "no text role 'answer'"),
    ("video_clip", [_text("shout"), _frame(0, 0.0), _frame(1, 1.0)], "known roles"),
])
def test_a_record_that_does_not_fit_its_kind_is_refused_with_the_shape(kind, sequence, words):
    with pytest.raises(PlanError, match=words):
        plan_sample(_record(kind, sequence))


def test_a_plan_without_any_loss_is_refused():
    with pytest.raises(PlanError, match="nothing to learn"):
        plan_sample(_record("video_clip", [_frame(0, 0.0)]))


def test_an_unknown_kind_is_a_clear_error():
    with pytest.raises(UnknownKindError, match=r"'audio_clip'.*known kinds"):
        plan_sample({"key": KEY, "kind": "audio_clip", "sequence": [_text("text")]})
    with pytest.raises(ShardFormatError, match="kind must be one of"):
        validate_record({"key": KEY, "kind": "audio_clip", "sequence": [_text("text")]})
