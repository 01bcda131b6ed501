"""Training samples of the shapes world, one per draw: the scenes, the sequence, the truth.

Tasks and the shard kinds they become:

    t2i       text_to_image  prompt (a GenEval category, or an object at a region), image
    vqa       vqa            image, then question / answer turns
    caption   vqa            image, "Describe the image.", the caption
    edit      image_edit     image, instruction, image (recolour | move | add | remove)
    video     video_clip     frame, caption, frame, caption, ... (one object moving)

A sample's sequence names its images by scene index (`{"type": "image", "scene": 0}`);
the pipeline renders the scenes and swaps in file paths. `truth` keeps what a scorer
needs (the prompt spec, the answers, the target scene) next to the scenes themselves.
A draw that does not fit (a scene with no nameable object, an edit with no room)
returns None and the caller draws again with the next attempt number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from weft.stages.shapes.edits import EDIT_OPS, sample_clip, sample_edit
from weft.stages.shapes.scene import (
    REGIONS,
    Obj,
    Scene,
    SceneConfig,
    pick,
    random_size,
    region_centre,
    region_of,
    sample_scene,
)
from weft.stages.shapes.text import (
    CAPTION_QUESTION,
    CATEGORIES,
    QUESTION_TYPES,
    caption,
    noun,
    prompt_scene,
    sample_prompt,
    vqa_pairs,
)

GENERATOR = "weft.shapes"
GENERATOR_VERSION = "3"  # bump when any sample a seed gives changes (2: count-of-a-shape,
#                          3: an edit op keeps its draw over scenes that do not allow it)
EDIT_SCENE_TRIES = 32  # scenes an edit op is tried on before the draw is given up
TASK_KINDS = {"t2i": "text_to_image", "vqa": "vqa", "caption": "vqa", "edit": "image_edit",
              "video": "video_clip"}
TASKS = tuple(TASK_KINDS)
# t2i prompts: a GenEval category's, or "region": one object at a named region of the 3x3
# grid ("a red circle in the top left"), the region words of move / add edits taught
# outside edits
T2I_PROMPTS = (*CATEGORIES, "region")


def _subset(value: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    bad = sorted(set(value) - set(allowed))
    if bad or not value:
        raise ValueError(f"{what} must be a non-empty subset of {list(allowed)}; unknown: {bad}")
    return value


class T2IConfig(BaseModel):
    """Text-to-image samples: which GenEval categories their prompts come from."""

    model_config = ConfigDict(extra="forbid")
    categories: list[str] = Field(default_factory=lambda: list(CATEGORIES),
                                  description=f"drawn uniformly; a subset of "
                                              f"{list(T2I_PROMPTS)}")

    @field_validator("categories")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _subset(value, T2I_PROMPTS, "categories")


class VqaConfig(BaseModel):
    """Question-answer samples: how many turns per image, of which question types."""

    model_config = ConfigDict(extra="forbid")
    questions: int = Field(3, ge=1, le=8, description="question / answer turns per image")
    types: list[str] = Field(default_factory=lambda: list(QUESTION_TYPES),
                             description=f"drawn uniformly; a subset of {list(QUESTION_TYPES)}")

    @field_validator("types")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _subset(value, QUESTION_TYPES, "types")


class EditConfig(BaseModel):
    """Edit samples: which operations."""

    model_config = ConfigDict(extra="forbid")
    ops: list[str] = Field(default_factory=lambda: list(EDIT_OPS),
                           description=f"drawn uniformly; a subset of {list(EDIT_OPS)}")

    @field_validator("ops")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _subset(value, EDIT_OPS, "ops")


class VideoConfig(BaseModel):
    """Video samples: one object moving a fixed step per frame."""

    model_config = ConfigDict(extra="forbid")
    frames: int = Field(4, ge=2, le=16, description="frames per clip")
    step: float = Field(0.125, gt=0, le=0.5, description="move per frame, a fraction of the "
                                                         "image side")
    frame_interval_s: float = Field(0.5, gt=0, description="seconds between frames (time_s)")
    max_objects: int = Field(3, ge=1, le=8, description="objects per clip (room to move)")


class TasksConfig(BaseModel):
    """How each task draws its samples."""

    model_config = ConfigDict(extra="forbid")
    t2i: T2IConfig = Field(default_factory=T2IConfig)
    vqa: VqaConfig = Field(default_factory=VqaConfig)
    edit: EditConfig = Field(default_factory=EditConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)


@dataclass
class ShapeSample:
    """One drawn sample: its scenes, its sequence (images by scene index) and its truth."""

    task: str
    category: str
    scenes: list[Scene]
    sequence: list[dict[str, Any]]
    truth: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return TASK_KINDS[self.task]

    def content(self) -> dict[str, Any]:
        """Everything the sample is, as JSON-able data (what its id hashes)."""
        return {"task": self.task, "kind": self.kind, "category": self.category,
                "scenes": [s.to_dict() for s in self.scenes], "sequence": self.sequence,
                "truth": self.truth}

    def scores(self) -> dict[str, float]:
        """Numbers a mixture may filter on: objects in the first scene, images, text turns."""
        texts = sum(item["type"] == "text" for item in self.sequence)
        return {"n_objects": float(len(self.scenes[0].objects)),
                "n_images": float(len(self.sequence) - texts), "n_texts": float(texts)}


def _text(role: str, text: str, **extra: float) -> dict[str, Any]:
    return {"type": "text", "role": role, "text": text, **extra}


def _image(scene: int) -> dict[str, Any]:
    return {"type": "image", "scene": scene}


def _region_sample(rng: np.random.Generator, cfg: SceneConfig) -> ShapeSample | None:
    """t2i of one object at a named region, placed where an edit would put it."""
    colour, shape, region = pick(rng, cfg.colours), pick(rng, cfg.shapes), pick(rng, list(REGIONS))
    size = random_size(rng, cfg)
    obj = Obj(shape, colour, size, *region_centre(region, size, cfg))
    if region_of(obj, cfg) != region:  # snapped out of its region: draw again
        return None
    text = f"{noun(colour, shape)} in the {region}"
    return ShapeSample("t2i", "region", [Scene(cfg.image_size, cfg.background, (obj,))],
                       [_text("prompt", text), _image(0)], {"prompt": text, "region": region})


def make_sample(task: str, rng: np.random.Generator, cfg: SceneConfig,
                tasks: TasksConfig) -> ShapeSample | None:
    """One random sample of a task (None when this draw does not fit: draw again)."""
    if task == "t2i":
        category = pick(rng, tasks.t2i.categories)
        if category == "region":
            return _region_sample(rng, cfg)
        spec = sample_prompt(rng, cfg, category)
        scene = prompt_scene(rng, cfg, spec)
        if scene is None:
            return None
        return ShapeSample(task, category, [scene], [_text("prompt", spec.prompt), _image(0)],
                           {"prompt": spec.to_dict()})
    if task == "vqa":
        scene = sample_scene(rng, cfg)
        pairs = vqa_pairs(rng, scene, cfg, tasks.vqa.questions, tuple(tasks.vqa.types))
        if not pairs:
            return None
        turns = [t for qa in pairs for t in (_text("question", qa.question),
                                             _text("answer", qa.answer))]
        return ShapeSample(task, "qa", [scene],
                           [_image(0), *turns], {"qa": [asdict(qa) for qa in pairs]})
    if task == "caption":
        scene = sample_scene(rng, cfg)
        text = caption(scene)
        return ShapeSample(task, "caption", [scene],
                           [_image(0), _text("question", CAPTION_QUESTION),
                            _text("answer", text)], {"caption": text})
    if task == "edit":
        # the op is drawn once and kept over scenes that do not allow it: drawing it again
        # with the scene would make add (needs room) and remove (needs two objects) rare
        op = pick(rng, tasks.edit.ops)
        edit = None
        for _ in range(EDIT_SCENE_TRIES):
            edit = sample_edit(rng, sample_scene(rng, cfg), cfg, op)
            if edit is not None:
                break
        if edit is None:
            return None
        return ShapeSample(task, op, [edit.source, edit.target],
                           [_image(0), _text("instruction", edit.instruction), _image(1)],
                           {"op": op, "instruction": edit.instruction})
    if task == "video":
        v = tasks.video
        clip = sample_clip(rng, cfg, v.frames, v.step, v.max_objects)
        if clip is None:
            return None
        dt = v.frame_interval_s
        sequence: list[dict[str, Any]] = []
        for i in range(len(clip.scenes)):
            sequence.append({"type": "video_frame", "scene": i, "time_s": round(i * dt, 6)})
            if i < len(clip.captions):
                sequence.append(_text("caption", clip.captions[i], from_s=round(i * dt, 6),
                                      to_s=round((i + 1) * dt, 6)))
        return ShapeSample(task, "move", list(clip.scenes), sequence,
                           {"captions": list(clip.captions)})
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


__all__ = ["GENERATOR", "GENERATOR_VERSION", "TASKS", "TASK_KINDS", "EditConfig",
           "ShapeSample", "T2IConfig", "TasksConfig", "VideoConfig", "VqaConfig",
           "make_sample"]
