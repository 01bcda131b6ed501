"""The Mixture-of-Transformers decoder layer: experts routed by token kind.

Routing is fixed, not learned: every VAE latent token goes to the generation expert
(`gen`), everything else (text, markers, ViT tokens, padding) to the understanding
expert (`und`). A `Routing` holds the two index tensors over the flat [L, D] hidden
states; `route` gathers each expert's rows (index_select), runs the expert on them and
scatters the results back (index_copy_), so a layer costs a few gathers, never a
Python loop over tokens. A part with a single expert skips the gather and runs on
every row.

What each `layer_mode` gives an expert (`MoTConfig.layer_mode`):

    dense  one AttentionExpert + one FeedForwardExpert serve every token
    moe    one shared AttentionExpert; a FeedForwardExpert per expert. The FFN's
           pre-norm (post-attention RMSNorm) is duplicated with it: its gain scales
           the FFN input channel by channel, so it belongs to the FFN. (The paper's
           MoE ablation duplicates the FFN only; the input norm feeds the shared
           q/k/v and stays shared.)
    mot    everything per expert: input norm, q/k/v/o, q/k norms, post-attention
           norm and MLP. Attention is still ONE attention over the whole packed
           sequence: each expert projects its own tokens, the results are scattered
           into full-length q/k/v, attended once, and each expert's o_proj takes its
           own tokens back.

KV-cached inference calls the two halves of a layer around its own attention:

    q, k, v = layer.project_qkv(x_new, rope_new, routing_new)   # [1, H*, n_new, D]
    k_all, v_all = cache.append(layer_index, k, v)              # roped keys
    out = attend(q, k_all, v_all, mask_new_vs_all, layer.scale)
    x_new = layer.finish(x_new, out, routing_new)

where x_new holds only the new tokens and `routing_new = Routing.from_kind(kinds)`
indexes into them. `forward` is exactly these calls with the full packed sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weft.model.attention_backends import AttentionMask, attend
from weft.model.config import MoTConfig
from weft.model.layers import RMSNorm, SwiGLU, apply_rotary
from weft.model.packed import PackedBatch, TokenKind

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Routing:
    """Which rows of the flat hidden states each expert owns (a partition of [0, L))."""

    und_index: torch.Tensor
    gen_index: torch.Tensor

    def __post_init__(self) -> None:
        if self.und_index.ndim != 1 or self.gen_index.ndim != 1:
            raise ValueError("routing indices must be 1-D")

    @property
    def length(self) -> int:
        return int(self.und_index.numel() + self.gen_index.numel())

    def groups(self, experts: Sequence[str]) -> list[torch.Tensor]:
        """Index tensors in the order of `experts` ("und", "gen")."""
        return [self.und_index if name == "und" else self.gen_index for name in experts]

    @classmethod
    def from_batch(cls, batch: PackedBatch) -> Routing:
        return cls(batch.und_index, batch.gen_index)

    @classmethod
    def from_kind(cls, kind: torch.Tensor) -> Routing:
        """From per-token kinds alone (inference with new tokens only); same rule as
        `PackedBatch.gen_index`: VAE latents (clean or noised) go to `gen`."""
        gen = (kind == TokenKind.VAE_CLEAN) | (kind == TokenKind.VAE_NOISED)
        return cls(torch.nonzero(~gen).flatten(), torch.nonzero(gen).flatten())


def route(x: torch.Tensor, groups: Sequence[torch.Tensor],
          experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Apply experts[i] to the rows x[groups[i]] and put the outputs back in place.

    x: [L, ...]. With one expert it runs on all rows (groups ignored). With several,
    the groups must partition [0, L): every output row is written by exactly one expert.
    """
    if len(experts) == 1:
        return experts[0](x)
    if sum(int(g.numel()) for g in groups) != x.shape[0]:
        raise ValueError(f"routing covers {sum(int(g.numel()) for g in groups)} rows, "
                         f"hidden states have {x.shape[0]}")
    out: torch.Tensor | None = None
    for index, expert in zip(groups, experts, strict=True):
        y = expert(x.index_select(0, index))
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, index, y)
    assert out is not None
    return out


class AttentionExpert(nn.Module):
    """One expert's attention weights: input norm, q/k/v (with bias), q/k norms, o_proj."""

    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        hd = config.head_dim
        assert hd is not None
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_heads,
                                                            config.num_kv_heads, hd)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(config.num_heads * hd, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, H + 2*Hkv, head_dim]: q, k (QK-normed, not yet roped), v.

        Concatenated so `route` scatters the three with one index_copy_.
        """
        n = x.shape[0]
        h = self.input_norm(x)
        q = self.q_norm(self.q_proj(h).view(n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(h).view(n, self.num_kv_heads, self.head_dim)
        return torch.cat([q, k, v], dim=1)


class FeedForwardExpert(nn.Module):
    """One expert's FFN with its pre-norm (Qwen2's post_attention_layernorm)."""

    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


class MoTDecoderLayer(nn.Module):
    """Pre-norm attention + residual, pre-norm SwiGLU + residual, experts by token kind."""

    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({name: AttentionExpert(config)
                                        for name in config.attention_experts})
        self.feed_forward = nn.ModuleDict({name: FeedForwardExpert(config)
                                           for name in config.experts})
        assert config.head_dim is not None
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5

    def project_qkv(self, x: torch.Tensor, rope: Rope, routing: Routing
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [L, hidden] -> q [1, H, L, D], k and v [1, Hkv, L, D]; q and k roped."""
        experts = list(self.attention.values())
        qkv = route(x, routing.groups(list(self.attention)), [e.qkv for e in experts])
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return (q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, routing: Routing
               ) -> torch.Tensor:
        """Each expert's o_proj on its tokens, residual; each expert's FFN, residual.

        attn_out: [1, H, L, D] from attention over the q of `project_qkv`.
        """
        out = attn_out.squeeze(0).transpose(0, 1).reshape(x.shape[0], -1)
        x = x + route(out, routing.groups(list(self.attention)),
                      [e.o_proj for e in self.attention.values()])
        return x + route(x, routing.groups(list(self.feed_forward)),
                         list(self.feed_forward.values()))

    def forward(self, x: torch.Tensor, rope: Rope, routing: Routing,
                mask: AttentionMask) -> torch.Tensor:
        """x [L, hidden] (the whole packed sequence) -> [L, hidden]."""
        q, k, v = self.project_qkv(x, rope, routing)
        return self.finish(x, attend(q, k, v, mask, self.scale), routing)
