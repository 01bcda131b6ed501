"""Sequence plans: what the trainer makes of each shard sample, before any tokenising.

A plan is BAGEL's per-sample recipe: an ordered list of items `text | vit_image |
vae_image`, each saying whether it carries a loss and whether it is a condition that
classifier-free-guidance dropout may remove. Keeping this step pure (a record in, a
plan out, no images decoded) lets the packer count tokens and cut samples before it
pays for pixels, and lets tests check each kind's recipe by hand.

Images appear in three forms (the paper's "three token sets"):
    vae_image, loss=True    noised latents: a generation target (MSE)
    vae_image, loss=False   clean latents: a condition for what follows
    vit_image               SigLIP2 patches: a condition for understanding
A generated image that more of the sequence follows is repeated clean (VAE + ViT, at
the noised image's position: `same_image_as_previous`) so later items see it clean.

`split` numbers the plan's units: items that belong together share it (a condition
image's VAE and ViT forms, a generated image's clean copy), and a sample that is too
long is cut between units, never inside one.
`frame_delta` is the time since the previous video frame, in milliseconds (0 elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from weft.schemas.shards import KINDS, TEXT_ROLES

ItemType = Literal["text", "vit_image", "vae_image"]


class PlanError(ValueError):
    """A sample record whose content does not fit its kind's recipe."""


class UnknownKindError(PlanError):
    """A sample kind the trainer has no plan for."""


@dataclass(frozen=True)
class PlanItem:
    """One step of a sequence plan (BAGEL's format).

    text: the text of a text item; image: the member name of an image item.
    loss: CE on a text item's tokens / MSE on a (then noised) VAE image.
    enable_cfg: a condition that CFG dropout may remove.
    split: the unit this item belongs to (a cut never separates a unit).
    frame_delta: milliseconds since the previous video frame.
    same_image_as_previous: shares the RoPE position of the image just before it.
    """

    type: ItemType
    text: str | None = None
    image: str | None = None
    loss: bool = False
    enable_cfg: bool = False
    split: int = 0
    frame_delta: int = 0
    same_image_as_previous: bool = False

    @property
    def noised(self) -> bool:
        """A VAE image with a loss is a generation target, so its latents are noised."""
        return self.type == "vae_image" and self.loss

    @property
    def is_image(self) -> bool:
        return self.type != "text"


@dataclass(frozen=True)
class SequencePlan:
    """A sample's plan: its key, kind, the dataset it came from, and the ordered items."""

    key: str
    kind: str
    dataset: str
    items: tuple[PlanItem, ...]

    @property
    def generates_image(self) -> bool:
        """Has a generation target (only such plans get CFG condition dropout)."""
        return any(item.noised for item in self.items)

    @property
    def has_loss(self) -> bool:
        return any(item.loss for item in self.items)

    def units(self) -> list[list[PlanItem]]:
        """The items grouped by split, in order."""
        groups: list[list[PlanItem]] = []
        for item in self.items:
            if not groups or groups[-1][0].split != item.split:
                groups.append([])
            groups[-1].append(item)
        return groups


class _Builder:
    """Appends units to a plan; each public method starts a new split."""

    def __init__(self) -> None:
        self.items: list[PlanItem] = []
        self.split = -1

    def _add(self, **fields: Any) -> None:
        self.items.append(PlanItem(split=self.split, **fields))

    def text(self, text: str, loss: bool, cfg: bool = False) -> None:
        self.split += 1
        self._add(type="text", text=text, loss=loss, enable_cfg=cfg)

    def condition(self, member: str, cfg: bool, delta: int = 0) -> None:
        """A given image: clean latents, then ViT patches at the same position."""
        self.split += 1
        self._add(type="vae_image", image=member, enable_cfg=cfg, frame_delta=delta)
        self._add(type="vit_image", image=member, enable_cfg=cfg, frame_delta=delta,
                  same_image_as_previous=True)

    def understood(self, member: str) -> None:
        """An image only read (ViT), never generated nor seen as latents."""
        self.split += 1
        self._add(type="vit_image", image=member)

    def generated(self, member: str, followed: bool, delta: int = 0) -> None:
        """A generation target; when more follows, its clean VAE + ViT at its position
        (a unit of their own: a cut right after the target may leave them out)."""
        self.split += 1
        self._add(type="vae_image", image=member, loss=True, frame_delta=delta)
        if followed:
            self.split += 1
            for kind in ("vae_image", "vit_image"):
                self._add(type=kind, image=member, frame_delta=delta,
                          same_image_as_previous=True)


def _is_image(item: dict[str, Any]) -> bool:
    return item["type"] in ("image", "video_frame")


def _check_roles(kind: str, sequence: list[dict[str, Any]], allowed: set[str]) -> None:
    for i, item in enumerate(sequence):
        if item["type"] == "text" and item["role"] not in allowed:
            known = "" if item["role"] in TEXT_ROLES else f" (known roles: {TEXT_ROLES})"
            raise PlanError(f"sequence[{i}]: a {kind} sample has no text role "
                            f"{item['role']!r}; it uses {sorted(allowed)}{known}")


def _video_clip(sequence: list[dict[str, Any]]) -> _Builder:
    """First frame given; captions trained on; every later frame generated (and then seen)."""
    _check_roles("video_clip", sequence, {"caption", "text", "title"})
    out, previous_time = _Builder(), None
    for i, item in enumerate(sequence):
        if item["type"] == "text":
            out.text(item["text"], loss=True)
            continue
        time_s = item.get("time_s")
        delta = 0 if previous_time is None or time_s is None else \
            max(0, round((time_s - previous_time) * 1000))
        if time_s is not None:
            previous_time = time_s
        if not any(it.is_image for it in out.items):
            out.condition(item["member"], cfg=True, delta=delta)
        else:
            out.generated(item["member"], followed=i + 1 < len(sequence), delta=delta)
    return out


def _web_doc(sequence: list[dict[str, Any]]) -> _Builder:
    """Text trained on; every image generated, conditioned by the (caption-first) text before it."""
    _check_roles("web_doc", sequence, {"caption", "text", "title"})
    out = _Builder()
    for i, item in enumerate(sequence):
        followed = i + 1 < len(sequence)
        if item["type"] == "text":
            out.text(item["text"], loss=True,
                     cfg=followed and _is_image(sequence[i + 1]))
        else:
            out.generated(item["member"], followed=followed)
    return out


# role -> (loss, enable_cfg) for the task kinds the synthesis pipelines write.
_TASK_ROLES = {"prompt": (False, True), "instruction": (False, True),
               "reasoning": (True, False), "question": (False, False),
               "answer": (True, False)}
_CODES = {"prompt": "p", "instruction": "i", "reasoning": "r", "question": "q",
          "answer": "a"}
# kind -> (sequence shape as a regex over item codes, the shape in words)
_TASK_SHAPES = {
    "text_to_image": (r"p+I", "prompt, image"),
    "image_edit": (r"Ii+I", "image, instruction, image"),
    "vqa": (r"I+(?:q+a+)+", "image(s), then question / answer turns"),
    "reasoning_t2i": (r"p+r+I", "prompt, reasoning, image"),
    "reasoning_edit": (r"Ii+r+I", "image, instruction, reasoning, image"),
}


def _task(kind: str) -> Callable[[list[dict[str, Any]]], _Builder]:
    pattern, words = _TASK_SHAPES[kind]
    roles = {r for r, code in _CODES.items() if code in pattern}

    def convert(sequence: list[dict[str, Any]]) -> _Builder:
        _check_roles(kind, sequence, roles)
        codes = "".join("I" if _is_image(it) else _CODES[it["role"]] for it in sequence)
        if not re.fullmatch(pattern, codes):
            got = ", ".join("image" if _is_image(it) else it["role"] for it in sequence)
            raise PlanError(f"a {kind} sample must be: {words}; got: {got}")
        out = _Builder()
        last_image = max(i for i, it in enumerate(sequence) if _is_image(it))
        for i, item in enumerate(sequence):
            if item["type"] == "text":
                loss, cfg = _TASK_ROLES[item["role"]]
                out.text(item["text"], loss=loss, cfg=cfg)
            elif kind == "vqa":
                out.understood(item["member"])
            elif i == last_image:
                out.generated(item["member"], followed=False)
            else:
                out.condition(item["member"], cfg=True)
        return out

    convert.__doc__ = f"{kind}: {words}."
    return convert


CONVERTERS: dict[str, Callable[[list[dict[str, Any]]], _Builder]] = {
    "video_clip": _video_clip, "web_doc": _web_doc,
    **{kind: _task(kind) for kind in _TASK_SHAPES},
}
if set(CONVERTERS) != set(KINDS):  # a kind added to the shard format needs a plan here
    raise ImportError(f"plans cover {sorted(CONVERTERS)}, the shard format has {KINDS}")


def plan_sample(record: dict[str, Any], dataset: str = "") -> SequencePlan:
    """The sequence plan of a validated sample record; PlanError when it cannot have one."""
    kind = record.get("kind")
    convert = CONVERTERS.get(kind)  # type: ignore[arg-type]
    if convert is None:
        raise UnknownKindError(f"no sequence plan for sample kind {kind!r}; known kinds: "
                               f"{sorted(CONVERTERS)}")
    built = convert(record["sequence"])
    plan = SequencePlan(record["key"], kind, dataset, tuple(built.items))
    if not plan.has_loss:
        raise PlanError(f"a {kind} sample with nothing to learn from (no text or image "
                        "with a loss)")
    return plan


__all__ = ["CONVERTERS", "PlanError", "PlanItem", "SequencePlan", "UnknownKindError",
           "plan_sample"]
