"""A shapes-world recipe: one YAML says what data, VAE, ViT, training and evaluation to run.

`run_recipe` does the five steps in order and reports how long each took:

    data   a shapes run (configs/shapes.yaml + the recipe's `shapes` section) -> shards
    vae    a FLUX-interface VAE trained on renders (`vae_train.train_shapes_vae`)
    vit    a tiny SigLIP2, random-init or pretrained on renders (`vit_train`); its
           weights train on with the model
           and the tokenizer: the tiny Qwen2.5's, or a BPE of the world's words
    train  the recipe's `train` section over configs/train.yaml + this machine's paths
    eval   the shapes evaluation of the trained export (table with chance, PNG grids)

Data, VAE and ViT are reused when already under OUT (each is written complete or not at
all, in a directory named by a hash of its settings), so a second run with other
training settings only trains (afresh, in its own OUT/train-<hash>) and evaluates, and a
changed VAE section trains a new VAE; the same recipe again resumes its own run. Every
section is validated at load, before any work: a typo in `train` fails at start-up with
the training config's own message, not after the VAE has trained for ten minutes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weft.schemas.config_doc import deep_merge, read_yaml_mapping, validation_problems
from weft.schemas.ids import hash_of
from weft.stages.shapes.samples import GENERATOR_VERSION

if TYPE_CHECKING:
    from weft.stages.shapes.geneval import EvalTable
    from weft.stages.shapes.scene import SceneConfig
    from weft.train.sample import Loaded

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU_RECIPE = CONFIGS / "shapes-recipe-cpu.yaml"
GPU_RECIPE = CONFIGS / "shapes-recipe-gpu.yaml"
# Placeholders that make a `train` section checkable before the real paths exist.
_CHECK_PATHS = {"data": {"shards": "-", "tokenizer": "-"}}


class RecipeError(ValueError):
    """A recipe that cannot run: reported once, at start-up."""


class VaeRecipe(BaseModel):
    """The shapes VAE: FLUX's interface (16 latent channels, 8x down), small widths."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1500, gt=0, description="training steps on fresh renders")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(2e-3, gt=0)
    widths: list[int] = Field([16, 32, 32, 32], min_length=4, max_length=4,
                              description="block widths (4 blocks: 8x down)")


class VitRecipe(BaseModel):
    """The understanding ViT: a SigLIP2 whose weights train on with the model.

    Patch 8 on 64 px renders gives an 8 x 8 grid: a shape then fills whole patches (with
    patch 16 a shape is a corner of one of 16 patches and the model takes several times
    longer to read colours at all). With `pretrain_steps` the tower is first pretrained
    on renders (every patch predicts the colour and shape covering it,
    `vit_train.train_shapes_vit`), as BAGEL starts from a pretrained SigLIP2.
    """

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    patch_size: int = Field(8, gt=0)
    pretrain_steps: int = Field(0, ge=0, description="patch-class pretraining steps on "
                                "fresh renders; 0: random init")
    pretrain_batch_size: int = Field(32, gt=0, description="renders a pretraining step")
    pretrain_lr: float = Field(5e-3, gt=0, description="peak lr of the one-cycle schedule")
    pretrain_location_weight: float = Field(0.0, ge=0, description="weight of the "
                                            "object-centre loss; 0: patch classes only")
    pretrain_seed: int = Field(0, ge=0, description="seeds the tower's init and its renders "
                               "(a seed study varies it with train.seed)")


class TokenizerRecipe(BaseModel):
    """Which tokenizer the backbone reads: the world's own or the tiny Qwen2.5's.

    `shapes` trains a byte-level BPE on the world's texts (`tokenizer.py`): a few hundred
    rows of embedding instead of 50k, which at width 128 are most of the model.
    """

    model_config = ConfigDict(extra="forbid")
    kind: str = Field("qwen2_5", pattern="^(qwen2_5|shapes)$",
                      description="qwen2_5: the tiny Qwen2.5's 50k vocabulary; shapes: a "
                                  "BPE trained on the world's texts")
    vocab_size: int = Field(512, ge=259, description="shapes only: at most this many tokens "
                            "(256 bytes and 3 special tokens included)")


class EvalRecipe(BaseModel):
    """The held-out evaluation (`evaluate.evaluate_run`) after training."""

    model_config = ConfigDict(extra="forbid")
    n_per_category: int = Field(16, gt=0, description="prompts per GenEval category, edits "
                                                      "per op, VQA scenes, captions")
    steps: int = Field(20, gt=0, description="Euler steps per generated image")
    shift: float | None = Field(None, gt=0, description="timestep shift of the Euler "
                                "schedule; null = the model's training timestep_shift")
    cfg_text_scale: float = Field(4.0, ge=1.0)
    cfg_image_scale: float = Field(1.5, ge=1.0)
    autoguidance: float = Field(1.0, ge=1.0, description="sample against the run's model at "
                                "guide_step: v_guide + w (v - v_guide); 1 = off")
    guide_step: int | None = Field(None, gt=0, description="the step whose export guides "
                                   "(the recipe's training exports it); needed when "
                                   "autoguidance > 1")
    weights: Literal["ema", "model"] = Field("ema", description="ema | model (the raw "
                                             "weights) export")

    @model_validator(mode="after")
    def _guide_named(self) -> EvalRecipe:
        if self.autoguidance != 1.0 and self.guide_step is None:
            raise ValueError("autoguidance needs guide_step (eval.guide_step in a recipe, "
                             "--guide-step on the command line): the step of the earlier "
                             "model to guide with")
        return self

    @property
    def active_guide_step(self) -> int | None:
        """The step whose model guides, when autoguidance is on (None when it is off)."""
        return self.guide_step if self.autoguidance != 1.0 else None

    def run(self, run_dir: str | Path, shapes_config: Any, out: str | Path
            ) -> tuple[EvalTable, list[Path]]:
        """Evaluate a trained run with these settings: (table, PNG grids under out)."""
        from weft.stages.shapes.evaluate import scene_config
        from weft.train.sample import load_run

        return self.evaluate(load_run(run_dir, self.weights, self.active_guide_step),
                             scene_config(shapes_config, run_dir), Path(out))

    def evaluate(self, loaded: Loaded, scene: SceneConfig, out: Path
                 ) -> tuple[EvalTable, list[Path]]:
        """Evaluate a run already loaded (`load_run` with these weights and guide step)
        in world `scene` with these settings: (table, PNG grids under out)."""
        from weft.stages.shapes.evaluate import evaluate_loaded

        return evaluate_loaded(loaded, scene, out, self.n_per_category, self.steps,
                               shift=self.shift, weights=self.weights,
                               guide_step=self.active_guide_step,
                               cfg_text_scale=self.cfg_text_scale,
                               cfg_image_scale=self.cfg_image_scale,
                               autoguidance=self.autoguidance)


class ShapesRecipe(BaseModel):
    """Everything one shapes-world experiment runs, in one file."""

    model_config = ConfigDict(extra="forbid")
    shapes: dict[str, Any] = Field(default_factory=dict,
                                   description="overrides over configs/shapes.yaml")
    vae: VaeRecipe = Field(default_factory=VaeRecipe)
    vit: VitRecipe = Field(default_factory=VitRecipe)
    tokenizer: TokenizerRecipe = Field(default_factory=TokenizerRecipe)
    train: dict[str, Any] = Field(default_factory=dict,
                                  description="overrides over configs/train.yaml")
    eval: EvalRecipe = Field(default_factory=EvalRecipe)

    def shapes_config(self) -> Any:
        from weft.pipelines.shapes import load_config

        return load_config(overrides=self.shapes)

    def train_config(self, paths: dict[str, Any] | None = None) -> Any:
        """The training config: the `train` section with `paths` merged in, exporting the
        evaluation's guide step too (`checkpoint.export_steps`)."""
        from weft.train.config import load_train_config

        train = deep_merge(self.train, paths or _CHECK_PATHS)
        guide = self.eval.active_guide_step
        if guide is not None:  # CheckpointConfig sorts and dedupes the steps
            given = train.get("checkpoint", {}).get("export_steps", [])
            train = deep_merge(train, {"checkpoint": {"export_steps": [*given, guide]}})
        return load_train_config(None, train)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> ShapesRecipe:
    """The recipe at `path` (+ overrides), every section checked; RecipeError when bad."""
    from weft.pipelines.common import ConfigError
    from weft.train.config import TrainConfigError, load_train_config

    data = read_yaml_mapping(path, "shapes recipe", RecipeError)
    try:
        recipe = ShapesRecipe.model_validate(deep_merge(data, overrides or {}))
    except ValidationError as exc:
        raise RecipeError(f"invalid shapes recipe {path}: {validation_problems(exc)}") from exc
    try:
        recipe.shapes_config()
        guide = recipe.eval.active_guide_step
        steps = load_train_config(None, deep_merge(recipe.train, _CHECK_PATHS)).steps
        if guide is not None and guide >= steps:
            raise RecipeError(f"shapes recipe {path}: eval.guide_step {guide} must be before "
                              f"the last training step ({steps}): autoguidance needs an "
                              "earlier model")
        recipe.train_config()
    except (ConfigError, TrainConfigError) as exc:
        raise RecipeError(f"shapes recipe {path}: {exc}") from exc
    return recipe


# ---- the steps ---------------------------------------------------------------------------------
def shapes_shards(root: str | Path, shapes_config: Any,
                  max_shard_bytes: int = 2_000_000) -> Path:
    """A shapes run under root/run, sharded to root/shards (reused when there)."""
    from weft.pipelines import shapes
    from weft.pipelines.mixture import build_mixture, single_run_mixture

    root = Path(root)
    out = root / "shards"
    if not (out / "mixture.json").is_file():
        shapes.generate_run(shapes_config, root / "run")
        build_mixture(single_run_mixture(root / "run", max_shard_bytes=max_shard_bytes),
                      root, out)
    return out


def shapes_vit(models_dir: str | Path, vit: VitRecipe, scene: Any = None,
               progress: bool = False) -> Path:
    """The recipe's SigLIP2 under models_dir (built once, seeded): random-init, or with
    `pretrain_steps` pretrained on renders of `scene` (a `SceneConfig`, then required)."""
    name = f"siglip2-h{vit.hidden_size}-l{vit.num_layers}-p{vit.patch_size}"
    if vit.pretrain_steps:
        from weft.stages.shapes.vit_train import train_shapes_vit

        if scene is None:
            raise ValueError("a pretrained shapes ViT needs the scene config it renders")
        key = hash_of("shapes-vit", vit.model_dump(mode="json"), scene.model_dump(mode="json"),
                      length=12)
        return train_shapes_vit(Path(models_dir) / f"{name}-pre-{key}", scene,
                                hidden=vit.hidden_size, layers=vit.num_layers,
                                patch=vit.patch_size, steps=vit.pretrain_steps,
                                batch_size=vit.pretrain_batch_size, lr=vit.pretrain_lr,
                                location_weight=vit.pretrain_location_weight,
                                seed=vit.pretrain_seed, progress=progress)
    from weft.model.tiny_parts import make_tiny_siglip2

    return make_tiny_siglip2(Path(models_dir) / name, hidden=vit.hidden_size,
                             layers=vit.num_layers, patch=vit.patch_size)


def shapes_tokenizer_dir(models_dir: str | Path, recipe: ShapesRecipe,
                         shapes_config: Any) -> Path:
    """The recipe's tokenizer under models_dir: the world's BPE or the tiny Qwen2.5's."""
    if recipe.tokenizer.kind == "shapes":
        from weft.stages.shapes.tokenizer import shapes_tokenizer

        return shapes_tokenizer(models_dir, shapes_config.scene, shapes_config.tasks,
                                recipe.tokenizer.vocab_size)
    from weft.stages.infer.tiny_models import make_tiny_models

    return make_tiny_models(Path(models_dir) / "tiny")["qwen2_5"]


def machine_paths(tokenizer_dir: str | Path, vae_dir: str | Path, vit_dir: str | Path,
                  shards: str | Path, run_dir: str | Path) -> dict[str, Any]:
    """The training config's local paths: the tokenizer (and its vocabulary size for the
    random-init backbone), the ViT, the VAE, the shards, the run directory."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return {"run_dir": str(run_dir),
            "model": {"vae_path": str(vae_dir),
                      "unified": {"vit_path": str(vit_dir), "llm": {"vocab_size": vocab}}},
            "data": {"shards": str(shards), "tokenizer": str(tokenizer_dir)}}


@dataclass
class RecipeResult:
    """What a recipe run produced and how long each step took (seconds)."""

    out: Path
    table: Any
    pngs: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)
    history: list[Any] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def prepare(recipe: ShapesRecipe, out: str | Path,
            log: Callable[[str], None] = lambda _: None,
            progress: bool = False) -> tuple[Any, dict[str, float]]:
    """Data, VAE and ViT under OUT; the training config (run_dir `train_dir`) and timings.
    progress: tqdm bars for the long steps."""
    from weft.stages.shapes.vae_train import reconstruction_report, train_shapes_vae

    out = Path(out)
    seconds: dict[str, float] = {}
    shapes_config = recipe.shapes_config()
    start = time.perf_counter()
    data_key = hash_of("shapes-data", shapes_config.config_hash, GENERATOR_VERSION, length=12)
    shards = shapes_shards(out / f"data-{data_key}", shapes_config)  # new samples: new dir
    seconds["data"] = time.perf_counter() - start
    log(f"data: {shards} ({seconds['data']:.0f} s)")
    start = time.perf_counter()
    vae_key = hash_of("shapes-vae", recipe.vae.model_dump(mode="json"),
                      shapes_config.scene.model_dump(mode="json"), length=12)
    vae = train_shapes_vae(out / f"vae-{vae_key}", image_size=shapes_config.scene.image_size,
                           steps=recipe.vae.steps, batch_size=recipe.vae.batch_size,
                           lr=recipe.vae.lr, widths=tuple(recipe.vae.widths),
                           scene=shapes_config.scene, progress=progress)
    seconds["vae"] = time.perf_counter() - start
    recon_n = 64
    recon = reconstruction_report(vae, n=recon_n, scene=shapes_config.scene)
    log(f"vae: {vae} ({seconds['vae']:.0f} s; the detector reads {recon['detect']:.2f} of "
        f"{recon_n} fresh scenes back from its reconstructions, l1 {recon['l1']:.3f})")
    start = time.perf_counter()
    vit = shapes_vit(out / "models", recipe.vit, shapes_config.scene, progress)
    if recipe.vit.pretrain_steps:
        from weft.stages.shapes.vit_train import load_stats

        stats = load_stats(vit)
        where = ("" if math.isnan(stats.centre_error_px)
                 else f", object centres {stats.centre_error_px:.1f} px off")
        log(f"vit: {vit} (pretrained {stats.steps} steps in {stats.seconds:.0f} s; held-out "
            f"patches {stats.patch_accuracy:.3f}, shape of object patches "
            f"{stats.shape_accuracy:.3f}{where})")
    tokenizer = shapes_tokenizer_dir(out / "models", recipe, shapes_config)
    run_dir = train_dir(out, recipe, shards.parent, vae, vit, tokenizer)
    paths = machine_paths(tokenizer, vae, vit, shards, run_dir)
    seconds["models"] = time.perf_counter() - start
    return recipe.train_config(paths), seconds


# training settings that change how a run goes, not the weights it trains
HOW_NOT_WHAT: dict[str, tuple[str, ...]] = {
    "metrics": ("every_steps", "tensorboard", "peak_tflops"),
    "checkpoint": ("every_steps", "keep_last", "export_safetensors", "export_steps"),
    "data": ("num_workers", "latent_cache_mb"),
    "parallel": ("compile", "activation_checkpointing", "reshard_after_forward"),
}


def train_dir(out: str | Path, recipe: ShapesRecipe, *built: Path) -> Path:
    """OUT/train-<hash>: named by the resolved training settings and the directories it
    reads (data, VAE, ViT, tokenizer, each already named by its own settings).

    The same recipe finds its run again and resumes it (an interrupted run goes on);
    another seed, lr or step count trains afresh beside it instead of resuming a run
    trained otherwise. Settings of how a run goes rather than what it trains
    (`HOW_NOT_WHAT`: logging, checkpoint cadence, loader workers, caches, compile) stay
    out of the name, so changing them resumes the same run. Paths enter by name only, so
    `--out runs/x` and `--out ./runs/x` agree.
    """
    settings = recipe.train_config().model_dump(mode="json")
    settings.pop("run_dir", None)
    for section, keys in HOW_NOT_WHAT.items():
        for name in keys:
            settings[section].pop(name, None)
    key = hash_of("shapes-train", settings, [Path(p).name for p in built], length=12)
    return Path(out) / f"train-{key}"


def run_recipe(recipe: ShapesRecipe, out: str | Path,
               log: Callable[[str], None] = lambda _: None,
               progress: bool = False) -> RecipeResult:
    """Data, VAE, ViT, training and evaluation; the table and grids under
    OUT/train-<hash>/eval."""
    from weft.train.loop import run_training

    out = Path(out)
    config, seconds = prepare(recipe, out, log, progress)
    start = time.perf_counter()
    result = run_training(config)
    seconds["train"] = time.perf_counter() - start
    log(f"train: {config.steps} steps in {config.run_dir} ({seconds['train']:.0f} s)")
    start = time.perf_counter()
    table, pngs = recipe.eval.run(config.run_dir, recipe.shapes_config(),
                                  Path(config.run_dir) / "eval")
    seconds["eval"] = time.perf_counter() - start
    return RecipeResult(out, table, pngs, seconds, list(result.history))


__all__ = ["CPU_RECIPE", "GPU_RECIPE", "EvalRecipe", "RecipeError", "RecipeResult",
           "ShapesRecipe", "TokenizerRecipe", "VaeRecipe", "VitRecipe", "load_recipe",
           "machine_paths", "prepare", "run_recipe", "shapes_shards", "shapes_tokenizer_dir",
           "shapes_vit", "train_dir"]
