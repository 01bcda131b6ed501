"""Toy GenEval: ground truth scores 1, wrong renders score 0, chance stays low."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from weft.stages.shapes.edits import EDIT_OPS
from weft.stages.shapes.geneval import (
    binomial_tail,
    caption_accuracy,
    chance_for_test,
    chance_levels,
    edit_accuracy,
    edit_correct,
    eval_captions,
    eval_edits,
    eval_prompts,
    eval_vqa,
    evaluate,
    geneval,
    vqa_accuracy,
    wrong_scene,
)
from weft.stages.shapes.render import render
from weft.stages.shapes.scene import SceneConfig
from weft.stages.shapes.text import CATEGORIES, QUESTION_TYPES, caption, prompt_scene

CFG = SceneConfig()


@pytest.fixture(scope="module")
def chance() -> dict[str, dict[str, float]]:
    return chance_levels(CFG, n=600)


def test_ground_truth_renders_pass_every_category_and_wrong_ones_fail(chance) -> None:
    specs = eval_prompts(CFG, per_category=25)
    rng = np.random.default_rng(0)
    right = [render(prompt_scene(rng, CFG, s)) for s in specs]
    wrong = [render(wrong_scene(rng, CFG, s)) for s in specs]
    good = geneval(specs, right, chance["geneval"])
    bad = geneval(specs, wrong, chance["geneval"])
    assert [r.category for r in good.rows] == list(CATEGORIES)
    assert all(r.accuracy == 1.0 and r.n == 25 for r in good.rows), good.to_markdown()
    assert all(r.accuracy == 0.0 for r in bad.rows), bad.to_markdown()
    assert good.overall == 1.0 and bad.overall == 0.0
    assert all(good.beats_chance(margin=0.4).values())


def test_chance_is_low_for_every_category(chance) -> None:
    assert set(chance["geneval"]) == set(CATEGORIES)
    assert all(v < 0.5 for v in chance["geneval"].values())
    assert chance["geneval"]["color_attr"] < chance["geneval"]["colors"] < \
        chance["geneval"]["single_object"]
    assert set(chance["vqa"]) == set(QUESTION_TYPES)
    assert all(abs(chance["vqa"][t] - 0.5) < 0.1 for t in ("position", "exists"))
    assert all(v < 0.55 for v in chance["vqa_majority"].values())  # no answer is a free win
    assert chance["caption"]["caption"] < 0.05
    assert all(v == 0.0 for v in chance["edit_copy"].values())
    assert all(v < 0.05 for v in chance["edit"].values())
    draws = chance["draws"]  # what each rate rests on, keyed by table row
    assert draws["geneval/colors"] == 600 and draws["caption"] == 600
    assert sum(draws[f"edit/{op}"] for op in EDIT_OPS) == 600
    assert draws["vqa/count"] > 100


def test_edits_score_on_the_target_only() -> None:
    edits = eval_edits(CFG, per_op=15)
    assert {e.op for e in edits} == set(EDIT_OPS) and len(edits) == 60
    assert edit_accuracy([e.target for e in edits], [render(e.target) for e in edits]) == 1.0
    assert edit_accuracy([e.target for e in edits], [render(e.source) for e in edits]) == 0.0
    e = edits[0]
    assert edit_correct(e.target, render(e.target), pos_tol=0)


def test_vqa_and_caption_accuracy() -> None:
    items = eval_vqa(CFG, 50)
    qas = [qa for _, pairs in items for qa in pairs]
    assert Counter(qa.type for qa in qas) == {t: 50 for t in QUESTION_TYPES}
    assert vqa_accuracy([qa.answer for qa in qas], qas) == 1.0
    assert vqa_accuracy(["Yes.", "THREE", "no"], ["yes", "3", "yes"]) == pytest.approx(2 / 3)
    scenes = eval_captions(CFG, 50)
    assert caption_accuracy([caption(s) for s in scenes], scenes) == 1.0
    assert caption_accuracy([caption(s) for s in scenes[1:]], scenes[:-1]) < 0.1


def test_evaluate_builds_a_table_with_overall_and_chance() -> None:
    table = evaluate([("a", True), ("a", False), ("b", True)], {"a": 0.25, "b": 0.9})
    assert [(r.category, r.n, r.correct) for r in table.rows] == [("a", 2, 1), ("b", 1, 1)]
    assert table.overall == pytest.approx(0.75)
    assert table.beats_chance() == {"a": True, "b": True}
    assert table.beats_chance(margin=0.3) == {"a": False, "b": False}
    assert "| **overall** | 3 | 0.750 |" in table.to_markdown()
    assert table.as_dict()["overall"] == pytest.approx(0.75)
    # one of two right at chance 0.25: P(X >= 1) = 1 - 0.75^2; one of one at 0.9: 0.9
    assert [r.p_value for r in table.rows] == pytest.approx([1 - 0.75**2, 0.9])
    assert table.above_chance() == {"a": False, "b": False}  # two items prove nothing
    assert "| a | 2 | 0.500 | 0.250 | 0.43" in table.to_markdown()  # p 0.4375


def test_binomial_tail_matches_enumerating_every_outcome() -> None:
    n, chance = 10, 0.3
    outcomes = itertools.product((0, 1), repeat=n)
    mass = Counter()
    for o in outcomes:
        k = sum(o)
        mass[k] += chance**k * (1 - chance) ** (n - k)
    for correct in range(n + 1):
        want = sum(m for k, m in mass.items() if k >= correct)
        assert binomial_tail(correct, n, chance) == pytest.approx(want, rel=1e-9)
    assert binomial_tail(0, n, chance) == pytest.approx(1.0)
    assert binomial_tail(3, 5, 0.0) == 0.0 and binomial_tail(0, 5, 0.0) == 1.0
    # the recipe's rows: 48 items, 0.23 vs 0.22 is noise, 0.65 vs 0.52 is not by much
    assert binomial_tail(11, 48, 0.223) > 0.4
    assert binomial_tail(31, 48, 0.517) < 0.06
    table = evaluate([("x", True)] * 20 + [("x", False)] * 28, {"x": 0.2})
    assert table.above_chance() == {"x": True}  # 20 of 48 at chance 0.2: p ~ 5e-4
    with pytest.raises(ValueError, match="correct"):
        binomial_tail(6, 5, 0.5)
    # large rows: symmetric at one half, and no float overflow
    assert binomial_tail(2500, 5000, 0.5) == pytest.approx(0.5 + 0.5 * 0.011283, abs=1e-4)
    assert binomial_tail(2700, 5000, 0.5) < 1e-8


def test_a_chance_measured_as_zero_is_tested_at_its_upper_bound() -> None:
    """No random scene of 75 matched the edit: one hit in 48 is not yet learning."""
    results = [("edit/move", True)] + [("edit/move", False)] * 47 + \
        [("edit/recolour", True)] * 9 + [("edit/recolour", False)] * 39
    table = evaluate(results, {"edit/move": 0.0, "edit/recolour": 0.0}, None,
                     {"edit/move": 75, "edit/recolour": 75})
    assert chance_for_test(0.0, 75) == pytest.approx(0.04)
    assert chance_for_test(0.2, 75) == 0.2  # a measured rate is used as it is
    assert table.above_chance() == {"edit/move": False, "edit/recolour": True}
    unknown = evaluate(results, {"edit/move": 0.0, "edit/recolour": 0.0})
    assert unknown.above_chance() == {"edit/move": True, "edit/recolour": True}


def test_evaluation_sets_are_deterministic_and_apart_from_training() -> None:
    assert eval_prompts(CFG, 5, seed=1) == eval_prompts(CFG, 5, seed=1)
    assert eval_prompts(CFG, 5, seed=1) != eval_prompts(CFG, 5, seed=2)
    prompts = [s.prompt for s in eval_prompts(CFG, 20) if s.category == "colors"]
    assert len(set(prompts)) == 20


def test_a_reply_that_runs_on_past_its_answer_reads_as_that_answer() -> None:
    from weft.stages.shapes.evaluate import closed_answer

    shapes = ["circle", "square", "triangle"]
    assert closed_answer("circleanglecircleangle", shapes) == "circle"
    assert closed_answer("Triangle, I think", shapes) == "triangle"
    assert closed_answer("tri", shapes) == "tri"  # not an answer: scored wrong
    assert closed_answer("yesno", ["yes", "no"]) == "yes"
    assert closed_answer("", ["yes", "no"]) == ""
