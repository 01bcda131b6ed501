"""The generalized causal mask: dense reference by hand, and flex agreeing with it."""

from __future__ import annotations

import itertools
import random
import sys

import pytest
import torch

from weft.model import attention_backends as ab
from weft.model.masks import dense_mask
from weft.model.packed import PackBuilder, PackedBatch

# doc 0: text(2) -> noised VAE(2) -> clean VAE(2, same position) -> ViT(2) -> text(2)
# doc 1: text(2) -> ViT(2); then 2 padding tokens. Rows: queries, columns: keys.
HAND_BUILT_REFERENCE = [
    "1000000000000000",  # 0  text, doc 0
    "1100000000000000",  # 1  text: causal
    "1111000000000000",  # 2  noised: earlier text + its whole image
    "1111000000000000",  # 3
    "1100110000000000",  # 4  clean: text + itself; the noised image is hidden
    "1100110000000000",  # 5
    "1100111100000000",  # 6  ViT: text, clean image, itself
    "1100111100000000",  # 7
    "1100111110000000",  # 8  text: everything but the noised image, then causal
    "1100111111000000",  # 9
    "0000000000100000",  # 10 text, doc 1: nothing of doc 0
    "0000000000110000",  # 11
    "0000000000111100",  # 12 ViT, doc 1
    "0000000000111100",  # 13
    "0000000000000010",  # 14 padding: itself only
    "0000000000000001",  # 15
]


def hand_built_pack() -> PackedBatch:
    image = torch.zeros(3, 16, 32)  # a 1x2 latent grid at stride 16
    builder = PackBuilder(vit_patch=16, vae_stride=16)
    builder.new_document().add_text([5, 6])
    builder.add_vae_image(image, noised=True)
    builder.add_vae_image(image, noised=False, same_position_as_previous_image=True)
    builder.add_vit_image(torch.zeros(2, 3 * 16 * 16), (1, 2))
    builder.add_text([7, 8], loss=True)
    builder.new_document().add_text([9, 10]).add_vit_image(torch.zeros(2, 768), (1, 2))
    return builder.build(pad_to=16)


def random_pack(seed: int, length: int) -> PackedBatch:
    """Documents of text runs, ViT images and noised/clean VAE images, padded to length."""
    rng = random.Random(seed)
    builder = PackBuilder(vit_patch=16, vae_stride=16)
    budget = length - rng.randint(0, length // 8)  # leave some padding
    while True:
        doc_items: list[tuple[str, int, int]] = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.choice(["text", "text", "vit", "vae_noised", "vae_clean"])
            rows, cols = (1, rng.randint(1, 40)) if kind == "text" else \
                (rng.randint(1, 6), rng.randint(1, 6))
            doc_items.append((kind, rows, cols))
        need = sum(rows * cols for _, rows, cols in doc_items)
        if len(builder) + need > budget:
            break
        builder.new_document()
        has_image = False
        for kind, rows, cols in doc_items:
            if kind == "text":
                builder.add_text([rng.randrange(1000) for _ in range(cols)], loss=True)
                continue
            share = has_image and rng.random() < 0.3
            if kind == "vit":
                builder.add_vit_image(torch.zeros(rows * cols, 768), (rows, cols),
                                      same_position_as_previous_image=share)
            else:
                builder.add_vae_image(torch.zeros(3, 16 * rows, 16 * cols),
                                      noised=kind == "vae_noised",
                                      same_position_as_previous_image=share)
            has_image = True
    if len(builder) == 0:
        builder.add_text([1])
    return builder.build(pad_to=length)


def qkv(length: int, seed: int, heads: int = 4, kv_heads: int = 2, dim: int = 32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, length, dim, generator=gen),
            torch.randn(1, kv_heads, length, dim, generator=gen),
            torch.randn(1, kv_heads, length, dim, generator=gen))


def test_dense_mask_equals_hand_written_reference() -> None:
    batch = hand_built_pack()
    expected = torch.tensor([[c == "1" for c in row] for row in HAND_BUILT_REFERENCE])
    mask = dense_mask(batch)
    assert torch.equal(mask, expected)
    assert not mask[4:, 2:4].any(), "noised latents are hidden from later splits"
    assert mask[2, 3] and mask[3, 2] and mask[6, 7], "full attention inside an image"
    assert mask[9, 8] and not mask[8, 9], "text is causal"
    assert not mask[10:14, :10].any() and not mask[:10, 10:].any(), "no cross-document"
    assert mask[14:].sum() == 2 and mask[14, 14] and mask[15, 15], "padding sees itself"
    assert batch.position_ids[2] == batch.position_ids[4], "clean image shares a position"


@pytest.mark.parametrize(("seed", "length", "block_size", "scale"),
                         [(0, 256, 128, None), (1, 512, 128, 0.3), (2, 1024, 128, None),
                          (3, 384, 64, None), (4, 512, 32, 0.3)])
def test_flex_matches_dense_on_random_packs(seed: int, length: int, block_size: int,
                                            scale: float | None) -> None:
    batch = random_pack(seed, length)
    assert len(batch.vae_images) and len(batch.vit_grids) and batch.doc_ids.max() >= 1
    assert batch.vae_noised.any() and not batch.vae_noised.all()
    q, k, v = qkv(length, seed)
    dense = ab.attend(q, k, v, ab.build_attention_mask(batch, "dense"), scale=scale)
    flex_mask = ab.build_attention_mask(batch, "flex", block_size=block_size,
                                        flex_mode="eager")
    flex = ab.attend(q, k, v, flex_mask, scale=scale)
    real = batch.num_tokens
    torch.testing.assert_close(flex[:, :, :real], dense[:, :, :real], atol=1e-5, rtol=1e-5)


def test_compiled_flex_forward_on_cpu_matches_dense() -> None:
    """The CPU auto mode for long packs: compiled BlockMask and fused forward."""
    length = 256
    batch = random_pack(7, length)
    q, k, v = qkv(length, 7)
    mask = ab.build_attention_mask(batch, "flex", flex_mode="compiled")
    eager = ab.build_attention_mask(batch, "flex", flex_mode="eager").block_mask
    assert torch.equal(mask.block_mask.to_dense(), eager.to_dense())
    assert torch.equal(mask.block_mask.full_kv_num_blocks, eager.full_kv_num_blocks)
    out = ab.attend(q, k, v, mask)
    dense = ab.attend(q, k, v, ab.build_attention_mask(batch, "dense"))
    real = batch.num_tokens
    torch.testing.assert_close(out[:, :, :real], dense[:, :, :real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seed", "length", "block_size"), [(5, 512, 128), (6, 512, 32)])
def test_block_mask_equals_dense_mask_at_block_granularity(seed: int, length: int,
                                                           block_size: int) -> None:
    batch = random_pack(seed, length)
    flex_mask = ab.build_attention_mask(batch, "flex", block_size=block_size)
    blocks = length // block_size
    tiles = dense_mask(batch).reshape(blocks, block_size, blocks, block_size)
    any_allowed = tiles.any(dim=3).any(dim=1)
    all_allowed = tiles.all(dim=3).all(dim=1)
    block_mask = flex_mask.block_mask
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_allowed)
    full = torch.zeros(blocks, blocks, dtype=torch.bool)
    for row in range(blocks):
        count = int(block_mask.full_kv_num_blocks[0, 0, row])
        full[row, block_mask.full_kv_indices[0, 0, row, :count]] = True
    assert torch.equal(full, all_allowed), "full blocks skip the mask_mod: exactly all-True"
    density = ab.block_density(flex_mask)
    assert density == pytest.approx(float(any_allowed.float().mean()))
    assert 0 < density < 1
    assert ab.block_density(ab.build_attention_mask(batch, "dense")) == 1.0


def test_flex_on_cpu_with_grad_falls_back_to_dense_and_matches() -> None:
    length = 256
    batch = random_pack(8, length)
    grads = []
    for backend in ("dense", "flex"):
        q, k, v = (t.requires_grad_() for t in qkv(length, 8))
        out = ab.attend(q, k, v, ab.build_attention_mask(batch, backend, flex_mode="eager"))
        out[:, :, : batch.num_tokens].square().sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for dense, flex in zip(*grads, strict=True):
        torch.testing.assert_close(flex, dense)


def test_short_cpu_packs_default_to_dense_sdpa_and_long_ones_compile() -> None:
    assert ab.default_flex_mode("cpu", 512) == "sdpa"
    assert ab.default_flex_mode("cpu", ab.CPU_COMPILE_MIN_LENGTH) == "compiled"
    assert ab.default_flex_mode("cuda", 128) == "compiled"
    batch = random_pack(9, 256)
    mask = ab.build_attention_mask(batch, "flex")
    assert mask.flex_mode == "sdpa"
    q, k, v = qkv(256, 9)
    dense = ab.attend(q, k, v, ab.build_attention_mask(batch, "dense"))
    torch.testing.assert_close(ab.attend(q, k, v, mask), dense)


def test_padded_length_rounds_up_to_the_block_multiple() -> None:
    assert ab.padded_length(1) == 128
    assert ab.padded_length(128) == 128
    assert ab.padded_length(129) == 256
    assert ab.padded_length(1000, multiple=256) == 1024
    assert ab.padded_length(0) == 128
    with pytest.raises(ValueError):
        ab.padded_length(10, multiple=0)


def test_describe_backend_names_backend_mode_device_and_block() -> None:
    assert "dense" in ab.describe_backend("dense", "cpu")
    cpu = ab.describe_backend("flex", "cpu", block_size=64)
    assert "flex" in cpu and "block 64" in cpu and "cpu" in cpu and "backward" in cpu
    cuda = ab.describe_backend("flex", "cuda")
    assert "compile" in cuda and "cuda" in cuda and "block 128" in cuda
    assert "SDPA" in ab.describe_backend("flex", "cpu", length=256)
    with pytest.raises(ValueError, match="unknown"):
        ab.describe_backend("sparse", "cpu")  # type: ignore[arg-type]


def test_unknown_backend_and_wrong_length_are_refused() -> None:
    batch = hand_built_pack()
    with pytest.raises(ValueError, match="unknown attention backend"):
        ab.build_attention_mask(batch, "sparse")  # type: ignore[arg-type]
    mask = ab.build_attention_mask(batch, "flex", block_size=16, flex_mode="eager")
    q, k, v = qkv(32, 0)
    with pytest.raises(ValueError, match="16 tokens"):
        ab.attend(q, k, v, mask)


def test_flex_requested_without_flex_attention_fails_clearly(monkeypatch) -> None:
    import torch.nn.attention as attention_pkg

    monkeypatch.delattr(attention_pkg, "flex_attention", raising=False)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    assert not ab.flex_available()
    with pytest.raises(ab.FlexUnavailableError, match="attention_backend='dense'"):
        ab.build_attention_mask(hand_built_pack(), "flex")
    assert ab.build_attention_mask(hand_built_pack(), "dense").dense is not None


@pytest.mark.parametrize(("seed", "length", "scale"), [(0, 256, None), (1, 512, 0.3),
                                                       (2, 1024, None)])
def test_docs_backend_matches_dense_forward_and_backward(seed: int, length: int,
                                                         scale: float | None) -> None:
    batch = random_pack(seed, length)
    assert batch.doc_ids.max() >= 2 and batch.num_tokens < length, "several docs + padding"
    results = []
    for backend in ("dense", "docs"):
        q, k, v = (t.requires_grad_() for t in qkv(length, seed))
        mask = ab.build_attention_mask(batch, backend)
        out = ab.attend(q, k, v, mask, scale=scale)
        out.square().sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for dense, docs in zip(*results, strict=True):
        torch.testing.assert_close(docs, dense, atol=5e-5, rtol=1e-4)  # float order only


def test_docs_backend_groups_whole_documents_and_skips_cross_document_work() -> None:
    batch = random_pack(3, 1024)
    mask = ab.build_attention_mask(batch, "docs")
    groups = mask.doc_groups()
    doc = batch.doc_ids
    assert groups[0].start == 0 and groups[-1].end == batch.num_tokens
    for a, b in itertools.pairwise(groups):
        assert a.end == b.start
        assert doc[a.end - 1] != doc[b.start], "a group boundary never cuts a document"
    for g in groups:
        idx = torch.arange(g.start, g.end)
        assert torch.equal(g.mask, dense_mask(batch)[idx][:, idx])
    assert 0 < ab.block_density(mask) < 0.5
    assert "docs" in ab.describe_backend("docs", "cpu")
