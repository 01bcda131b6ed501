"""The decoder backbone: shared embedding, MoT layers, final norm per expert, LM head.

The caller (the full model) builds the input embeddings of a packed batch: text
embeddings from `embed_text`, ViT tokens after their connector and VAE latent tokens
after their input projection, each placed at its positions. `forward` runs the layers
over that flat [L, hidden] sequence and returns final-normed hidden states: the LM
head reads the understanding tokens (`lm_head(hidden[und])`), the generation head the
latent tokens.

Shared across experts: the token embedding (only text uses it) and the LM head (only
understanding tokens use it). The final norm belongs to the experts in mot mode (each
token is normed by its own expert's norm) and is shared in dense and moe modes, where
attention-side weights are shared too.
"""

from __future__ import annotations

import torch
from torch import nn

from weft.model.attention_backends import AttentionMask, build_attention_mask
from weft.model.config import MoTConfig
from weft.model.experts import MoTDecoderLayer, Rope, Routing, route
from weft.model.layers import RMSNorm, RotaryEmbedding
from weft.model.packed import PackedBatch


class MoTBackbone(nn.Module):
    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        self.config = config
        assert config.head_dim is not None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta,
                                      config.spatial_rope_pairs, config.spatial_rope_theta)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.ModuleDict({name: RMSNorm(config.hidden_size, config.rms_norm_eps)
                                   for name in config.attention_experts})
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (Qwen2's): normal(0, initializer_range) weights, zero biases,
        unit norm gains. Loading a checkpoint overwrites all of it."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [L] -> [L, hidden]."""
        return self.embed_tokens(input_ids)

    def rope(self, position_ids: torch.Tensor, spatial: torch.Tensor | None = None) -> Rope:
        """cos/sin [L, head_dim] for the positions (and, with spatial RoPE, each token's
        (row, col) in its image [L, 2]); computed once, shared by the layers."""
        return self.rotary(position_ids, spatial)

    def final_norm(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        return route(hidden, routing.groups(list(self.norm)), list(self.norm.values()))

    def forward(self, hidden: torch.Tensor, batch: PackedBatch,
                mask: AttentionMask | None = None) -> torch.Tensor:
        """Input embeddings [L, hidden] of `batch` -> final-normed hidden [L, hidden].

        `mask` defaults to the batch's mask for `config.attention_backend`; pass one
        built once when several forwards share a batch.
        """
        if mask is None:
            mask = build_attention_mask(batch, self.config.attention_backend)
        spatial = batch.spatial_coords() if self.config.spatial_rope_pairs else None
        return self.forward_routed(hidden, batch.position_ids, Routing.from_batch(batch),
                                   mask, spatial)

    def forward_routed(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                       routing: Routing, mask: AttentionMask,
                       spatial: torch.Tensor | None = None) -> torch.Tensor:
        """The same without a PackedBatch: positions (and spatial coordinates), routing
        and mask given directly."""
        if hidden.ndim != 2 or hidden.shape[0] != routing.length:
            raise ValueError(f"hidden {tuple(hidden.shape)} does not match routing over "
                             f"{routing.length} tokens")
        rope = self.rope(position_ids, spatial)
        for layer in self.layers:
            hidden = layer(hidden, rope, routing, mask)
        return self.final_norm(hidden, routing)
