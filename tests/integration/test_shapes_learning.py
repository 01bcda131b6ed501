"""The whole stack learns: a shapes run, shards, a shapes VAE, the CPU recipe at reduced
size (a smaller backbone, colour questions only, a few hundred steps), then the held-out
evaluation through the KV-cached Interleaver. The model must read colours from the ViT
tokens: a blind model cannot beat the most frequent answer.
"""

from __future__ import annotations

import time

import pytest

from weft.stages.shapes.evaluate import evaluate_run
from weft.stages.shapes.geneval import chance_levels
from weft.stages.shapes.recipe import CPU_RECIPE, load_recipe, prepare
from weft.train.loop import run_training

pytestmark = pytest.mark.integration

STEPS = 300
SMALL = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-learning")
    started = time.perf_counter()
    recipe = load_recipe(CPU_RECIPE, {
        "shapes": {"samples": {"t2i": 0, "vqa": 300, "caption": 0, "edit": 0, "video": 0},
                   "tasks": {"vqa": {"types": ["colour"], "questions": 3}}},
        # VQA images are read through the ViT only: a briefly trained VAE is enough here.
        "vae": {"steps": 20, "batch_size": 4, "widths": [8, 16, 16, 16]},
        "train": {"steps": STEPS, "checkpoint": {"every_steps": STEPS},
                  "metrics": {"every_steps": 25},
                  "optim": {"lr": 3e-3, "warmup_steps": 10},
                  "model": {"ema_decay": 0.9, "unified": {"llm": SMALL}},
                  "data": {"pack": {"expected_tokens": 1024, "max_tokens": 1280,
                                    "max_tokens_per_sample": 256}}}})
    config, _ = prepare(recipe, root)
    result = run_training(config)
    table, _ = evaluate_run(config.run_dir, recipe.shapes_config(), n_per_category=60,
                            tasks=("vqa",), vqa_types=("colour",))
    return {"result": result, "table": table, "scene": recipe.shapes_config().scene,
            "seconds": time.perf_counter() - started}


def test_answer_loss_falls(trained) -> None:
    history = trained["result"].history
    assert len(history) == STEPS
    assert sum(h.ce for h in history[-5:]) < 0.1 * sum(h.ce for h in history[:5])


def test_colour_answers_beat_chance_and_the_blind_prior(trained) -> None:
    row = next(r for r in trained["table"].rows if r.category == "vqa/colour")
    chance = chance_levels(trained["scene"], 300)
    blind = chance["vqa_majority"]["colour"]  # what a model that ignores the image scores
    assert row.n >= 60
    print(f"vqa/colour {row.accuracy:.3f} on {row.n} questions; blind prior {blind:.3f}, "
          f"chance {chance['vqa']['colour']:.3f}; {trained['seconds']:.0f} s")  # the README figure
    assert row.accuracy >= max(blind, chance["vqa"]["colour"]) + 0.15, \
        f"colour accuracy {row.accuracy:.3f} vs blind prior {blind:.3f}"
