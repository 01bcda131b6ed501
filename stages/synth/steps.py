"""The model steps of synthesis: judge a pair, write an instruction, write the reasoning.

Each step is a plain function over sample rows: it builds chat requests from a
versioned prompt template, gets the answers through a `Gateway` (in the
pipeline: the registry's models behind the request cache; in tests: scripted
answers), parses the structured answer, scores, and lets the policy decide.
It returns one `StepResult` per row: the ledger entry and the row's new
columns. A task a step has nothing to do for is kept with `not_applicable`
(or `given`, when the input already holds what the step writes).

    pair_judge   concept: is (source -> target) a meaningful edit?      VERDICT: yes|no
    instruct     concept: the instruction from source to target          INSTRUCTION: ...
                 edit: given
    reason       t2i: reasoning + a detailed prompt (text-only LLM)      REASONING / PROMPT
                 edit, concept: reasoning from instruction to target     REASONING: ...

An answer without its fields keeps the raw text as a fallback, scores
`*_parsed = 0`, and the policy decides (`unparseable` under the default policy;
the tiny-model policy does not decide on it). A backend error is an error row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ids import hash_of
from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy
from weft.stages.infer.prompts import PromptTemplate
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams
from weft.stages.synth.answers import decide, parse_fields, parse_verdict
from weft.stages.synth.images import model_pixels

SAMPLE_KIND = "synth_sample"


class Gateway(Protocol):
    """Where a step's questions go: model name -> revision, and answers in request order."""

    def revision(self, model: str) -> str:
        ...

    def ask(self, model: str, requests: list[ChatRequest]) -> list[Completion]:
        ...


class StepConfig(BaseModel):
    """A model step: which model, which prompt template, how to sample."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a name in the model registry")
    prompt: str = Field(description="configs/prompts/<prompt>.yaml")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; above 0 each rollout "
                               "samples with its own seed")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="new tokens at most (the registry's "
                            "max_tokens caps it too)")
    image_side: int = Field(448, ge=28, description="images reach the model with their "
                            "longer side at most this many pixels")

    def sampling(self, seed: int = 0, step: str = "") -> SamplingParams:
        """Greedy steps ignore the seed (so every rollout shares one cached answer); sampled
        steps draw from the rollout's seed mixed with the step's name, so two steps of one
        rollout never share a random stream."""
        if self.temperature <= 0:
            return SamplingParams(temperature=0.0, top_p=self.top_p, max_tokens=self.max_tokens)
        mixed = int(hash_of("step-seed", seed, step, length=8), 16) & 0x7FFFFFFF
        return SamplingParams(temperature=self.temperature, top_p=self.top_p,
                              max_tokens=self.max_tokens, seed=mixed)


class PairJudgeConfig(StepConfig):
    """Is a pair of images from an interleaved run a meaningful conceptual edit?"""

    model: str = Field("caption-vlm", description="a VLM in the model registry")
    prompt: str = Field("synth_pair_judge", description="configs/prompts/<prompt>.yaml")
    max_tokens: int = Field(48, ge=1, description="new tokens at most")


class InstructConfig(StepConfig):
    """The instruction a person would give to turn a pair's source into its target."""

    model: str = Field("caption-vlm", description="a VLM in the model registry")
    prompt: str = Field("synth_pair_instruction", description="configs/prompts/<prompt>.yaml")
    temperature: float = Field(0.7, ge=0, description="0 = greedy; above 0 each rollout "
                               "samples with its own seed")
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(64, ge=1, description="new tokens at most")


class ReasonConfig(StepConfig):
    """Reasoning traces: the t2i query rewrite (an LLM) and edit reasoning (a VLM)."""

    model: str = Field("filter-llm", description="t2i: an LLM in the model registry that "
                       "writes the reasoning and a detailed prompt")
    prompt: str = Field("synth_query_rewrite", description="t2i: configs/prompts/<prompt>.yaml")
    edit_model: str = Field("caption-vlm", description="edit and concept: a VLM that sees "
                            "source and target")
    edit_prompt: str = Field("synth_edit_reasoning", description="edit: the prompt template")
    pair_prompt: str = Field("synth_pair_reasoning", description="concept: the prompt template")
    temperature: float = Field(0.7, ge=0, description="0 = greedy; above 0 each rollout "
                               "samples with its own seed")
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="new tokens at most")


@dataclass
class StepResult:
    """A step's verdict on one row and the columns it adds to the row."""

    entry: LedgerEntry
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Question:
    """One prompt template bound to the model that answers it."""

    model: str
    template: PromptTemplate


def entry_for(row: dict[str, Any], policy: Policy, stage: str, scores: dict[str, Any],
              details: dict[str, Any], *, model: str | None = None,
              revision: str | None = None, prompt: PromptTemplate | None = None,
              override: tuple[str, str] | None = None) -> LedgerEntry:
    """A sample's ledger entry, decided by the rules that apply to its scores."""
    decision, reason, thresholds = decide(policy, stage, scores)
    if override is not None:
        decision, reason = override
    return LedgerEntry(item_id=row["item_id"], item_kind=row.get("item_kind") or SAMPLE_KIND,
                       parent_id=row.get("parent_id"), source_id=row.get("source_id"),
                       decision=decision, reason=reason, scores=scores, thresholds=thresholds,
                       details=details, model_id=model, model_revision=revision,
                       prompt_hash=prompt.prompt_hash if prompt else None)


def skip(row: dict[str, Any], policy: Policy, stage: str, reason: str = "not_applicable"
         ) -> StepResult:
    """Kept: this step has nothing to do for the row's task."""
    return StepResult(entry_for(row, policy, stage, {}, {"task": row["task"]},
                                override=("keep", reason)))


def error_result(row: dict[str, Any], stage: str, completion: Completion, question: Question,
                 revision: str) -> StepResult:
    """A backend error for one request: the row errors, the run goes on."""
    return StepResult(LedgerEntry(
        item_id=row["item_id"], item_kind=row.get("item_kind") or SAMPLE_KIND,
        parent_id=row.get("parent_id"), source_id=row.get("source_id"), decision="error",
        reason="model_error", error_type="ModelError",
        error_message=(completion.error or "")[:2000],
        details={"task": row["task"], "stage": stage}, model_id=question.model,
        model_revision=revision, prompt_hash=question.template.prompt_hash))


def provenance(question: Question, revision: str, sampling: SamplingParams,
               completion: Completion) -> dict[str, Any]:
    """What a sample records about one generated text: model, revision, prompt, seed."""
    return {"model": question.model, "revision": revision, "prompt": question.template.ref,
            "prompt_hash": question.template.prompt_hash, "seed": sampling.seed,
            "temperature": sampling.temperature, "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason}


def answer_details(completion: Completion) -> dict[str, Any]:
    return {"answer": completion.text[:4000], "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason, "latency_ms": completion.latency_ms,
            "cached": completion.cached}


def pair_pixels(row: dict[str, Any], side: int) -> list[np.ndarray]:
    """The source and target as a VLM sees them."""
    return [model_pixels(row["source_image"], side), model_pixels(row["target_image"], side)]


Build = Callable[[dict[str, Any]], ChatRequest]
Judge = Callable[[dict[str, Any], Completion, str], StepResult]


def run_step(rows: list[dict[str, Any]], gateway: Gateway, plan: dict[str, tuple[Question, Build]],
             judge: dict[str, Judge], policy: Policy, stage: str,
             given: dict[str, str] | None = None) -> list[StepResult]:
    """Ask each row's question (by task), one gateway call per model, then judge the answers.

    `plan`: task -> (question, request builder); `judge`: task -> answer handler;
    `given`: task -> the keep reason for tasks the step skips ("given").
    """
    pending: dict[str, list[tuple[int, ChatRequest]]] = {}
    questions: dict[int, Question] = {}
    failed: dict[int, StepResult] = {}
    for i, row in enumerate(rows):
        if row["task"] in plan:
            question, build = plan[row["task"]]
            try:
                pending.setdefault(question.model, []).append((i, build(row)))
            except Exception as exc:  # e.g. image bytes that no longer decode: this row only
                failed[i] = StepResult(LedgerEntry(
                    item_id=row["item_id"], item_kind=row.get("item_kind") or SAMPLE_KIND,
                    parent_id=row.get("parent_id"), source_id=row.get("source_id"),
                    decision="error", reason="request_error", error_type=type(exc).__name__,
                    error_message=str(exc)[:2000], details={"task": row["task"]}))
            questions[i] = question
    answers: dict[int, Completion] = {}
    revisions: dict[str, str] = {}
    for model in sorted(pending):
        indices, requests = zip(*pending[model], strict=True)
        revisions[model] = gateway.revision(model)
        answers.update(zip(indices, gateway.ask(model, list(requests)), strict=True))
    out = []
    for i, row in enumerate(rows):
        if i in failed:
            out.append(failed[i])
            continue
        if i not in answers:
            out.append(skip(row, policy, stage, (given or {}).get(row["task"], "not_applicable")))
            continue
        completion, question = answers[i], questions[i]
        revision = revisions[question.model]
        if completion.error:
            out.append(error_result(row, stage, completion, question, revision))
        else:
            out.append(judge[row["task"]](row, completion, revision))
    return out


# ---- pair_judge ------------------------------------------------------------------------
def pair_judge_step(rows: list[dict[str, Any]], gateway: Gateway, policy: Policy,
                    config: PairJudgeConfig, template: PromptTemplate,
                    stage: str = "pair_judge") -> list[StepResult]:
    """Concept candidates: VERDICT yes/no on whether the pair is a meaningful edit."""
    question = Question(config.model, template)
    sampling = config.sampling()

    def build(row: dict[str, Any]) -> ChatRequest:
        return ChatRequest(template.messages(images=2, context=row["context"] or "two images"),
                           pair_pixels(row, config.image_side), sampling, template.ref,
                           template.prompt_hash)

    def judge(row: dict[str, Any], completion: Completion, revision: str) -> StepResult:
        verdict = parse_verdict(completion.text)
        scores = {"judge_parsed": float(verdict is not None), "meaningful": verdict}
        details = {"task": row["task"], **answer_details(completion)}
        entry = entry_for(row, policy, stage, scores, details, model=config.model,
                          revision=revision, prompt=template)
        return StepResult(entry, {"generators": {**(row.get("generators") or {}), stage:
                                                 provenance(question, revision, sampling,
                                                            completion)}})

    return run_step(rows, gateway, {"concept": (question, build)}, {"concept": judge},
                    policy, stage)


# ---- instruct --------------------------------------------------------------------------
def instruct_step(rows: list[dict[str, Any]], gateway: Gateway, policy: Policy,
                  config: InstructConfig, template: PromptTemplate,
                  stage: str = "instruct") -> list[StepResult]:
    """Concept samples get an instruction written (sampled with the rollout's seed)."""
    question = Question(config.model, template)

    def build(row: dict[str, Any]) -> ChatRequest:
        return ChatRequest(template.messages(images=2, context=row["context"] or "two images"),
                           pair_pixels(row, config.image_side), config.sampling(row["seed"], stage),
                           template.ref, template.prompt_hash)

    def judge(row: dict[str, Any], completion: Completion, revision: str) -> StepResult:
        fields = parse_fields(completion.text, ["INSTRUCTION"])
        instruction = fields["INSTRUCTION"] if fields else completion.text.strip()
        scores = {"instruction_parsed": float(fields is not None),
                  "instruction_chars": len(instruction)}
        details = {"task": row["task"], "fallback": None if fields else "raw_answer",
                   **answer_details(completion)}
        entry = entry_for(row, policy, stage, scores, details, model=config.model,
                          revision=revision, prompt=template)
        sampling = config.sampling(row["seed"], stage)
        return StepResult(entry, {"instruction": instruction, "generators": {
            **(row.get("generators") or {}),
            stage: provenance(question, revision, sampling, completion)}})

    return run_step(rows, gateway, {"concept": (question, build)}, {"concept": judge},
                    policy, stage, given={"edit": "given"})


# ---- reason ----------------------------------------------------------------------------
def reason_step(rows: list[dict[str, Any]], gateway: Gateway, policy: Policy,
                config: ReasonConfig, templates: dict[str, PromptTemplate],
                stage: str = "reason") -> list[StepResult]:
    """Every sample gets its reasoning; t2i samples also a detailed prompt to render.

    `templates`: task -> prompt template (t2i: the query rewrite).
    """
    questions = {"t2i": Question(config.model, templates["t2i"]),
                 "edit": Question(config.edit_model, templates["edit"]),
                 "concept": Question(config.edit_model, templates["concept"])}

    def build(row: dict[str, Any]) -> ChatRequest:
        template = questions[row["task"]].template
        sampling = config.sampling(row["seed"], stage)
        if row["task"] == "t2i":
            return ChatRequest(template.messages(prompt=row["prompt"]), [], sampling,
                               template.ref, template.prompt_hash)
        values = {"instruction": row["instruction"]}
        if row["task"] == "concept":
            values["context"] = row["context"] or "two images"
        return ChatRequest(template.messages(images=2, **values),
                           pair_pixels(row, config.image_side), sampling, template.ref,
                           template.prompt_hash)

    def judge(row: dict[str, Any], completion: Completion, revision: str) -> StepResult:
        question = questions[row["task"]]
        t2i = row["task"] == "t2i"
        fields = parse_fields(completion.text, ["REASONING", "PROMPT"] if t2i else ["REASONING"])
        reasoning = fields["REASONING"] if fields else completion.text.strip()
        updates: dict[str, Any] = {"reasoning": reasoning,
                                   "reasoning_finish": completion.finish_reason}
        scores: dict[str, Any] = {"reasoning_parsed": float(fields is not None),
                                  "reasoning_chars": len(reasoning)}
        if t2i:
            updates["detailed_prompt"] = fields["PROMPT"] if fields else row["prompt"]
            scores["detailed_prompt_chars"] = len(updates["detailed_prompt"])
        details = {"task": row["task"], "fallback": None if fields else "raw_answer",
                   **answer_details(completion)}
        entry = entry_for(row, policy, stage, scores, details, model=question.model,
                          revision=revision, prompt=question.template)
        updates["generators"] = {**(row.get("generators") or {}), stage: provenance(
            question, revision, config.sampling(row["seed"], stage), completion)}
        return StepResult(entry, updates)

    plan = {task: (q, build) for task, q in questions.items()}
    return run_step(rows, gateway, plan, dict.fromkeys(questions, judge), policy, stage)
