"""`weft shapes recipe` end to end at a minute's size: every step runs, the table has
every category, the grids are written, a second run with other training settings reuses
data, VAE and ViT and trains afresh in its own directory, and the same recipe again finds
its finished run instead of training another."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from weft.cli import app
from weft.stages.shapes.recipe import CPU_RECIPE

pytestmark = pytest.mark.integration


def _run(out, tiny: list[str], *extra: str):
    args = ["shapes", "recipe", str(CPU_RECIPE), "--out", str(out)]
    for pair in (*tiny, *extra):
        args += ["--set", pair]
    return CliRunner().invoke(app, args)


def test_a_recipe_runs_end_to_end_and_reuses_what_it_built(tmp_path,
                                                          tiny_shapes_recipe) -> None:
    result = _run(tmp_path, tiny_shapes_recipe)
    assert result.exit_code == 0, result.output
    for category in ("geneval/single_object", "geneval/color_attr", "edit/recolour",
                     "edit/remove", "vqa/", "caption", "overall"):
        assert category in result.output
    [run] = tmp_path.glob("train-*")
    assert (run / "eval" / "table.md").is_file()
    assert "above chance (one-sided binomial p < 0.05):" in result.output
    assert (run / "eval" / "geneval.png").is_file()
    assert (run / "eval" / "edits.png").is_file()
    assert (run / "export").is_dir()
    # the recipe autoguides with the run's own earlier model: exported at its guide step
    assert json.loads((run / "export-step-000001" / "export.json").read_text())["step"] == 1
    recorded = json.loads((run / "eval" / "settings.json").read_text())
    assert recorded["guide_step"] == 1 and recorded["guidance"]["autoguidance"] == 2.0
    built = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in built if n.startswith(("data-", "vae-"))] and "models" in built
    # the recipe's tokenizer is the world's own, and the trained model reads its vocabulary
    [tokenizer] = [p for p in (tmp_path / "models").iterdir() if p.name.startswith("tokenizer-")]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["tokenizer"] == str(tokenizer)
    assert config["model"]["unified"]["llm"]["vocab_size"] < 512
    # the ViT is the one pretrained on renders, with its held-out accuracy beside it
    [vit] = (tmp_path / "models").glob("siglip2-*-pre-*")
    assert config["model"]["unified"]["vit_path"] == str(vit)
    assert (vit / "shapes_vit_stats.json").is_file() and "pretrained 3 steps" in result.output

    # `weft eval shapes` finds the recipe's scene (not the default one) through the shards
    from weft.stages.shapes.evaluate import trained_scene
    from weft.stages.shapes.recipe import load_recipe

    scene = load_recipe(CPU_RECIPE).shapes_config().scene
    assert trained_scene(run) == scene != type(scene)()
    evaluated = CliRunner().invoke(app, ["eval", "shapes", str(run), "--n",
                                         "1", "--steps", "2", "--cfg-text", "1.0",
                                         "--out", str(tmp_path / "eval-cli"), "--diagnose"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "above chance (one-sided binomial" in evaluated.output
    assert "geneval/colors" in evaluated.output and (tmp_path / "eval-cli" / "table.md").is_file()
    # --diagnose: completion per t0 for every category, sensitivity per t (6 prompts)
    diagnosis = json.loads((tmp_path / "eval-cli" / "diagnose.json").read_text())
    assert diagnosis["n"] == 6 and "completion from a noised right image" in evaluated.output
    assert set(diagnosis["completion"]) == {"0.3", "0.5", "0.7", "0.85", "1.0"}
    assert all(len(row) == 6 for row in diagnosis["completion"].values())
    assert set(diagnosis["sensitivity"]) == {"0.3", "0.6", "0.9"}
    # what was asked is on record: the options given, the CLI's defaults for the rest
    asked = json.loads((tmp_path / "eval-cli" / "settings.json").read_text())
    assert (asked["n_per_category"], asked["steps"], asked["weights"]) == (1, 2, "ema")
    assert asked["guidance"]["cfg_text_scale"] == 1.0
    assert asked["guidance"]["cfg_image_scale"] == 1.5
    # --recipe: the recipe's evaluation settings (guidance 1.5 / 1.0) where no option says
    again = CliRunner().invoke(app, ["eval", "shapes", str(run), "--recipe", str(CPU_RECIPE),
                                     "--n", "1", "--steps", "2", "--guide-step", "1",
                                     "--out", str(tmp_path / "eval-recipe")])
    assert again.exit_code == 0, again.output
    asked = json.loads((tmp_path / "eval-recipe" / "settings.json").read_text())
    assert asked["n_per_category"] == 1 and asked["guidance"]["cfg_text_scale"] == 1.5
    assert asked["guidance"]["cfg_image_scale"] == 1.0
    assert asked["guidance"]["autoguidance"] == 2.0 and asked["guide_step"] == 1
    # the recipe's guide step (1000) was never reached by this 2-step run: one clear error
    missing = CliRunner().invoke(app, ["eval", "shapes", str(run), "--recipe",
                                       str(CPU_RECIPE), "--n", "1", "--steps", "2"])
    assert missing.exit_code != 0
    assert "no export or checkpoint of step 1000" in " ".join(missing.output.split())
    unnamed = CliRunner().invoke(app, ["eval", "shapes", str(run), "--autoguidance", "2"])
    assert unnamed.exit_code != 0
    assert "--guide-step on the command" in " ".join(unnamed.output.split())
    bad = CliRunner().invoke(app, ["eval", "shapes", str(run), "--recipe", "nope.yaml"])
    assert bad.exit_code != 0 and "nope.yaml" in bad.output
    # ... and what the images from noise hold: one row a category, one image each
    rows = diagnosis["objects"]["rows"]
    assert len(rows) == 6 and all(row["images"] == 1 for row in rows.values())
    assert "what the images generated from noise hold" in evaluated.output
    built = sorted(p.name for p in tmp_path.iterdir())

    # another seed: data, VAE and ViT are reused; training starts afresh beside the first
    # run (it would otherwise resume a run trained with seed 0 and report it as seed 1)
    vae_dir = next(tmp_path.glob("vae-*"))
    stamp = (vae_dir / "config.json").stat().st_mtime_ns
    second = _run(tmp_path, tiny_shapes_recipe, "train.seed=1")
    assert second.exit_code == 0, second.output
    assert (vae_dir / "config.json").stat().st_mtime_ns == stamp
    [other] = set(tmp_path.glob("train-*")) - {run}
    assert "resumed from" not in second.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*built, other.name])
    assert [p.name for p in (other / "checkpoints").iterdir()] == ["step-000002"]
    # the first recipe again, logging and checkpointing otherwise (how it runs, not what
    # it trains): its own finished run is found, nothing retrains
    checkpoint = run / "checkpoints" / "step-000002"
    stamp = checkpoint.stat().st_mtime_ns
    third = _run(tmp_path, tiny_shapes_recipe, "train.metrics.every_steps=1",
                 "train.checkpoint.keep_last=5")
    assert third.exit_code == 0, third.output
    assert f"resumed from {checkpoint}" in " ".join(third.output.split())
    assert checkpoint.stat().st_mtime_ns == stamp
    assert len(list(tmp_path.glob("train-*"))) == 2


def test_a_bad_recipe_fails_before_any_work(tmp_path, tiny_shapes_recipe) -> None:
    result = _run(tmp_path, tiny_shapes_recipe, "train.optim.lrr=1")
    assert result.exit_code != 0
    assert "optim.lrr" in result.output
    assert not any(tmp_path.iterdir())
