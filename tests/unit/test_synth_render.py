"""Renderers: the tiny FLUX pipeline and weft's MoT behind one interface, reproducible by
seed, a failure on one prompt isolated, and renders paid for once through the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weft.schemas.policy import load_policy
from weft.stages.synth.render import RenderCache, render_step, render_with
from weft.stages.synth.renderers import (
    DiffusersRenderer,
    MoTRenderer,
    RenderConfig,
    RenderFailure,
    renderer_identity,
    renderer_params,
)
from weft.stages.synth.tiny_renderer import make_tiny_flux

POLICY = load_policy(Path(__file__).resolve().parents[2] / "configs" / "policies" /
                     "synth-tiny-models.yaml")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: contended OpenMP threads on a busy 2-core machine only slow them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flux_config(tmp_path_factory) -> RenderConfig:
    path = make_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "flux")
    return RenderConfig(path=str(path), height=32, width=32, steps=2, max_sequence_length=32)


@pytest.fixture(scope="module")
def flux(flux_config) -> DiffusersRenderer:
    return DiffusersRenderer(flux_config)


def test_tiny_flux_loads_as_a_flux_pipeline_from_a_local_directory(flux, flux_config) -> None:
    from diffusers import FluxPipeline

    assert isinstance(flux.pipe, FluxPipeline)
    assert (Path(flux_config.path) / "model_index.json").is_file()
    assert make_tiny_flux(flux_config.path) == Path(flux_config.path)  # already complete
    assert (flux.model_id, flux.revision) == renderer_identity(flux_config)
    assert flux.params() == renderer_params(flux_config)


def test_renders_are_reproducible_by_seed_and_independent_of_batch(flux) -> None:
    a = flux.render(["a red cat", "a blue dog"], [1, 2], 32, 32)
    b = flux.render(["a blue dog"], [2], 32, 32)
    c = flux.render(["a red cat"], [3], 32, 32)
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[1], b[0])
    assert not np.array_equal(a[0], c[0])


def test_a_prompt_the_pipeline_cannot_render_fails_alone(flux) -> None:
    out = flux.render(["fine", "too small", "fine too"], [1, 2, 3], 8, 8)
    assert all(isinstance(o, RenderFailure) for o in out)  # 8 px cannot be drawn at all
    mixed = flux.render(["fine"], [1], 16, 16) + flux.render(["bad"], [2], 8, 8)
    assert isinstance(mixed[0], np.ndarray) and isinstance(mixed[1], RenderFailure)
    assert mixed[1].error_type == "RuntimeError"


class Crashy:
    """A renderer wrapper that raises for one prompt and draws a blank image for another."""

    def __init__(self, inner: DiffusersRenderer) -> None:
        self.inner, self.model_id, self.revision = inner, "crashy", "r1"
        self.calls = 0

    def params(self) -> dict:
        return self.inner.params()

    def render(self, prompts, seeds, height, width):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            self.calls += 1
            if prompt == "crash":
                out.append(RenderFailure("RuntimeError", "injected crash"))
            elif prompt == "blank":
                out.append(np.zeros((height, width, 3), np.uint8))
            else:
                out += self.inner.render([prompt], [seed], height, width)
        return out


def _rows() -> list[dict]:
    base = {"source_id": "f", "item_kind": "synth_sample", "task": "t2i", "seed": 4}
    return [{**base, "item_id": name, "parent_id": f"in-{name}", "prompt": name,
             "detailed_prompt": name, "height": None, "width": None}
            for name in ("a cat", "crash", "blank")] + [
        {**base, "item_id": "edit", "parent_id": "in-edit", "task": "edit"}]


def test_render_step_isolates_a_crash_and_caches_what_it_drew(flux, flux_config, tmp_path
                                                               ) -> None:
    renderer = Crashy(flux)
    identity = (renderer.model_id, renderer.revision, renderer.params())
    with RenderCache(tmp_path / "cache.sqlite") as cache:
        results, stats = render_step(_rows(), POLICY, flux_config, identity, cache,
                                     lambda jobs: render_with(renderer, jobs))
        assert [(r.entry.decision, r.entry.reason) for r in results] == [
            ("keep", "ok"), ("error", "render_failed"), ("keep", "ok"), ("keep", "given")]
        assert results[1].entry.error_message == "injected crash"
        assert stats.as_dict() == {"requests": 3, "unique": 3, "cache_hits": 0,
                                   "renderer_calls": 3, "errors": 1}
        drawn = results[0].updates["target_image"]
        assert drawn.startswith(b"\x89PNG") and results[0].updates["render_height"] == 32
        assert results[0].updates["generators"]["render"]["seed"] == 4
        again, stats = render_step(_rows(), POLICY, flux_config, identity, cache,
                                   lambda jobs: render_with(renderer, jobs))
    assert stats.cache_hits == 2 and stats.renderer_calls == 1  # failures are not cached
    assert again[0].updates["target_image"] == drawn
    assert renderer.calls == 4


def _tiny_mot(vocab_size: int = 64):
    from weft.model.config import MoTConfig
    from weft.model.mot import MoTModel, UnifiedConfig

    llm = MoTConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, attention_backend="dense")
    torch.manual_seed(0)
    model = MoTModel.build(UnifiedConfig(llm=llm, latent_max_grid=16))
    with torch.no_grad():  # a non-zero velocity head: images that depend on the prompt
        for p in model.latent.proj_out.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_mot_renderer_draws_through_the_interleaver(tmp_path) -> None:
    from weft.model.tiny_parts import make_tiny_vae
    from weft.model.vae import LatentCodec

    codec = LatentCodec.from_pretrained(make_tiny_vae(tmp_path / "vae"))
    renderer = MoTRenderer(_tiny_mot(), codec, lambda text: [ord(c) % 64 for c in text],
                           model_id="mot:tiny", revision="r", steps=2)
    out = renderer.render(["a cat", "a dog", "a cat"], [1, 2, 1], 32, 32)
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in out)
    assert np.array_equal(out[0], out[2]) and not np.array_equal(out[0], out[1])
    bad = renderer.render(["a cat", ""], [1, 1], 24, 24)  # not a multiple of 16; empty text
    assert [type(b) for b in bad] == [RenderFailure, RenderFailure]
    assert renderer.params()["steps"] == 2


def test_mot_renderer_loads_an_export_its_vae_and_tokenizer(tmp_path) -> None:
    from safetensors.torch import save_file

    from weft.model.tiny_parts import make_tiny_vae
    from weft.stages.synth.renderers import build_renderer
    from weft.stages.synth.tiny_renderer import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    model = _tiny_mot(vocab_size=len(tokenizer))
    export = tmp_path / "export"
    export.mkdir()
    (export / "unified_config.json").write_text(model.config.model_dump_json())
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(export / "model.safetensors"))
    config = RenderConfig(backend="mot", path=str(export), vae_path=str(make_tiny_vae(
        tmp_path / "vae")), tokenizer_path=str(tmp_path / "tokenizer"), steps=2)
    renderer = build_renderer(config)
    assert isinstance(renderer, MoTRenderer)
    assert (renderer.model_id, renderer.revision) == renderer_identity(config)
    [image] = renderer.render(["a lighthouse"], [5], 32, 32)
    assert image.shape == (32, 32, 3)
