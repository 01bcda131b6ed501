"""The `verify` stage: rules on what was generated, plus a VLM judge; the policy decides.

Rule scores (every sample has those that fit its task):

    condition_chars        the prompt (t2i) or instruction (edit) length: empty or too long
    reasoning_chars        the reasoning's length: empty or too long
    reasoning_truncated    1 when the reasoning ran into the token cap
    detailed_prompt_chars  t2i: the rendered prompt's length
    image_min_side         the generated / target image's shorter side
    image_std              its grayscale standard deviation: blank or constant images
    image_size_match       t2i: 1 when the render has the requested size
    pair_difference        edit: mean absolute pixel difference of source and target
                           (0-255 at 64x64): a no-op edit

Judge scores (the VLM sees the image, or source and target, with the text):

    judge_parsed           1 when the answer has a VERDICT line (else `unparseable`)
    judge_ok               1 yes / 0 no / null when unparseable

The policy lists the rules before the judge, so a blank image is dropped for
`image_std_below_min`, not for what the judge said about it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy
from weft.stages.infer.prompts import PromptTemplate
from weft.stages.infer.types import ChatRequest, Completion
from weft.stages.synth.answers import parse_verdict
from weft.stages.synth.images import mean_abs_difference, measure, model_pixels
from weft.stages.synth.steps import (
    Gateway,
    Question,
    StepConfig,
    StepResult,
    answer_details,
    entry_for,
    pair_pixels,
    provenance,
    run_step,
)


class VerifyConfig(StepConfig):
    """The verification judge and how images are measured; thresholds live in the policy."""

    model: str = Field("caption-vlm", description="the judge: a VLM in the model registry")
    prompt: str = Field("synth_verify", description="t2i: configs/prompts/<prompt>.yaml")
    edit_prompt: str = Field("synth_verify_edit", description="edit and concept: the prompt "
                             "template")
    max_tokens: int = Field(48, ge=1, description="new tokens at most")
    judge_text_chars: int = Field(2000, ge=100, description="reasoning shown to the judge, at "
                                  "most (its head)")
    difference_side: int = Field(64, ge=8, description="side both images are resized to for "
                                 "pair_difference")


def rule_scores(row: dict[str, Any], config: VerifyConfig) -> dict[str, Any]:
    """The rule scores of one sample (pure; raises only on undecodable image bytes)."""
    t2i = row["task"] == "t2i"
    condition = row.get("prompt") if t2i else row.get("instruction")
    reasoning = row.get("reasoning") or ""
    scores: dict[str, Any] = {
        "condition_chars": len((condition or "").strip()),
        "reasoning_chars": len(reasoning.strip()),
        "reasoning_truncated": float(row.get("reasoning_finish") == "length"),
    }
    if t2i:
        scores["detailed_prompt_chars"] = len((row.get("detailed_prompt") or "").strip())
    target = measure(row["target_image"])
    scores.update(image_min_side=target.min_side, image_std=target.std)
    if t2i:
        scores["image_size_match"] = float((target.height, target.width) ==
                                           (row["render_height"], row["render_width"]))
    else:
        scores["pair_difference"] = mean_abs_difference(row["source_image"], row["target_image"],
                                                        config.difference_side)
    return scores


def verify_step(rows: list[dict[str, Any]], gateway: Gateway, policy: Policy,
                config: VerifyConfig, templates: dict[str, PromptTemplate],
                stage: str = "verify") -> list[StepResult]:
    """Rules and the judge for every sample (`templates`: "t2i" and "edit")."""
    t2i_q = Question(config.model, templates["t2i"])
    edit_q = Question(config.model, templates["edit"])
    sampling = config.sampling()
    head = config.judge_text_chars

    def build_t2i(row: dict[str, Any]) -> ChatRequest:
        t = t2i_q.template
        return ChatRequest(t.messages(images=1, prompt=row["prompt"],
                                      reasoning=(row.get("reasoning") or "")[:head]),
                           [model_pixels(row["target_image"], config.image_side)], sampling,
                           t.ref, t.prompt_hash)

    def build_edit(row: dict[str, Any]) -> ChatRequest:
        t = edit_q.template
        return ChatRequest(t.messages(images=2, instruction=row["instruction"],
                                      reasoning=(row.get("reasoning") or "")[:head]),
                           pair_pixels(row, config.image_side), sampling, t.ref, t.prompt_hash)

    rules: dict[str, dict[str, Any]] = {}

    def judge(row: dict[str, Any], completion: Completion, revision: str) -> StepResult:
        question = t2i_q if row["task"] == "t2i" else edit_q
        verdict = parse_verdict(completion.text)
        scores = {**rules[row["item_id"]], "judge_parsed": float(verdict is not None),
                  "judge_ok": verdict}
        details = {"task": row["task"], **answer_details(completion)}
        entry = entry_for(row, policy, stage, scores, details, model=config.model,
                          revision=revision, prompt=question.template)
        return StepResult(entry, {"judge_score": verdict, "generators": {
            **(row.get("generators") or {}),
            stage: provenance(question, revision, sampling, completion)}})

    measurable, broken = [], []
    for row in rows:
        try:
            rules[row["item_id"]] = rule_scores(row, config)
            measurable.append(row)
        except Exception as exc:  # bytes that do not decode: an error row, not a crash
            broken.append((row, exc))
    plan = {"t2i": (t2i_q, build_t2i), "edit": (edit_q, build_edit),
            "concept": (edit_q, build_edit)}
    results = dict(zip((r["item_id"] for r in measurable),
                       run_step(measurable, gateway, plan, dict.fromkeys(plan, judge), policy,
                                stage), strict=True))
    for row, exc in broken:
        results[row["item_id"]] = StepResult(LedgerEntry(
            item_id=row["item_id"], item_kind=row.get("item_kind") or "synth_sample",
            parent_id=row.get("parent_id"), source_id=row.get("source_id"), decision="error",
            reason="image_undecodable", error_type=type(exc).__name__,
            error_message=str(exc)[:2000], details={"task": row["task"]}))
    return [results[r["item_id"]] for r in rows]
