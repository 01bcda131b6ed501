"""Tokenising, CFG dropout, cutting and token-budget packing of sequence plans."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weft.model.mot import UnifiedConfig
from weft.model.packed import IGNORE_INDEX, TokenKind
from weft.train.config import CfgDropoutConfig, DataConfig, PackConfig
from weft.train.images import (
    ImageConfigError,
    ImageSpec,
    check_image_config,
    image_size,
    vae_input,
    vit_input,
)
from weft.train.packer import (
    PackStats,
    PlanPreparer,
    PreparedPlan,
    Segment,
    TextTokens,
    TokenPacker,
    cfg_dropout,
)
from weft.train.plans import SequencePlan, plan_sample

START, END, EOS = 1, 2, 3
SPEC = ImageSpec(vit_patch=8, vit_max_patches=4, vit_max_side=64, vae_stride=16,
                 vae_max_side=32, vae_min_side=16, max_pixels=1_000_000)


class WordTokenizer:
    """One token per word (so tests control lengths), with image markers and an eos."""

    eos_token_id = EOS

    def get_vocab(self) -> dict[str, int]:
        return {"<|vision_start|>": START, "<|vision_end|>": END, "<eos>": EOS}

    def __len__(self) -> int:
        return 600

    def __call__(self, text: str, add_special_tokens: bool = False,
                 split_special_tokens: bool = False) -> dict[str, list[int]]:
        assert not add_special_tokens and split_special_tokens
        return {"input_ids": [10 + sum(map(ord, w)) % 500 for w in text.split()]}


def _jpeg(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _key(i: int) -> str:
    return f"{i:016x}"


def _sample(kind: str, i: int, words: int = 3, frames: int = 3,
            size: tuple[int, int] = (32, 32)) -> tuple[SequencePlan, dict[str, bytes]]:
    key = _key(i)
    text = " ".join(f"w{i}x{n}" for n in range(words))
    img = [f"{key}.{n}.jpg" for n in range(frames)]
    shapes = {
        "text_to_image": [("prompt", text), img[0]],
        "image_edit": [img[0], ("instruction", text), img[1]],
        "vqa": [img[0], ("question", text), ("answer", text)],
        "video_clip": [img[0]] + [x for n in range(1, frames) for x in (("caption", text),
                                                                          img[n])],
    }[kind]
    sequence = [{"type": "text", "role": s[0], "text": s[1]} if isinstance(s, tuple) else
                {"type": "video_frame", "member": s, "time_s": 0.5 * int(s.split(".")[1])}
                for s in shapes]
    members = {m["member"]: _jpeg(i * 10 + n, size)
               for n, m in enumerate(x for x in sequence if "member" in x)}
    plan = plan_sample({"key": key, "kind": kind, "sequence": sequence}, dataset="d")
    return plan, members


def _preparer(pack: PackConfig | None = None, dropout: CfgDropoutConfig | None = None,
              spec: ImageSpec = SPEC) -> PlanPreparer:
    return PlanPreparer(TextTokens(WordTokenizer()), spec, pack or PackConfig(),
                        dropout or CfgDropoutConfig(text=0, vit=0, vae=0), seed=0)


def _text_plan(i: int, n: int) -> PreparedPlan:
    """A prepared plan of exactly n text tokens (the packer only needs segments)."""
    plan = SequencePlan(_key(i), "web_doc", "d", ())
    return PreparedPlan(plan, [Segment(ids=[5] * n, loss=True)], n)


def _drain(packer: TokenPacker, plans: list[PreparedPlan]) -> list:
    source = iter(plans)
    packs = []
    while (pack := packer.next_pack(lambda: next(source, None))) is not None:
        packs.append(pack)
    return packs


# ---- layout: markers, eos, labels --------------------------------------------------------------
def test_text_to_image_layout_wraps_the_image_in_markers_and_ends_with_eos():
    preparer = _preparer()
    plan, members = _sample("text_to_image", 1, words=3)
    prepared = preparer.prepare(plan, members)
    assert [s.ids is not None for s in prepared.segments] == [True, False, True]
    prompt, image, tail = prepared.segments
    assert prompt.ids[-1] == START and not prompt.loss
    assert tail.ids == [END, EOS] and image.item.noised
    batch = TokenPacker(PackConfig(pad_multiple=8), 8, 16).next_pack(
        iter([prepared, None]).__next__).batch
    assert batch.num_tokens == prepared.n_tokens == 3 + 1 + 4 + 2
    assert bool((batch.labels == IGNORE_INDEX).all())  # a prompt carries no loss
    assert batch.length == 16 and batch.vae_noised.tolist() == [True]


def test_text_with_a_loss_learns_to_open_an_image_and_its_first_token_after_one():
    plan, members = _sample("video_clip", 2, words=2, frames=2)
    prepared = _preparer().prepare(plan, members)
    ids = [s.ids for s in prepared.segments]
    # [start] clean [end start] vit [end caption... start] noised [end eos]
    assert ids[0] == [START] and ids[2] == [END, START]
    caption = prepared.segments[4]
    assert caption.loss and caption.ids[0] == END and caption.ids[-1] == START
    assert ids[-1] == [END, EOS]
    batch = TokenPacker(PackConfig(), 8, 16).next_pack(iter([prepared, None]).__next__).batch
    labelled = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    assert labelled == caption.ids[1:]  # both words, then <|vision_start|>


def test_real_tokenizer_keeps_special_strings_as_text_and_finds_markers(tmp_path_factory):
    from transformers import AutoTokenizer

    path = Path.home() / ".cache/weft/models/tiny/qwen2_5"
    if not (path / "tokenizer_config.json").is_file():
        from weft.stages.infer.tiny_models import make_tiny_models

        path = make_tiny_models(tmp_path_factory.mktemp("tiny"))["qwen2_5"]
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    text = TextTokens(tokenizer)
    vocab = tokenizer.get_vocab()
    assert text.markers == (vocab["<|vision_start|>"], vocab["<|vision_end|>"])
    assert text.eos == tokenizer.eos_token_id is not None
    ids = text.encode("a <|im_end|> b")
    assert vocab["<|im_end|>"] not in ids and tokenizer.decode(ids) == "a <|im_end|> b"


# ---- packing ---------------------------------------------------------------------------------
def test_packs_fill_to_expected_never_pass_max_and_keep_every_plan_once():
    pack = PackConfig(expected_tokens=200, max_tokens=240, max_tokens_per_sample=60,
                      overflow_buffer=8, pad_multiple=32)
    rng = random.Random(0)
    plans = [_text_plan(i, rng.randint(10, 60)) for i in range(300)]
    packs = _drain(TokenPacker(pack, 8, 16), plans)
    tokens = [p.batch.num_tokens for p in packs]
    assert max(tokens) <= 240
    assert all(t >= 200 for t in tokens[:-3])  # only the last packs drain a dry source
    assert all(p.batch.length % 32 == 0 and p.batch.length >= p.batch.num_tokens
               for p in packs)
    keys = [pl.plan.key for p in packs for pl in p.plans]
    assert sorted(keys) == sorted(_key(i) for i in range(300))


def test_overflow_plans_go_first_in_order_and_a_full_buffer_closes_the_pack():
    pack = PackConfig(expected_tokens=100, max_tokens=100, max_tokens_per_sample=100,
                      overflow_buffer=4, pad_multiple=1)
    sizes = {0: 60, 1: 50, 2: 30, 3: 20, 4: 10, 5: 25, 6: 5}
    packs = _drain(TokenPacker(pack, 8, 16), [_text_plan(i, n) for i, n in sizes.items()])
    keys = [[int(pl.plan.key, 16) for pl in p.plans] for p in packs]
    assert keys == [[0, 2, 4], [1, 3, 5, 6]]  # 1 and 3 waited, then went first in order
    assert packs[0].stats["overflow"] == 2

    tight = PackConfig(expected_tokens=100, max_tokens=100, max_tokens_per_sample=100,
                       overflow_buffer=1, pad_multiple=1)
    packs = _drain(TokenPacker(tight, 8, 16), [_text_plan(i, n) for i, n in
                                               {0: 60, 1: 50, 2: 45, 3: 5}.items()])
    keys = [[int(pl.plan.key, 16) for pl in p.plans] for p in packs]
    assert keys == [[0], [1, 2, 3]]  # the second waiting plan overflowed the buffer


def test_a_sample_over_the_cap_is_cut_between_units_or_skipped():
    stats = PackStats()
    preparer = _preparer(PackConfig(max_tokens_per_sample=40, expected_tokens=64,
                                    max_tokens=64))
    preparer.stats = stats
    plan, members = _sample("video_clip", 3, words=4, frames=6)
    prepared = preparer.prepare(plan, members)
    assert prepared.cut and prepared.n_tokens <= 40
    kept = prepared.plan.items
    assert kept == plan.items[:len(kept)]  # a prefix of whole units
    assert {it.split for it in kept}.isdisjoint(it.split for it in plan.items[len(kept):])
    assert kept[-1].loss  # nothing without a loss is left dangling at the end
    assert prepared.segments[-1].ids[-1] != EOS  # a cut document did not end

    big_plan, big = _sample("text_to_image", 4, words=60)
    assert preparer.prepare(big_plan, big) is None
    assert stats.drain() == {"cut": 1, "skipped": {"too_long": 1},
                             "dropped": {"text": 0, "vit": 0, "vae": 0}}


def test_bad_and_oversized_images_and_missing_vit_are_skipped_with_reasons():
    preparer = _preparer(spec=ImageSpec(**{**SPEC.__dict__, "max_pixels": 32 * 32}))
    plan, members = _sample("text_to_image", 5)
    assert preparer.prepare(plan, {k: b"not an image" for k in members}) is None
    plan, members = _sample("text_to_image", 6, size=(64, 40))
    assert preparer.prepare(plan, members) is None  # over max_pixels, never decoded
    no_vit = _preparer(spec=ImageSpec(**{**SPEC.__dict__, "vit_patch": None}))
    no_vit.stats = preparer.stats
    assert no_vit.prepare(*_sample("vqa", 7)) is None  # only understood through a ViT
    video = no_vit.prepare(*_sample("video_clip", 8))
    assert all(it.type != "vit_image" for it in video.plan.items)
    assert not any(it.same_image_as_previous for it in video.plan.items[:1])
    assert preparer.stats.drain()["skipped"] == {"bad_image": 2, "needs_vit": 1}


def test_packed_batches_validate_and_log_token_counts_per_kind():
    preparer = _preparer(PackConfig(expected_tokens=120, max_tokens=160,
                                    max_tokens_per_sample=100, pad_multiple=16))
    plans = [preparer.prepare(*_sample(kind, i)) for i, kind in enumerate(
        ["video_clip", "image_edit", "vqa", "text_to_image"] * 5)]
    packs = _drain(TokenPacker(preparer.pack, 8, 16, preparer.stats), plans)
    for pack in packs:
        batch = pack.batch.validate()
        counts = pack.stats["token_counts"]
        assert counts == batch.token_counts() and sum(counts.values()) == batch.length
        assert counts["pad"] == batch.length - batch.num_tokens
        assert pack.stats["tokens"] == batch.num_tokens <= 160
    total = Counter()
    for pack in packs:
        total.update(pack.stats["token_counts"])
    assert all(total[k.name.lower()] > 0 for k in TokenKind)


# ---- CFG dropout -----------------------------------------------------------------------------
def test_cfg_dropout_rates_hold_over_many_packs_and_each_condition_is_independent():
    rates = CfgDropoutConfig(text=0.1, vit=0.5, vae=0.2)
    preparer = _preparer(PackConfig(expected_tokens=400, max_tokens=480,
                                    max_tokens_per_sample=100, pad_multiple=16), rates)
    n = 2000
    image = _jpeg(0)
    plans = []
    both = 0
    for i in range(n):
        plan, members = _sample("image_edit", i, words=2)
        prepared = preparer.prepare(plan, dict.fromkeys(members, image))
        both += prepared.dropped >= {"text", "vit"}
        plans.append(prepared)
        conditions = {(it.type, it.noised) for it in prepared.plan.items if it.enable_cfg}
        assert (("text", False) in conditions) != ("text" in prepared.dropped)
        assert (("vit_image", False) in conditions) != ("vit" in prepared.dropped)
        assert (("vae_image", False) in conditions) != ("vae" in prepared.dropped)
        if prepared.dropped == {"vae"}:  # the ViT takes over the dropped latents' position
            assert not next(it for it in prepared.plan.items
                            if it.type == "vit_image").same_image_as_previous
    packs = _drain(TokenPacker(preparer.pack, 8, 16, preparer.stats), plans)
    dropped = Counter()
    for pack in packs:
        dropped.update(pack.stats["dropped"])
    assert sum(p.stats["plans"] for p in packs) == n and len(packs) > 50
    for name, rate in rates.model_dump().items():
        sd = (rate * (1 - rate) / n) ** 0.5
        assert abs(dropped[name] / n - rate) < 4 * sd, (name, dropped[name])
    assert abs(both / n - 0.05) < 4 * (0.05 * 0.95 / n) ** 0.5


def test_cfg_dropout_is_decided_per_sample_and_never_touches_understanding_plans():
    plan, _ = _sample("image_edit", 1)
    drops = {frozenset(cfg_dropout(plan, CfgDropoutConfig(text=.5, vit=.5, vae=.5),
                                   random.Random(s))[1]) for s in range(40)}
    assert len(drops) > 4
    vqa, _ = _sample("vqa", 2)
    assert cfg_dropout(vqa, CfgDropoutConfig(text=1, vit=1, vae=1), random.Random(0)) == \
        (vqa, set())
    preparer = _preparer(dropout=CfgDropoutConfig(text=.5, vit=.5, vae=.5))
    image, members = _sample("image_edit", 3)
    again = [preparer.prepare(image, members, epoch=0).dropped for _ in range(3)]
    assert again[0] == again[1] == again[2]  # the same sample and epoch: the same draw


# ---- images ---------------------------------------------------------------------------------
def test_vae_and_vit_inputs_keep_aspect_within_bounds():
    spec = ImageSpec(vit_patch=16, vit_max_patches=64, vit_max_side=64, vae_stride=16,
                     vae_max_side=256, vae_min_side=64, max_pixels=10**8)
    assert spec.vae_size((1000, 500)) == (256, 128)
    assert spec.vae_size((40, 20)) == (128, 64)  # small images grow to the minimum side
    assert spec.vae_size((5000, 50)) == (256, 64)  # extreme aspect squeezed within bounds
    for size in [(1, 1), (333, 777), (4096, 17), (64, 64)]:
        w, h = spec.vae_size(size)
        assert w % 16 == h % 16 == 0 and min(w, h) >= 64 and max(w, h) <= 256
    img = Image.fromarray(np.full((50, 100, 3), 255, np.uint8))
    vae = vae_input(img, spec)
    assert vae.shape == (3, 64, 128) and torch.allclose(vae, torch.ones_like(vae))
    patches, grid = vit_input(img, spec)
    assert grid == spec.vit_grid((100, 50)) and patches.shape == (grid[0] * grid[1], 768)
    assert grid[0] * grid[1] <= 64


def test_image_size_reads_the_header_and_applies_exif_rotation():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (40, 20)).save(buf, format="JPEG", exif=exif)
    assert image_size(buf.getvalue(), 10**6) == (20, 40)


def test_image_settings_are_checked_at_start_up_in_one_message():
    bad = DataConfig.model_validate({"images": {"vae_max_side": 8, "vae_min_side": 64},
                                     "pack": {"max_tokens_per_sample": 64,
                                              "expected_tokens": 64, "max_tokens": 64}})
    with pytest.raises(ImageConfigError) as err:
        check_image_config(bad, UnifiedConfig(), vit_patch=16)
    message = str(err.value)
    assert "vae_min_side (64) is over" in message and "under the VAE stride" in message
    too_big = DataConfig.model_validate({"images": {"vae_max_side": 2048}})
    with pytest.raises(ImageConfigError, match="latent_max_grid"):
        check_image_config(too_big, UnifiedConfig(), vit_patch=16)
    check_image_config(DataConfig(), UnifiedConfig(), vit_patch=16)
