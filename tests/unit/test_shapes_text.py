"""Words about shapes scenes are right: captions parse back, VQA answers match, edits and
clips change exactly what they say."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from weft.stages.shapes.edits import EDIT_OPS, sample_clip, sample_edit
from weft.stages.shapes.scene import REGIONS, Scene, SceneConfig, region_of, relations, sample_scene
from weft.stages.shapes.text import (
    CATEGORIES,
    QUESTION_TYPES,
    answer_space,
    caption,
    caption_correct,
    normalize_answer,
    noun,
    parse_objects,
    prompt_scene,
    sample_prompt,
    vqa_pairs,
)

CFG = SceneConfig()


def _scenes(n: int, seed: int = 0, cfg: SceneConfig = CFG) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg) for _ in range(n)]


def _named(scene: Scene, colour: str, shape: str):
    [obj] = [o for o in scene.objects if o.label == (colour, shape)]
    return obj


def test_nouns_take_the_right_article_and_number() -> None:
    assert noun("red", "circle") == "a red circle"
    assert noun("orange", "star") == "an orange star"
    assert noun(None, "square", 3) == "three squares"
    assert noun(None, "diamond") == "a diamond"


def test_captions_name_exactly_the_objects_and_true_relations() -> None:
    scenes = _scenes(400)
    for scene in scenes:
        text = caption(scene)
        assert parse_objects(text) == scene.labels(), text
        assert caption_correct(text, scene)
        said = re.search(r"(left of|right of|above|below)", text)
        if said:
            (_, ca, sa), (_, cb, sb) = re.findall(r"(a|an) (\w+) (\w+)", text)
            a, b = _named(scene, ca, sa), _named(scene, cb, sb)
            assert said.group(1) in relations(a, b)
    wrong = sum(caption_correct(caption(a), b) for a, b in itertools.pairwise(scenes))
    assert wrong < 0.05 * len(scenes)


def test_a_caption_with_a_false_relation_is_wrong() -> None:
    for scene in _scenes(200):
        text = caption(scene)
        if " left of " in text:
            assert not caption_correct(text.replace(" left of ", " right of "), scene)
            return
    pytest.fail("no two-object caption with a relation in 200 scenes")


def _truth(scene: Scene, question: str) -> str:
    """The answer worked out from the scene, independently of the question generator."""
    objs = scene.objects
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m.group(1) for o in objs))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        [obj] = [o for o in objs if o.shape == m.group(1)]
        return obj.colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [obj] = [o for o in objs if o.colour == m.group(1)]
        return obj.shape
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?",
                         question):
        a, b = _named(scene, m.group(1), m.group(2)), _named(scene, m.group(4), m.group(5))
        rel = relations(a, b)
        opposite = {"left of": "right of", "right of": "left of", "above": "below",
                    "below": "above"}[m.group(3)]
        assert m.group(3) in rel or opposite in rel, "asked an undecided relation"
        return "yes" if m.group(3) in rel else "no"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if (m.group(1), m.group(2)) in scene.labels() else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_answers_match_the_scene() -> None:
    rng = np.random.default_rng(1)
    seen_types, answers = set(), {t: set() for t in QUESTION_TYPES}
    for scene in _scenes(400, seed=1):
        pairs = vqa_pairs(rng, scene, CFG, 3)
        assert 1 <= len(pairs) <= 3
        assert len({qa.question for qa in pairs}) == len(pairs)
        for qa in pairs:
            assert qa.answer == _truth(scene, qa.question), qa
            assert qa.answer in answer_space(qa.type, CFG)
            seen_types.add(qa.type)
            answers[qa.type].add(qa.answer)
    assert seen_types == set(QUESTION_TYPES)
    assert answers["position"] == answers["exists"] == {"yes", "no"}


def test_answers_normalise() -> None:
    assert normalize_answer("Three.") == normalize_answer("3") == "3"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("The Red color") == "red colour"


@pytest.mark.parametrize("category", CATEGORIES)
def test_prompts_read_as_their_category_and_their_scenes_hold_only_what_they_ask(
        category: str) -> None:
    rng = np.random.default_rng(2)
    for _ in range(40):
        spec = sample_prompt(rng, CFG, category)
        scene = prompt_scene(rng, CFG, spec)
        assert scene is not None
        assert len(scene.objects) == sum(r.count for r in spec.objects)
        for req in spec.objects:
            assert req.shape in spec.prompt
            if req.colour:
                assert req.colour in spec.prompt
        if spec.relation:
            assert spec.relation in spec.prompt
            assert spec.relation in relations(*scene.objects[:2])


@pytest.mark.parametrize("op", EDIT_OPS)
def test_edits_change_exactly_what_the_instruction_says(op: str) -> None:
    rng = np.random.default_rng(3)
    made = 0
    for scene in _scenes(150, seed=3):
        edit = sample_edit(rng, scene, CFG, op)
        if edit is None:
            continue
        made += 1
        src, dst, words = edit.source.objects, edit.target.objects, edit.instruction
        if op == "recolour":
            m = re.fullmatch(r"make the (\w+) (\w+) (\w+)", words)
            assert m and m.group(3) != m.group(1)
            changed = [(a, b) for a, b in zip(src, dst, strict=True) if a != b]
            [(a, b)] = changed
            assert a.label == (m.group(1), m.group(2)) and b.label == (m.group(3), m.group(2))
            assert (a.x, a.y, a.size) == (b.x, b.y, b.size)
        elif op == "move":
            m = re.fullmatch(r"move the (\w+) (\w+) to the ([a-z ]+)", words)
            assert m and m.group(3) in REGIONS
            [(a, b)] = [(a, b) for a, b in zip(src, dst, strict=True) if a != b]
            assert a.label == b.label == (m.group(1), m.group(2))
            assert region_of(b, CFG) == m.group(3) != region_of(a, CFG)
            assert np.hypot(a.x - b.x, a.y - b.y) >= 0.2 * CFG.image_size
        elif op == "add":
            m = re.fullmatch(r"add an? (\w+) (\w+) to the ([a-z ]+)", words)
            assert m and dst[:-1] == src
            assert dst[-1].label == (m.group(1), m.group(2))
            assert region_of(dst[-1], CFG) == m.group(3)
        else:
            m = re.fullmatch(r"remove the (\w+) (\w+)", words)
            assert m and len(dst) == len(src) - 1
            assert sorted(edit.source.labels()) == sorted([*edit.target.labels(),
                                                           (m.group(1), m.group(2))])
    assert made > 50


def test_clips_move_one_object_as_the_captions_say() -> None:
    rng = np.random.default_rng(4)
    step = round(0.125 * CFG.image_size)
    moves = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}
    for _ in range(50):
        clip = sample_clip(rng, CFG, frames=4, step=0.125, max_objects=3)
        if clip is None:
            continue
        assert len(clip.scenes) == 4 and len(clip.captions) == 3
        for before, after, text in zip(clip.scenes, clip.scenes[1:], clip.captions,
                                       strict=False):
            m = re.fullmatch(r"the (\w+) (\w+) moves (left|right|up|down)", text)
            assert m
            [(a, b)] = [(a, b) for a, b in zip(before.objects, after.objects, strict=True)
                        if a != b]
            assert a.label == (m.group(1), m.group(2))
            assert (b.x - a.x, b.y - a.y) == moves[m.group(3)]
