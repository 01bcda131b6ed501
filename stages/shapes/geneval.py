"""Toy GenEval: score generated images, edits, answers and captions against known truth.

Text-to-image follows GenEval's six categories and rules: an image passes when the
detector finds every required object (shape, and colour when the prompt names one),
exactly N of them for counting, and, for position, some pair in the asked relation
(GenEval's box-centre rule). Edits pass when the detected scene is the target scene
(same objects, centres within `pos_tol`). Answers pass when they equal the truth
after normalising; captions when they name exactly the scene's objects (and any
relation they state holds).

The detector reads generated images in the world's shape vocabulary (`SceneConfig.shapes`,
`detect(..., shapes=)`), as GenEval's detector reads only its benchmark's classes and as
VQA answers are closed over the world's words: in a world of circles, squares and
triangles a blob is whichever of those it fits best, or "unknown" when it fits none
(IoU < 0.7); it is never a diamond. Colours stay the whole palette: a red-yellow blend
reads as orange, a colour no prompt asks for, and fails.

`evaluate` turns (category, pass) pairs into a table of per-category accuracy, the
overall score (the mean over categories, as GenEval reports it) and each category's
chance level with the binomial p of beating it (`binomial_tail`), so a test or a report
can say "above chance" and mean it. `chance_levels` measures
chance: random scenes scored against the prompts, random answers from each question
type's answer space, captions of random scenes, and edits answered by a random scene
or by the unchanged source. Held-out evaluation sets (`eval_*`) draw from a seed
domain the training generator never uses.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import numpy as np

from weft.stages.shapes.detect import detect, match_scene
from weft.stages.shapes.edits import EDIT_OPS, Edit, sample_edit
from weft.stages.shapes.render import degrade, render
from weft.stages.shapes.scene import (
    OPPOSITE,
    SHAPES,
    Obj,
    Scene,
    SceneConfig,
    pick,
    relations,
    sample_scene,
)
from weft.stages.shapes.text import (
    CATEGORIES,
    QA,
    QUESTION_TYPES,
    PromptSpec,
    Requirement,
    answer_space,
    caption,
    caption_correct,
    normalize_answer,
    prompt_scene,
    sample_prompt,
    vqa_pairs,
)

EVAL_SALT = 0x5EED_E7A1  # first seed word of every evaluation draw (training draws never use it)


# ---- single judgements ------------------------------------------------------------------------
def score_prompt(spec: PromptSpec, objects: Sequence[Obj] | Scene) -> bool:
    """GenEval's rule for one image, given the objects detected in it."""
    objs = list(objects.objects if isinstance(objects, Scene) else objects)
    groups = []
    for req in spec.objects:
        found = [o for o in objs
                 if o.shape == req.shape and (req.colour is None or o.colour == req.colour)]
        if len(found) < req.count or (req.exact and len(found) != req.count):
            return False
        groups.append(found)
    if spec.relation is None:
        return True
    return any(spec.relation in relations(a, b) for a in groups[0] for b in groups[1])


def geneval_image(spec: PromptSpec, image: np.ndarray,
                  shapes: Sequence[str] = SHAPES) -> bool:
    """Does a generated RGB image pass its prompt? `shapes`: the world's vocabulary."""
    return score_prompt(spec, detect(image, shapes=tuple(shapes)))


def default_pos_tol(image_size: int) -> float:
    """How far a detected centre may be from the target's: an eighth of the image side."""
    return image_size / 8


def edit_correct(target: Scene, image: np.ndarray, pos_tol: float | None = None,
                 shapes: Sequence[str] = SHAPES) -> bool:
    """The edited image shows the target scene: same objects, centres within pos_tol
    (read in the world's shape vocabulary `shapes`)."""
    tol = default_pos_tol(target.image_size) if pos_tol is None else pos_tol
    return match_scene(target, detect(image, shapes=tuple(shapes)), tol)


def edit_accuracy(targets: Sequence[Scene], images: Sequence[np.ndarray],
                  pos_tol: float | None = None, shapes: Sequence[str] = SHAPES) -> float:
    """The share of edited images that show their target scenes."""
    return _mean([edit_correct(t, im, pos_tol, shapes)
                  for t, im in zip(targets, images, strict=True)])


def answer_correct(answer: str, truth: str | QA) -> bool:
    want = truth.answer if isinstance(truth, QA) else truth
    return normalize_answer(answer) == normalize_answer(want)


def vqa_accuracy(answers: Sequence[str], truths: Sequence[str | QA]) -> float:
    """The share of answers equal to the truth after normalising."""
    return _mean([answer_correct(a, t) for a, t in zip(answers, truths, strict=True)])


def caption_accuracy(captions: Sequence[str], scenes: Sequence[Scene]) -> float:
    """The share of captions that name exactly their scene's objects (relations hold)."""
    return _mean([caption_correct(c, s) for c, s in zip(captions, scenes, strict=True)])


def _mean(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def detector_accuracy(cfg: SceneConfig, n: int = 500, blur: float = 0.0, noise: float = 0.0,
                      seed: int = 0, pos_tol: float = 1.0, size_tol: float | None = 0.0
                      ) -> float:
    """The share of n random scenes the detector reads back from their renders (blurred by
    `blur` px and noised by `noise` when given), in the world's shape vocabulary as the
    evaluation reads: how far to trust every score here."""
    rng = eval_rng(seed, 4)
    hits = []
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        image = render(scene)
        if blur or noise:
            image = degrade(image, rng, blur, noise)
        hits.append(match_scene(scene, detect(image, shapes=tuple(cfg.shapes)), pos_tol,
                                size_tol))
    return _mean(hits)


# ---- the table --------------------------------------------------------------------------------
def chance_for_test(chance: float, draws: int | None) -> float:
    """The chance rate a significance test uses: the measured rate, except that a rate
    measured as 0 becomes the rule of three's 95% upper bound, 3 / draws (that none of 75
    random scenes matched an edit does not make one hit in 48 a discovery)."""
    return 3.0 / draws if chance == 0 and draws else chance


def binomial_tail(correct: int, n: int, chance: float) -> float:
    """P(at least `correct` of n right by chance): the one-sided exact binomial p-value.

    At 48 items a row, 0.65 against a chance of 0.52 is p ~ 0.05, 0.23 against 0.22 is
    p ~ 0.5: the p-value says which rows show learning and which are noise.
    """
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct}")
    if chance <= 0:
        return 0.0 if correct > 0 else 1.0
    if chance >= 1:
        return 1.0
    # in log space: comb(n, k) overflows a float from n ~ 1030
    log_p, log_q, log_n = math.log(chance), math.log1p(-chance), math.lgamma(n + 1)
    return min(1.0, math.fsum(
        math.exp(log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p
                 + (n - k) * log_q) for k in range(correct, n + 1)))


@dataclass
class CategoryScore:
    category: str
    n: int
    correct: int
    accuracy: float
    chance: float | None = None
    chance_draws: int | None = None  # how many draws measured `chance`

    @property
    def p_value(self) -> float | None:
        """One-sided binomial p of this many right at the chance rate (`chance_for_test`;
        None: no chance)."""
        if self.chance is None:
            return None
        return binomial_tail(self.correct, self.n,
                             chance_for_test(self.chance, self.chance_draws))


@dataclass
class EvalTable:
    """Per-category accuracy, the overall score (mean over categories) and chance."""

    rows: list[CategoryScore] = field(default_factory=list)

    @property
    def overall(self) -> float:
        return _mean([r.accuracy for r in self.rows]) if self.rows else 0.0

    def accuracy(self, category: str) -> float:
        return next(r.accuracy for r in self.rows if r.category == category)

    def beats_chance(self, margin: float = 0.0) -> dict[str, bool]:
        """Per category: accuracy above chance + margin (categories without a chance: absent)."""
        return {r.category: r.accuracy > r.chance + margin for r in self.rows
                if r.chance is not None}

    def above_chance(self, alpha: float = 0.05) -> dict[str, bool]:
        """Per category: above chance at significance alpha (one-sided exact binomial test,
        chance taken as known); categories without a chance: absent."""
        return {r.category: r.p_value < alpha for r in self.rows if r.p_value is not None}

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [{**asdict(r), "p_value": r.p_value} for r in self.rows],
                "overall": self.overall}

    def to_markdown(self) -> str:
        lines = ["| category | n | accuracy | chance | p |", "|---|---:|---:|---:|---:|"]
        for r in self.rows:
            chance = "-" if r.chance is None else f"{r.chance:.3f}"
            lines.append(f"| {r.category} | {r.n} | {r.accuracy:.3f} | {chance} | "
                         f"{_p_text(r.p_value)} |")
        lines.append(f"| **overall** | {sum(r.n for r in self.rows)} | {self.overall:.3f} "
                     "| | |")
        return "\n".join(lines)


def _p_text(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def evaluate(results: Iterable[tuple[str, bool]],
             chance: Mapping[str, float] | None = None,
             order: Sequence[str] | None = None,
             chance_draws: Mapping[str, int] | None = None) -> EvalTable:
    """(category, passed) pairs as a table; `order` fixes the row order (default: sorted);
    `chance_draws`: how many draws measured each chance (`chance_levels()["draws"]`)."""
    tally: dict[str, list[int]] = {}
    for category, passed in results:
        counts = tally.setdefault(category, [0, 0])
        counts[0] += 1
        counts[1] += bool(passed)
    names = [c for c in (order or sorted(tally)) if c in tally]
    names += sorted(set(tally) - set(names))
    return EvalTable([CategoryScore(c, tally[c][0], tally[c][1], tally[c][1] / tally[c][0],
                                    (chance or {}).get(c), (chance_draws or {}).get(c))
                      for c in names])


def geneval(specs: Sequence[PromptSpec], images: Sequence[np.ndarray],
            chance: Mapping[str, float] | None = None) -> EvalTable:
    """GenEval's table for generated images, one per prompt spec."""
    results = [(s.category, geneval_image(s, im)) for s, im in zip(specs, images, strict=True)]
    return evaluate(results, chance, CATEGORIES)


# ---- held-out evaluation sets -----------------------------------------------------------------
def eval_rng(seed: int, *words: int) -> np.random.Generator:
    """The evaluation's draws: salted apart from every training draw, one stream per
    (seed, words); word 0 prompts, 1 edits, 2 VQA, 3 captions, 10-13 chance, 20 diagnosis."""
    return np.random.default_rng([EVAL_SALT, seed, *words])


def eval_prompts(cfg: SceneConfig, per_category: int, seed: int = 0) -> list[PromptSpec]:
    """per_category prompts of each GenEval category (no two alike while the world allows)."""
    out: list[PromptSpec] = []
    for c, category in enumerate(CATEGORIES):
        seen: set[str] = set()
        for i in range(per_category):
            spec = sample_prompt(eval_rng(seed, 0, c, i), cfg, category)
            for attempt in range(1, 20):
                if spec.prompt not in seen:
                    break
                spec = sample_prompt(eval_rng(seed, 0, c, i, attempt), cfg, category)
            seen.add(spec.prompt)
            out.append(spec)
    return out


def eval_edits(cfg: SceneConfig, per_op: int, seed: int = 0) -> list[Edit]:
    """per_op edits of each operation, on fresh scenes."""
    out: list[Edit] = []
    for o, op in enumerate(EDIT_OPS):
        for i in range(per_op):
            for attempt in range(100):
                rng = eval_rng(seed, 1, o, i, attempt)
                edit = sample_edit(rng, sample_scene(rng, cfg), cfg, op)
                if edit is not None:
                    out.append(edit)
                    break
    return out


def eval_vqa(cfg: SceneConfig, per_type: int, seed: int = 0,
             types: tuple[str, ...] = QUESTION_TYPES) -> list[tuple[Scene, list[QA]]]:
    """per_type scenes of each question type, one question each: every type gets the same
    number of items (types drawn at random left some rows at 19 of 144)."""
    out = []
    for t, qtype in enumerate(types):
        for i in range(per_type):
            for attempt in range(100):
                rng = eval_rng(seed, 2, t, i, attempt)
                scene = sample_scene(rng, cfg)
                qas = vqa_pairs(rng, scene, cfg, 1, (qtype,))
                if qas:
                    out.append((scene, qas))
                    break
    return out


def eval_captions(cfg: SceneConfig, n: int, seed: int = 0) -> list[Scene]:
    """n scenes to caption."""
    return [sample_scene(eval_rng(seed, 3, i), cfg) for i in range(n)]


# ---- chance -----------------------------------------------------------------------------------
class ChanceLevels(TypedDict):
    """What `chance_levels` measured: rates per category, and the draws each rests on."""

    geneval: dict[str, float]
    vqa: dict[str, float]
    vqa_majority: dict[str, float]
    caption: dict[str, float]
    edit: dict[str, float]
    edit_copy: dict[str, float]
    draws: dict[str, int]


def chance_levels(cfg: SceneConfig, n: int = 1000, seed: int = 0) -> ChanceLevels:
    """Chance per category, measured on n draws each (scene-level: the detector is exact).

    geneval: a random scene scored against a random prompt of the category;
    vqa: a uniformly random answer from the question type's answer space
    (`vqa_majority`: always the type's most frequent answer, the prior a blind model learns);
    caption: the caption of another random scene; edit: a random scene as the edit
    (`edit`) and the unchanged source (`edit_copy`, the do-nothing baseline).
    `draws`: how many draws each measured rate rests on, by table row
    (`geneval/colors`, `edit/add`, `vqa/count`, `caption`).
    """
    out = ChanceLevels(geneval={}, vqa={}, vqa_majority={}, caption={}, edit={}, edit_copy={},
                       draws={})
    for c, category in enumerate(CATEGORIES):
        hits = [score_prompt(sample_prompt(eval_rng(seed, 10, c, i), cfg, category),
                             sample_scene(eval_rng(seed, 11, c, i), cfg)) for i in range(n)]
        out["geneval"][category] = _mean(hits)
        out["draws"][f"geneval/{category}"] = len(hits)
    votes: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    answers: dict[str, list[str]] = {t: [] for t in QUESTION_TYPES}
    for i, (_, pairs) in enumerate(eval_vqa(cfg, n, seed + 1)):
        rng = eval_rng(seed, 12, i)
        for qa in pairs:
            votes[qa.type].append(answer_correct(pick(rng, answer_space(qa.type, cfg)), qa))
            answers[qa.type].append(qa.answer)
    out["vqa"] = {t: _mean(v) for t, v in votes.items() if v}
    out["vqa_majority"] = {t: max(Counter(a).values()) / len(a)
                           for t, a in answers.items() if a}
    out["draws"].update({f"vqa/{t}": len(a) for t, a in answers.items() if a})
    scenes = eval_captions(cfg, n + 1, seed + 1)
    out["caption"]["caption"] = _mean([caption_correct(caption(a), b)
                                       for a, b in itertools.pairwise(scenes)])
    out["draws"]["caption"] = len(scenes) - 1
    edits = eval_edits(cfg, max(1, n // len(EDIT_OPS)), seed + 1)
    tol = default_pos_tol(cfg.image_size)
    for op in EDIT_OPS:
        mine = [e for e in edits if e.op == op]
        out["edit"][op] = _mean([match_scene(e.target, sample_scene(eval_rng(seed, 13, i), cfg),
                                             tol) for i, e in enumerate(mine)])
        out["edit_copy"][op] = _mean([match_scene(e.target, e.source, tol) for e in mine])
        out["draws"][f"edit/{op}"] = len(mine)
    return out


def wrong_scene(rng: np.random.Generator, cfg: SceneConfig, spec: PromptSpec) -> Scene | None:
    """A scene that misses the prompt by one thing: the check that scoring can fail.

    single / two objects: a shape the prompt does not name instead of the last one;
    counting: one object more (or fewer at the limit); colors: another colour;
    position: the opposite relation; color_attr: the two colours swapped.
    """
    reqs = list(spec.objects)
    first, last = reqs[0], reqs[-1]
    relation = spec.relation
    if spec.category == "counting":
        n = first.count + (1 if first.count < cfg.max_objects else -1)
        reqs = [Requirement(first.shape, None, n, True)]
    elif spec.category == "position":
        relation = OPPOSITE[spec.relation or "left of"]
    elif spec.category == "colors":
        reqs[0] = Requirement(first.shape, pick(rng, [c for c in cfg.colours
                                                      if c != first.colour]))
    elif spec.category == "color_attr":
        reqs = [Requirement(first.shape, last.colour), Requirement(last.shape, first.colour)]
    else:
        named = {r.shape for r in reqs}
        reqs[-1] = Requirement(pick(rng, [s for s in cfg.shapes if s not in named]))
    return prompt_scene(rng, cfg, PromptSpec(spec.category, "", tuple(reqs), relation))


__all__ = ["EVAL_SALT", "CategoryScore", "ChanceLevels", "EvalTable", "answer_correct",
           "binomial_tail", "caption_accuracy", "chance_for_test", "chance_levels",
           "default_pos_tol", "detector_accuracy", "edit_accuracy", "edit_correct",
           "eval_captions", "eval_edits", "eval_prompts", "eval_rng", "eval_vqa", "evaluate",
           "geneval", "geneval_image", "score_prompt", "vqa_accuracy", "wrong_scene"]
