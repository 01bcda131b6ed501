"""`weft shapes recipe` end to end at a minute's size: every step runs, the table has
every category, the grids are written, and a second run reuses data, VAE and ViT."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from weft.cli import app
from weft.stages.shapes.recipe import CPU_RECIPE

pytestmark = pytest.mark.integration

TINY = ["shapes.samples.t2i=12", "shapes.samples.vqa=8", "shapes.samples.caption=4",
        "shapes.samples.edit=8", "shapes.samples.video=0",
        "vae.steps=3", "vae.batch_size=2", "vae.widths=[8,8,8,8]",
        "vit.hidden_size=16", "vit.num_layers=1",
        "train.steps=2", "train.checkpoint.every_steps=2", "train.data.num_workers=0",
        "train.model.unified.llm.hidden_size=32", "train.model.unified.llm.num_layers=1",
        "train.model.unified.llm.intermediate_size=64",
        "train.model.unified.llm.num_heads=2", "train.model.unified.llm.num_kv_heads=1",
        "eval.n_per_category=1", "eval.steps=2"]


def _run(out, *extra: str):
    args = ["shapes", "recipe", str(CPU_RECIPE), "--out", str(out)]
    for pair in (*TINY, *extra):
        args += ["--set", pair]
    return CliRunner().invoke(app, args)


def test_a_recipe_runs_end_to_end_and_reuses_what_it_built(tmp_path) -> None:
    result = _run(tmp_path)
    assert result.exit_code == 0, result.output
    for category in ("geneval/single_object", "geneval/color_attr", "edit/recolour",
                     "edit/remove", "vqa/", "caption", "overall"):
        assert category in result.output
    assert (tmp_path / "eval" / "table.md").is_file()
    assert (tmp_path / "eval" / "geneval.png").is_file()
    assert (tmp_path / "eval" / "edits.png").is_file()
    assert (tmp_path / "train" / "export").is_dir()
    built = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in built if n.startswith(("data-", "vae-"))] and "models" in built
    # the recipe's tokenizer is the world's own, and the trained model reads its vocabulary
    [tokenizer] = [p for p in (tmp_path / "models").iterdir() if p.name.startswith("tokenizer-")]
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["data"]["tokenizer"] == str(tokenizer)
    assert config["model"]["unified"]["llm"]["vocab_size"] < 512

    # `weft eval shapes` finds the recipe's scene (not the default one) through the shards
    from weft.stages.shapes.evaluate import trained_scene
    from weft.stages.shapes.recipe import load_recipe

    scene = load_recipe(CPU_RECIPE).shapes_config().scene
    assert trained_scene(tmp_path / "train") == scene != type(scene)()
    evaluated = CliRunner().invoke(app, ["eval", "shapes", str(tmp_path / "train"), "--n",
                                         "1", "--steps", "2", "--cfg-text", "1.0",
                                         "--out", str(tmp_path / "eval-cli"), "--diagnose"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "geneval/colors" in evaluated.output and (tmp_path / "eval-cli" / "table.md").is_file()
    # --diagnose: completion per t0 for every category, sensitivity per t (6 prompts)
    diagnosis = json.loads((tmp_path / "eval-cli" / "diagnose.json").read_text())
    assert diagnosis["n"] == 6 and "completion from a noised right image" in evaluated.output
    assert set(diagnosis["completion"]) == {"0.3", "0.5", "0.7", "0.85", "1.0"}
    assert all(len(row) == 6 for row in diagnosis["completion"].values())
    assert set(diagnosis["sensitivity"]) == {"0.3", "0.6", "0.9"}
    built = sorted(p.name for p in tmp_path.iterdir())

    # other training settings: data, VAE and ViT are reused, only training reruns
    vae_dir = next(tmp_path.glob("vae-*"))
    stamp = (vae_dir / "config.json").stat().st_mtime_ns
    second = _run(tmp_path, "train.steps=3", "train.checkpoint.every_steps=3")
    assert second.exit_code == 0, second.output
    assert (vae_dir / "config.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == built


def test_a_bad_recipe_fails_before_any_work(tmp_path) -> None:
    result = _run(tmp_path, "train.optim.lrr=1")
    assert result.exit_code != 0
    assert "optim.lrr" in result.output
    assert not any(tmp_path.iterdir())
