"""Parameter counts and FLOPs per token of the backbone, for MFU on active parameters.

A MoT model holds two experts but each token runs through one, so its FLOPs per
token are those of the dense model; MFU must count active, not total, parameters.

    flops_per_token = k * N_active + k' * num_layers * num_heads * head_dim * context

k = 6 (train: forward 2, backward 4) or 2 (forward only); the attention term counts
QK^T and AV (2 matmuls x 2 FLOPs per multiply-add per key), k' = 12 (train) or 4
(forward). `context` is the number of keys a query attends to on average. In a
packed batch with per-document masks that is far below the pack length; pass the
mean attended keys per query (the dense mask's `sum() / L`) for an honest number,
or the pack length for torchtitan's (upper-bound) convention.

N_active excludes the token embedding (a lookup, not a matmul) and counts the LM head
(vocab x hidden) for text tokens only: latent tokens leave through the small VAE
output projection, which is not part of the backbone.
"""

from __future__ import annotations

from typing import Literal

from weft.model.config import MoTConfig


def param_counts(config: MoTConfig) -> dict[str, int]:
    """Parameters by role; `total` equals the backbone's unique parameter count.

    shared: used by every token; und_expert / gen_expert: used only by that expert's
    tokens; active_text / active_latent: what one token of that kind runs through.
    """
    d, hd = config.hidden_size, config.head_dim
    assert hd is not None
    q_out, kv_out = config.num_heads * hd, config.num_kv_heads * hd
    attention = (d                                   # input norm
                 + d * q_out + q_out                 # q_proj (bias)
                 + 2 * (d * kv_out + kv_out)         # k_proj, v_proj (bias)
                 + q_out * d                         # o_proj
                 + (2 * hd if config.qk_norm else 0))  # q_norm, k_norm
    ffn = d + 3 * d * config.intermediate_size       # norm + gate/up/down
    final_norm = d
    layers = config.num_layers
    if config.layer_mode == "dense":
        shared, per_expert = layers * (attention + ffn) + final_norm, 0
    elif config.layer_mode == "moe":
        shared, per_expert = layers * attention + final_norm, layers * ffn
    else:
        shared, per_expert = 0, layers * (attention + ffn) + final_norm
    embedding = config.vocab_size * d
    lm_head = 0 if config.tie_word_embeddings else config.vocab_size * d
    non_embedding = shared + 2 * per_expert
    return {
        "total": embedding + lm_head + non_embedding,
        "embedding": embedding,
        "lm_head": lm_head,
        "non_embedding": non_embedding,
        "shared": shared,
        "und_expert": per_expert,
        "gen_expert": per_expert,
        "active_text": shared + per_expert + config.vocab_size * d,
        "active_latent": shared + per_expert,
    }


def flops_per_token(config: MoTConfig, seq_len: int,
                    mode: Literal["train", "forward"] = "train",
                    token: Literal["text", "latent"] = "text") -> int:
    """FLOPs for one token of `token` kind attending to `seq_len` keys (see module doc)."""
    counts = param_counts(config)
    active = counts["active_text"] if token == "text" else counts["active_latent"]
    assert config.head_dim is not None
    attention = config.num_layers * config.num_heads * config.head_dim * seq_len
    if mode == "train":
        return 6 * active + 12 * attention
    return 2 * active + 4 * attention
