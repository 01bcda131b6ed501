"""Compiled FlexAttention on CUDA: bf16 agrees with dense SDPA, trains, compiles once."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENGTH = 4096  # a multiple of the block size: the static padded length
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # the 7B backbone's attention shape


def realistic_pack(seed: int, length: int = LENGTH):
    """Documents of text runs and ViT / VAE images of a few hundred tokens, some noised."""
    from weft.model.packed import PackBuilder

    rng = random.Random(seed)
    builder = PackBuilder(vit_patch=16, vae_stride=16)
    budget = length - rng.randint(1, 200)
    while True:
        items = [("text", 1, rng.randint(8, 120))]
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["vit", "vae_noised", "vae_clean"])
            items += [(kind, rng.randint(8, 24), rng.randint(8, 24)),
                      ("text", 1, rng.randint(4, 80))]
        if len(builder) + sum(r * c for _, r, c in items) > budget:
            break
        builder.new_document()
        for kind, rows, cols in items:
            if kind == "text":
                builder.add_text([rng.randrange(1000) for _ in range(cols)], loss=True)
            elif kind == "vit":
                builder.add_vit_image(torch.zeros(rows * cols, 768), (rows, cols))
            else:
                builder.add_vae_image(torch.zeros(3, 16 * rows, 16 * cols),
                                      noised=kind == "vae_noised")
    return builder.build(pad_to=length).to("cuda")


def qkv(seed: int, dtype, requires_grad: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, HEADS, LENGTH, HEAD_DIM)] + [(1, KV_HEADS, LENGTH, HEAD_DIM)] * 2
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen)
            .requires_grad_(requires_grad) for s in shapes]


def test_compiled_flex_bf16_matches_dense_sdpa_and_backward_runs() -> None:
    from weft.model import attention_backends as ab

    batch = realistic_pack(0)
    real = batch.num_tokens
    flex_mask = ab.build_attention_mask(batch, "flex")
    dense_mask = ab.build_attention_mask(batch, "dense")
    assert flex_mask.flex_mode == "compiled"
    assert 0 < ab.block_density(flex_mask) < 0.6  # several documents: most blocks skipped

    q, k, v = qkv(0, torch.bfloat16, requires_grad=True)
    out = ab.attend(q, k, v, flex_mask)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        dense_bf16 = ab.attend(q, k, v, dense_mask)
    reference_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = ab.attend(*reference_inputs, dense_mask)
    torch.testing.assert_close(out[:, :, :real].float(), reference[:, :, :real],
                               atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:, :, :real], dense_bf16[:, :, :real], atol=3e-2,
                               rtol=3e-2)

    weights = torch.randn_like(reference)
    (out[:, :, :real].float() * weights[:, :, :real]).sum().backward()
    (reference[:, :, :real] * weights[:, :, :real]).sum().backward()
    for got, want in zip((q, k, v), reference_inputs, strict=True):
        assert got.grad is not None and torch.isfinite(got.grad).all()
        error = (got.grad.float() - want.grad).norm() / want.grad.norm()
        assert error < 5e-2, f"relative grad error {error:.4f}"


def test_same_padded_length_does_not_recompile() -> None:
    from torch._dynamo.utils import counters

    from weft.model import attention_backends as ab

    q, k, v = qkv(1, torch.bfloat16)
    with torch.no_grad():
        ab.attend(q, k, v, ab.build_attention_mask(realistic_pack(1), "flex"))
        torch.cuda.synchronize()
        graphs = counters["stats"]["unique_graphs"]
        frames = dict(counters["frames"])
        for seed in (2, 3):  # new packs, new masks, same padded length
            out = ab.attend(q, k, v, ab.build_attention_mask(realistic_pack(seed), "flex"))
            torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert counters["stats"]["unique_graphs"] == graphs, "a new mask recompiled flex"
    assert dict(counters["frames"]) == frames
