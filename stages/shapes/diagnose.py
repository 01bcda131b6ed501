"""Where a shapes run's generation fails: at which noise levels, and whether it reads the
prompt. GenEval says that images are wrong; this says why, so an operator knows whether
to train longer, change the schedule or look for a conditioning bug.

Both measurements use held-out GenEval prompts (`geneval.eval_prompts`), each with a
render of a scene that satisfies it, so the right image is known:

    completion   the render's latents noised to t0 (x_t0 = (1 - t0) x0 + t0 ε) and
                 sampled from there to 0 under the prompt, then scored by the detector
                 as a generated image. Near t0 = 0 this is the VAE's readback; t0 = 1 is
                 plain generation. A model right from 0.3 but not from 0.7 finishes and
                 sharpens shapes it is shown but cannot lay them out from noise.
    sensitivity  the velocity MSE against ε − x0 at t, under the item's own prompt and
                 under another item's (the list rotated by one, mostly a prompt of the
                 same category). No gap: the image ignores the text, whatever the loss.
    objects      what the images generated from noise (t0 = 1) hold, per category: how
                 many objects, how often each object the prompt names is there by shape
                 and by shape and colour, how often all are; and which shape a
                 one-object prompt got (`ObjectBreakdown`). A two-object prompt fails
                 when either object does: this says whether the count, the shapes or
                 the colours are what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from weft.stages.shapes.detect import detect
from weft.stages.shapes.geneval import eval_prompts, eval_rng, score_prompt
from weft.stages.shapes.render import render
from weft.stages.shapes.scene import Obj, SceneConfig
from weft.stages.shapes.text import CATEGORIES, PromptSpec, prompt_scene
from weft.train.sample import Loaded

COMPLETION_T0 = (0.3, 0.5, 0.7, 0.85, 1.0)
SENSITIVITY_T = (0.3, 0.6, 0.9)


OBJECT_COLUMNS = ("objects", "each_shape", "each_object", "all_objects", "pass")


@dataclass
class ObjectBreakdown:
    """What generated images hold against their prompts.

    rows[category]: `images`, mean detected `objects` an image, the share of named
    objects present by shape (`each_shape`) and by shape and colour (`each_object`;
    the colour only where the prompt names one), the share of images with every named
    object (`all_objects`: counts and relation aside) and GenEval's verdict (`pass`).
    shapes[asked][drawn]: one-object prompts (single object, colours) whose image holds
    exactly one object, by the shape asked and the shape the detector read.
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    shapes: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = ["| category | images | " + " | ".join(OBJECT_COLUMNS) + " |",
                 "|---|---:|" + "---:|" * len(OBJECT_COLUMNS)]
        for category, row in self.rows.items():
            cells = " | ".join(f"{row[c]:.2f}" for c in OBJECT_COLUMNS)
            lines.append(f"| {category} | {row['images']:.0f} | {cells} |")
        if self.shapes:
            drawn = sorted({d for row in self.shapes.values() for d in row})
            lines += ["", "one-object prompts with one object drawn, shape asked (rows) "
                      "vs read (columns):", "", "| asked | " + " | ".join(drawn) + " |",
                      "|---|" + "---:|" * len(drawn)]
            for asked, row in sorted(self.shapes.items()):
                lines.append(f"| {asked} | " + " | ".join(str(row.get(d, 0)) for d in drawn)
                             + " |")
        return "\n".join(lines)


def object_breakdown(items: Sequence[tuple[PromptSpec, Sequence[Obj]]]) -> ObjectBreakdown:
    """Tally (prompt, detected objects) pairs into an `ObjectBreakdown`."""
    tallies: dict[str, dict[str, list[float]]] = {}
    shapes: dict[str, dict[str, int]] = {}
    for spec, objs in items:
        shape_hits = [any(o.shape == r.shape for o in objs) for r in spec.objects]
        object_hits = [any(o.shape == r.shape and r.colour in (None, o.colour) for o in objs)
                       for r in spec.objects]
        row = tallies.setdefault(spec.category, {c: [] for c in OBJECT_COLUMNS})
        row["objects"].append(len(objs))
        row["each_shape"] += shape_hits
        row["each_object"] += object_hits
        row["all_objects"].append(all(object_hits))
        row["pass"].append(score_prompt(spec, objs))
        if len(spec.objects) == 1 and spec.objects[0].count == 1 and len(objs) == 1:
            asked = shapes.setdefault(spec.objects[0].shape, {})
            asked[objs[0].shape] = asked.get(objs[0].shape, 0) + 1
    rows = {c: {"images": float(len(t["pass"])),
                **{k: float(np.mean(v)) for k, v in t.items()}}
            for c in CATEGORIES if (t := tallies.get(c))}
    return ObjectBreakdown(rows, shapes)


@dataclass
class Diagnosis:
    """completion[t0][category] accuracy; sensitivity[t] = (own prompt, other prompt) MSE;
    objects: what the images generated from noise hold (empty without t0 = 1)."""

    n: int
    completion: dict[float, dict[str, float]] = field(default_factory=dict)
    sensitivity: dict[float, tuple[float, float]] = field(default_factory=dict)
    objects: ObjectBreakdown = field(default_factory=ObjectBreakdown)

    def completion_mean(self, t0: float) -> float:
        values = list(self.completion[t0].values())
        return float(np.mean(values)) if values else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n,
                "completion": {str(t): row for t, row in self.completion.items()},
                "sensitivity": {str(t): {"own_prompt": own, "other_prompt": other}
                                for t, (own, other) in self.sensitivity.items()},
                "objects": asdict(self.objects)}

    def to_markdown(self) -> str:
        categories = list(next(iter(self.completion.values()), {}))
        lines = [f"completion from a noised right image ({self.n} prompts):", "",
                 "| t0 | mean | " + " | ".join(categories) + " |",
                 "|---:|---:|" + "---:|" * len(categories)]
        for t0, row in self.completion.items():
            cells = " | ".join(f"{row[c]:.2f}" for c in categories)
            lines.append(f"| {t0:.2f} | {self.completion_mean(t0):.2f} | {cells} |")
        lines += ["", "velocity MSE with the item's prompt vs another's:", "",
                  "| t | own prompt | other prompt | gap |", "|---:|---:|---:|---:|"]
        for t, (own, other) in self.sensitivity.items():
            lines.append(f"| {t:.2f} | {own:.4f} | {other:.4f} | {other - own:+.4f} |")
        if self.objects.rows:
            lines += ["", "what the images generated from noise hold (unguided):", "",
                      self.objects.to_markdown()]
        return "\n".join(lines)


def diagnosis_items(cfg: SceneConfig, per_category: int, seed: int = 0,
                    categories: Sequence[str] = CATEGORIES
                    ) -> list[tuple[PromptSpec, np.ndarray]]:
    """Held-out prompts with a render that satisfies each (prompts no scene fits: left out)."""
    items = []
    for i, spec in enumerate(eval_prompts(cfg, per_category, seed)):
        if spec.category not in categories:
            continue
        scene = prompt_scene(eval_rng(seed, 20, i), cfg, spec)
        if scene is not None:
            items.append((spec, render(scene)))
    return items


def diagnose(run: Loaded, cfg: SceneConfig, per_category: int = 16, steps: int = 20,
             shift: float | None = None, seed: int = 0, batch_size: int = 16,
             completion_t0: Sequence[float] = COMPLETION_T0,
             sensitivity_t: Sequence[float] = SENSITIVITY_T,
             categories: Sequence[str] = CATEGORIES) -> Diagnosis:
    """Completion accuracy per t0 and prompt sensitivity per t (see the module doc);
    unguided, with the run's training timestep shift unless `shift` is given."""
    from weft.model.flow import noise_latents
    from weft.stages.shapes.evaluate import _pixels, _uint8, prompt_contexts

    items = diagnosis_items(cfg, per_category, seed, categories)
    if len(items) < 2:
        raise ValueError("a diagnosis needs at least two prompts with a scene")
    shift = run.model.config.timestep_shift if shift is None else shift
    prompts = [spec.prompt for spec, _ in items]
    others = prompts[1:] + prompts[:1]
    latents = [z.float().cpu() for z in run.codec.encode([_pixels(run, im) for _, im in items])]
    noise = [torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + i))
             for i, z in enumerate(latents)]
    size = cfg.image_size
    correct: dict[float, list[bool]] = {t0: [] for t0 in completion_t0}
    from_noise: list[tuple[PromptSpec, list[Obj]]] = []
    errors: dict[float, tuple[list[float], list[float]]] = {t: ([], []) for t in sensitivity_t}
    for lo in range(0, len(items), batch_size):
        chunk = range(lo, min(len(items), lo + batch_size))
        own = prompt_contexts(run, [prompts[i] for i in chunk])
        other = prompt_contexts(run, [others[i] for i in chunk])
        for t0 in completion_t0:
            x_t = [noise_latents(latents[i], t0, noise[i])[0] for i in chunk]
            out = own.generate_latents(size, size, steps, shift, 1.0, 1.0, start=x_t,
                                       start_t=t0)
            found = [(items[i][0], detect(_uint8(im), shapes=tuple(cfg.shapes)))
                     for i, im in zip(chunk, run.codec.decode(out), strict=True)]
            correct[t0] += [score_prompt(spec, objs) for spec, objs in found]
            if t0 >= 1.0:
                from_noise += found
        for t in sensitivity_t:
            x_t, target = zip(*(noise_latents(latents[i], t, noise[i]) for i in chunk),
                              strict=True)
            for inter, sink in ((own, errors[t][0]), (other, errors[t][1])):
                v = inter.velocities(x_t, t)
                sink += [float(((a.cpu() - b) ** 2).mean()) for a, b in
                         zip(v, target, strict=True)]
    kinds = [spec.category for spec, _ in items]
    present = [c for c in categories if c in kinds]
    completion = {t0: {c: float(np.mean([ok for ok, k in zip(oks, kinds, strict=True)
                                          if k == c])) for c in present}
                  for t0, oks in correct.items()}
    sensitivity = {t: (float(np.mean(a)), float(np.mean(b))) for t, (a, b) in errors.items()}
    return Diagnosis(len(items), completion, sensitivity, object_breakdown(from_noise))


__all__ = ["COMPLETION_T0", "SENSITIVITY_T", "Diagnosis", "ObjectBreakdown", "diagnose",
           "diagnosis_items", "object_breakdown"]
