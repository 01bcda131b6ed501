"""Words about scenes: captions (and their parser), GenEval-style prompts, VQA pairs.

One fixed template per thing said, so a small model learns the world rather than
paraphrase, and every text parses back: `parse_objects` reads the objects out of a
caption (or any answer) so a generated caption is scored against the scene.

Prompts follow GenEval's six categories; a `PromptSpec` keeps what the prompt
requires (shapes, colours, counts, a relation) for scoring. Questions only ask
what a scene answers definitely: "the circle" only when there is one circle, a
relation only when it (or its opposite) clearly holds.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from weft.stages.shapes.scene import (
    OPPOSITE,
    PALETTE,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    SceneConfig,
    pick,
    relations,
    sample_objects,
)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
QUESTION_TYPES = ("count", "count_shape", "colour", "shape", "position", "exists")
CAPTION_QUESTION = "Describe the image."
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_COUNT = "|".join(("a", "an", *NUMBERS))
_OBJECT = re.compile(rf"\b({_COUNT})\s+({'|'.join(PALETTE)})\s+({'|'.join(SHAPES)})s?\b")
_RELATION = re.compile(rf"\b({'|'.join(SHAPES)})s?\s+({'|'.join(RELATIONS)})\s+(?:a|an)\s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun(colour: str | None, shape: str, count: int = 1) -> str:
    """'a red circle', 'two circles', 'an orange star'."""
    words = " ".join(w for w in (colour, shape + ("s" if count != 1 else "")) if w)
    return f"{article(words) if count == 1 else NUMBERS[count]} {words}"


def the(obj: Obj) -> str:
    """How a unique object is named: 'the red circle'."""
    return f"the {obj.colour} {obj.shape}"


# ---- captions ---------------------------------------------------------------------------------
def caption(scene: Scene) -> str:
    """One sentence naming every object; two objects also say where one is from the other."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    if len(objs) == 2 and objs[0].label != objs[1].label:
        a, b = objs
        for word, first, second in (("left of", a, b), ("above", a, b), ("above", b, a)):
            if word in relations(first, second):
                return f"{noun(*first.label)} {word} {noun(*second.label)}"
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[o.label] = groups.get(o.label, 0) + 1
    parts = [noun(colour, shape, n) for (colour, shape), n in groups.items()]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def parse_objects(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) multiset a text names ('two red circles' counts twice), sorted."""
    out: list[tuple[str, str]] = []
    for count, colour, shape in _OBJECT.findall(text.lower()):
        n = 1 if count in ("a", "an") else NUMBERS.index(count)
        out.extend([(colour, shape)] * n)
    return sorted(out)


def caption_correct(text: str, scene: Scene) -> bool:
    """The caption names exactly the scene's objects, and any relation it states holds."""
    if parse_objects(text) != scene.labels():
        return False
    said = _RELATION.search(text.lower())
    if said is None:
        return True
    named = _OBJECT.findall(text.lower())
    if len(named) != 2:
        return False
    (_, ca, sa), (_, cb, sb) = named
    a = next(o for o in scene.objects if o.label == (ca, sa))
    b = next(o for o in scene.objects if o.label == (cb, sb))
    return said.group(2) in relations(a, b)


# ---- GenEval-style prompts --------------------------------------------------------------------
@dataclass(frozen=True)
class Requirement:
    """count objects of this shape (and colour, when given); `exact`: no more than count."""

    shape: str
    colour: str | None = None
    count: int = 1
    exact: bool = False


@dataclass(frozen=True)
class PromptSpec:
    """A text-to-image prompt and what an image must show to pass it."""

    category: str
    prompt: str
    objects: tuple[Requirement, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptSpec:
        return cls(data["category"], data["prompt"],
                   tuple(Requirement(**r) for r in data["objects"]), data.get("relation"))


def _two(rng: np.random.Generator, options: list[str]) -> tuple[str, str]:
    first = pick(rng, options)
    return first, pick(rng, [o for o in options if o != first])


def sample_prompt(rng: np.random.Generator, cfg: SceneConfig, category: str) -> PromptSpec:
    """A random prompt of a GenEval category over the config's shapes and colours."""
    if category == "single_object":
        shape = pick(rng, cfg.shapes)
        return PromptSpec(category, noun(None, shape), (Requirement(shape),))
    if category == "two_object":
        a, b = _two(rng, cfg.shapes)
        return PromptSpec(category, f"{noun(None, a)} and {noun(None, b)}",
                          (Requirement(a), Requirement(b)))
    if category == "counting":
        shape = pick(rng, cfg.shapes)
        n = int(rng.integers(2, max(2, cfg.max_objects) + 1))
        return PromptSpec(category, noun(None, shape, n), (Requirement(shape, None, n, True),))
    if category == "colors":
        shape, colour = pick(rng, cfg.shapes), pick(rng, cfg.colours)
        return PromptSpec(category, noun(colour, shape), (Requirement(shape, colour),))
    if category == "position":
        (a, b), rel = _two(rng, cfg.shapes), pick(rng, RELATIONS)
        return PromptSpec(category, f"{noun(None, a)} {rel} {noun(None, b)}",
                          (Requirement(a), Requirement(b)), rel)
    if category == "color_attr":
        (a, b), (ca, cb) = _two(rng, cfg.shapes), _two(rng, cfg.colours)
        return PromptSpec(category, f"{noun(ca, a)} and {noun(cb, b)}",
                          (Requirement(a, ca), Requirement(b, cb)))
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


def prompt_scene(rng: np.random.Generator, cfg: SceneConfig, spec: PromptSpec) -> Scene | None:
    """A scene of exactly what the prompt asks for (None when none fits)."""
    labels = [(r.colour, r.shape) for r in spec.objects for _ in range(r.count)]
    for _ in range(cfg.max_tries):
        scene = sample_objects(rng, cfg, labels)
        if scene is None:
            continue
        if spec.relation is None or spec.relation in relations(*scene.objects[:2]):
            return scene
    return None


# ---- VQA --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    """A question about a scene, its type, and its one right answer."""

    type: str
    question: str
    answer: str


def _unique(scene: Scene) -> list[Obj]:
    return [o for o in scene.objects if scene.unique(o)]


def _question(rng: np.random.Generator, scene: Scene, cfg: SceneConfig,
              qtype: str) -> QA | None:
    objs = list(scene.objects)
    if qtype == "count":
        return QA(qtype, "How many objects are there?", str(len(objs)))
    if qtype == "count_shape":  # the answer is drawn first, so no count is the easy guess
        counts = {s: sum(o.shape == s for o in objs) for s in cfg.shapes}
        n = pick(rng, sorted(set(counts.values())))
        shape = pick(rng, sorted(s for s, c in counts.items() if c == n))
        return QA(qtype, f"How many {shape}s are there?", str(n))
    if qtype == "colour":
        alone = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not alone:
            return None
        o = pick(rng, alone)
        return QA(qtype, f"What colour is the {o.shape}?", o.colour)
    if qtype == "shape":
        alone = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
        if not alone:
            return None
        o = pick(rng, alone)
        return QA(qtype, f"What shape is the {o.colour} object?", o.shape)
    if qtype == "position":
        named = _unique(scene)
        pairs = [(a, b) for a in named for b in named if a is not b and relations(a, b)]
        if not pairs:
            return None
        a, b = pick(rng, pairs)
        rel = pick(rng, sorted(relations(a, b)))
        yes = bool(rng.integers(2))
        asked = rel if yes else OPPOSITE[rel]
        return QA(qtype, f"Is {the(a)} {asked} {the(b)}?", "yes" if yes else "no")
    if qtype == "exists":
        present = sorted({o.label for o in objs})
        absent = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present]
        yes = bool(rng.integers(2)) or not absent
        colour, shape = pick(rng, present if yes else absent)
        return QA(qtype, f"Is there {noun(colour, shape)}?", "yes" if yes else "no")
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def vqa_pairs(rng: np.random.Generator, scene: Scene, cfg: SceneConfig, n: int,
              types: tuple[str, ...] = QUESTION_TYPES) -> list[QA]:
    """Up to n different questions about the scene, types drawn uniformly."""
    out: list[QA] = []
    for _ in range(8 * n):
        if len(out) == n:
            break
        qa = _question(rng, scene, cfg, pick(rng, types))
        if qa is not None and all(qa.question != q.question for q in out):
            out.append(qa)
    return out


def answer_space(qtype: str, cfg: SceneConfig) -> list[str]:
    """Every answer a question type can have (what a guesser picks from)."""
    if qtype == "count":
        return [str(n) for n in range(cfg.min_objects, cfg.max_objects + 1)]
    if qtype == "count_shape":
        return [str(n) for n in range(cfg.max_objects + 1)]
    if qtype == "colour":
        return list(cfg.colours)
    if qtype == "shape":
        return list(cfg.shapes)
    if qtype in ("position", "exists"):
        return ["yes", "no"]
    raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or article, number words as digits, 'color' as 'colour'."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    words = [str(NUMBERS.index(w)) if w in NUMBERS else w for w in words
             if w not in ("a", "an", "the")]
    return " ".join(words).replace("color", "colour")


__all__ = [
    "CAPTION_QUESTION",
    "CATEGORIES",
    "QA",
    "QUESTION_TYPES",
    "PromptSpec",
    "Requirement",
    "answer_space",
    "caption",
    "caption_correct",
    "normalize_answer",
    "noun",
    "parse_objects",
    "prompt_scene",
    "sample_prompt",
    "the",
    "vqa_pairs",
]
