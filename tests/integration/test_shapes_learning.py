"""The whole stack learns: a shapes run, shards, a shapes VAE, the CPU recipe at reduced
size (a smaller backbone, one question type, a few hundred steps), then the held-out
evaluation through the KV-cached Interleaver. The model must read the answer from the ViT
tokens: a blind model cannot beat the most frequent answer. Colour is learnt through a
random-init ViT; shape, which a random ViT does not learn in this budget, through the
ViT pretrained on renders (`vit_train`).
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
PRETRAIN_STEPS = 300  # the ViT's patch-class pretraining (~20 s)
SMALL = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}


def _train(root, qtype: str, vit_pretrain_steps: int) -> dict:
    started = time.perf_counter()
    recipe = load_recipe(CPU_RECIPE, {
        "shapes": {"samples": {"t2i": 0, "vqa": 300, "caption": 0, "edit": 0, "video": 0},
                   "tasks": {"vqa": {"types": [qtype], "questions": 3}}},
        # VQA images are read through the ViT only: a briefly trained VAE is enough here.
        "vae": {"steps": 20, "batch_size": 4, "widths": [8, 16, 16, 16]},
        "vit": {"pretrain_steps": vit_pretrain_steps},
        "train": {"steps": STEPS, "checkpoint": {"every_steps": STEPS},
                  "metrics": {"every_steps": 25},
                  "optim": {"lr": 3e-3, "warmup_steps": 10},
                  "model": {"ema_decay": 0.9, "unified": {"llm": SMALL}},
                  "data": {"pack": {"expected_tokens": 1024, "max_tokens": 1280,
                                    "max_tokens_per_sample": 256}}},
        "eval": {"autoguidance": 1.0}})  # VQA only: nothing generated to guide
    config, _ = prepare(recipe, root)
    result = run_training(config)
    table, _ = evaluate_run(config.run_dir, recipe.shapes_config(), n_per_category=60,
                            tasks=("vqa",), vqa_types=(qtype,))
    return {"result": result, "table": table, "scene": recipe.shapes_config().scene,
            "seconds": time.perf_counter() - started}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("shapes-learning"), "colour", 0)


@pytest.fixture(scope="module")
def trained_shape(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("shapes-learning-shape"), "shape", PRETRAIN_STEPS)


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


def test_shape_answers_beat_chance_through_the_pretrained_vit(trained_shape) -> None:
    row = next(r for r in trained_shape["table"].rows if r.category == "vqa/shape")
    chance = chance_levels(trained_shape["scene"], 300)
    blind = max(chance["vqa_majority"]["shape"], chance["vqa"]["shape"])
    print(f"vqa/shape {row.accuracy:.3f} on {row.n} questions; blind {blind:.3f}; "
          f"{trained_shape['seconds']:.0f} s")
    assert row.n >= 60
    assert row.accuracy >= blind + 0.15, f"shape accuracy {row.accuracy:.3f} vs {blind:.3f}"
