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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from weft.stages.shapes.geneval import eval_prompts, eval_rng, geneval_image
from weft.stages.shapes.render import render
from weft.stages.shapes.scene import SceneConfig
from weft.stages.shapes.text import CATEGORIES, PromptSpec, prompt_scene
from weft.train.sample import Loaded

COMPLETION_T0 = (0.3, 0.5, 0.7, 0.85, 1.0)
SENSITIVITY_T = (0.3, 0.6, 0.9)


@dataclass
class Diagnosis:
    """completion[t0][category] accuracy; sensitivity[t] = (own prompt, other prompt) MSE."""

    n: int
    completion: dict[float, dict[str, float]] = field(default_factory=dict)
    sensitivity: dict[float, tuple[float, float]] = field(default_factory=dict)

    def completion_mean(self, t0: float) -> float:
        values = list(self.completion[t0].values())
        return float(np.mean(values)) if values else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n,
                "completion": {str(t): row for t, row in self.completion.items()},
                "sensitivity": {str(t): {"own_prompt": own, "other_prompt": other}
                                for t, (own, other) in self.sensitivity.items()}}

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
    errors: dict[float, tuple[list[float], list[float]]] = {t: ([], []) for t in sensitivity_t}
    for lo in range(0, len(items), batch_size):
        chunk = range(lo, min(len(items), lo + batch_size))
        own = prompt_contexts(run, [prompts[i] for i in chunk])
        other = prompt_contexts(run, [others[i] for i in chunk])
        for t0 in completion_t0:
            x_t = [noise_latents(latents[i], t0, noise[i])[0] for i in chunk]
            out = own.generate_latents(size, size, steps, shift, 1.0, 1.0, start=x_t,
                                       start_t=t0)
            images = run.codec.decode(out)
            correct[t0] += [geneval_image(items[i][0], _uint8(im))
                            for i, im in zip(chunk, images, strict=True)]
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
    return Diagnosis(len(items), completion, sensitivity)


__all__ = ["COMPLETION_T0", "SENSITIVITY_T", "Diagnosis", "diagnose", "diagnosis_items"]
