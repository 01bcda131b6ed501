"""The MoT decoder backbone: Qwen2 parity, routing by token kind, loading, counts."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from weft.model.attention_backends import build_attention_mask
from weft.model.backbone import MoTBackbone
from weft.model.config import MoTConfig
from weft.model.experts import Routing
from weft.model.flops import flops_per_token, param_counts
from weft.model.loading import CheckpointError, load_qwen2_into
from weft.model.masks import dense_mask
from weft.model.packed import PackBuilder, PackedBatch, TokenKind

MODES = ("dense", "moe", "mot")
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_layers": 2,
        "num_heads": 4, "num_kv_heads": 2, "attention_backend": "dense"}


DOC_A = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
DOC_B = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(4)).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Qwen2 checkpoints, untied (sharded) and tied (one file), with the
    transformers logits of DOC_A and DOC_B saved beside them."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("qwen2")
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        torch.manual_seed(0 if tied else 1)
        config = transformers.Qwen2Config(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            rms_norm_eps=1e-5)
        model = transformers.Qwen2ForCausalLM(config).eval()
        with torch.no_grad():  # non-trivial norms and biases, larger weights
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            logits = {doc: model(input_ids=torch.tensor([ids])).logits[0]
                      for doc, ids in (("a", DOC_A), ("b", DOC_B))}
        shard = "40KB" if name == "untied" else "50MB"
        model.save_pretrained(root / name, safe_serialization=True, max_shard_size=shard)
        save_file(logits, root / f"{name}.logits.safetensors")
        out[name] = root / name
    return out


def text_pack(docs: list[list[int]], pad_to: int | None = None) -> PackedBatch:
    builder = PackBuilder()
    for ids in docs:
        builder.new_document().add_text(ids, loss=True)
    return builder.build(pad_to=pad_to)


def run(backbone: MoTBackbone, batch: PackedBatch, hidden: torch.Tensor | None = None
        ) -> torch.Tensor:
    if hidden is None:
        hidden = backbone.embed_text(batch.input_ids)
    with torch.no_grad():
        return backbone(hidden, batch, build_attention_mask(batch, "dense"))


@pytest.mark.parametrize("variant", ["untied", "tied"])
@pytest.mark.parametrize("mode", MODES)
def test_text_logits_match_transformers_qwen2(checkpoints, variant: str, mode: str) -> None:
    directory = checkpoints[variant]
    want = load_file(directory.parent / f"{variant}.logits.safetensors")
    want_a, want_b = want["a"], want["b"]
    config = MoTConfig.from_qwen2_config(directory, layer_mode=mode,
                                         attention_backend="dense")
    assert config.qk_norm is False and config.tie_word_embeddings == (variant == "tied")
    backbone = MoTBackbone(config).eval()
    load_qwen2_into(backbone, directory)

    one = backbone.lm_head(run(backbone, text_pack([DOC_A])))
    torch.testing.assert_close(one, want_a, atol=1e-4, rtol=1e-4)

    packed = backbone.lm_head(run(backbone, text_pack([DOC_A, DOC_B], pad_to=20)))
    torch.testing.assert_close(packed[:9], want_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[9:15], want_b, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_and_tied_untying(checkpoints) -> None:
    assert (checkpoints["untied"] / "model.safetensors.index.json").exists()
    # A tied checkpoint into an untied backbone: the head becomes a copy of the embedding.
    config = MoTConfig.from_qwen2_config(checkpoints["tied"], tie_word_embeddings=False,
                                         attention_backend="dense")
    backbone = MoTBackbone(config)
    report = load_qwen2_into(backbone, checkpoints["tied"])
    assert report.untied_lm_head
    assert backbone.lm_head.weight is not backbone.embed_tokens.weight
    torch.testing.assert_close(backbone.lm_head.weight, backbone.embed_tokens.weight,
                               rtol=0, atol=0)
    # The reverse is refused.
    tied = MoTBackbone(MoTConfig.from_qwen2_config(checkpoints["untied"],
                                                   tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match="ties embeddings"):
        load_qwen2_into(tied, checkpoints["untied"])


@pytest.mark.parametrize("mode", ["moe", "mot"])
def test_generation_expert_starts_as_exact_copy(checkpoints, mode: str) -> None:
    config = MoTConfig.from_qwen2_config(checkpoints["untied"], layer_mode=mode,
                                         qk_norm=True)
    backbone = MoTBackbone(config)
    report = load_qwen2_into(backbone, checkpoints["untied"])
    params = dict(backbone.named_parameters())
    gen_names = [n for n in params if ".gen." in n or n.startswith("norm.gen")]
    assert sorted(report.copied) == sorted(gen_names) and gen_names
    for name in gen_names:
        assert torch.equal(params[name], params[name.replace("gen", "und")]), name
    if mode == "moe":
        assert all(".feed_forward.gen." in n for n in gen_names)
    # Qwen2 has no QK-norm: the gains start at ones (documented mismatch).
    assert report.initialized and all(torch.equal(params[n], torch.ones_like(params[n]))
                                      for n in report.initialized)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(path))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_loading_is_strict(checkpoints, tmp_path: Path) -> None:
    src = checkpoints["untied"]
    config = MoTConfig.from_qwen2_config(src)
    missing = _rewrite(src, tmp_path / "missing",
                       lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.feed_forward\.und\.mlp"):
        load_qwen2_into(MoTBackbone(config), missing)
    extra = _rewrite(src, tmp_path / "extra",
                     lambda t: t.update({"model.layers.0.self_attn.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*self_attn\.extra"):
        load_qwen2_into(MoTBackbone(config), extra)
    wrong_shape = config.model_copy(update={"intermediate_size": 128})
    with pytest.raises(CheckpointError, match="intermediate_size: checkpoint 96, backbone 128"):
        load_qwen2_into(MoTBackbone(wrong_shape), src)


def random_pack(seed: int, docs: int = 3, text_only: bool = False) -> PackedBatch:
    """Several documents of random text, ViT images and clean/noised VAE images."""
    rng = random.Random(seed)
    builder = PackBuilder(vit_patch=4, vae_stride=8)
    for _ in range(docs):
        builder.new_document()
        for _ in range(rng.randint(1, 4)):
            choice = "text" if text_only else rng.choice(["text", "vit", "vae"])
            if choice == "text":
                builder.add_text([rng.randrange(256) for _ in range(rng.randint(1, 6))])
            elif choice == "vit":
                rows, cols = rng.randint(1, 3), rng.randint(1, 3)
                builder.add_vit_image(torch.zeros(rows * cols, 3 * 4 * 4), (rows, cols))
            else:
                rows, cols = rng.randint(1, 3), rng.randint(1, 3)
                builder.add_vae_image(torch.zeros(3, 8 * rows, 8 * cols),
                                      noised=rng.random() < 0.5, timestep=0.5)
    return builder.build(pad_to=len(builder) + rng.randint(0, 3))


@pytest.mark.parametrize("seed", range(8))
def test_routing_partitions_every_token(seed: int) -> None:
    batch = random_pack(seed)
    routing = Routing.from_batch(batch)
    und, gen = routing.und_index.tolist(), routing.gen_index.tolist()
    assert not set(und) & set(gen)
    assert sorted(und + gen) == list(range(batch.length))
    assert all(batch.kind[i] in (TokenKind.VAE_CLEAN, TokenKind.VAE_NOISED) for i in gen)
    from_kind = Routing.from_kind(batch.kind)
    assert torch.equal(from_kind.und_index, routing.und_index)
    assert torch.equal(from_kind.gen_index, routing.gen_index)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _tiny(mode: str, **overrides) -> MoTBackbone:
    torch.manual_seed(0)
    backbone = MoTBackbone(MoTConfig(**{**TINY, "layer_mode": mode, **overrides})).eval()
    _perturb(backbone, seed=1)  # norms and biases away from their init
    return backbone


def test_generation_expert_does_not_touch_text_only_packs() -> None:
    backbone = _tiny("mot")
    batch = random_pack(5, text_only=True)
    before = run(backbone, batch)
    for layer in backbone.layers:
        _perturb(layer.attention["gen"])
        _perturb(layer.feed_forward["gen"])
    _perturb(backbone.norm["gen"])
    torch.testing.assert_close(run(backbone, batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["moe", "mot"])
def test_expert_weights_act_only_on_their_tokens(mode: str) -> None:
    """The last layer's FFN is per token: an expert's FFN changes only its own rows.
    Earlier gen weights reach text only through attention, never across documents."""
    backbone = _tiny(mode)
    batch = random_pack(11, docs=4)
    assert batch.gen_index.numel() and batch.und_index.numel()
    hidden = torch.randn(batch.length, 64, generator=torch.Generator().manual_seed(2))
    is_gen = torch.zeros(batch.length, dtype=torch.bool)
    is_gen[batch.gen_index] = True
    before = run(backbone, batch, hidden)

    for expert, changed in (("gen", is_gen), ("und", ~is_gen)):
        _perturb(backbone.layers[-1].feed_forward[expert], seed=7)
        after = run(backbone, batch, hidden)
        assert torch.equal(after[~changed], before[~changed])
        assert not torch.allclose(after[changed], before[changed])
        before = after

    if mode == "mot":  # all gen weights: documents without latents stay the same
        docs_with_latents = set(batch.doc_ids[batch.gen_index].tolist())
        untouched = torch.tensor([int(d) not in docs_with_latents
                                  for d in batch.doc_ids.tolist()])
        untouched &= batch.kind != TokenKind.PAD
        assert untouched.any()
        for layer in backbone.layers:
            _perturb(layer.attention["gen"], seed=9)
        after = run(backbone, batch, hidden)
        torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=1e-6)
        assert not torch.allclose(after[is_gen], before[is_gen])


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_forward(backbone: MoTBackbone, hidden: torch.Tensor,
                      batch: PackedBatch) -> torch.Tensor:
    """Every expert on every token, then pick per token with torch.where; explicit
    RoPE and masked softmax. An independent formulation of the routed forward."""
    c = backbone.config
    n, heads, kv_heads, hd, eps = (hidden.shape[0], c.num_heads, c.num_kv_heads,
                                   c.head_dim, c.rms_norm_eps)
    is_gen = (batch.kind == TokenKind.VAE_CLEAN) | (batch.kind == TokenKind.VAE_NOISED)

    def per_token(experts, fn):
        und = fn(experts["und"])
        gen = fn(experts["gen"]) if "gen" in experts else und
        return torch.where(is_gen[:, None], gen, und)

    angles = batch.position_ids.double()[:, None] / c.rope_theta ** (
        torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.cat([angles, angles], dim=-1).float()[:, None, :]

    def rope(x):
        return x * angles.cos() + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * \
            angles.sin()

    def qkv(e, x):
        h = _rms(x, e.input_norm.weight, eps)
        q = F.linear(h, e.q_proj.weight, e.q_proj.bias).view(n, heads, hd)
        k = F.linear(h, e.k_proj.weight, e.k_proj.bias).view(n, kv_heads, hd)
        v = F.linear(h, e.v_proj.weight, e.v_proj.bias)
        if c.qk_norm:
            q, k = _rms(q, e.q_norm.weight, eps), _rms(k, e.k_norm.weight, eps)
        return torch.cat([q.flatten(1), k.flatten(1), v], dim=1)

    def ffn(e, x):
        h = _rms(x, e.norm.weight, eps)
        m = e.mlp
        return F.linear(F.silu(F.linear(h, m.gate_proj.weight)) * F.linear(h, m.up_proj.weight),
                        m.down_proj.weight)

    allowed = dense_mask(batch)
    x = hidden
    for layer in backbone.layers:
        out = per_token(layer.attention, lambda e, x=x: qkv(e, x))
        q, k, v = out.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=1)
        q, k = rope(q.view(n, heads, hd)), rope(k.view(n, kv_heads, hd))
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.view(n, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + per_token(layer.attention, lambda e, a=attn: F.linear(a, e.o_proj.weight))
        x = x + per_token(layer.feed_forward, lambda e, x=x: ffn(e, x))
    return per_token(backbone.norm, lambda e, x=x: _rms(x, e.weight, eps))


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_routed_forward_matches_per_token_reference(mode: str, qk_norm: bool) -> None:
    backbone = _tiny(mode, qk_norm=qk_norm)
    batch = random_pack(21, docs=3)
    hidden = torch.randn(batch.length, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference_forward(backbone, hidden, batch)
    torch.testing.assert_close(run(backbone, batch, hidden), want, atol=2e-5, rtol=1e-4)


def test_layer_halves_allow_a_kv_cached_step() -> None:
    """Prefill the earlier splits, then run the last split alone against the cached
    k/v: the same output as one forward over the whole pack (what a KV cache relies on)."""
    backbone = _tiny("mot")
    batch = random_pack(3, docs=1)
    length = batch.num_tokens
    hidden = torch.randn(batch.length, 64, generator=torch.Generator().manual_seed(5))
    full = run(backbone, batch, hidden)[:length]
    cut = int((batch.split_ids[:length] < batch.split_ids[length - 1]).sum())
    assert 0 < cut < length
    allowed = dense_mask(batch)[:length, :length]
    kind, cos, sin = batch.kind, *backbone.rope(batch.position_ids)
    old, new = slice(0, cut), slice(cut, length)
    routing_old, routing_new = Routing.from_kind(kind[old]), Routing.from_kind(kind[new])
    x_old, x_new = hidden[old], hidden[new]
    with torch.no_grad():
        for layer in backbone.layers:
            q, k_cache, v_cache = layer.project_qkv(x_old, (cos[old], sin[old]), routing_old)
            out_old = F.scaled_dot_product_attention(
                q, k_cache, v_cache, attn_mask=allowed[old, old], scale=layer.scale,
                enable_gqa=True)
            q, k, v = layer.project_qkv(x_new, (cos[new], sin[new]), routing_new)
            out_new = F.scaled_dot_product_attention(
                q, torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2),
                attn_mask=allowed[new], scale=layer.scale, enable_gqa=True)
            x_old = layer.finish(x_old, out_old, routing_old)
            x_new = layer.finish(x_new, out_new, routing_new)
        got = backbone.final_norm(x_new, routing_new)
    torch.testing.assert_close(got, full[cut:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_param_counts_match_the_module(mode: str, tied: bool, qk_norm: bool) -> None:
    config = MoTConfig(**{**TINY, "layer_mode": mode, "tie_word_embeddings": tied,
                          "qk_norm": qk_norm})
    counts = param_counts(config)
    assert counts["total"] == sum(p.numel() for p in MoTBackbone(config).parameters())
    dense = param_counts(config.model_copy(update={"layer_mode": "dense"}))
    assert counts["active_text"] == dense["active_text"]
    assert counts["active_latent"] == dense["active_latent"]
    if mode == "mot":
        assert counts["non_embedding"] == 2 * dense["non_embedding"]
        assert counts["shared"] == 0
    for token in ("text", "latent"):
        assert flops_per_token(config, 128, "train", token) == \
            flops_per_token(config.model_copy(update={"layer_mode": "dense"}), 128, "train",
                            token)


def test_flops_formula() -> None:
    config = MoTConfig(**TINY)
    n = param_counts(config)["active_text"]
    attention = 2 * 4 * 16 * 100
    assert flops_per_token(config, 100) == 6 * n + 12 * attention
    assert flops_per_token(config, 100, "forward") == 2 * n + 4 * attention
    latent = param_counts(config)["active_latent"]
    assert n - latent == 256 * 64  # the LM head
    # Real sizes: BAGEL's 7B-active MoT holds about 14B parameters.
    big = param_counts(MoTConfig())
    assert 13e9 < big["total"] < 15.5e9 and 6.5e9 < big["active_text"] < 8e9


def test_config_validation_and_qwen2_import() -> None:
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        MoTConfig(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="hidden_size 64 is not divisible by num_heads 5"):
        MoTConfig(**{**TINY, "num_heads": 5, "num_kv_heads": 1})
    assert MoTConfig(**{**TINY, "num_heads": 5, "num_kv_heads": 1, "head_dim": 16}).head_dim
    with pytest.raises(ValueError, match="extra"):
        MoTConfig(**TINY, vit_hidden=3)
    # A Qwen2.5-7B config.json as published (legacy top-level rope_theta).
    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
              "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 32768,
              "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
              "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "rope_scaling": None, "sliding_window": 131072, "tie_word_embeddings": False,
              "use_sliding_window": False, "vocab_size": 152064}
    config = MoTConfig.from_qwen2_config(qwen25)
    assert (config.head_dim, config.rope_theta, config.qk_norm, config.layer_mode) == \
        (128, 1e6, False, "mot")
    assert config.model_copy(update={"qk_norm": True}) == MoTConfig()
    with pytest.raises(ValueError, match="rope_type"):
        MoTConfig.from_qwen2_config({**qwen25, "rope_scaling": {"type": "yarn"}})
    round_trip = MoTConfig.model_validate(json.loads(config.model_dump_json()))
    assert round_trip == config


def test_backbone_imports_without_ray_prefect_vllm() -> None:
    code = ("import sys, weft.model.backbone, weft.model.loading, weft.model.flops; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'prefect', 'vllm'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_gradients_reach_each_expert_through_the_routing() -> None:
    backbone = _tiny("mot").train()
    batch = random_pack(11, docs=4)
    hidden = torch.randn(batch.length, 64, requires_grad=True)
    out = backbone(hidden, batch, build_attention_mask(batch, "dense"))
    out.square().mean().backward()
    assert hidden.grad is not None and bool(hidden.grad.abs().sum() > 0)
    for name, p in backbone.named_parameters():
        if name != "lm_head.weight" and name != "embed_tokens.weight":
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
