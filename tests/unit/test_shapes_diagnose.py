"""The object breakdown of `--diagnose`: what generated images hold against their prompts.

Detections here are the detector's reading of renders (exact on clean renders), so each
expected tally is known: a right scene, a scene missing one named object, a scene of the
wrong colour, a one-object prompt drawn as another shape.
"""

from __future__ import annotations

import json

import pytest

from weft.stages.shapes.detect import detect
from weft.stages.shapes.diagnose import Diagnosis, object_breakdown
from weft.stages.shapes.render import render
from weft.stages.shapes.scene import Obj, Scene
from weft.stages.shapes.text import PromptSpec, Requirement


def _seen(*objs: Obj) -> list[Obj]:
    """The detector's reading of a render of these objects."""
    return detect(render(Scene(64, "white", objs)))


RED_CIRCLE = Obj("circle", "red", 14, 16, 16)
BLUE_SQUARE = Obj("square", "blue", 14, 44, 40)
GREEN_SQUARE = Obj("square", "green", 14, 44, 40)
TWO = PromptSpec("two_object", "a circle and a square",
                 (Requirement("circle"), Requirement("square")))
ATTR = PromptSpec("color_attr", "a red circle and a blue square",
                  (Requirement("circle", "red"), Requirement("square", "blue")))
SINGLE = PromptSpec("single_object", "a circle", (Requirement("circle"),))


def test_two_object_rows_count_each_named_object() -> None:
    report = object_breakdown([
        (TWO, _seen(RED_CIRCLE, BLUE_SQUARE)),  # both there
        (TWO, _seen(RED_CIRCLE)),  # the square missing
        (ATTR, _seen(RED_CIRCLE, GREEN_SQUARE)),  # both shapes, one colour wrong
        (ATTR, _seen(RED_CIRCLE, BLUE_SQUARE)),
    ])
    two, attr = report.rows["two_object"], report.rows["color_attr"]
    assert two == {"images": 2.0, "objects": 1.5, "each_shape": 0.75, "each_object": 0.75,
                   "all_objects": 0.5, "pass": 0.5}
    assert attr == {"images": 2.0, "objects": 2.0, "each_shape": 1.0, "each_object": 0.75,
                    "all_objects": 0.5, "pass": 0.5}
    assert list(report.rows) == ["two_object", "color_attr"]  # GenEval's category order


def test_single_object_shape_confusion() -> None:
    report = object_breakdown([
        (SINGLE, _seen(RED_CIRCLE)),
        (SINGLE, _seen(Obj("square", "red", 14, 16, 16))),  # a square for a circle
        (SINGLE, _seen(Obj("square", "red", 14, 16, 16))),
        (SINGLE, _seen(RED_CIRCLE, BLUE_SQUARE)),  # two objects: not a one-object reading
    ])
    assert report.shapes == {"circle": {"circle": 1, "square": 2}}
    assert report.rows["single_object"]["pass"] == pytest.approx(0.5)
    table = report.to_markdown()
    assert "| circle | 1 | 2 |" in table and "| single_object | 4 |" in table


def test_diagnosis_writes_objects() -> None:
    found = Diagnosis(2, {1.0: {"two_object": 0.5}}, {0.3: (0.1, 0.2)},
                      object_breakdown([(TWO, _seen(RED_CIRCLE))]))
    data = json.loads(json.dumps(found.as_dict()))
    assert data["objects"]["rows"]["two_object"]["each_shape"] == 0.5
    assert "what the images generated from noise hold" in found.to_markdown()
    assert "what the images" not in Diagnosis(2, {1.0: {}}, {}).to_markdown()
