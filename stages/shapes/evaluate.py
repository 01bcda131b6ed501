"""Score a trained run on the shapes world: GenEval, edits, VQA and captions in one table.

The run's export is driven through the `Interleaver` with the layout the trainer's plans
give shapes samples (see `train/plans.py`, `train/packer.py`), so the model is asked
exactly what it was taught:

    t2i      prompt <|vision_start|>            -> generate an image
    edit     <|vision_start|> src <|vision_end|> instruction <|vision_start|> -> generate
    vqa      <|vision_start|> img <|vision_end|> question   -> decode the answer
    caption  <|vision_start|> img <|vision_end|> "Describe the image." -> decode to eos

Prompts, edits, questions and scenes are the held-out sets of `geneval.py` (their own
seed salt, never drawn by a shapes run). The detector scores images; answers are
compared after `normalize_answer` (the first word only: a VQA answer is one word, and
a sample's next question follows it without an eos; `closed_answer` reads a first word
that runs on past an answer, "circleangle", as that answer). Rows are prefixed by task
(`geneval/colors`, `vqa/colour`, `edit/move`, `caption`), each with its chance level;
a VQA row's chance is the higher of a random answer and the type's most frequent answer
(what a model that ignores the image learns).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from weft.stages.shapes.edits import EDIT_OPS
from weft.stages.shapes.geneval import (
    EvalTable,
    answer_correct,
    chance_levels,
    default_pos_tol,
    edit_correct,
    eval_captions,
    eval_edits,
    eval_prompts,
    eval_vqa,
    evaluate,
    geneval_image,
)
from weft.stages.shapes.render import png_bytes, render
from weft.stages.shapes.scene import SceneConfig
from weft.stages.shapes.text import (
    CAPTION_QUESTION,
    CATEGORIES,
    QUESTION_TYPES,
    answer_space,
    caption_correct,
    normalize_answer,
)
from weft.train.sample import Loaded, load_run

GRID_COLUMNS = 16  # images a GenEval grid row shows (96 a row made a 6528 px strip)
EDITS_SHOWN = 4  # edits of each op the edits grid shows (source, generated, target)

if TYPE_CHECKING:
    from weft.model.inference import Interleaver
    from weft.stages.shapes.recipe import EvalRecipe

TASKS = ("geneval", "edit", "vqa", "caption")


def _pixels(run: Loaded, image: np.ndarray) -> torch.Tensor:
    """A render as the trainer sees it: PNG bytes through the same decode and resize."""
    from weft.train.images import decode_rgb, vae_input

    return vae_input(decode_rgb(png_bytes(image), run.spec.max_pixels), run.spec)


def _uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def _markers(run: Loaded) -> tuple[list[int], list[int]]:
    start, end = run.text.markers or (None, None)
    return ([start] if start is not None else []), ([end] if end is not None else [])


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def prompt_contexts(run: Loaded, prompts: Sequence[str],
                    sources: Sequence[np.ndarray] | None = None) -> Interleaver:
    """One context per prompt, ready to generate: the t2i layout (prompt, image start), or
    the edit layout when `sources` are given (source image, instruction, image start)."""
    from weft.model.inference import Interleaver

    start, end = _markers(run)
    inter = Interleaver(run.model, run.codec, batch_size=len(prompts),
                        vit_max_patches=run.spec.vit_max_patches)
    if sources is not None:
        if start:
            inter.append_text([start] * len(prompts))
        inter.append_image([_pixels(run, source) for source in sources])
    inter.append_text([end * (sources is not None) + run.text.encode(prompt) + start
                       for prompt in prompts])
    return inter


def generate(run: Loaded, prompts: Sequence[str], size: int, steps: int,
             sources: Sequence[np.ndarray] | None = None, batch_size: int = 8,
             seed: int = 0, **guidance: Any) -> list[np.ndarray]:
    """One image per prompt (an edit of `sources[i]` when given), as uint8 RGB.
    guidance: `Interleaver.generate_image`'s; `autoguidance` > 1 needs `run.guide`."""
    autoguided = guidance.get("autoguidance", 1.0) != 1.0
    if autoguided and run.guide is None:
        raise ValueError("autoguidance needs the run's guide model: load the run with "
                         "guide_step (load_run(..., guide_step=N))")
    guide_run = replace(run, model=run.guide) if autoguided else None
    out: list[np.ndarray] = []
    for chunk in _chunks(len(prompts), batch_size):
        given = [prompts[i] for i in chunk]
        shown = None if sources is None else [sources[i] for i in chunk]
        inter = prompt_contexts(run, given, shown)
        guide = prompt_contexts(guide_run, given, shown) if guide_run is not None else None
        gens = [torch.Generator().manual_seed(seed + i) for i in chunk]
        images = inter.generate_image(size, size, steps=steps, generator=gens, append=False,
                                      guide=guide, **guidance)
        out.extend(_uint8(im) for im in images)
    return out


def answer(run: Loaded, images: Sequence[np.ndarray], questions: Sequence[str],
           max_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy text after each image and question (cut at eos or the next image marker)."""
    from weft.model.inference import Interleaver

    start, end = _markers(run)
    out: list[str] = []
    for chunk in _chunks(len(images), batch_size):
        inter = Interleaver(run.model, run.codec, batch_size=len(chunk),
                            vit_max_patches=run.spec.vit_max_patches)
        if start:
            inter.append_text([start] * len(chunk))
        pixels = [_pixels(run, images[i]) for i in chunk]
        if run.model.vision is not None:
            inter.append_vit_image(pixels)
        else:  # a model without vision reads images as latents
            inter.append_image(pixels)
        inter.append_text([end + run.text.encode(questions[i]) for i in chunk])
        for ids in inter.decode_text(max_tokens, eos_id=run.text.eos):
            stops = [i for i, t in enumerate(ids) if t in (run.text.eos, *start)]
            ids = ids[:stops[0]] if stops else ids
            out.append(run.tokenizer.decode(ids, skip_special_tokens=True))
    return out


def _first_word(text: str) -> str:
    words = normalize_answer(text).split()
    return words[0] if words else ""


def closed_answer(text: str, options: Sequence[str]) -> str:
    """The reply's first word, or the answer-space entry it starts with (longest first):
    answers are tokenized without a leading space, and a small model often runs the
    answer's token into a fragment of another ("circle" + "angle" -> "circleangle")."""
    word = _first_word(text)
    for option in sorted(options, key=len, reverse=True):
        if word.startswith(normalize_answer(option)):
            return option
    return word


def _grid(rows: Sequence[Sequence[np.ndarray]], path: Path, scale: int = 2) -> Path:
    """Images in rows (padded with white), upscaled, written as one PNG."""
    from PIL import Image

    side = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (side + 2), cols * (side + 2), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = r * (side + 2), c * (side + 2)
            canvas[y:y + side, x:x + side] = image
    img = Image.fromarray(canvas)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
    return path


def evaluate_run(train_run_dir: str | Path, shapes_config: Any = None,
                 n_per_category: int = 8, steps: int = 20, out_dir: str | Path | None = None,
                 tasks: Sequence[str] = TASKS, seed: int = 0, batch_size: int = 8,
                 weights: str = "ema", chance_n: int = 300,
                 vqa_types: Sequence[str] = QUESTION_TYPES, shift: float | None = None,
                 guide_step: int | None = None, **guidance: Any
                 ) -> tuple[EvalTable, list[Path]]:
    """Score a run on held-out shapes tasks; write sample grids (PNG) and the table.

    shapes_config: a `ShapesConfig`, a `SceneConfig`, a YAML path, or None: the scene of
    the shapes run the training read (`trained_scene`), else the defaults; only its scene
    settings matter. n_per_category: prompts per GenEval category, edits
    per op, questions per VQA type and captions are this many each. steps: Euler
    steps per generated image. vqa_types: the question types asked. shift: of the Euler
    schedule; None = the one the model trained with (`timestep_shift`). guide_step: the
    step whose export (`checkpoint.export_steps`) autoguides. guidance: passed to
    `Interleaver.generate_image` (cfg_text_scale, cfg_image_scale, autoguidance, ...).
    Returns the table and the PNG paths.
    """
    out = Path(out_dir) if out_dir is not None else Path(train_run_dir) / "eval-shapes"
    return evaluate_loaded(load_run(train_run_dir, weights, guide_step),
                           scene_config(shapes_config, train_run_dir), out, n_per_category,
                           steps, tasks, seed, batch_size, chance_n, vqa_types, shift,
                           weights=weights, guide_step=guide_step, **guidance)


def evaluate_loaded(run: Loaded, cfg: SceneConfig, out: Path, n_per_category: int = 8,
                    steps: int = 20, tasks: Sequence[str] = TASKS, seed: int = 0,
                    batch_size: int = 8, chance_n: int = 300,
                    vqa_types: Sequence[str] = QUESTION_TYPES, shift: float | None = None,
                    weights: str | None = None, guide_step: int | None = None,
                    **guidance: Any) -> tuple[EvalTable, list[Path]]:
    """`evaluate_run` on a run already loaded, in world `cfg`, writing under `out`.

    `out/settings.json` records what was asked (items, steps, seed, tasks, guidance,
    the shift in effect, `weights` and the guide's step when known), so a table can be
    reproduced."""
    guidance["shift"] = run.model.config.timestep_shift if shift is None else shift
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps({
        "n_per_category": n_per_category, "steps": steps, "seed": seed, "tasks": list(tasks),
        "vqa_types": list(vqa_types), "chance_n": chance_n, "weights": weights,
        "guide_step": guide_step, "guidance": guidance,
        "scene": cfg.model_dump(mode="json")}, indent=2) + "\n")
    chance = chance_levels(cfg, chance_n, seed)
    world = tuple(cfg.shapes)  # the detector's vocabulary (geneval.py's module doc)
    results: list[tuple[str, bool]] = []
    chances: dict[str, float] = {}
    pngs: list[Path] = []
    size = cfg.image_size
    if "geneval" in tasks:
        specs = eval_prompts(cfg, n_per_category, seed)
        images = generate(run, [s.prompt for s in specs], size, steps, None, batch_size,
                          seed, **guidance)
        results += [(f"geneval/{s.category}", geneval_image(s, im, world))
                    for s, im in zip(specs, images, strict=True)]
        chances.update({f"geneval/{k}": v for k, v in chance["geneval"].items()})
        rows = [[im for s, im in zip(specs, images, strict=True) if s.category == c]
                for c in CATEGORIES]  # a row per category, its first GRID_COLUMNS images
        pngs.append(_grid([r[:GRID_COLUMNS] for r in rows if r], out / "geneval.png"))
    if "edit" in tasks:
        edits = eval_edits(cfg, n_per_category, seed)
        sources = [render(e.source) for e in edits]
        images = generate(run, [e.instruction for e in edits], size, steps, sources,
                          batch_size, seed, **guidance)
        tol = default_pos_tol(size)
        results += [(f"edit/{e.op}", edit_correct(e.target, im, tol, world))
                    for e, im in zip(edits, images, strict=True)]
        chances.update({f"edit/{k}": v for k, v in chance["edit"].items()})
        shown = {op: 0 for op in EDIT_OPS}  # the first EDITS_SHOWN of each op, in op order
        rows = []
        for e, s, im in zip(edits, sources, images, strict=True):
            if shown[e.op] < EDITS_SHOWN:
                shown[e.op] += 1
                rows.append([s, im, render(e.target)])
        pngs.append(_grid(rows, out / "edits.png"))
    if "vqa" in tasks:
        pairs = [(scene, qa) for scene, qas in eval_vqa(cfg, n_per_category, seed,
                                                             types=tuple(vqa_types))
                 for qa in qas]
        answers = answer(run, [render(s) for s, _ in pairs], [qa.question for _, qa in pairs],
                         4, batch_size)
        results += [(f"vqa/{qa.type}",
                     answer_correct(closed_answer(a, answer_space(qa.type, cfg)), qa))
                    for (_, qa), a in zip(pairs, answers, strict=True)]
        # a blind model learns each type's answer prior, so that is the bar, not a coin
        chances.update({f"vqa/{k}": max(v, chance["vqa_majority"][k])
                        for k, v in chance["vqa"].items()})
    if "caption" in tasks:
        scenes = eval_captions(cfg, n_per_category, seed)
        captions = answer(run, [render(s) for s in scenes], [CAPTION_QUESTION] * len(scenes),
                          48, batch_size)
        results += [("caption", caption_correct(c, s))
                    for c, s in zip(captions, scenes, strict=True)]
        chances["caption"] = chance["caption"]["caption"]
    order = [*(f"geneval/{c}" for c in CATEGORIES), *(f"edit/{o}" for o in EDIT_OPS),
             *(f"vqa/{q}" for q in QUESTION_TYPES), "caption"]
    table = evaluate(results, chances, order, {k: int(v) for k, v in chance["draws"].items()})
    (out / "table.md").write_text(table.to_markdown() + "\n")
    return table, pngs


def scene_config(shapes_config: Any, train_run_dir: str | Path | None = None) -> SceneConfig:
    """The world to evaluate in: a SceneConfig as given, a ShapesConfig's or a YAML's scene,
    or (None) the scene of the shapes run the training read, else the defaults."""
    if isinstance(shapes_config, SceneConfig):
        return shapes_config
    if shapes_config is None and train_run_dir is not None:
        found = trained_scene(train_run_dir)
        if found is not None:
            return found
    if shapes_config is None or isinstance(shapes_config, str | Path):
        from weft.pipelines.shapes import load_config

        return load_config(shapes_config).scene
    return shapes_config.scene


def trained_scene(train_run_dir: str | Path) -> SceneConfig | None:
    """The scene config of the shapes run a training run read: its config.json's shards
    (a mixture.json) name each dataset's run directory, and a shapes run keeps its
    config.yaml there. None when the run read no shapes run; a ValueError when it read
    several with different scenes (then say which with --shapes-config)."""
    from weft.pipelines.shapes import PIPELINE, load_config
    from weft.pipelines.shard import MIXTURE_FILE
    from weft.pipelines.shard_samples import run_pipeline

    config = Path(train_run_dir) / "config.json"
    if not config.is_file():
        return None
    shards = Path(json.loads(config.read_text()).get("data", {}).get("shards", ""))
    mixture = shards / MIXTURE_FILE
    if not mixture.is_file():
        return None
    scenes = []
    for dataset in json.loads(mixture.read_text()).get("datasets", []):
        run_dir = Path(dataset.get("run_dir") or "")
        try:
            pipeline = run_pipeline(run_dir)
        except (FileNotFoundError, ValueError):  # gone or not a run: nothing to read
            continue
        if pipeline == PIPELINE:
            scene = load_config(run_dir / "config.yaml").scene
            if scene not in scenes:
                scenes.append(scene)
    if len(scenes) > 1:
        raise ValueError(f"{train_run_dir} trained on shapes runs with {len(scenes)} "
                         "different scenes; name one with --shapes-config")
    return scenes[0] if scenes else None


def task_mean(table: EvalTable, task: str) -> float:
    """Mean accuracy over one task's rows (`geneval`, `edit`, `vqa`, `caption`)."""
    accs = [r.accuracy for r in table.rows if r.category.split("/")[0] == task]
    return float(np.mean(accs)) if accs else 0.0


def task_means(table: EvalTable) -> str:
    """One line: the mean accuracy of each task."""
    return ", ".join(f"{t} {task_mean(table, t):.3f}" for t in TASKS)


def chance_summary(table: EvalTable, alpha: float = 0.05) -> str:
    """One line: how many rows are above chance at significance alpha, and which are not."""
    above = table.above_chance(alpha)
    behind = [c for c, ok in above.items() if not ok]
    line = f"above chance (one-sided binomial p < {alpha}): {len(above) - len(behind)} of " \
           f"{len(above)} rows"
    return f"{line}; not: {', '.join(behind)}" if behind else line


CLI_QUICK_ITEMS = 8  # `weft eval shapes` without a recipe: a quick look, 8 items a row


def eval_settings(recipe: str | Path | None = None, **given: Any) -> EvalRecipe:
    """The evaluation settings of `weft eval shapes`: the options given (not None), else
    the recipe's `eval` section (what `weft shapes recipe` evaluated with), else
    `EvalRecipe`'s defaults at `CLI_QUICK_ITEMS` items a row. Checked as a recipe's
    `eval` section is: RecipeError when they do not fit together."""
    from pydantic import ValidationError

    from weft.schemas.config_doc import validation_problems
    from weft.stages.shapes.recipe import EvalRecipe, RecipeError, load_recipe

    base = (load_recipe(recipe).eval if recipe is not None
            else EvalRecipe(n_per_category=CLI_QUICK_ITEMS)).model_dump()
    unknown = set(given) - set(base)
    if unknown:
        raise TypeError(f"unknown evaluation settings {sorted(unknown)}")
    settings = {**base, **{k: v for k, v in given.items() if v is not None}}
    try:
        return EvalRecipe.model_validate(settings)
    except ValidationError as exc:
        raise RecipeError(f"evaluation settings: {validation_problems(exc)}") from exc


def eval_shapes_cli(checkpoint_dir: str | Path, out_dir: str | Path | None = None,
                    shapes_config: str | Path | None = None, diagnose: bool = False,
                    recipe: str | Path | None = None, **given: Any
                    ) -> tuple[str, list[Path]]:
    """`weft eval shapes CHECKPOINT`: the table as markdown (per-task means appended)
    and the sample grids' paths. CHECKPOINT is a training run directory (RUN/export).
    given: evaluation settings (`eval_settings`; None = the recipe's or the default).
    diagnose: also where generation fails (`diagnose.py`), written as diagnose.md/json."""
    chosen = eval_settings(recipe, **given)
    out = Path(out_dir) if out_dir is not None else Path(checkpoint_dir) / "eval-shapes"
    run = load_run(checkpoint_dir, chosen.weights, chosen.active_guide_step)
    cfg = scene_config(shapes_config, checkpoint_dir)
    table, pngs = chosen.evaluate(run, cfg, out)
    markdown = f"{table.to_markdown()}\n\nper task: {task_means(table)}\n" \
               f"{chance_summary(table)}"
    if diagnose:
        from weft.stages.shapes.diagnose import diagnose as run_diagnosis

        found = run_diagnosis(run, cfg, chosen.n_per_category, chosen.steps)
        (out / "diagnose.md").write_text(found.to_markdown() + "\n")
        (out / "diagnose.json").write_text(json.dumps(found.as_dict(), indent=2) + "\n")
        markdown += "\n\n" + found.to_markdown()
    return markdown, pngs


__all__ = [
    "CLI_QUICK_ITEMS",
    "TASKS",
    "Loaded",
    "answer",
    "chance_summary",
    "eval_settings",
    "eval_shapes_cli",
    "evaluate_loaded",
    "evaluate_run",
    "generate",
    "load_run",
    "prompt_contexts",
    "scene_config",
    "task_mean",
    "task_means",
    "trained_scene",
]
