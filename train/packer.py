"""Plans -> token budgets: tokenising, CFG condition dropout, cutting, and packing.

A plan becomes segments, one PackBuilder call each: text splits (token ids) and image
splits. With a tokenizer that has them, every image is wrapped in `<|vision_start|>`
/ `<|vision_end|>` tokens, merged into the neighbouring text so a text with a loss
learns to open an image and the text after an image is predicted from its end
marker; a document ends with eos (not a cut one: it did not end). Text is tokenised
without special tokens, and special-token strings inside it stay plain text.

The count of a plan's tokens needs only its text and its images' header sizes, so a
sample over `max_tokens_per_sample` is cut between units (`PlanItem.split`) or skipped
before anything is decoded. The packer fills a pack up to `expected_tokens`, never
past `max_tokens`; a plan that does not fit waits in a bounded overflow buffer and is
tried first for the next pack (a full buffer closes the pack).

CFG dropout is decided per plan from a seeded RNG keyed by (seed, dataset, epoch,
key), not drawn from a stream: a resumed loader that re-reads buffered samples makes
exactly the same plans again.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from weft.model.packed import PackBuilder, PackedBatch
from weft.train.config import CfgDropoutConfig, PackConfig
from weft.train.images import ImageError, ImageSpec, decode_rgb, image_size, vae_input, vit_input
from weft.train.plans import PlanItem, SequencePlan

log = logging.getLogger(__name__)

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
CONDITIONS = ("text", "vit", "vae")


class TextTokens:
    """A Hugging Face tokenizer as the packer uses it: plain ids, image markers, eos."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        start, end = vocab.get(VISION_START), vocab.get(VISION_END)
        self.markers: tuple[int, int] | None = (start, end) if start is not None \
            and end is not None else None
        self.eos: int | None = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS/EOS added, `<|...|>` strings not special."""
        try:
            out = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
        except TypeError:  # a tokenizer without split_special_tokens
            out = self.tokenizer(text, add_special_tokens=False)
        return list(out["input_ids"])


# ---- CFG condition dropout ---------------------------------------------------------------------
def _condition(item: PlanItem) -> str | None:
    """Which dropout rate governs an item: only enable_cfg items are conditions."""
    if not item.enable_cfg:
        return None
    if item.type == "text":
        return "text"
    if item.type == "vit_image":
        return "vit"
    return None if item.noised else "vae"


def dropout_rng(seed: int, dataset: str, epoch: int, key: str) -> random.Random:
    digest = hashlib.sha256(f"weft-cfg:{seed}:{dataset}:{epoch}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def remove_items(items: list[PlanItem], drop: Callable[[PlanItem], bool]) -> list[PlanItem]:
    """The items without the dropped ones; an image that shared the position of a dropped
    one takes that position over (it becomes the first of its group)."""
    out: list[PlanItem] = []
    group_kept = False
    for item in items:
        if not item.is_image:
            if not drop(item):
                out.append(item)
            continue
        if not item.same_image_as_previous:
            group_kept = False
        if drop(item):
            continue
        if item.same_image_as_previous and not group_kept:
            item = replace(item, same_image_as_previous=False)
        group_kept = True
        out.append(item)
    return out


def cfg_dropout(plan: SequencePlan, rates: CfgDropoutConfig,
                rng: random.Random) -> tuple[SequencePlan, set[str]]:
    """The plan without the conditions the three independent draws drop, and which were.

    Only plans that generate an image get dropout; a condition counts as dropped only
    when the plan had one of that kind.
    """
    if not plan.generates_image:
        return plan, set()
    draws = {name: rng.random() < getattr(rates, name) for name in CONDITIONS}
    present = {_condition(item) for item in plan.items} - {None}
    dropped = {name for name, hit in draws.items() if hit and name in present}
    if not dropped:
        return plan, set()
    items = remove_items(list(plan.items), lambda it: _condition(it) in dropped)
    return replace(plan, items=tuple(items)), dropped


# ---- segments and counting ---------------------------------------------------------------------
@dataclass
class Segment:
    """One PackBuilder call: a text split (ids) or an image split (item)."""

    ids: list[int] | None = None
    loss: bool = False
    item: PlanItem | None = None
    tokens: int = 0
    size: tuple[int, int] | None = None  # the source image's (width, height)
    pixels: torch.Tensor | None = None  # VAE image [3, H, W] or ViT patches
    grid: tuple[int, int] | None = None  # ViT patch grid

    @property
    def n_tokens(self) -> int:
        return len(self.ids) if self.ids is not None else self.tokens


@dataclass
class _Entry:
    item: PlanItem
    ids: list[int] | None = None
    tokens: int = 0
    size: tuple[int, int] | None = None


def layout(entries: list[_Entry], text: TextTokens, end: bool) -> list[Segment]:
    """The segments of a plan: markers merged into neighbouring text, eos when `end`."""
    segments: list[Segment] = []
    pending: list[int] = []  # <|vision_end|> waiting for the next text
    for entry in entries:
        if entry.ids is not None:
            ids = pending + entry.ids
            pending = []
            if ids:
                segments.append(Segment(ids=ids, loss=entry.item.loss))
            continue
        if text.markers is not None:
            start, close = text.markers
            last = segments[-1] if segments else None
            if pending or last is None or last.ids is None:
                segments.append(Segment(ids=[*pending, start]))
            else:
                last.ids.append(start)
            pending = [close]
        segments.append(Segment(item=entry.item, tokens=entry.tokens, size=entry.size))
    tail = pending + ([text.eos] if end and text.eos is not None else [])
    if tail:
        last = segments[-1] if segments else None
        if not pending and last is not None and last.ids is not None:
            last.ids.extend(tail)
        else:
            segments.append(Segment(ids=tail))
    return segments


def count_tokens(segments: list[Segment]) -> int:
    return sum(s.n_tokens for s in segments)


@dataclass
class PreparedPlan:
    """A plan ready to pack: its segments (images decoded) and its exact token count."""

    plan: SequencePlan
    segments: list[Segment]
    n_tokens: int
    cut: bool = False
    dropped: set[str] = field(default_factory=set)
    origin: dict[str, Any] | None = None  # where the sample lies (the loader's bookkeeping)


@dataclass
class PackStats:
    """What happened to plans since the last pack (cut, skipped by reason, dropped)."""

    cut: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def drain(self) -> dict[str, Any]:
        out = {"cut": self.cut, "skipped": dict(self.skipped),
               "dropped": {name: self.dropped[name] for name in CONDITIONS}}
        self.cut, self.skipped, self.dropped = 0, Counter(), Counter()
        return out


class PlanPreparer:
    """Plan -> PreparedPlan: dropout, token count, cut or skip, then decode the images."""

    def __init__(self, text: TextTokens, images: ImageSpec, pack: PackConfig,
                 dropout: CfgDropoutConfig, seed: int = 0,
                 stats: PackStats | None = None) -> None:
        self.text, self.images, self.pack, self.dropout = text, images, pack, dropout
        self.seed = seed
        self.stats = stats if stats is not None else PackStats()

    def prepare(self, plan: SequencePlan, images: dict[str, bytes],
                epoch: int = 0) -> PreparedPlan | None:
        """The prepared plan, or None when it is skipped (counted in `stats`)."""
        if self.images.vit_patch is None:  # a model without a ViT encoder
            items = remove_items(list(plan.items), lambda it: it.type == "vit_image")
            if {it.split for it in items} != {it.split for it in plan.items}:
                return self._skip("needs_vit", plan)
            plan = replace(plan, items=tuple(items))
        plan, dropped = cfg_dropout(plan, self.dropout,
                                    dropout_rng(self.seed, plan.dataset, epoch, plan.key))
        try:
            entries = self._entries(plan, images)
        except KeyError:
            return self._skip("missing_image", plan)
        except ImageError as exc:
            return self._skip("bad_image", plan, exc)
        cut = False
        segments = layout(entries, self.text, end=True)
        if count_tokens(segments) > self.pack.max_tokens_per_sample:
            found = self._cut(entries)
            if found is None:
                return self._skip("too_long", plan)
            entries, segments, cut = *found, True
            plan = replace(plan, items=tuple(e.item for e in entries))
        try:
            self._decode(segments, images)
        except ImageError as exc:
            return self._skip("bad_image", plan, exc)
        self.stats.cut += cut
        self.stats.dropped.update(dropped)
        return PreparedPlan(plan, segments, count_tokens(segments), cut, dropped)

    def _skip(self, reason: str, plan: SequencePlan, exc: Exception | None = None) -> None:
        self.stats.skip(reason)
        log.debug("skipped sample %s (%s): %s%s", plan.key, plan.dataset, reason,
                  f": {exc}" if exc else "")
        return None

    def _entries(self, plan: SequencePlan, images: dict[str, bytes]) -> list[_Entry]:
        sizes: dict[str, tuple[int, int]] = {}
        entries = []
        for item in plan.items:
            if item.type == "text":
                entries.append(_Entry(item, ids=self.text.encode(item.text or "")))
                continue
            member = item.image or ""
            if member not in sizes:
                sizes[member] = image_size(images[member], self.images.max_pixels)
            size = sizes[member]
            if item.type == "vit_image":
                rows, cols = self.images.vit_grid(size)
                tokens = rows * cols
            else:
                tokens = self.images.vae_tokens(size)
            entries.append(_Entry(item, tokens=tokens, size=size))
        return entries

    def _cut(self, entries: list[_Entry]) -> tuple[list[_Entry], list[Segment]] | None:
        """The longest prefix of whole units that fits and still has a loss."""
        splits = sorted({e.item.split for e in entries})
        for keep in range(len(splits) - 1, 0, -1):
            prefix = [e for e in entries if e.item.split < splits[keep]]
            while prefix and not any(e.item.loss for e in prefix
                                     if e.item.split == prefix[-1].item.split):
                last = prefix[-1].item.split  # nothing follows to use a unit without a loss
                prefix = [e for e in prefix if e.item.split != last]
            if not prefix:
                continue
            segments = layout(prefix, self.text, end=False)
            if count_tokens(segments) <= self.pack.max_tokens_per_sample:
                return prefix, segments
        return None

    def _decode(self, segments: list[Segment], images: dict[str, bytes]) -> None:
        decoded: dict[str, Any] = {}
        for seg in segments:
            if seg.item is None:
                continue
            member = seg.item.image or ""
            if member not in decoded:
                decoded[member] = decode_rgb(images[member], self.images.max_pixels)
            if seg.item.type == "vit_image":
                seg.pixels, seg.grid = vit_input(decoded[member], self.images)
            else:
                seg.pixels = vae_input(decoded[member], self.images)


# ---- packing -----------------------------------------------------------------------------------
@dataclass
class Pack:
    """A built pack, the plans in it (in order) and what happened since the last one."""

    batch: PackedBatch
    plans: list[PreparedPlan]
    stats: dict[str, Any]


def build_pack(plans: list[PreparedPlan], vit_patch: int, vae_stride: int,
               pad_multiple: int) -> PackedBatch:
    """One PackedBatch of the plans, one document each, padded to a multiple."""
    builder = PackBuilder(vit_patch=vit_patch, vae_stride=vae_stride)
    for prepared in plans:
        builder.new_document()
        for seg in prepared.segments:
            if seg.ids is not None:
                builder.add_text(seg.ids, loss=seg.loss)
                continue
            item = seg.item
            assert item is not None and seg.pixels is not None
            if item.type == "vit_image":
                assert seg.grid is not None
                builder.add_vit_image(seg.pixels, seg.grid, item.same_image_as_previous)
            else:
                builder.add_vae_image(seg.pixels, noised=item.noised, loss=item.loss,
                                      same_position_as_previous_image=item.
                                      same_image_as_previous)
    n = len(builder)
    expected = sum(p.n_tokens for p in plans)
    if n != expected:  # the count decides what fits, so it must be exact
        raise RuntimeError(f"packer bug: counted {expected} tokens, built {n}")
    return builder.build(pad_to=-(-n // pad_multiple) * pad_multiple)


class TokenPacker:
    """Fills packs from a source of prepared plans, with an overflow buffer tried first."""

    def __init__(self, pack: PackConfig, vit_patch: int | None, vae_stride: int,
                 stats: PackStats | None = None) -> None:
        self.pack = pack
        self.vit_patch = vit_patch or 16  # only sizes an empty vit_pixels without a ViT
        self.vae_stride = vae_stride
        self.stats = stats if stats is not None else PackStats()
        self.overflow: deque[PreparedPlan] = deque()

    def next_pack(self, pull: Callable[[], PreparedPlan | None]) -> Pack | None:
        """The next pack; `pull` gives the next plan or None when the source is done."""
        cfg = self.pack
        chosen: list[PreparedPlan] = []
        total = 0
        waiting: deque[PreparedPlan] = deque()
        for prepared in self.overflow:
            if total < cfg.expected_tokens and total + prepared.n_tokens <= cfg.max_tokens:
                chosen.append(prepared)
                total += prepared.n_tokens
            else:
                waiting.append(prepared)
        self.overflow = waiting
        while total < cfg.expected_tokens:
            prepared = pull()
            if prepared is None:
                break
            if prepared.n_tokens > cfg.max_tokens_per_sample:
                raise ValueError(f"plan {prepared.plan.key} has {prepared.n_tokens} tokens, "
                                 f"over max_tokens_per_sample {cfg.max_tokens_per_sample}")
            if total + prepared.n_tokens <= cfg.max_tokens:
                chosen.append(prepared)
                total += prepared.n_tokens
                continue
            self.overflow.append(prepared)
            if len(self.overflow) > cfg.overflow_buffer:
                break  # the buffer is full: close this pack, the buffer goes first next
        if not chosen:
            return None
        batch = build_pack(chosen, self.vit_patch, self.vae_stride, cfg.pad_multiple)
        stats = {"plans": len(chosen), "tokens": batch.num_tokens, "length": batch.length,
                 "token_counts": batch.token_counts(), "overflow": len(self.overflow),
                 **self.stats.drain()}
        log.debug("pack of %d plans: %s", len(chosen), stats)
        return Pack(batch, chosen, stats)


__all__ = ["CONDITIONS", "Pack", "PackStats", "PlanPreparer", "PreparedPlan", "Segment",
           "TextTokens", "TokenPacker", "build_pack", "cfg_dropout", "count_tokens",
           "dropout_rng", "layout", "remove_items"]
