"""A KV cache for inference: keys and values of every layer, per context, plus the fields
the attention rule reads, so new tokens are masked against cached ones exactly as in a
packed training forward.

One `KVCache` is one independent context (a batch of B contexts is B caches). Per
layer it holds roped keys and values [1, Hkv, n, D]; per token it keeps kind, RoPE
position, split id and the full-attention flag. `mask(chunk)` applies the rule of
`model/masks.py` (`allowed`) to the cached tokens followed by a chunk of new ones:
cached tokens always lie in earlier splits, so a new token sees every cached token,
and inside the chunk text is causal and an image split is full.

Noised latents are never stored: the rule hides them from every later split, so they
would only be dead weight. A generation step runs its noised tokens against the cache
with `store=False`; `commit` refuses a chunk that holds any.

Design choices (correctness first, on CPU):
- `cached_forward` batches the contexts for everything but attention: the new tokens
  of all contexts are concatenated into one flat sequence for the projections, norms
  and MLPs (where the FLOPs are), and attention loops over the contexts, each over its
  own cache with a dense [n_new, n_cached + n_new] mask. No padding, no wasted work;
  the cost is one small attention call per context and layer.
- Appending concatenates into new tensors instead of writing into a preallocated
  buffer. That copies the cache once per append (quadratic over a long decode), but it
  makes cached tensors immutable, so `fork()` is a cheap shallow copy: two contexts
  with a common prefix (a classifier-free-guidance context and the full one) share
  their tensors until they diverge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weft.model.attention_backends import AttentionMask, attend
from weft.model.backbone import MoTBackbone
from weft.model.experts import Routing
from weft.model.masks import allowed
from weft.model.packed import TokenKind, image_token_coords


@dataclass(frozen=True)
class Chunk:
    """New tokens for one cache, all shape [m]: kind, RoPE position, split id, full flag;
    spatial [m, 2]: each image token's (row, col) in its image for spatial RoPE (text: 0)."""

    kind: torch.Tensor
    positions: torch.Tensor
    split_ids: torch.Tensor
    full: torch.Tensor
    spatial: torch.Tensor

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @property
    def noised(self) -> torch.Tensor:
        return self.kind == TokenKind.VAE_NOISED


class KVCache:
    """Keys/values per layer and per-token fields of one context (see the module doc)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        empty = torch.zeros(0, dtype=torch.long)
        self.kind, self.positions, self.split_ids = empty, empty, empty
        self.full = torch.zeros(0, dtype=torch.bool)
        self.next_position = 0
        self.next_split = 0

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def fork(self) -> KVCache:
        """A copy that can grow on its own; it shares the (never mutated) tensors."""
        other = KVCache(self.num_layers)
        other.keys, other.values = list(self.keys), list(self.values)
        other.kind, other.positions = self.kind, self.positions
        other.split_ids, other.full = self.split_ids, self.full
        other.next_position, other.next_split = self.next_position, self.next_split
        return other

    # ---- planning new tokens ------------------------------------------------------------
    def text_chunk(self, n: int) -> Chunk:
        """n text tokens: one causal split at the next n positions."""
        if n < 1:
            raise ValueError("a text chunk needs at least one token")
        positions = torch.arange(self.next_position, self.next_position + n)
        return Chunk(torch.full((n,), int(TokenKind.TEXT)), positions,
                     torch.full((n,), self.next_split), torch.zeros(n, dtype=torch.bool),
                     torch.zeros(n, 2))

    def image_chunk(self, parts: Sequence[tuple[TokenKind, tuple[int, int]]]) -> Chunk:
        """One image as consecutive full-attention splits (e.g. clean latents then ViT),
        each part a (kind, token grid), every token at the same RoPE position: the next
        one (and at its place in the grid for spatial RoPE)."""
        kinds, splits, grids = [], [], []
        for offset, (kind, (rows, cols)) in enumerate(parts):
            if rows < 1 or cols < 1:
                raise ValueError(f"an image part of {rows}x{cols} tokens")
            kinds += [int(kind)] * (rows * cols)
            splits += [self.next_split + offset] * (rows * cols)
            grids.append((rows, cols))
        m = len(kinds)
        return Chunk(torch.tensor(kinds), torch.full((m,), self.next_position),
                     torch.tensor(splits), torch.ones(m, dtype=torch.bool),
                     image_token_coords(grids))

    # ---- attention --------------------------------------------------------------------
    def mask(self, chunk: Chunk) -> torch.Tensor:
        """[m, n + m] bool: which cached-then-new tokens each new token may attend to."""
        n, m = len(self), len(chunk)
        split = torch.cat([self.split_ids, chunk.split_ids])
        full = torch.cat([self.full, chunk.full])
        noised = torch.cat([torch.zeros(n, dtype=torch.bool), chunk.noised])
        doc = torch.zeros(n + m, dtype=torch.long)
        q = torch.arange(n, n + m)[:, None]
        kv = torch.arange(n + m)[None, :]
        return allowed(q, kv, doc, split, full, noised)

    def extended(self, layer: int, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys/values of `layer` followed by the new ones [1, Hkv, m, D]."""
        cached_k, cached_v = self.keys[layer], self.values[layer]
        if cached_k is None or cached_v is None:
            return k, v
        return torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)

    def commit(self, chunk: Chunk, keys: Sequence[torch.Tensor],
               values: Sequence[torch.Tensor]) -> None:
        """Keep the chunk: `keys`/`values` per layer are the extended [1, Hkv, n + m, D]."""
        if bool(chunk.noised.any()):
            raise ValueError("noised latents are hidden from later splits; never cache them")
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"need keys and values for {self.num_layers} layers")
        self.keys, self.values = list(keys), list(values)
        self.kind = torch.cat([self.kind, chunk.kind])
        self.positions = torch.cat([self.positions, chunk.positions])
        self.split_ids = torch.cat([self.split_ids, chunk.split_ids])
        self.full = torch.cat([self.full, chunk.full])
        self.next_position = int(chunk.positions.max()) + 1
        self.next_split = int(chunk.split_ids.max()) + 1


@dataclass(frozen=True)
class Job:
    """One context's share of a batched cached forward: its cache, new tokens, inputs."""

    cache: KVCache
    chunk: Chunk
    hidden: torch.Tensor  # [m, hidden] input embeddings of the chunk


def cached_forward(backbone: MoTBackbone, jobs: Sequence[Job], store: bool
                   ) -> list[torch.Tensor]:
    """Run the chunks of several contexts through the layers against their caches.

    Returns the final-normed hidden states [m_i, hidden] of each job's new tokens.
    With `store`, each cache keeps its chunk (keys, values and fields); without it the
    caches are left as they were (a generation step's noised latents). A cache may
    appear in at most one job.
    """
    if not jobs:
        return []
    if len({id(job.cache) for job in jobs}) != len(jobs):
        raise ValueError("a cache may appear in only one job of a forward")
    device = jobs[0].hidden.device
    sizes = [len(job.chunk) for job in jobs]
    x = torch.cat([job.hidden for job in jobs])
    kind = torch.cat([job.chunk.kind for job in jobs]).to(device)
    routing = Routing.from_kind(kind)
    spatial = torch.cat([job.chunk.spatial for job in jobs]).to(device) \
        if backbone.config.spatial_rope_pairs else None
    rope = backbone.rope(torch.cat([job.chunk.positions for job in jobs]).to(device), spatial)
    masks = [AttentionMask("dense", len(job.cache) + len(job.chunk),
                           dense=job.cache.mask(job.chunk).to(device)) for job in jobs]
    new_keys: list[list[torch.Tensor]] = [[] for _ in jobs]
    new_values: list[list[torch.Tensor]] = [[] for _ in jobs]
    for index, layer in enumerate(backbone.layers):
        q, k, v = layer.project_qkv(x, rope, routing)
        outs = []
        parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2),
                    strict=True)
        for j, (job, (qj, kj, vj)) in enumerate(zip(jobs, parts, strict=True)):
            k_all, v_all = job.cache.extended(index, kj, vj)
            if store:
                new_keys[j].append(k_all)
                new_values[j].append(v_all)
            outs.append(attend(qj, k_all, v_all, masks[j], layer.scale))
        x = layer.finish(x, torch.cat(outs, dim=2), routing)
    x = backbone.final_norm(x, routing)
    if store:
        for job, keys, values in zip(jobs, new_keys, new_values, strict=True):
            job.cache.commit(job.chunk, keys, values)
    return list(x.split(sizes))
