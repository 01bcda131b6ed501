"""The training loop on CUDA: bf16 FSDP2 (world 1) with compiled FlexAttention trains,
reports memory and MFU, and checkpoints (skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_TOYS = Path(__file__).resolve().parents[1] / "unit" / "test_train_loop.py"


def _toys():
    spec = importlib.util.spec_from_file_location("train_toys", _TOYS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_bf16_fsdp_flex_train_steps_on_cuda(tmp_path, activation_checkpointing) -> None:
    from weft.model.tiny_parts import make_tiny_vae
    from weft.train.loop import run_training

    toys = _toys()
    config = toys.tiny_train_config(
        tmp_path / "run", steps=3, vae_path=str(make_tiny_vae(tmp_path / "vae")),
        metrics={"every_steps": 1, "tensorboard": False, "peak_tflops": None},
        parallel={"device": "cuda", "fsdp": "on", "mixed_precision": "auto",
                  "activation_checkpointing": activation_checkpointing})
    config.model.unified.llm.attention_backend = "flex"
    result = run_training(config, toys.ToySource(variety=True, pad_to=128))
    assert result.step == 3
    assert all(math.isfinite(h.loss) and math.isfinite(h.grad_norm) for h in result.history)
    lines = [json.loads(line) for line in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(line["peak_memory_gib"] > 0 for line in lines)
    name = torch.cuda.get_device_name()
    if any(gpu in name for gpu in ("H100", "H200", "A100")):
        assert lines[-1]["mfu"] is not None and lines[-1]["mfu"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    state = json.loads((tmp_path / "run" / "config.json").read_text())
    assert state["parallel"]["fsdp"] == "on"
