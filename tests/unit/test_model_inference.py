"""Inference: the KV cache reproduces full forwards, batching changes nothing, image
generation with two-scale CFG, the pure sampler pieces, and the think / edit recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weft.model.config import MoTConfig
from weft.model.flow import euler_timesteps
from weft.model.inference import Interleaver
from weft.model.kv_cache import KVCache
from weft.model.mot import MoTModel, UnifiedConfig
from weft.model.packed import PackBuilder, TokenKind
from weft.model.sampler import Guidance, cfg_combine, euler_sample, renormalize
from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae
from weft.model.vae import LatentCodec
from weft.model.vision import prepare_vit_image, vit_grid_for

VIT_PATCHES = 4  # ViT patch budget per image: keeps the tiny tests fast
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a busy 2-core machine contended OpenMP threads make each small
    op ~20x slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[0, 2], ids=["rope", "spatial-rope"])
def tiny(request, tmp_path_factory) -> tuple[MoTModel, LatentCodec]:
    """Every cached-inference check runs with BAGEL's RoPE (one position an image) and
    with spatial RoPE (2 of the 8 pairs per image axis), where a cached image token
    must get the same (row, col) as the packed forward gives it."""
    root: Path = tmp_path_factory.mktemp("tiny-parts")
    vit, vae = make_tiny_siglip2(root / "siglip2"), make_tiny_vae(root / "vae")
    llm = MoTConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, attention_backend="dense",
                    spatial_rope_pairs=request.param)
    config = UnifiedConfig(llm=llm, vit_path=str(vit), vit_max_grid=16, latent_max_grid=16)
    torch.manual_seed(0)
    model = MoTModel.build(config).eval()
    with torch.no_grad():  # a non-zero velocity head and larger weights: outputs that differ
        for p in model.latent.proj_out.parameters():
            torch.nn.init.normal_(p, std=0.05)
        for p in model.backbone.parameters():
            p.mul_(3.0)
    return model, LatentCodec.from_pretrained(vae)


def _image(seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=g) * 2 - 1


def _interleaver(tiny, batch_size: int = 1) -> Interleaver:
    model, codec = tiny
    return Interleaver(model, codec, batch_size, vit_max_patches=VIT_PATCHES)


def _full_forward(tiny, items: list, latents: list[torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """Final hidden states of one packed, uncached forward over text ids / images
    (`latents`: the images' VAE latents when already encoded)."""
    model, codec = tiny
    builder = PackBuilder(vit_patch=16, vae_stride=codec.stride)
    for item in items:
        if isinstance(item, list):
            builder.add_text(item)
        elif isinstance(item, tuple):  # ("vit", image): read only, as VQA plans lay it out
            patches, grid = prepare_vit_image((item[1] + 1) / 2, 16, VIT_PATCHES, max_side=16)
            builder.add_vit_image(patches, grid)
        else:
            patches, grid = prepare_vit_image((item + 1) / 2, 16, VIT_PATCHES, max_side=16)
            builder.add_vae_image(item, noised=False)
            builder.add_vit_image(patches, grid, same_position_as_previous_image=True)
    batch = builder.build()
    with torch.no_grad():
        latents = latents if latents is not None else codec.encode(batch.vae_images)
        flow = model.flow_inputs(batch, latents)
        return model.backbone(model.embed(batch, flow), batch)


def _greedy(model: MoTModel, hidden: torch.Tensor) -> int:
    return int(model.backbone.lm_head(hidden[-1]).argmax())


# ---- the KV cache against full forwards ----------------------------------------------------
def test_cached_greedy_decoding_matches_full_forward_argmax_at_every_step(tiny) -> None:
    model, codec = tiny
    prompt, image, question = [1, 5, 9, 13, 17], _image(0), [3, 7, 11]
    inter = _interleaver(tiny)
    inter.append_text([prompt])
    inter.append_image([image])
    inter.append_text([question])
    ids = inter.decode_text(6)[0]
    assert len(ids) == 6 and len(set(ids)) > 1
    latents = codec.encode([image])
    for k in range(len(ids)):
        hidden = _full_forward(tiny, [prompt, image, question + ids[:k]], latents)
        assert _greedy(model, hidden) == ids[k], f"step {k}"


def test_prefill_in_appends_matches_one_packed_forward(tiny) -> None:
    model, _ = tiny
    first, image, second = [2, 4, 6, 8], _image(1, 32, 48), [10, 12, 14]
    inter = _interleaver(tiny)
    parts = [inter.append_text([first])[0], inter.append_image([image])[0],
             inter.append_text([second])[0]]
    cached = torch.cat(parts)
    full = _full_forward(tiny, [first, image, second])
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.backbone.lm_head(cached), model.backbone.lm_head(full),
                               atol=ATOL, rtol=0)
    # one RoPE position for the whole image (ViT and latents), text continues after it
    positions = inter.contexts[0].tracks["full"].positions.tolist()
    assert positions == [0, 1, 2, 3] + [4] * len(parts[1]) + [5, 6, 7]


def test_a_vit_only_image_prefills_like_the_packed_vqa_layout(tiny) -> None:
    first, image, question = [2, 4, 6], _image(3, 32, 32), [10, 12]
    inter = _interleaver(tiny)
    parts = [inter.append_text([first])[0], inter.append_vit_image([image])[0],
             inter.append_text([question])[0]]
    full = _full_forward(tiny, [first, ("vit", image), question])
    n_vit = vit_grid_for(32, 32, 16, VIT_PATCHES)
    assert len(parts[1]) == n_vit[0] * n_vit[1]  # ViT tokens only, no latents
    torch.testing.assert_close(torch.cat(parts), full, atol=ATOL, rtol=0)
    assert inter.contexts[0].tracks["full"].positions.tolist() == \
        [0, 1, 2] + [3] * len(parts[1]) + [4, 5]


def test_eos_stops_a_context_and_stays_in_it(tiny) -> None:
    inter = _interleaver(tiny)
    inter.append_text([[1, 2, 3]])
    first = inter.decode_text(1)[0][0]
    inter = _interleaver(tiny)
    inter.append_text([[1, 2, 3]])
    assert inter.decode_text(5, eos_id=first) == [[first]]
    assert inter.lengths() == [4]


def test_sampled_decoding_is_seeded_and_cold_sampling_is_greedy(tiny) -> None:
    runs = []
    for temperature in (1.0, 1.0, 1e-4, 0.0):
        inter = _interleaver(tiny, 2)
        inter.append_text([[1, 2, 3], [4, 5]])
        runs.append(inter.decode_text(5, temperature=temperature,
                                      generator=torch.Generator().manual_seed(0)))
    assert runs[0] == runs[1]
    assert runs[2] == runs[3]
    assert all(0 <= i < 64 for ids in runs[0] for i in ids)


def test_noised_latents_are_never_cached() -> None:
    cache = KVCache(num_layers=1)
    chunk = cache.image_chunk([(TokenKind.VAE_NOISED, (1, 2))])
    with pytest.raises(ValueError, match="noised"):
        cache.commit(chunk, [torch.zeros(1, 1, 2, 4)], [torch.zeros(1, 1, 2, 4)])


# ---- batching -----------------------------------------------------------------------------------
def _run(inter: Interleaver, contexts: list[tuple], seeds: list[int]) -> tuple:
    hidden = [inter.append_text([c[0] for c in contexts]),
              inter.append_image([c[1] for c in contexts]),
              inter.append_text([c[2] for c in contexts])]
    ids = inter.decode_text(3)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    images = inter.generate_image(32, 32, steps=2, generator=generators)
    return hidden, ids, images, inter.lengths()


def test_batched_contexts_of_different_lengths_match_each_alone(tiny) -> None:
    contexts = [([1, 2, 3, 4, 5], _image(2), [6, 7, 8]),
                ([9, 10], _image(3, 48, 32), [11, 12, 13, 14, 15, 16, 17])]
    together = _run(_interleaver(tiny, 2), contexts, [0, 1])
    for i, context in enumerate(contexts):
        alone = _run(_interleaver(tiny), [context], [i])
        for step in range(3):
            torch.testing.assert_close(together[0][step][i], alone[0][step][0], atol=ATOL,
                                       rtol=0)
        assert together[1][i] == alone[1][0]
        torch.testing.assert_close(together[2][i], alone[2][0], atol=ATOL, rtol=0)
        assert together[3][i] == alone[3][0]
    assert together[3][0] != together[3][1]


# ---- generation ---------------------------------------------------------------------------------
def test_generate_image_size_determinism_and_write_back(tiny) -> None:
    _, codec = tiny
    images = []
    for _ in range(2):
        inter = _interleaver(tiny)
        inter.append_text([[1, 5, 9, 13]])
        before = {t: inter.lengths(t)[0] for t in ("full", "text_uncond", "uncond")}
        images.append(inter.generate_image(32, 48, steps=2,
                                           generator=torch.Generator().manual_seed(0))[0])
    assert images[0].shape == (3, 32, 48)
    assert float(images[0].abs().max()) <= 1.0
    assert torch.equal(images[0], images[1])
    other = _interleaver(tiny)
    other.append_text([[1, 5, 9, 13]])
    assert not torch.equal(other.generate_image(
        32, 48, steps=2, generator=torch.Generator().manual_seed(1))[0], images[0])

    rows, cols = vit_grid_for(32, 48, 16, VIT_PATCHES, 16)
    grown = rows * cols + (32 // codec.stride) * (48 // codec.stride)
    assert before == {"full": 4, "text_uncond": 0, "uncond": 0}
    assert inter.lengths("full") == [4 + grown]
    assert inter.lengths("text_uncond") == [grown]  # an image condition, kept there
    assert inter.lengths("uncond") == [0]
    full = inter.contexts[0].tracks["full"]
    assert full.positions[4:].unique().tolist() == [4]  # one position for the image
    assert full.kind[4:].tolist() == [TokenKind.VAE_CLEAN] * (grown - rows * cols) + \
        [TokenKind.VIT] * (rows * cols)  # clean latents, then ViT: the trainer's order


def test_guided_velocity_combines_the_three_contexts(tiny) -> None:
    """One Euler step from t = 1 gives x0 = ε − v: the guided step equals the sampler's
    combination of three single-context runs (everything, image only, nothing)."""
    source, instruction = _image(4), [20, 21, 22]
    scales = {"cfg_text_scale": 3.0, "cfg_image_scale": 1.7}

    def step(inter: Interleaver, **kwargs) -> torch.Tensor:
        latent = inter.generate_latents(32, 32, steps=1, generator=torch.Generator()
                                        .manual_seed(5), **kwargs)[0]
        return inter.codec.patchify(latent)

    guided = _interleaver(tiny)
    guided.append_image([source])
    guided.append_text([instruction])
    x0 = step(guided, **scales)
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    v = {}
    for name, items in (("full", [source, instruction]), ("image", [source]), ("none", [])):
        single = _interleaver(tiny)
        for item in items:
            if isinstance(item, list):
                single.append_text([item])
            else:
                single.append_image([item])
        v[name] = noise - step(single, cfg_text_scale=1.0, cfg_image_scale=1.0)
    expected = Guidance(3.0, 1.7)(1.0, v["full"], v["image"], v["none"])
    torch.testing.assert_close(noise - x0, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(v["full"], v["image"], atol=1e-3)


# ---- the sampler, without a model -------------------------------------------------------------
def _velocities(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(6, 8, generator=g) for _ in range(3))


def test_cfg_with_unit_scales_is_the_conditional_velocity() -> None:
    full, text_uncond, uncond = _velocities()
    torch.testing.assert_close(cfg_combine(full, text_uncond, uncond, 1.0, 1.0), full)
    assert Guidance(1.0, 1.0)(0.7, full, text_uncond, uncond) is full
    # without image conditions (equal unconditional contexts): plain text CFG
    plain = uncond + 4.0 * (full - uncond)
    torch.testing.assert_close(cfg_combine(full, uncond, uncond, 4.0, 1.5), plain)


def test_guidance_is_off_outside_its_interval() -> None:
    full, text_uncond, uncond = _velocities()
    guidance = Guidance(4.0, 1.5, interval=(0.4, 1.0), renorm="none")
    assert guidance(0.2, full, None, None) is full
    assert not guidance.active(0.39) and guidance.active(0.4) and guidance.active(1.0)
    inside = guidance(0.7, full, text_uncond, uncond)
    torch.testing.assert_close(inside, cfg_combine(full, text_uncond, uncond, 4.0, 1.5))
    with pytest.raises(ValueError, match="missing"):
        guidance(0.7, full, None, None)


@pytest.mark.parametrize("mode", ["global", "token"])
def test_renorm_never_exceeds_the_conditional_norm(mode: str) -> None:
    for seed in range(5):
        full, text_uncond, uncond = _velocities(seed)
        guided = cfg_combine(full, text_uncond, uncond, 7.0, 2.0)
        out = renormalize(guided, full, mode)
        if mode == "global":
            assert float(out.norm()) <= float(full.norm()) * (1 + 1e-6)
        else:
            assert bool((out.norm(dim=-1) <= full.norm(dim=-1) * (1 + 1e-6)).all())
        small = 0.01 * full
        torch.testing.assert_close(renormalize(small, full, mode), small)  # never scales up


def test_euler_with_a_perfect_velocity_recovers_the_latent() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)

    def oracle(x_t: torch.Tensor, t: float) -> torch.Tensor:
        return (x_t - x0) / t  # on the straight path x_t = (1 - t) x0 + t ε: ε − x0

    out = euler_sample(noise, oracle, euler_timesteps(7, shift=3.0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


# ---- recipes ----------------------------------------------------------------------------------
def test_think_returns_text_then_an_image(tiny) -> None:
    inter = _interleaver(tiny)
    [(thought, image)] = inter.think([[1, 2, 3]], height=32, width=32, max_think_tokens=3,
                                     steps=2, generator=torch.Generator().manual_seed(0))
    assert len(thought) == 3 and image.shape == (3, 32, 32)
    kinds = inter.contexts[0].tracks["full"].kind.tolist()
    assert kinds[:6] == [TokenKind.TEXT] * 6 and kinds[-1] == TokenKind.VIT
    assert inter.lengths("uncond") == [0]  # prompt and reasoning are text conditions


def test_edit_runs_with_both_guidances(tiny) -> None:
    inter = _interleaver(tiny, 2)
    sources = [_image(5, 32, 48), _image(6, 32, 48)]
    out = inter.edit(sources, [[4, 5, 6], [7, 8]], steps=2,
                     generator=torch.Generator().manual_seed(0))
    assert [tuple(x.shape) for x in out] == [(3, 32, 48)] * 2
    tracks = inter.contexts[1].tracks
    # full: source, instruction, result; text_uncond: source and result; uncond: nothing
    assert len(tracks["full"]) == len(tracks["text_uncond"]) + 2
    assert len(tracks["uncond"]) == 0


def test_a_model_with_latent_patch_1_samples_through_a_codec_loaded_for_it(tmp_path) -> None:
    vae = make_tiny_vae(tmp_path / "vae")
    llm = MoTConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, attention_backend="dense")
    config = UnifiedConfig(llm=llm, latent_patch=1, latent_max_grid=16)
    torch.manual_seed(0)
    model = MoTModel.build(config).eval()
    codec = LatentCodec.from_pretrained(vae, patch=model.config.latent_patch)
    assert (codec.stride, codec.token_dim) == (config.vae_stride, config.latent_token_dim)
    inter = Interleaver(model, codec, 1)
    inter.append_text([[1, 2, 3]])
    image = inter.generate_image(32, 32, steps=2)[0]
    assert image.shape == (3, 32, 32)
    assert len(inter.contexts[0].tracks["full"].positions) == 3 + (32 // 8) ** 2


def test_sampling_velocity_equals_the_training_forward_on_the_same_noised_latents(tiny) -> None:
    """What the sampler integrates is what training fitted: for a prompt and an image to
    generate, the cached velocity at (x_t, t) equals the packed forward's prediction with
    the same noise and t (the t2i layout the trainer's plans give)."""
    import dataclasses

    model, codec = tiny
    prompt, image = [3, 9, 27, 31], _image(4)
    latent = codec.encode([image])[0]
    x0 = codec.patchify(latent)
    grid = (image.shape[1] // codec.stride, image.shape[2] // codec.stride)
    for t in (0.9, 0.4):
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(t * 10)))
        builder = PackBuilder(vit_patch=16, vae_stride=codec.stride).new_document()
        builder.add_text(prompt).add_vae_image(image, noised=True, loss=True)
        batch = dataclasses.replace(builder.add_text([1, 2], loss=True).build(),
                                    vae_timesteps=torch.tensor([t]))
        with torch.no_grad():
            flow = model.flow_inputs(batch, [latent], [eps])
            hidden = model.backbone(model.embed(batch, flow), batch)
            trained = model.latent(hidden[batch.vae_index]).float()
        inter = _interleaver(tiny)
        inter.append_text([prompt])
        with torch.no_grad():
            sampled = inter._guided_velocity([(1 - t) * x0 + t * eps], grid, t,
                                             Guidance(1.0, 1.0))
        assert trained.abs().max() > 0.01, "a velocity head that says something"
        torch.testing.assert_close(sampled, trained, atol=ATOL, rtol=0)


def test_sampling_from_a_noised_latent_continues_the_schedule(tiny) -> None:
    """`start` at t = 1 with the generator's own noise is plain generation; from t0 < 1 a
    one-step schedule is one Euler step with the velocity `velocities` reports."""
    model, codec = tiny
    prompt = [3, 9, 27, 31]
    latent = codec.encode([_image(5)])[0]
    inter = _interleaver(tiny)
    inter.append_text([prompt])
    plain = inter.generate_latents(32, 32, steps=3, shift=1.0, cfg_text_scale=1.0,
                                   cfg_image_scale=1.0,
                                   generator=torch.Generator().manual_seed(2))[0]
    noise = torch.randn((latent.numel() // latent.shape[0] // model.config.latent_patch ** 2,
                         model.config.latent_token_dim),
                        generator=torch.Generator().manual_seed(2))
    started = inter.generate_latents(32, 32, steps=3, shift=1.0, cfg_text_scale=1.0,
                                     cfg_image_scale=1.0,
                                     start=[codec.unpatchify(noise, (2, 2))], start_t=1.0)[0]
    torch.testing.assert_close(started, plain)

    x_t = 0.4 * latent + 0.6 * codec.unpatchify(noise, (2, 2))
    one_step = inter.generate_latents(32, 32, steps=1, shift=1.0, cfg_text_scale=1.0,
                                      cfg_image_scale=1.0, start=[x_t], start_t=0.6)[0]
    velocity = inter.velocities([x_t], 0.6)[0]
    assert velocity.shape == latent.shape and velocity.abs().max() > 0.01
    torch.testing.assert_close(one_step, x_t - 0.6 * velocity)
    with pytest.raises(ValueError, match="start_t"):
        inter.generate_latents(32, 32, steps=1, start=[x_t], start_t=0.0)


def test_autoguidance_steers_away_from_the_guide_model(tiny) -> None:
    """v_guide + w (v - v_guide): a guide that is the model itself changes nothing at any w;
    another guide gives, over one Euler step, exactly that extrapolation; a guide whose
    contexts differ is refused."""
    model, codec = tiny
    prompt = [3, 9, 27, 31]
    torch.manual_seed(1)
    weaker = MoTModel.build(model.config).eval()  # the same architecture, other weights
    with torch.no_grad():
        for p in weaker.latent.proj_out.parameters():
            torch.nn.init.normal_(p, std=0.05)

    def context(which: MoTModel) -> Interleaver:
        inter = Interleaver(which, codec, 1, vit_max_patches=VIT_PATCHES)
        inter.append_text([prompt])
        return inter

    def one_step(guide: Interleaver | None, w: float) -> torch.Tensor:
        return context(model).generate_latents(
            32, 32, steps=1, shift=1.0, cfg_text_scale=1.0, cfg_image_scale=1.0,
            generator=torch.Generator().manual_seed(4), guide=guide, autoguidance=w)[0]

    plain = one_step(None, 1.0)
    torch.testing.assert_close(one_step(context(model), 3.0), plain)
    noise = codec.unpatchify(torch.randn((4, model.config.latent_token_dim),
                                         generator=torch.Generator().manual_seed(4)), (2, 2))
    v = context(model).velocities([noise], 1.0)[0]
    v_guide = context(weaker).velocities([noise], 1.0)[0]
    assert (v - v_guide).abs().max() > 0.01, "a guide that predicts otherwise"
    torch.testing.assert_close(one_step(context(weaker), 2.5),
                               noise - (v_guide + 2.5 * (v - v_guide)))
    torch.testing.assert_close(one_step(context(weaker), 1.0), plain)  # 1 is off
    longer = context(weaker)
    longer.append_text([[5]])
    with pytest.raises(ValueError, match="guide's contexts differ"):
        one_step(longer, 2.0)
    with pytest.raises(ValueError, match="autoguidance must be >= 1"):
        one_step(context(weaker), 0.5)
