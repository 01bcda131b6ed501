"""Shapes recipes: both shipped YAMLs load, every section is checked at start-up, and the
ViT a recipe asks for is the one built."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from weft.stages.shapes.recipe import (
    CPU_RECIPE,
    GPU_RECIPE,
    RecipeError,
    VitRecipe,
    load_recipe,
    shapes_vit,
)
from weft.stages.shapes.vit_train import load_stats


@pytest.mark.parametrize("path", [CPU_RECIPE, GPU_RECIPE])
def test_shipped_recipes_load_with_every_section_valid(path) -> None:
    recipe = load_recipe(path)
    train = recipe.train_config({"data": {"shards": "s", "tokenizer": "t"}})
    assert train.steps > 0 and train.model.unified.llm.layer_mode == "mot"
    shapes = recipe.shapes_config()
    assert shapes.samples.t2i > 0 and shapes.samples.vqa > 0 and shapes.samples.edit > 0
    # a render must give the ViT a grid within the connector's table (32 px, patch 4: 8 x 8)
    assert shapes.scene.image_size // recipe.vit.patch_size <= train.model.unified.vit_max_grid
    assert train.data.images.vit_max_patches == (shapes.scene.image_size
                                                 // recipe.vit.patch_size) ** 2


def test_the_cpu_recipe_fits_its_budget_on_paper() -> None:
    recipe = load_recipe(CPU_RECIPE)
    train = recipe.train_config()
    assert train.model.unified.llm.attention_backend == "docs"  # CPU: no flex backward
    # 0.29-0.37 s per 2k-token step on 2 cores (docs attention, fused AdamW, latent cache,
    # 16-token latents of 32 px renders, the world's 390-token vocabulary): 16-21 minutes
    # of the 30 for training (measured: 971 s for 3400 steps; 949 s for 2600 in a slower
    # hour), data ~2.5, the VAE's 1200 steps ~2, the ViT's ~1, evaluation ~2
    assert recipe.tokenizer.kind == "shapes"
    assert recipe.shapes_config().scene.image_size == 32
    assert train.steps * train.data.pack.expected_tokens <= 7_000_000
    assert recipe.vae.steps * recipe.vae.batch_size <= 19_200
    # the ViT's pretraining on renders: 1200 steps of 32 renders, ~80 s
    assert recipe.vit.pretrain_steps * recipe.vit.pretrain_batch_size <= 38_400


@pytest.mark.parametrize(("overrides", "words"), [
    ({"train": {"optim": {"lrr": 1.0}}}, "optim.lrr"),
    ({"shapes": {"samples": {"t2i": -1}}}, "samples.t2i"),
    ({"vae": {"widths": [8, 8]}}, "vae.widths"),
    ({"eval": {"weights": "best"}}, "eval.weights"),
    ({"eval": {"guide_step": None}}, "autoguidance needs guide_step"),
    ({"eval": {"guide_step": 3400}}, "eval.guide_step 3400 must be before the last"),
    ({"eval": {"autoguidance": 0.5}}, "eval.autoguidance"),
    ({"trian": {}}, "trian"),
])
def test_a_bad_section_fails_at_load_with_its_key(overrides, words) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(CPU_RECIPE, overrides)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_autoguidance_exports_its_guide_step_without_renaming_the_run(tmp_path) -> None:
    """The CPU recipe autoguides with its own step-1000 model: training exports that step;
    where a run is exported is not what it trains, so the run directory keeps its name."""
    from weft.stages.shapes.recipe import train_dir

    recipe = load_recipe(CPU_RECIPE)
    assert (recipe.eval.autoguidance, recipe.eval.guide_step) == (2.0, 1000)
    assert recipe.train_config().checkpoint.export_steps == [1000]
    off = load_recipe(CPU_RECIPE, {"eval": {"autoguidance": 1.0}})
    assert off.train_config().checkpoint.export_steps == []
    both = load_recipe(CPU_RECIPE, {"train": {"checkpoint": {"export_steps": [1500]}}})
    assert both.train_config().checkpoint.export_steps == [1000, 1500]
    assert train_dir(tmp_path, recipe) == train_dir(tmp_path, off) == \
        train_dir(tmp_path, both)
    assert train_dir(tmp_path, recipe) != train_dir(
        tmp_path, load_recipe(CPU_RECIPE, {"train": {"seed": 1}}))


def test_unreadable_recipe_is_one_clear_error(tmp_path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")


def test_the_vit_has_the_recipes_patch_and_width(tmp_path) -> None:
    path = shapes_vit(tmp_path, VitRecipe(hidden_size=32, num_layers=1, patch_size=8))
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"]) == \
        (32, 1, 8)
    other = shapes_vit(tmp_path, VitRecipe(hidden_size=32, num_layers=1, patch_size=16))
    assert other != path


def test_a_pretrained_vit_is_its_own_directory_and_needs_its_scene(tmp_path) -> None:
    recipe = VitRecipe(hidden_size=16, num_layers=1, patch_size=4, pretrain_steps=2,
                       pretrain_batch_size=2)
    scene = load_recipe(CPU_RECIPE).shapes_config().scene
    with pytest.raises(ValueError, match="scene config"):
        shapes_vit(tmp_path, recipe)
    path = shapes_vit(tmp_path, recipe, scene)
    assert path.name.startswith("siglip2-h16-l1-p4-pre-")
    assert load_stats(path).steps == 2
    assert shapes_vit(tmp_path, recipe, scene) == path  # found again
    more = shapes_vit(tmp_path, recipe.model_copy(update={"pretrain_steps": 3}), scene)
    assert more != path and load_stats(more).steps == 3
    seeded = shapes_vit(tmp_path, recipe.model_copy(update={"pretrain_seed": 1}), scene)
    assert seeded not in (path, more)
    first, second = (load_file(p / "model.safetensors") for p in (path, seeded))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another tower


def test_eval_cli_settings_come_from_the_options_then_the_recipe_then_defaults() -> None:
    """`weft eval shapes RUN --recipe R` evaluates as the recipe did unless told otherwise."""
    from weft.stages.shapes.evaluate import eval_settings
    from weft.stages.shapes.recipe import RecipeError, load_recipe

    shipped = load_recipe(CPU_RECIPE).eval
    quick = {"n_per_category": 8, "steps": 20, "shift": None, "cfg_text_scale": 4.0,
             "cfg_image_scale": 1.5, "autoguidance": 1.0, "guide_step": None,
             "weights": "ema"}
    assert eval_settings().model_dump() == quick
    assert eval_settings(CPU_RECIPE) == shipped
    assert shipped.cfg_text_scale != quick["cfg_text_scale"]  # the point of it
    mixed = eval_settings(CPU_RECIPE, n_per_category=3, cfg_text_scale=None)
    assert mixed.n_per_category == 3 and mixed.cfg_text_scale == shipped.cfg_text_scale
    with pytest.raises(TypeError, match="unknown evaluation settings"):
        eval_settings(cfg_scale=2.0)
    with pytest.raises(RecipeError):
        eval_settings("no/such/recipe.yaml")
    with pytest.raises(RecipeError, match="autoguidance needs guide_step"):
        eval_settings(autoguidance=2.0)  # the quick defaults name no guide
    assert eval_settings(autoguidance=2.0, guide_step=500).guide_step == 500
