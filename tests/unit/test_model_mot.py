"""The unified model on packed batches: losses by token, flow inputs, and overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weft.model.config import MoTConfig
from weft.model.mot import MoTModel, UnifiedConfig
from weft.model.packed import PackBuilder
from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae
from weft.model.vae import LatentCodec
from weft.model.vision import prepare_vit_image


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-parts")
    return {"vit": make_tiny_siglip2(root / "siglip2"), "vae": make_tiny_vae(root / "vae")}


def _config(parts: dict[str, Path], mode: str = "mot") -> UnifiedConfig:
    llm = MoTConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, layer_mode=mode, attention_backend="dense")
    return UnifiedConfig(llm=llm, vit_path=str(parts["vit"]), vit_max_grid=16,
                         latent_max_grid=16)


def _image(seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


def _pack(config: UnifiedConfig) -> PackBuilder:
    """Two documents: caption -> generated image -> text; image (ViT + clean latents) -> text."""
    b = PackBuilder(vit_patch=16, vae_stride=config.vae_stride)
    b.new_document().add_text([1, 5, 9, 13, 17, 21], loss=True)
    b.add_vae_image(_image(0), noised=True, timestep=0.6)
    b.add_vae_image(_image(0), noised=False, same_position_as_previous_image=True)
    b.add_text([2, 4, 6, 8], loss=True)
    patches, grid = prepare_vit_image((_image(1) + 1) / 2, patch=16, max_patches=16)
    b.new_document().add_vit_image(patches, grid)
    b.add_vae_image(_image(1), noised=False, same_position_as_previous_image=True)
    b.add_text([3, 7, 11, 15, 19], loss=True)
    return b


def test_losses_count_tokens_and_clean_images_get_no_mse(parts) -> None:
    config = _config(parts)
    model = MoTModel.build(config)
    codec = LatentCodec.from_pretrained(parts["vae"])
    batch = _pack(config).build(pad_to=64)
    latents = codec.encode(batch.vae_images)
    out = model(batch, latents, generator=torch.Generator().manual_seed(0))
    assert out.ce_tokens == 5 + 3 + 4  # each text item: every token but its last
    assert out.mse_tokens == 4  # the one noised 32x32 image: 2x2 latent tokens
    # the latent output projection starts at zero: MSE = mean((eps - x0)^2)
    flow = model.flow_inputs(batch, latents, generator=torch.Generator().manual_seed(0))
    expected = (flow.target[:4] ** 2).mean(dim=-1).sum()
    assert torch.allclose(out.mse_sum, expected, atol=1e-5)
    assert torch.equal(flow.timesteps, torch.tensor([0.6, 0.0, 0.0]))
    assert torch.equal(flow.tokens[4:8], codec.patchify(latents[1]))  # clean: x0 itself


def test_condition_tokens_change_the_text_prediction(parts) -> None:
    """Text after an image attends to its ViT and clean-latent tokens."""
    config = _config(parts)
    model = MoTModel.build(config)
    codec = LatentCodec.from_pretrained(parts["vae"])
    torch.manual_seed(0)
    for p in model.latent.proj_out.parameters():
        torch.nn.init.normal_(p, std=0.02)
    batch = _pack(config).build(pad_to=64)
    latents = codec.encode(batch.vae_images)
    fixed = {"noise": [torch.randn(4, 64), None, None]}
    base = model(batch, latents, **fixed).ce_sum
    other = [latents[0], latents[1], latents[2] * -1.0]
    assert not torch.allclose(model(batch, other, **fixed).ce_sum, base)


@pytest.mark.parametrize("mode", ["mot", "dense"])
def test_tiny_model_overfits_one_packed_batch(parts, mode) -> None:
    """Batch, noise and timesteps fixed: CE and MSE each fall by at least 90%."""
    torch.manual_seed(0)
    config = _config(parts, mode)
    model = MoTModel.build(config)
    codec = LatentCodec.from_pretrained(parts["vae"])
    batch = _pack(config).build(pad_to=64)
    latents = codec.encode(batch.vae_images)
    noise = [torch.randn(4, 64), None, None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    first = None
    for _ in range(300):
        out = model(batch, latents, noise=noise)
        loss = out.ce + out.mse
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if first is None:
            first = (out.ce.item(), out.mse.item())
    last = (out.ce.item(), out.mse.item())
    assert last[0] < 0.1 * first[0], (first, last)
    assert last[1] < 0.1 * first[1], (first, last)


def test_first_answer_token_is_a_target_but_never_across_documents() -> None:
    """question (no loss) -> answer (loss): the question's last token predicts the answer's
    first, so a one-token answer is learned; a new document's first token is not a target."""
    b = PackBuilder()
    b.new_document().add_text([5, 6, 7]).add_text([42], loss=True)
    b.new_document().add_text([8, 9], loss=True)
    batch = b.build()
    assert batch.labels.tolist() == [-100, -100, 42, -100, 9, -100]


@pytest.mark.parametrize("mode", ["mot", "moe"])
def test_generation_expert_can_start_as_a_copy_of_the_understanding_one(mode) -> None:
    """gen_expert_init copy: every gen weight equals its und twin, so at step 0 the model
    computes what a dense one with the understanding weights would; random: its own draw."""
    llm = MoTConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, layer_mode=mode, attention_backend="dense")
    for init in ("copy", "random"):
        torch.manual_seed(0)
        params = dict(MoTModel.build(UnifiedConfig(llm=llm, gen_expert_init=init))
                      .backbone.named_parameters())
        twins = {n: ".".join("und" if p == "gen" else p for p in n.split("."))
                 for n in params if "gen" in n.split(".")}
        matrices = [n for n in twins if params[n].ndim >= 2]
        assert matrices, "the model has a generation expert"
        same = [torch.equal(params[n], params[twins[n]]) for n in matrices]
        assert all(same) if init == "copy" else not any(same), (init, matrices)


def test_meta_build_is_the_same_structure_with_no_weights(parts) -> None:
    """What FSDP ranks other than 0 build: every parameter and buffer of the real model
    (ViT from its config.json only), same names, shapes and dtypes, none allocated."""
    config = _config(parts)
    real = MoTModel.build(config)
    meta = MoTModel.build(config, on_meta=True)

    def layout(model: torch.nn.Module) -> dict[str, tuple]:
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {k: (tuple(t.shape), t.dtype, t.requires_grad) for k, t in tensors.items()}

    assert layout(meta) == layout(real)
    assert any(k.startswith("vision.") for k in layout(real))
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))
    assert not any(t.is_meta for t in (*real.parameters(), *real.buffers()))
    assert real.state_dict().keys() == meta.state_dict().keys()
