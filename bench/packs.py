"""Synthetic packs for the benchmarks: documents of the kinds BAGEL trains on.

Text runs, ViT images, clean and noised VAE images (text-to-image, editing, image
understanding, interleaved), packed until the next document does not fit, then padded to
the length. Pixels are zeros: the benchmarks time attention and training steps, whose
cost depends on the layout, not on the content. The scripts beside it import it as
`packs` (a script's own folder is on sys.path).
"""

from __future__ import annotations

import random

import torch

from weft.model.packed import PackBuilder, PackedBatch

Item = tuple[str, int, int]  # (kind, rows, cols); text: ("text", 1, length)


def synthetic_pack(tokens: int, seed: int, *, vocab: int = 1000, vit: bool = True,
                   side: tuple[int, int] = (10, 20)) -> PackedBatch:
    """A pack of `tokens` tokens. vit=False (no SigLIP weights, e.g. the training bench)
    swaps the understanding documents for text-only ones; `side`: an image grid's side in
    tokens, drawn per image."""
    rng = random.Random(seed)
    builder = PackBuilder(vit_patch=16, vae_stride=16)

    def grid() -> tuple[int, int]:
        return rng.randint(*side), rng.randint(*side)

    def text(lo: int, hi: int) -> Item:
        return ("text", 1, rng.randint(lo, hi))

    def document() -> list[Item]:
        # (the orders keep the packs each benchmark measured before they shared this)
        kind = rng.choice(["t2i", "understand", "edit", "interleaved"] if vit else
                          ["t2i", "edit", "interleaved", "text"])
        if kind == "t2i":
            return [text(10, 80), ("vae_noised", *grid())]
        if kind == "understand":
            return [("vit", *grid()), text(20, 200)]
        if kind == "text":
            return [text(100, 600)]
        if kind == "edit":
            rows, cols = grid()
            source = [("vae_clean", rows, cols)] + ([("vit_same", rows, cols)] if vit else [])
            return [text(10, 60), *source, ("vae_noised", rows, cols)]
        items = [text(10, 80)]
        images = ["vae_noised", "vae_clean"] + (["vit"] if vit else [])
        for _ in range(rng.randint(2, 3)):
            items += [(rng.choice(images), *grid()), text(10, 60)]
        return items

    misses = 0
    while misses < 8:
        items = document()
        if len(builder) + sum(rows * cols for _, rows, cols in items) > tokens:
            misses += 1
            continue
        builder.new_document()
        for kind, rows, cols in items:
            if kind == "text":
                builder.add_text([rng.randrange(vocab) for _ in range(cols)], loss=True)
            elif kind.startswith("vit"):
                builder.add_vit_image(torch.zeros(rows * cols, 768), (rows, cols),
                                      same_position_as_previous_image=kind == "vit_same")
            else:
                builder.add_vae_image(torch.zeros(3, 16 * rows, 16 * cols),
                                      noised=kind == "vae_noised")
    return builder.build(pad_to=tokens)
