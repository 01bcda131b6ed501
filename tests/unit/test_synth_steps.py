"""Synthesis model steps without models: structured answers, the applicable-rules policy,
and verification dropping bad generations with their reasons (scripted answers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from weft.schemas.policy import Policy, load_policy
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.types import ChatRequest, Completion
from weft.stages.synth.answers import decide, parse_fields, parse_verdict
from weft.stages.synth.dedup import SynthDedupConfig, input_scores, output_scores
from weft.stages.synth.images import NO_MATCH, png_bytes
from weft.stages.synth.steps import (
    InstructConfig,
    PairJudgeConfig,
    ReasonConfig,
    instruct_step,
    pair_judge_step,
    reason_step,
)
from weft.stages.synth.verify import VerifyConfig, rule_scores, verify_step

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"
PRODUCTION = load_policy(POLICIES / "synth.yaml")
TINY = load_policy(POLICIES / "synth-tiny-models.yaml")


def _picture(seed: int, size: int = 300) -> bytes:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return png_bytes(cv2.GaussianBlur(noise, (9, 9), 3.0))


def _blank(size: int = 300) -> bytes:
    return png_bytes(np.full((size, size, 3), 128, np.uint8))


class Scripted:
    """A Gateway whose answers come from a function of (model, request)."""

    def __init__(self, answer: Callable[[str, ChatRequest], str],
                 finish: str = "stop") -> None:
        self.answer, self.finish = answer, finish
        self.asked: list[tuple[str, ChatRequest]] = []

    def revision(self, model: str) -> str:
        return f"rev-{model}"

    def ask(self, model: str, requests: list[ChatRequest]) -> list[Completion]:
        self.asked += [(model, r) for r in requests]
        return [Completion(self.answer(model, r), 10, 5, self.finish, 1.0) for r in requests]


def _user_text(request: ChatRequest) -> str:
    content = request.messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def _t2i(item: str, **extra) -> dict:
    row = {"item_id": item, "parent_id": f"in-{item}", "source_id": "src", "item_kind":
           "synth_sample", "task": "t2i", "prompt": "a red cat", "seed": 7, "input_id":
           f"in-{item}", "reasoning": "The user wants a cat that is red, sitting calmly.",
           "reasoning_finish": "stop", "detailed_prompt": "a red cat on a blue sofa, photo",
           "target_image": _picture(1), "render_height": 300, "render_width": 300}
    return {**row, **extra}


def _edit(item: str, **extra) -> dict:
    row = {"item_id": item, "parent_id": f"in-{item}", "source_id": "src", "item_kind":
           "synth_sample", "task": "edit", "instruction": "make it darker", "seed": 3,
           "input_id": f"in-{item}", "reasoning": "Darken every region, keep the layout.",
           "reasoning_finish": "stop", "source_image": _picture(2),
           "target_image": _picture(3), "context": "frames of one video clip"}
    return {**row, **extra}


# ---- structured answers -----------------------------------------------------------------
def test_parse_fields_reads_labelled_lines_with_markdown_and_multiline_values() -> None:
    text = "Sure!\n**REASONING:** first line\nsecond line\n\nPROMPT: a detailed prompt\n"
    assert parse_fields(text, ["REASONING", "PROMPT"]) == {
        "REASONING": "first line\nsecond line", "PROMPT": "a detailed prompt"}
    assert parse_fields("reasoning: ok\nNote: kept inside\nprompt: p", ["REASONING", "PROMPT"]) \
        == {"REASONING": "ok\nNote: kept inside", "PROMPT": "p"}
    assert parse_fields("REASONING: a cat. PROMPT: a red cat", ["REASONING", "PROMPT"]) == {
        "REASONING": "a cat.", "PROMPT": "a red cat"}
    # a lower-case word mid-line is text, not a label
    assert parse_fields("REASONING: the prompt: is short", ["REASONING"]) == {
        "REASONING": "the prompt: is short"}


@pytest.mark.parametrize("text", ["", "random words Gauigroup Sears", "REASONING: only one",
                                  "REASONING:\nPROMPT: empty reasoning"])
def test_parse_fields_is_none_without_every_field(text: str) -> None:
    assert parse_fields(text, ["REASONING", "PROMPT"]) is None


@pytest.mark.parametrize(("text", "verdict"), [("VERDICT: yes\nWHY: fine", 1.0),
                                               ("verdict: **No**, it is blank", 0.0),
                                               ("VERDICT: maybe", None), ("yes", None)])
def test_parse_verdict(text: str, verdict: float | None) -> None:
    assert parse_verdict(text) == verdict


def test_decide_applies_only_rules_whose_score_the_row_has() -> None:
    decision, reason, thresholds = decide(PRODUCTION, "verify", {"image_std": 0.0})
    assert (decision, reason) == ("drop", "image_std_below_min")
    assert set(thresholds) == {"image_std"}
    assert decide(PRODUCTION, "verify", {}) == ("keep", "ok", {})


def test_decide_names_a_broken_parsed_bound_unparseable() -> None:
    decision, reason, _ = decide(PRODUCTION, "pair_judge", {"judge_parsed": 0.0,
                                                            "meaningful": None})
    assert (decision, reason) == ("drop", "unparseable")


def test_policies_list_rules_for_pipeline_stages_only() -> None:
    from weft.pipelines.synth import STAGES

    names = {s.name for s in STAGES}
    for policy in (PRODUCTION, TINY):
        assert set(policy.rules) <= names
    # the tiny policy decides on no semantic score
    semantic = {"judge_parsed", "judge_ok", "meaningful", "reasoning_parsed",
                "instruction_parsed", "reasoning_truncated"}
    assert not semantic & {s for rules in TINY.rules.values() for s in rules}


# ---- model steps -----------------------------------------------------------------------
def test_reason_step_parses_the_rewrite_and_records_provenance() -> None:
    gateway = Scripted(lambda m, r: "REASONING: a cat, red fur, cosy room.\n"
                                    "PROMPT: a fluffy red cat on a sofa, warm light")
    rows = [_t2i("a", reasoning=None, detailed_prompt=None)]
    [result] = reason_step(rows, gateway, PRODUCTION, ReasonConfig(),
                           {"t2i": load_prompt("synth_query_rewrite"),
                            "edit": load_prompt("synth_edit_reasoning"),
                            "concept": load_prompt("synth_pair_reasoning")})
    assert result.entry.decision == "keep", result.entry
    assert result.updates["detailed_prompt"] == "a fluffy red cat on a sofa, warm light"
    assert result.updates["reasoning"] == "a cat, red fur, cosy room."
    provenance = result.updates["generators"]["reason"]
    assert provenance["model"] == "filter-llm" and provenance["revision"] == "rev-filter-llm"
    assert provenance["prompt"] == "synth_query_rewrite@1"
    assert result.entry.prompt_hash == load_prompt("synth_query_rewrite").prompt_hash
    [(model, request)] = gateway.asked
    assert model == "filter-llm" and request.sampling.seed != 0  # sampled with the rollout


def test_an_unparseable_answer_is_dropped_in_production_and_kept_for_tiny_models() -> None:
    gateway = Scripted(lambda m, r: "Luck Gauigroup Sears Principlesms cited example")
    templates = {"t2i": load_prompt("synth_query_rewrite"),
                 "edit": load_prompt("synth_edit_reasoning"),
                 "concept": load_prompt("synth_pair_reasoning")}
    rows = [_t2i("a", reasoning=None), _edit("b", reasoning=None)]
    prod = reason_step(rows, gateway, PRODUCTION, ReasonConfig(), templates)
    assert [(r.entry.decision, r.entry.reason) for r in prod] == [("drop", "unparseable")] * 2
    tiny = reason_step(rows, gateway, TINY, ReasonConfig(), templates)
    assert [r.entry.decision for r in tiny] == ["keep", "keep"]
    # the fallback: the raw answer is the reasoning, the user's prompt is rendered
    assert tiny[0].updates["reasoning"].startswith("Luck")
    assert tiny[0].updates["detailed_prompt"] == "a red cat"
    assert tiny[0].entry.scores["reasoning_parsed"] == 0.0


def test_pair_judge_and_instruct_act_on_concepts_only() -> None:
    rows = [_t2i("a"), _edit("b"), _edit("c", task="concept")]
    judge = Scripted(lambda m, r: "VERDICT: no\nWHY: the same scene")
    out = pair_judge_step(rows, judge, PRODUCTION, PairJudgeConfig(),
                          load_prompt("synth_pair_judge"))
    assert [(r.entry.decision, r.entry.reason) for r in out] == [
        ("keep", "not_applicable"), ("keep", "not_applicable"), ("drop", "meaningful_below_min")]
    assert len(judge.asked) == 1 and len(judge.asked[0][1].images) == 2
    writer = Scripted(lambda m, r: "INSTRUCTION: turn the lights off")
    out = instruct_step(rows, writer, PRODUCTION, InstructConfig(),
                        load_prompt("synth_pair_instruction"))
    assert [r.entry.reason for r in out] == ["not_applicable", "given", "ok"]
    assert out[2].updates["instruction"] == "turn the lights off"


def test_a_backend_error_is_an_error_row_not_a_crash() -> None:
    class Failing(Scripted):
        def ask(self, model, requests):
            return [Completion("", 0, 0, "error", 0.0, error="RuntimeError: OOM")
                    for _ in requests]

    out = pair_judge_step([_edit("c", task="concept")], Failing(lambda m, r: ""), PRODUCTION,
                          PairJudgeConfig(), load_prompt("synth_pair_judge"))
    assert (out[0].entry.decision, out[0].entry.reason) == ("error", "model_error")
    assert "OOM" in out[0].entry.error_message
    # bytes that cannot become a request fail their row only
    rows = [_edit("bad", task="concept", source_image=b"garbage"), _edit("ok", task="concept")]
    out = pair_judge_step(rows, Scripted(lambda m, r: "VERDICT: yes"), PRODUCTION,
                          PairJudgeConfig(), load_prompt("synth_pair_judge"))
    assert [(r.entry.decision, r.entry.reason) for r in out] == [("error", "request_error"),
                                                                ("keep", "ok")]


# ---- verification ------------------------------------------------------------------------
VERIFY_TEMPLATES = {"t2i": load_prompt("synth_verify"), "edit": load_prompt("synth_verify_edit")}


def _verify(rows: list[dict], answer: str = "VERDICT: yes\nWHY: fine",
            policy: Policy = PRODUCTION) -> list[tuple[str, str]]:
    out = verify_step(rows, Scripted(lambda m, r: answer), policy, VerifyConfig(),
                      VERIFY_TEMPLATES)
    return [(r.entry.decision, r.entry.reason) for r in out]


def test_verification_keeps_a_good_sample_of_each_task() -> None:
    assert _verify([_t2i("a"), _edit("b"), _edit("c", task="concept")]) == [("keep", "ok")] * 3


@pytest.mark.parametrize(("row", "reason"), [
    (_t2i("empty", reasoning="   "), "reasoning_chars_below_min"),
    (_t2i("long", reasoning="why " * 2000), "reasoning_chars_above_max"),
    (_edit("no-instruction", instruction=""), "condition_chars_below_min"),
    (_t2i("capped", reasoning_finish="length"), "reasoning_truncated_above_max"),
    (_t2i("blank", target_image=_blank()), "image_std_below_min"),
    (_t2i("small", target_image=_picture(1, 64), render_height=64, render_width=64),
     "image_min_side_below_min"),
    (_t2i("resized", render_height=320), "image_size_match_below_min"),
    (_edit("no-op", target_image=_picture(2)), "pair_difference_below_min"),
])
def test_a_failed_generation_is_dropped_with_its_reason(row: dict, reason: str) -> None:
    assert _verify([row]) == [("drop", reason)]


def test_the_judge_saying_no_drops_and_an_unreadable_verdict_is_unparseable() -> None:
    assert _verify([_t2i("a")], "VERDICT: no\nWHY: that is a dog") == [
        ("drop", "judge_ok_below_min")]
    assert _verify([_t2i("a")], "Gauigroup Sears") == [("drop", "unparseable")]
    # tiny models: the verdict is recorded, not decided on
    assert _verify([_t2i("a")], "Gauigroup Sears", TINY) == [("keep", "ok")]


def test_rules_come_before_the_judge_and_the_judge_sees_the_image() -> None:
    gateway = Scripted(lambda m, r: "VERDICT: no")
    [result] = verify_step([_t2i("blank", target_image=_blank())], gateway, PRODUCTION,
                           VerifyConfig(), VERIFY_TEMPLATES)
    assert result.entry.reason == "image_std_below_min"
    assert result.entry.scores["judge_ok"] == 0.0  # still scored, for re-thresholding
    [(_, request)] = gateway.asked
    assert len(request.images) == 1 and "a red cat" in _user_text(request)


def test_rule_scores_fit_the_task() -> None:
    t2i = rule_scores(_t2i("a"), VerifyConfig())
    edit = rule_scores(_edit("b"), VerifyConfig())
    assert "image_size_match" in t2i and "pair_difference" not in t2i
    assert "pair_difference" in edit and "detailed_prompt_chars" not in edit


# ---- dedup -----------------------------------------------------------------------------
def test_input_dedup_finds_near_duplicate_prompts_and_pairs() -> None:
    rows = [{"item_id": "a", "task": "t2i", "prompt": "A red cat on a sofa!"},
            {"item_id": "b", "task": "t2i", "prompt": "a red cat on a sofa"},
            {"item_id": "c", "task": "t2i", "prompt": "a lighthouse at dusk over the sea"},
            {"item_id": "d", "task": "edit", "source_image": _picture(5),
             "target_image": _picture(6)},
            {"item_id": "e", "task": "concept", "source_image": _picture(5),
             "target_image": _picture(6)},
            {"item_id": "f", "task": "edit", "source_image": _picture(7),
             "target_image": _picture(6)}]
    scores = [s for s, _ in input_scores(rows, SynthDedupConfig())]
    assert max(scores[0]["prompt_jaccard"], scores[1]["prompt_jaccard"]) == 1.0
    assert scores[2]["prompt_jaccard"] < 0.5
    assert scores[3]["pair_phash_distance"] == NO_MATCH  # the best-ranked pair
    assert scores[4]["pair_phash_distance"] == 0
    assert scores[5]["pair_phash_distance"] > 4  # same target, another source: no copy


def test_output_dedup_compares_across_inputs_only() -> None:
    rows = [{"item_id": "a", "input_id": "x", "target_image": _picture(1)},
            {"item_id": "b", "input_id": "x", "target_image": _picture(1)},
            {"item_id": "c", "input_id": "y", "target_image": _picture(1)},
            {"item_id": "d", "input_id": "z", "target_image": _blank()}]
    scores = [s["image_phash_distance"] for s, _ in output_scores(rows, SynthDedupConfig())]
    assert scores == [NO_MATCH, NO_MATCH, 0, NO_MATCH]
