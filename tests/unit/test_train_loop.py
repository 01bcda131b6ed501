"""The training loop on one process: lr schedule, EMA, losses falling, exact resume from
real DCP checkpoints, and the safetensors export reproducing the model.

`ToySource`, `PoolCodec` and `tiny_train_config` are also used by the 2-process test
(tests/integration/test_train_fsdp.py loads this file by path).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from weft.model.packed import PackBuilder, PackedBatch
from weft.train.config import LossConfig, TrainConfig, TrainConfigError
from weft.train.ema import EMA
from weft.train.loop import DataSource, global_stats, noise_generator, pack_loss
from weft.train.parallel import DistInfo
from weft.train.schedule import lr_factor

# ---- test data --------------------------------------------------------------------------


class ToySource:
    """A deterministic DataSource: pack i of rank r is built from seed (i·world + r) % pool.

    Documents: a learnable text (an arithmetic progression mod 64, with loss), then a
    noised 32x32 VAE image (MSE) or a clean one, optionally a ViT image, more text.
    `variety` makes some packs text-only and some without CE labels, so ranks use
    different parts of the model at the same step.
    """

    def __init__(self, rank: int = 0, world: int = 1, pool: int = 4, vit: bool = False,
                 variety: bool = False, pad_to: int = 96, vae_stride: int = 16,
                 size: int = 48) -> None:
        self.rank, self.world, self.pool = rank, world, pool
        self.vit, self.variety, self.pad_to, self.vae_stride = vit, variety, pad_to, vae_stride
        self.size = size
        self.index = 0

    def pack(self, index: int) -> PackedBatch:
        seed = (index * self.world + self.rank) % self.pool
        g = torch.Generator().manual_seed(seed)
        kind = seed % 3 if self.variety else 0
        start, delta = int(torch.randint(0, 64, (1,), generator=g)), 1 + seed % 3
        text = [(start + delta * i) % 64 for i in range(10)]
        b = PackBuilder(vit_patch=16, vae_stride=self.vae_stride).new_document()
        b.add_text(text, loss=kind != 2)
        if kind != 1:
            color = torch.rand(3, 1, 1, generator=g) * 2 - 1
            size = self.size
            image = (color + 0.1 * torch.randn(3, size, size, generator=g)).clamp(-1, 1)
            b.add_vae_image(image, noised=True)
            b.add_vae_image(image, noised=False, same_position_as_previous_image=True)
        if self.vit:
            from weft.model.vision import prepare_vit_image

            patches, grid = prepare_vit_image(torch.rand(3, 32, 32, generator=g), patch=16,
                                              max_patches=16)
            b.new_document().add_vit_image(patches, grid)
        b.add_text([(t + 7) % 64 for t in text[:6]], loss=True)
        return b.build(pad_to=self.pad_to)

    def __iter__(self):
        while True:
            batch = self.pack(self.index)
            self.index += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


class PoolCodec:
    """A stand-in for the frozen VAE (no diffusers import): 8x average pooling and a fixed
    3 → 16 channel map. Deterministic, like the real encoder's posterior mean."""

    def __init__(self, channels: int = 16, down: int = 8) -> None:
        self.down = down
        self.proj = torch.randn(channels, 3, generator=torch.Generator().manual_seed(7))

    def encode(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for image in images:
            pooled = F.avg_pool2d(image[None].float(), self.down)[0]
            out.append(torch.einsum("ck,khw->chw", self.proj.to(pooled.device), pooled))
        return out


def tiny_train_config(run_dir: str | Path, steps: int = 6, vit_path: str | None = None,
                      vae_path: str | None = None, **sections: dict[str, Any]) -> TrainConfig:
    """A 2-layer, hidden-64 MoT model and a short run; `sections` override config parts."""
    llm = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
           "num_heads": 4, "num_kv_heads": 2, "attention_backend": "dense"}
    data: dict[str, Any] = {
        "run_dir": str(run_dir), "steps": steps, "seed": 3,
        "model": {"unified": {"llm": llm, "vit_path": vit_path, "vit_max_grid": 16,
                              "latent_max_grid": 16},
                  "vae_path": vae_path, "ema_decay": 0.9},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01,
                  "schedule": "cosine", "min_lr_ratio": 0.1},
        "loss": {"ce_weight": 0.25, "mse_weight": 1.0},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
        "metrics": {"every_steps": 2, "tensorboard": False},
        "parallel": {"device": "cpu"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(data)


# ---- pure pieces ---------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_holds_or_follows_the_cosine() -> None:
    assert [lr_factor(s, 3, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [lr_factor(s, 2, 12, "cosine", 0.1) for s in range(15)]
    assert cos[:2] == [1 / 3, 2 / 3]
    assert cos[2] == pytest.approx(1.0)
    assert cos[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert cos[12] == pytest.approx(0.1) and cos[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(cos[2:]))
    with pytest.raises(ValueError):
        lr_factor(0, 0, 10, "linear")


def test_export_steps_must_fall_inside_the_run(tmp_path) -> None:
    assert tiny_train_config(tmp_path, steps=6, checkpoint={"export_steps": [4, 2, 4]}
                             ).checkpoint.export_steps == [2, 4]
    with pytest.raises(ValidationError, match="not before the last step"):
        tiny_train_config(tmp_path, steps=6, checkpoint={"export_steps": [6]})
    with pytest.raises(ValidationError, match="positive step numbers"):
        tiny_train_config(tmp_path, steps=6, checkpoint={"export_steps": [0]})


def test_ema_is_a_lerp_towards_the_weights_and_round_trips() -> None:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 1.0))  # 0.75·0 + 0.25·4
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 1.75))
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(model, decay=0.75)
    other.load_state_dict(state)
    other.copy_to(model)
    assert torch.allclose(model.weight, torch.full((2, 2), 1.75))
    assert not EMA(model, decay=0.0).enabled


def test_pack_loss_is_its_share_of_the_steps_per_token_mean() -> None:
    from weft.model.mot import LossOutput

    out = LossOutput(torch.tensor(6.0), 3, torch.tensor(2.0), 4)
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    weights = LossConfig(ce_weight=0.25, mse_weight=1.0)
    assert pack_loss(out, weights, (3.0, 4.0), 1).item() == pytest.approx(0.25 * 2.0 + 0.5)
    # in a step of twice its tokens (another pack, or another rank) it weighs half
    assert pack_loss(out, weights, (6.0, 8.0), 1).item() == pytest.approx(0.5)
    stats = global_stats(torch.tensor([6.0, 2.0], dtype=torch.float64), (3.0, 4.0), weights,
                         info)
    assert stats["ce"] == 2.0 and stats["mse"] == 0.5 and stats["ce_tokens"] == 3
    assert stats["loss"] == pytest.approx(1.0)


def test_loss_token_counts_match_the_forward() -> None:
    """The counts a step scales by are read from the packs before any forward."""
    from weft.model.mot import MoTModel, loss_token_counts

    config = tiny_train_config("unused")
    torch.manual_seed(0)
    model = MoTModel.build(config.model.unified)
    source, codec = ToySource(variety=True), PoolCodec()
    seen = set()
    for i in range(4):
        pack = source.pack(i)
        out = model(pack, codec.encode(pack.vae_images),
                    generator=torch.Generator().manual_seed(i))
        assert loss_token_counts(pack) == (out.ce_tokens, out.mse_tokens)
        seen.add((out.ce_tokens > 0, out.mse_tokens > 0))
    assert seen == {(True, True), (True, False)}  # some packs have no image to noise


def test_noise_is_seeded_by_seed_step_and_rank() -> None:
    a = torch.randn(4, generator=noise_generator(0, 5, 1))
    assert torch.equal(a, torch.randn(4, generator=noise_generator(0, 5, 1)))
    assert not torch.equal(a, torch.randn(4, generator=noise_generator(0, 5, 0)))
    assert not torch.equal(a, torch.randn(4, generator=noise_generator(0, 6, 1)))


def test_toy_source_is_a_resumable_data_source() -> None:
    source = ToySource()
    assert isinstance(source, DataSource)
    it = iter(source)
    first = [next(it) for _ in range(3)]
    fresh = ToySource()
    fresh.load_state_dict({"index": 2})
    assert torch.equal(next(iter(fresh)).input_ids, first[2].input_ids)


# ---- training on one process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae

    root = tmp_path_factory.mktemp("tiny-parts")
    return {"vit": make_tiny_siglip2(root / "siglip2"), "vae": make_tiny_vae(root / "vae")}


def _state(path: Path, weights: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / f"{weights}.safetensors"))


def test_optimizer_gives_the_vit_its_own_learning_rate(tmp_path, parts) -> None:
    """vit_lr_scale sets the SigLIP2 parameters' rate (and the schedule scales it too);
    every trainable parameter is in exactly one group; no decay on gains and biases."""
    from weft.model.mot import MoTModel
    from weft.train.loop import build_optimizer
    from weft.train.schedule import build_scheduler

    config = tiny_train_config(tmp_path / "run", vit_path=str(parts["vit"]),
                               vae_path=str(parts["vae"]),
                               optim={"lr": 1e-3, "vit_lr_scale": 0.25, "warmup_steps": 2,
                                      "weight_decay": 0.1})
    model = MoTModel.build(config.model.unified)
    optimizer = build_optimizer(model, config.optim)
    vit = {id(p) for p in model.vision.parameters()}
    seen: list[int] = []
    for group in optimizer.param_groups:
        ids = [id(p) for p in group["params"]]
        seen += ids
        in_vit = {i in vit for i in ids}
        assert len(in_vit) == 1  # a group is all ViT or all not
        assert group["lr"] == pytest.approx(1e-3 * (0.25 if in_vit == {True} else 1.0))
        assert group["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in group["params"])
                                         else 0.0)
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert vit <= set(seen)
    scheduler = build_scheduler(optimizer, config.optim, 10)
    scheduler.step()  # warm-up step 2 of 2: 2/3 of each group's own rate
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs == [pytest.approx(0.25 * 1e-3 * 2 / 3), pytest.approx(1e-3 * 2 / 3)]


def test_tiny_model_learns_ce_and_mse_fall(tmp_path, parts) -> None:
    """Real tiny SigLIP2 and VAE, 40 steps over 4 packs: both losses fall; metrics written."""
    from weft.train.loop import run_training

    config = tiny_train_config(tmp_path / "run", steps=40, vit_path=str(parts["vit"]),
                               vae_path=str(parts["vae"]),
                               metrics={"every_steps": 8, "tensorboard": True},
                               checkpoint={"every_steps": 16, "keep_last": 2,
                                           "export_steps": [20]},
                               optim={"lr": 5e-3, "warmup_steps": 2, "schedule": "constant"})
    result = run_training(config, ToySource(vit=True))
    ce = [h.ce for h in result.history]
    mse = [h.mse for h in result.history]
    assert result.step == 40 and len(result.history) == 40
    assert sum(ce[-8:]) < 0.5 * sum(ce[:8]), ce
    assert sum(mse[-8:]) < 0.92 * sum(mse[:8]), mse  # noise is fresh every step
    run = tmp_path / "run"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == \
        ["step-000032", "step-000040"]  # keep_last 2
    assert (run / "checkpoints" / "step-000040" / "COMPLETE").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [8, 16, 24, 32, 40]
    last = lines[-1]
    assert last["tokens"]["vit"] > 0 and last["tokens"]["vae_noised"] > 0
    assert last["tokens_per_s"] > 0 and last["tflops_per_device"] > 0
    assert last["mfu"] is None and last["peak_memory_gib"] > 0  # no MFU on CPU
    assert math.isclose(last["loss"], 0.25 * last["ce"] + last["mse"], rel_tol=1e-9)
    assert any((run / "tb").iterdir())
    assert (result.export_dir / "ema.safetensors").is_file()
    # the earlier model autoguidance samples against: exported at step 20, or exported
    # now from a kept checkpoint (32), and refused for a step with neither (24)
    from safetensors.torch import load_file

    from weft.train.sample import load_guide

    early = run / "export-step-000020"
    assert json.loads((early / "export.json").read_text())["step"] == 20
    final, at_20 = (load_file(p / "ema.safetensors") for p in (result.export_dir, early))
    assert final.keys() == at_20.keys()
    assert any(not torch.equal(final[k], at_20[k]) for k in final)
    guide = load_guide(run, 20)
    assert torch.equal(guide.state_dict()["latent.proj_out.weight"],
                       at_20["latent.proj_out.weight"])
    assert not guide.training
    load_guide(run, 32)
    assert json.loads((run / "export-step-000032" / "export.json").read_text())["step"] == 32
    with pytest.raises(FileNotFoundError, match=r"export_steps: \[24\]"):
        load_guide(run, 24)


def test_exact_resume_matches_a_straight_run(tmp_path, parts) -> None:
    """6 steps straight == 3 steps, stop, resume from the DCP checkpoint, 3 more."""
    from weft.train.loop import run_training

    def config(run: str) -> TrainConfig:
        return tiny_train_config(tmp_path / run, steps=6, vae_path=str(parts["vae"]),
                                 checkpoint={"every_steps": 2, "keep_last": 2})

    straight = run_training(config("a"), ToySource(variety=True))
    first = run_training(config("b"), ToySource(variety=True), stop_at=3)
    assert first.step == 3 and first.export_dir is None
    assert first.checkpoint == tmp_path / "b" / "checkpoints" / "step-000003"
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG
    torch.rand(100)
    second = run_training(config("b"), ToySource(variety=True))  # a fresh source: index 0
    assert second.start_step == 3 and second.step == 6
    resumed = first.history + second.history
    assert [h.step for h in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.history, resumed, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-6), (a, b)
        assert a.ce == pytest.approx(b.ce, abs=1e-6) and a.mse == pytest.approx(b.mse, abs=1e-6)
        assert a.lr == pytest.approx(b.lr, rel=1e-12)
    for weights in ("model", "ema"):
        sa, sb = _state(straight.export_dir, weights), _state(second.export_dir, weights)
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], atol=1e-6, rtol=0, msg=key)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == \
        ["step-000004", "step-000006"]


def test_export_reproduces_the_trained_model_and_its_ema(tmp_path, parts) -> None:
    from weft.model.vae import LatentCodec
    from weft.train.checkpoint import export_checkpoint, load_exported
    from weft.train.loop import Trainer

    config = tiny_train_config(tmp_path / "run", steps=3, vit_path=str(parts["vit"]),
                               vae_path=str(parts["vae"]))
    trainer = Trainer(config, ToySource(vit=True))
    try:
        result = trainer.train()
        batch = ToySource(vit=True).pack(1)
        latents = LatentCodec.from_pretrained(parts["vae"]).encode(batch.vae_images)
        noise = [torch.randn(9, 64), None]

        def losses(model: torch.nn.Module) -> torch.Tensor:
            out = model(batch, latents, noise=noise, generator=torch.Generator().manual_seed(5))
            return torch.stack([out.ce_sum, out.mse_sum])

        trainer.model.eval()
        with torch.no_grad():
            expected = losses(trainer.model)
            got = losses(load_exported(result.export_dir, weights="model"))
            torch.testing.assert_close(got, expected)
            trainer.ema.copy_to(trainer.model)
            expected_ema = losses(trainer.model)
            got_ema = losses(load_exported(result.export_dir))  # EMA by default
            torch.testing.assert_close(got_ema, expected_ema)
            assert not torch.allclose(got_ema, got)
    finally:
        trainer.close()
    # the same export, offline, from the DCP checkpoint
    offline = export_checkpoint(tmp_path / "run", out_dir=tmp_path / "offline")
    for weights in ("model", "ema"):
        a, b = _state(result.export_dir, weights), _state(offline, weights)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_mixing_runs_in_one_run_dir_is_refused(tmp_path) -> None:
    from weft.train.loop import run_training

    run_training(tiny_train_config(tmp_path, steps=1), ToySource(), codec=PoolCodec())
    bigger = tiny_train_config(tmp_path, steps=2)
    bigger.model.unified.llm.num_layers = 3
    with pytest.raises(TrainConfigError, match="different model"):
        run_training(bigger, ToySource(), codec=PoolCodec())
    fresh = tiny_train_config(tmp_path, steps=2, checkpoint={"resume": "never"})
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):
        run_training(fresh, ToySource(), codec=PoolCodec())


def test_resume_with_a_changed_lr_warns_and_keeps_the_saved_schedule(tmp_path, caplog) -> None:
    """The optimizer and LambdaLR state carry the old lr: a resumed run says so."""
    from weft.train.loop import run_training

    config = tiny_train_config(tmp_path, steps=4, checkpoint={"every_steps": 2})
    first = run_training(config, ToySource(), codec=PoolCodec(), stop_at=2)
    changed = tiny_train_config(tmp_path, steps=4, checkpoint={"every_steps": 2},
                                optim={"lr": 0.1, "weight_decay": 0.5})
    with caplog.at_level("WARNING", logger="weft.train"):
        second = run_training(changed, ToySource(), codec=PoolCodec())
    assert "optim lr, weight_decay changed" in caplog.text
    recorded = json.loads((tmp_path / "config.json").read_text())["optim"]
    assert recorded["lr"] == config.optim.lr and recorded["weight_decay"] == \
        config.optim.weight_decay  # what took effect, so the next resume warns again
    caplog.clear()
    with caplog.at_level("WARNING", logger="weft.train"):
        run_training(changed.model_copy(update={"steps": 6}), ToySource(), codec=PoolCodec())
    assert "optim lr, weight_decay changed" in caplog.text
    straight = run_training(tiny_train_config(tmp_path / "straight", steps=4), ToySource(),
                            codec=PoolCodec())
    assert [h.lr for h in first.history + second.history] == \
        pytest.approx([h.lr for h in straight.history], rel=1e-12)


def test_checkpoint_of_an_optimizer_grouped_otherwise_is_refused_before_loading(
        tmp_path) -> None:
    """A checkpoint's optimizer state loads only into an optimizer with the same parameter
    groups; otherwise a clear error, and the model is left as it was (recorded groups, or
    for checkpoints that did not record them, the group count in the DCP metadata)."""
    from weft.train.checkpoint import CheckpointError, read_train_state
    from weft.train.loop import Trainer, run_training

    result = run_training(tiny_train_config(tmp_path / "a", steps=2,
                                            checkpoint={"every_steps": 2}),
                          ToySource(), codec=PoolCodec())
    saved = read_train_state(result.checkpoint)["optimizer_groups"]
    assert len(saved) == 2 and all(group["params"] > 0 for group in saved)
    trainer = Trainer(tiny_train_config(tmp_path / "b", steps=2), ToySource(), codec=PoolCodec())
    try:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        one_group = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(one_group, lambda _: 1.0)
        with pytest.raises(CheckpointError, match=r"optimizer state has groups of \[\d+, \d+\]"
                           r" parameters, this run's optimizer has groups of \[\d+\]"):
            trainer.checkpointer.load(result.checkpoint, trainer.model, one_group, scheduler,
                                      trainer.ema)
        state_file = result.checkpoint / "train_state.json"
        state = json.loads(state_file.read_text())
        del state["optimizer_groups"]  # as a checkpoint from before groups were recorded
        state_file.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match="optimizer state has 2 parameter groups"):
            trainer.checkpointer.load(result.checkpoint, trainer.model, one_group, scheduler,
                                      trainer.ema)
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, before[key]), key
        trainer.checkpointer.load(result.checkpoint, trainer.model, trainer.optimizer,
                                  trainer.scheduler, trainer.ema)  # the right layout loads
        assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    finally:
        trainer.close()


def test_latent_cache_encodes_each_image_once_and_trains_identically(tmp_path, parts) -> None:
    """The real tiny VAE behind the cache: same latents, same losses, fewer encodes."""
    from weft.model.vae import LatentCodec
    from weft.train.latent_cache import LatentCache
    from weft.train.loop import Trainer

    codec = LatentCodec.from_pretrained(parts["vae"])
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1
              for i in range(3)]
    latent_bytes = codec.encode(images[:1])[0].numel() * 4
    cache = LatentCache(codec, max_bytes=2 * latent_bytes)  # room for two latents
    first = cache.encode(images[:2])
    for got, want in zip(first, codec.encode(images[:2]), strict=True):
        assert torch.equal(got, want)
    again = cache.encode([images[1], images[0]])
    assert torch.equal(again[0], first[1]) and (cache.hits, cache.misses) == (2, 2)
    cache.encode([images[2]])  # evicts images[1], the least recently used
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    cache.encode([images[0]])
    assert (cache.hits, cache.misses) == (3, 3)
    cache.encode([images[1]])
    assert (cache.hits, cache.misses) == (3, 4)
    with pytest.raises(ValueError, match="deterministic"):
        LatentCache(LatentCodec.from_pretrained(parts["vae"], sample_posterior=True), 1 << 20)

    histories, caches = [], []
    for mb in (0.0, 1.0):
        config = tiny_train_config(tmp_path / f"run-{mb}", steps=8,
                                   vae_path=str(parts["vae"]),
                                   data={"latent_cache_mb": mb})
        trainer = Trainer(config, ToySource(pool=4))
        try:
            histories.append(trainer.train().history)
        finally:
            trainer.close()
        caches.append(trainer.latent_cache)
    assert caches[0] is None
    # 4 packs, each with one image twice (noised target + clean copy), then the same 4 again
    assert caches[1].misses == 4 and caches[1].hits == 8
    for a, b in zip(*histories, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
    # a cache setting is not the model: a run resumes with the cache turned off
    resumed = Trainer(tiny_train_config(tmp_path / "run-1.0", steps=8,
                                        vae_path=str(parts["vae"])), ToySource(pool=4))
    try:
        assert resumed.step == 8 and resumed.latent_cache is None
    finally:
        resumed.close()
