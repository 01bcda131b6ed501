"""A small MoT trains on shapes VQA through the real path: a shapes run, shards, a
shapes VAE, the CPU recipe at reduced size; the answer loss falls.

Not shown yet (issue 10 stays open): colour accuracy above chance. After 200 steps at this
size the model answers colour questions at about chance (0.08-0.15 vs a 0.21 blind
prior), so the assertion that it reads colours from the ViT tokens waits for the recipe
work of the next session.
"""

from __future__ import annotations

import time

import pytest

from weft.pipelines import shapes
from weft.stages.shapes.evaluate import CPU_RECIPE, shapes_recipe
from weft.stages.shapes.vae_train import train_shapes_vae
from weft.train.loop import run_training

pytestmark = pytest.mark.integration

STEPS = 40
SMALL = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from weft.pipelines.mixture import build_mixture, single_run_mixture

    root = tmp_path_factory.mktemp("shapes-learning")
    started = time.perf_counter()
    config = shapes.load_config(overrides={
        "samples": {"t2i": 0, "vqa": 300, "caption": 0, "edit": 0, "video": 0},
        "tasks": {"vqa": {"types": ["colour"], "questions": 1}}})
    shapes.generate_run(config, root / "run")
    build_mixture(single_run_mixture(root / "run", max_shard_bytes=2_000_000), root,
                  root / "shards")
    # VQA images are read through the ViT only: a briefly trained VAE is enough here.
    vae = train_shapes_vae(root / "vae", steps=20, batch_size=4, widths=(8, 16, 16, 16))
    train = shapes_recipe(CPU_RECIPE, root / "models", vae, root / "shards", root / "train", {
        "steps": STEPS, "checkpoint": {"every_steps": STEPS},
        "metrics": {"every_steps": 10, "tensorboard": False},
        "optim": {"lr": 3e-3, "warmup_steps": 10}, "model": {"ema_decay": 0.9,
                                                             "unified": {"llm": SMALL}},
        "data": {"pack": {"expected_tokens": 512, "max_tokens": 640,
                          "max_tokens_per_sample": 256}}})
    result = run_training(train)
    return {"root": root, "result": result, "scene": config.scene,
            "seconds": time.perf_counter() - started}


def test_answer_loss_falls(trained) -> None:
    history = trained["result"].history
    assert len(history) == STEPS
    assert sum(h.ce for h in history[-5:]) < 0.3 * sum(h.ce for h in history[:5])
