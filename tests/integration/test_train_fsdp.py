"""FSDP2 for real: two gloo ranks on CPU train, save a DCP checkpoint, a second 2-process
run resumes it, and the result equals a single-process reference of the same global
batches (which checks FSDP2's sharding, the global per-token loss scaling and the
unused-parameter handling). The export loads in one process. Accumulating two packs in
one process matches the same reference. Ray Train smoke-runs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.integration

_TOYS = Path(__file__).resolve().parents[1] / "unit" / "test_train_loop.py"

_RANK_SCRIPT = textwrap.dedent("""
    import importlib.util, json, logging, os, sys
    spec = importlib.util.spec_from_file_location("train_toys", sys.argv[1])
    toys = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toys)
    from weft.train.__main__ import setup_logging
    from weft.train.loop import run_training

    setup_logging()
    logging.getLogger("weft.train").setLevel(logging.INFO)  # every rank says how it built

    run_dir, stop_at, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = toys.tiny_train_config(run_dir, **json.loads(sys.argv[5]))
    source = toys.ToySource(rank=rank, world=world, variety=True)
    result = run_training(config, source, codec=toys.PoolCodec(), stop_at=stop_at)
    with open(out, "w") as fh:
        json.dump({"rank": rank, "step": result.step, "start": result.start_step,
                   "history": [h.__dict__ for h in result.history],
                   "checkpoint": str(result.checkpoint),
                   "export": str(result.export_dir) if result.export_dir else None,
                   "source_index": source.index}, fh)
""")

# Every part of the toy run that the reference must reproduce.
_CONFIG = {"steps": 4, "checkpoint": {"every_steps": 100, "keep_last": 2},
           "metrics": {"every_steps": 1, "tensorboard": False},
           "parallel": {"device": "cpu", "fsdp": "on"}}


def _toys() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_toys", _TOYS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_toys", module)  # cloudpickle wants it registered
    spec.loader.exec_module(module)
    return sys.modules["train_toys"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, run_dir: Path, stop_at: int, tag: str, world: int = 2
            ) -> tuple[list[dict], list[str]]:
    """Start `world` ranks the way torchrun would (env vars), wait, return their reports."""
    script = tmp / "rank.py"
    script.write_text(_RANK_SCRIPT)
    port = _free_port()
    procs, outs = [], []
    for rank in range(world):
        out = tmp / f"{tag}-rank{rank}.json"
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(_TOYS), str(run_dir), str(stop_at), str(out),
             json.dumps(_CONFIG)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
        outs.append(out)
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{tag}: ranks did not finish in time")
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"{tag} rank failed:\n{log[-4000:]}"
    return [json.loads(out.read_text()) for out in outs], logs


def _reference(toys: ModuleType, run_dir: Path, world: int, steps: int
               ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, both ranks' packs each step: the global per-token loss, its gradient,
    the same clipping, AdamW and schedule. FSDP2 over `world` ranks must match it."""
    from weft.model.mot import MoTModel
    from weft.train.loop import build_optimizer, noise_generator
    from weft.train.schedule import build_scheduler

    config = toys.tiny_train_config(run_dir, **_CONFIG)
    torch.manual_seed(config.seed)
    model = MoTModel.build(config.model.unified)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    codec = toys.PoolCodec()
    sources = [toys.ToySource(rank=r, world=world, variety=True) for r in range(world)]
    losses, norms = [], []
    for step in range(steps):
        outs = []
        for rank, source in enumerate(sources):
            batch = source.pack(step)
            outs.append(model(batch, codec.encode(batch.vae_images),
                              generator=noise_generator(config.seed, step, rank)))
        ce_n = max(sum(o.ce_tokens for o in outs), 1)
        mse_n = max(sum(o.mse_tokens for o in outs), 1)
        loss = sum(config.loss.ce_weight * o.ce_sum / ce_n +
                   config.loss.mse_weight * o.mse_sum / mse_n for o in outs)
        loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fsdp2_two_ranks_train_resume_and_match_one_process(tmp_path) -> None:
    from safetensors.torch import load_file

    from weft.train.checkpoint import load_exported

    toys = _toys()
    run_dir = tmp_path / "run"
    first, first_logs = _launch(tmp_path, run_dir, stop_at=2, tag="first")
    assert [r["step"] for r in first] == [2, 2]
    # rank 1 built no weights: it trained from rank 0's, broadcast after sharding (the
    # losses below match a one-process reference only if they arrived, buffers included)
    meta = "built on the meta device"
    assert meta in first_logs[1] and meta not in first_logs[0]
    assert "weights and buffers broadcast to 1 other rank after" in first_logs[0]
    ckpt = run_dir / "checkpoints" / "step-000002"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "rank-00000.pt").is_file() and (ckpt / "rank-00001.pt").is_file()
    assert len(list(ckpt.glob("*.distcp"))) == 2  # each rank wrote its own shards
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2

    second, logs = _launch(tmp_path, run_dir, stop_at=100, tag="second")
    assert [(r["start"], r["step"]) for r in second] == [(2, 4), (2, 4)]
    assert [r["source_index"] for r in second] == [4, 4]  # restored at 2, then 2 packs
    assert "resumed from" in logs[0] and "FSDP2 on" in logs[0]
    history = first[0]["history"] + second[0]["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history == first[1]["history"] + second[1]["history"]  # global numbers agree

    ref_losses, ref_norms, ref_state = _reference(toys, tmp_path / "ref", world=2, steps=4)
    assert [h["loss"] for h in history] == pytest.approx(ref_losses, abs=1e-5)
    # the gradient itself, not only its direction: FSDP2's average x world size = global
    assert [h["grad_norm"] for h in history] == pytest.approx(ref_norms, rel=1e-4)
    exported = load_file(str(Path(second[0]["export"]) / "model.safetensors"))
    assert exported.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(exported[key], value, atol=2e-5, rtol=1e-4, msg=key)

    model = load_exported(second[0]["export"])  # one process, EMA weights
    batch = toys.ToySource().pack(0)
    out = model(batch, toys.PoolCodec().encode(batch.vae_images),
                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.ce_sum) and torch.isfinite(out.mse_sum)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["tokens"]["text"] > 0 for m in metrics)


def test_accumulating_two_packs_on_one_process_equals_two_ranks(tmp_path) -> None:
    """optim.grad_accum_steps 2 in one process: the same losses, gradient norms and weights
    as the reference of two ranks' packs (which FSDP2 on two ranks matches above)."""
    from safetensors.torch import load_file

    from weft.train.loop import run_training

    toys = _toys()
    config = toys.tiny_train_config(tmp_path / "run", **{
        **_CONFIG, "parallel": {"device": "cpu", "fsdp": "off"},
        "optim": {"grad_accum_steps": 2}})
    source = toys.ToySource(variety=True)  # pack i = rank i % 2's pack of step i // 2
    result = run_training(config, source, codec=toys.PoolCodec())
    assert result.step == 4 and source.index == 8  # two packs a step
    ref_losses, ref_norms, ref_state = _reference(toys, tmp_path / "ref", world=2, steps=4)
    assert [h.loss for h in result.history] == pytest.approx(ref_losses, abs=1e-5)
    assert [h.grad_norm for h in result.history] == pytest.approx(ref_norms, rel=1e-4)
    exported = load_file(str(result.export_dir / "model.safetensors"))
    for key, value in ref_state.items():
        torch.testing.assert_close(exported[key], value, atol=2e-5, rtol=1e-4, msg=key)
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    packs = [toys.ToySource(variety=True).pack(i) for i in range(8)]
    assert [m["tokens"]["text"] for m in metrics] == [
        sum(p.token_counts()["text"] for p in packs[2 * s:2 * s + 2]) for s in range(4)]


def test_ray_train_runs_the_same_loop(tmp_path) -> None:
    """Ray Train (TorchTrainer, 1 CPU worker, gloo group made by Ray) runs run_training."""
    import ray
    from ray import cloudpickle

    from weft.train.ray_launcher import launch_on_ray

    toys = _toys()
    cloudpickle.register_pickle_by_value(toys)  # the toy source is not an importable module

    def data_factory(config, info):
        return toys.ToySource(rank=info.rank, world=info.world_size, variety=True)

    config = toys.tiny_train_config(tmp_path / "run", **_CONFIG)
    (tmp_path / "train.yaml").write_text(json.dumps(config.model_dump(mode="json")))
    try:
        report = launch_on_ray(tmp_path / "train.yaml", num_workers=2,
                               overrides={"steps": 2, "parallel": {"fsdp": "auto"}},
                               data_factory=data_factory, codec_factory=toys.PoolCodec)
    finally:
        ray.shutdown()
    assert report["step"] == 2 and report["start_step"] == 0
    assert report["last"]["step"] == 2 and math.isfinite(report["last"]["loss"])
    assert report["checkpoint"].endswith("step-000002")
    assert Path(report["export_dir"], "model.safetensors").is_file()


def _shards(root: Path) -> Path:
    """A small shard set of text-to-image and VQA samples (real PNGs, write_shards)."""
    import io

    import numpy as np
    from PIL import Image

    from weft.pipelines.shard import write_shards
    from weft.schemas.ids import hash_of

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    samples = []
    for i in range(12):
        key = hash_of("train-cli", i)
        member = f"{key}.0.png"
        image = {"type": "image", "member": member}
        sequence = ([{"type": "text", "role": "prompt", "text": f"a box number {i}"}, image]
                    if i % 2 == 0 else
                    [image, {"type": "text", "role": "question", "text": "what is it?"},
                     {"type": "text", "role": "answer", "text": f"box {i}"}])
        record = {"key": key, "kind": "text_to_image" if i % 2 == 0 else "vqa",
                  "sequence": sequence, "scores": {}, "parent_ids": []}
        samples.append({"key": key, "json": record, "members": {member: png(i)}})
    write_shards(samples, root, max_shard_bytes=4000)
    return root


def test_cli_trains_on_real_shards_and_resumes_exactly(tmp_path) -> None:
    """`python -m weft.train --config` in-process: the shard loader (2 workers), a Qwen2
    checkpoint with its tokenizer, tiny SigLIP2 and VAE; 4 steps straight equal 2 + 2."""
    import yaml

    from weft.assets import AssetUnavailableError
    from weft.model.config import MoTConfig
    from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae
    from weft.train.__main__ import main

    qwen = Path.home() / ".cache/weft/models/tiny/qwen2_5"
    if not (qwen / "tokenizer_config.json").is_file():
        from weft.stages.infer.tiny_models import make_tiny_models

        try:
            qwen = make_tiny_models(tmp_path / "tiny")["qwen2_5"]
        except AssetUnavailableError as exc:
            pytest.skip(f"tiny Qwen2.5 needs the GPT-2 vocabulary asset: {exc}")
    shards = _shards(tmp_path / "shards")
    llm = MoTConfig.from_qwen2_config(qwen, attention_backend="dense").model_dump()

    def config(run: str, steps: int) -> Path:
        data = {
            "run_dir": str(tmp_path / run), "steps": steps, "seed": 1,
            "model": {"unified": {"llm": llm, "vit_path": str(make_tiny_siglip2(
                tmp_path / "vit")), "vit_max_grid": 16, "latent_max_grid": 16},
                "llm_checkpoint": str(qwen), "vae_path": str(make_tiny_vae(tmp_path / "vae")),
                "ema_decay": 0.99},
            "data": {"shards": str(shards), "num_workers": 2, "seed": 3,
                     "images": {"vit_max_patches": 16, "vae_max_side": 64, "vae_min_side": 32},
                     "pack": {"expected_tokens": 200, "max_tokens": 256,
                              "max_tokens_per_sample": 256, "overflow_buffer": 2,
                              "pad_multiple": 64}},
            "optim": {"warmup_steps": 1}, "checkpoint": {"every_steps": 2},
            "metrics": {"every_steps": 1, "tensorboard": False}}
        path = tmp_path / f"{run}-{steps}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    assert main(["--config", str(config("straight", 4))]) == 0
    assert main(["--config", str(config("resumed", 2))]) == 0
    assert main(["--config", str(config("resumed", 4)), "--set", "metrics.every_steps=1"]) == 0

    def losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"]) for m in map(json.loads, lines)]

    straight, resumed = losses("straight"), losses("resumed")
    assert [s for s, _ in straight] == [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-6)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000004" / "rank-00000.pt",
                       weights_only=True)
    assert state["data"]["format"] == "weft-data-state-v1"
    model = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert model["step"] == 4 and Path(model["export_dir"], "ema.safetensors").is_file()
