"""The decoder backbone's config: a Qwen2.5-style LLM with a `dense | moe | mot` switch.

Defaults are BAGEL's 7B-active backbone (Qwen2.5-7B shape, QK-norm on, two experts).
`MoTConfig.from_qwen2_config` reads a Hugging Face Qwen2/Qwen2.5 `config.json` and
sets `qk_norm=False` so a loaded checkpoint reproduces Qwen2 exactly; turn it on
(`qk_norm=True`) to train BAGEL-style, where the q/k norms start at ones.

This config covers the language backbone only. The ViT, VAE and rectified-flow parts
keep their own configs next to their modules; the full model's config composes them
with this one when the model is assembled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LayerMode = Literal["dense", "moe", "mot"]
AttentionBackendName = Literal["dense", "docs", "flex"]


class MoTConfig(BaseModel):
    """Shape and switches of the decoder backbone."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(152064, gt=0, description="Token embedding / LM head rows.")
    hidden_size: int = Field(3584, gt=0, description="Residual stream width.")
    intermediate_size: int = Field(18944, gt=0, description="SwiGLU inner width.")
    num_layers: int = Field(28, gt=0, description="Decoder layers.")
    num_heads: int = Field(28, gt=0, description="Query heads.")
    num_kv_heads: int = Field(4, gt=0, description="Key/value heads (grouped-query "
                              "attention); must divide num_heads.")
    head_dim: int | None = Field(None, gt=0, description="Per-head width; None means "
                                 "hidden_size // num_heads (filled in on validation).")
    rope_theta: float = Field(1_000_000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    qk_norm: bool = Field(True, description="RMSNorm over head_dim on q and k before RoPE "
                          "(BAGEL adds it to Qwen2.5 for training stability).")
    tie_word_embeddings: bool = Field(False, description="LM head shares the token "
                                      "embedding matrix.")
    layer_mode: LayerMode = Field("mot", description="dense: one set of weights for every "
                                  "token; moe: shared attention, one FFN per expert; mot: "
                                  "every layer weight per expert (BAGEL).")
    attention_backend: AttentionBackendName = Field(
        "flex", description="flex: FlexAttention BlockMask (training); docs: SDPA per "
        "group of whole documents (CPU training); dense: the [L, L] reference mask (tests).")
    spatial_rope_pairs: int = Field(0, ge=0, description="Rotary pairs per image axis that "
                                    "rotate by a token's row / column in its image instead "
                                    "of its sequence position (text: 0). 0: BAGEL's RoPE, "
                                    "one position per image; the rest of the head_dim/2 "
                                    "pairs keep the sequence position (the lowest "
                                    "frequencies are the ones given to the image axes, "
                                    "which a loaded LLM checkpoint then relearns).")
    spatial_rope_theta: float = Field(100.0, gt=1, description="Base of the image-axis "
                                      "frequencies; an image spans 8 units along each axis.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal init of "
                                     "linear and embedding weights (random init only).")

    @model_validator(mode="after")
    def _check_shapes(self) -> MoTConfig:
        problems = []
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                                f"num_heads {self.num_heads} (or set head_dim)")
            else:
                self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of "
                            f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim is not None and self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        elif self.head_dim is not None and 2 * self.spatial_rope_pairs >= self.head_dim // 2:
            problems.append(f"spatial_rope_pairs {self.spatial_rope_pairs} per image axis "
                            f"leave none of head_dim / 2 = {self.head_dim // 2} rotary pairs "
                            "for the sequence position")
        if problems:
            raise ValueError("invalid MoTConfig: " + "; ".join(problems))
        return self

    @property
    def experts(self) -> tuple[str, ...]:
        """Expert names in routing order: understanding first."""
        return ("und",) if self.layer_mode == "dense" else ("und", "gen")

    @property
    def attention_experts(self) -> tuple[str, ...]:
        """Experts that own attention weights (and the final norm): only mot splits them."""
        return ("und", "gen") if self.layer_mode == "mot" else ("und",)

    @classmethod
    def from_qwen2_config(cls, hf_config: dict[str, Any] | str | Path,
                          **overrides: Any) -> MoTConfig:
        """Build from a Qwen2/Qwen2.5 `config.json` (a dict, the file, or its directory).

        qk_norm defaults to False here so the checkpoint's logits are reproduced exactly;
        `overrides` set any field (layer_mode, qk_norm, attention_backend, ...).
        """
        if not isinstance(hf_config, dict):
            path = Path(hf_config)
            if path.is_dir():
                path = path / "config.json"
            hf_config = json.loads(path.read_text())
        model_type = hf_config.get("model_type")
        if model_type not in ("qwen2", None):
            raise ValueError(f"expected a Qwen2 config, got model_type={model_type!r}")
        if hf_config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SiLU (SwiGLU) is supported, got {hf_config['hidden_act']}")
        if hf_config.get("use_sliding_window", False):
            raise ValueError("Qwen2 sliding-window attention is not supported")
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"only default RoPE is supported, got rope_type={rope_type!r}")
        heads = hf_config["num_attention_heads"]
        values: dict[str, Any] = {
            "vocab_size": hf_config["vocab_size"],
            "hidden_size": hf_config["hidden_size"],
            "intermediate_size": hf_config["intermediate_size"],
            "num_layers": hf_config["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": hf_config.get("num_key_value_heads") or heads,
            "head_dim": hf_config.get("head_dim"),
            "rope_theta": rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
            "rms_norm_eps": hf_config.get("rms_norm_eps", 1e-6),
            "tie_word_embeddings": hf_config.get("tie_word_embeddings", False),
            "initializer_range": hf_config.get("initializer_range", 0.02),
            "qk_norm": False,
        }
        values.update(overrides)
        return cls(**values)
