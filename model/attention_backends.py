"""Attention over a packed batch with the generalized causal mask, by backend.

`build_attention_mask(batch, backend)` prepares what a backend needs once per batch
(every layer reuses it); `attend(q, k, v, mask)` runs attention. Shapes: q
[1, Hq, L, D], k and v [1, Hkv, L, D] with Hq a multiple of Hkv (grouped-query
attention); returns [1, Hq, L, D].

Backends:
- `dense`: the reference. A [L, L] boolean mask from `model/masks.py` through
  `scaled_dot_product_attention` (O(L^2) memory; fine for tests and short packs).
- `docs`: the same rule through SDPA, one call per group of whole packed documents
  (each group's own [g, g] mask). Documents never attend to each other, so the
  [L, L] mask is block-diagonal and everything off its blocks is wasted work: with
  documents of ~100 tokens in a 1k pack this does a fraction of dense's arithmetic
  for the same numbers. The CPU training choice (flex has no CPU backward).
- `flex`: FlexAttention with a `BlockMask` built from the same rule (`masks.allowed`
  is the `mask_mod`). Blocks of `block_size` x `block_size` that the rule leaves
  empty (other documents, later splits, hidden noised latents) are skipped, and the
  scores are never materialised.

How `flex` runs (`FlexMode`, chosen per mask; torch 2.14):
- CUDA: `compiled` by default. `flex_attention` is wrapped in `torch.compile(...,
  dynamic=False)` once per process; it compiles once per padded length (a new batch
  of the same length reuses the kernel, whatever its mask), so callers pad packs to
  a few fixed lengths (`padded_length`). Past dynamo's recompile limit (8 lengths by
  default) it falls back to the slow unfused path.
- CPU: inductor's CPU path compiles a fused forward that is correct and faster than
  dense SDPA from about 1k tokens (bench/attention.py), but costs ~30 s to compile
  per length and has NO backward (torch raises on CPU inputs that require grad).
  Eager (uncompiled) flex on CPU is correct but slower than dense SDPA at every
  length. So on CPU the auto choice is `compiled` for packs of at least
  `CPU_COMPILE_MIN_LENGTH` tokens and `sdpa` (the dense mask through SDPA, same
  numbers) below; and whenever q, k or v require grad on CPU, `attend` uses `sdpa`
  for that call (per document group, as `docs` does). `eager` is available explicitly
  (tests check the mask_mod with it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from weft.model.masks import allowed, dense_mask, mask_fields
from weft.model.packed import PackedBatch

Backend = Literal["dense", "docs", "flex"]
FlexMode = Literal["compiled", "eager", "sdpa"]

DEFAULT_BLOCK_SIZE = 128
CPU_COMPILE_MIN_LENGTH = 1024
DOC_GROUP_TOKENS = 128  # `docs`: consecutive documents are merged into groups this long

_compiled_flex: Callable[..., torch.Tensor] | None = None
_compiled_create_block_mask: Callable[..., Any] | None = None


class FlexUnavailableError(RuntimeError):
    """The flex backend was asked for but this torch cannot provide it."""


@dataclass(frozen=True)
class DocGroup:
    """Tokens [start, end) holding whole documents, and the rule over them ([g, g])."""

    start: int
    end: int
    mask: torch.Tensor


def doc_groups(fields: tuple[torch.Tensor, ...],
               group_tokens: int = DOC_GROUP_TOKENS) -> list[DocGroup]:
    """Consecutive documents merged greedily into groups of about `group_tokens` (a longer
    document is a group of its own); padding (doc -1) is left out: it sees only itself."""
    doc = fields[0]
    real = int((doc >= 0).sum())
    if bool((doc[:real] < 0).any()):
        raise ValueError("padding must come after every document")
    starts = [0, *(torch.nonzero(doc[1:real] != doc[:real - 1]).flatten() + 1).tolist()] \
        if real else []
    bounds = [*starts, real]
    groups: list[DocGroup] = []
    begin = 0
    for i in range(1, len(bounds)):
        end = bounds[i]
        if end - begin >= group_tokens or i == len(bounds) - 1:
            idx = torch.arange(begin, end, device=doc.device)
            groups.append(DocGroup(begin, end, allowed(idx[:, None], idx[None, :], *fields)))
            begin = end
    return groups


def _attend_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                   scale: float | None, gqa: bool) -> torch.Tensor:
    """SDPA per document group; a padding token's output is its own value (it sees itself)."""
    groups = mask.doc_groups()
    outs = [F.scaled_dot_product_attention(q[:, :, g.start:g.end], k[:, :, g.start:g.end],
                                           v[:, :, g.start:g.end], attn_mask=g.mask,
                                           scale=scale, enable_gqa=gqa) for g in groups]
    real = groups[-1].end if groups else 0
    if real < q.shape[2]:
        pad = v[:, :, real:]
        outs.append(pad.repeat_interleave(q.shape[1] // v.shape[1], dim=1) if gqa else pad)
    return torch.cat(outs, dim=2)


@dataclass
class AttentionMask:
    """A batch's mask in the form its backend wants.

    dense: the [L, L] boolean mask (dense backend, or built lazily by flex's `sdpa`
    mode). block_mask: the flex BlockMask; fields: the per-token tensors its mask_mod
    reads, kept so a dense mask can be derived when needed.
    """

    backend: Backend
    length: int
    dense: torch.Tensor | None = None
    block_mask: Any = None
    block_size: int | None = None
    flex_mode: FlexMode | None = None
    fields: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    groups: list[DocGroup] | None = field(default=None, repr=False)

    def doc_groups(self) -> list[DocGroup]:
        """The document groups and their masks, built once from the per-token fields."""
        if self.groups is None:
            if self.fields is None:
                raise ValueError("this mask keeps no per-token fields to group documents by")
            self.groups = doc_groups(self.fields)
        return self.groups

    def dense_mask(self) -> torch.Tensor:
        """The [L, L] boolean mask, built once from the per-token fields if needed."""
        if self.dense is None:
            if self.fields is None:
                raise ValueError("this mask keeps neither a dense mask nor its fields")
            idx = torch.arange(self.length, device=self.fields[0].device)
            self.dense = allowed(idx[:, None], idx[None, :], *self.fields)
        return self.dense


def _flex_api() -> Any:
    """The flex_attention module, or a clear error naming what is missing."""
    try:
        from torch.nn.attention import flex_attention as api
    except ImportError as exc:
        raise FlexUnavailableError(
            f"attention backend 'flex' needs torch.nn.attention.flex_attention "
            f"(torch >= 2.5); this torch is {torch.__version__}. Use "
            f"attention_backend='dense'.") from exc
    return api


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        _flex_api()
    except FlexUnavailableError:
        return False
    return True


def padded_length(n_tokens: int, multiple: int = DEFAULT_BLOCK_SIZE) -> int:
    """The static length to pad a pack of n_tokens to: the next multiple (at least one)."""
    if n_tokens < 0 or multiple <= 0:
        raise ValueError(f"padded_length({n_tokens}, {multiple}): need n >= 0, multiple > 0")
    return max(multiple, -(-n_tokens // multiple) * multiple)


def default_flex_mode(device: torch.device | str, length: int) -> FlexMode:
    """How flex runs when the caller does not say (see the module docstring)."""
    if torch.device(device).type == "cpu":
        return "compiled" if length >= CPU_COMPILE_MIN_LENGTH else "sdpa"
    return "compiled"


def build_attention_mask(batch: PackedBatch, backend: Backend = "dense",
                         block_size: int = DEFAULT_BLOCK_SIZE,
                         flex_mode: FlexMode | None = None) -> AttentionMask:
    """The mask `attend` needs for this batch (build once, reuse in every layer).

    For flex, the BlockMask lives on the batch's device; move the batch first.
    flex_mode None picks `default_flex_mode` for the batch's device and length.
    """
    if backend == "dense":
        return AttentionMask("dense", batch.length, dense=dense_mask(batch))
    if backend == "docs":
        mask = AttentionMask("docs", batch.length, fields=mask_fields(batch))
        mask.doc_groups()
        return mask
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}")
    fields = mask_fields(batch)
    doc, split, full, noised = fields

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                 kv_idx: torch.Tensor) -> torch.Tensor:
        return allowed(q_idx, kv_idx, doc, split, full, noised)

    n = batch.length
    device = batch.kind.device
    mode = flex_mode or default_flex_mode(device, n)
    create = _create_block_mask_function(compiled=mode == "compiled")
    block_mask = create(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device,
                        BLOCK_SIZE=block_size)
    return AttentionMask("flex", n, block_mask=block_mask, block_size=block_size,
                         flex_mode=mode, fields=fields)


def _flex_function(compiled: bool) -> Callable[..., torch.Tensor]:
    """flex_attention, compiled once per process (lazily: importing compiles nothing)."""
    global _compiled_flex
    api = _flex_api()
    if not compiled:
        return api.flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(api.flex_attention, dynamic=False)
    return _compiled_flex


def _create_block_mask_function(compiled: bool) -> Callable[..., Any]:
    """create_block_mask; compiled, it never materialises the [L, L] mask.

    Eager, it evaluates the mask_mod over the whole grid (~10 bytes per pair at its
    peak: 3 GB at 16k tokens, ~11 GB at 32k); compiled, it fuses the evaluation with
    the block reduction (under 1 GB at 16k on CPU) and, like flex, compiles once per
    length.
    """
    global _compiled_create_block_mask
    api = _flex_api()
    if not compiled:
        return api.create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(api.create_block_mask)
    return _compiled_create_block_mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
           scale: float | None = None) -> torch.Tensor:
    """Attention of q over k/v under `mask` (built by `build_attention_mask`)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale,
                                              enable_gqa=gqa)
    if mask.backend == "docs":
        return _attend_groups(q, k, v, mask, scale, gqa)
    if mask.backend != "flex":
        raise ValueError(f"unknown attention backend {mask.backend!r}")
    if q.shape[2] != mask.length or k.shape[2] != mask.length:
        raise ValueError(f"flex mask is for {mask.length} tokens; got q {q.shape[2]}, "
                         f"k {k.shape[2]}")
    mode = mask.flex_mode
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
    if q.device.type == "cpu" and needs_grad:  # FlexAttention has no CPU backward (2.14)
        return _attend_groups(q, k, v, mask, scale, gqa)
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense_mask(),
                                              scale=scale, enable_gqa=gqa)
    flex = _flex_function(compiled=mode == "compiled")
    with warnings.catch_warnings():
        # Eager was asked for explicitly; torch's "use torch.compile" warning is noise.
        warnings.filterwarnings("ignore", message=".*flex_attention called without "
                                "torch.compile.*")
        return flex(q, k, v, block_mask=mask.block_mask, scale=scale, enable_gqa=gqa)


def block_density(mask: AttentionMask) -> float:
    """Fraction of (block x block) tiles the backend computes: 1.0 for dense."""
    if mask.backend == "dense":
        return 1.0
    if mask.backend == "docs":
        return sum((g.end - g.start) ** 2 for g in mask.doc_groups()) / mask.length ** 2
    return 1.0 - mask.block_mask.sparsity() / 100.0


def describe_backend(backend: Backend, device: torch.device | str,
                     block_size: int = DEFAULT_BLOCK_SIZE,
                     length: int | None = None) -> str:
    """One line for start-up logs: backend, how it runs, device, block size."""
    device = torch.device(device)
    if backend == "dense":
        return f"attention: dense (SDPA with an [L, L] boolean mask) on {device}"
    if backend == "docs":
        return (f"attention: docs (SDPA per group of whole documents, ~{DOC_GROUP_TOKENS} "
                f"tokens a group) on {device}")
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}")
    _flex_api()
    head = f"attention: flex (FlexAttention BlockMask, block {block_size}) on {device}, "
    if device.type != "cpu":
        return head + ("torch.compile'd once, dynamic=False: one compile per padded "
                       "length")
    if length is not None:
        mode = default_flex_mode(device, length)
        how = {"compiled": "compiled forward (inductor CPU)",
               "sdpa": "dense-mask SDPA (short pack)"}[mode]
        head += f"{how} at {length} tokens; "
    return head + (f"compiled forward from {CPU_COMPILE_MIN_LENGTH} tokens, dense-mask SDPA "
                   "below, SDPA per document group for backward (no CPU backward in torch "
                   f"{torch.__version__.split('+')[0]})")
