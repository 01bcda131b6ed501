"""Load a Hugging Face Qwen2/Qwen2.5 checkpoint into a `MoTBackbone`.

The checkpoint fills the understanding expert and the shared parts (embedding, final
norm, LM head); the generation expert starts as an exact copy of the understanding
one (BAGEL's init): in mot mode every per-expert weight, in moe mode the FFN and its
norm. Reads only safetensors (`model.safetensors`, or shards listed by
`model.safetensors.index.json`); never pickle.

Strict: the checkpoint's `config.json` must describe the backbone's shape, every
backbone parameter must be filled, and every checkpoint tensor must be used; all
problems are reported in one `CheckpointError`. Two documented exceptions:

- QK-norm: Qwen2 has none. With `qk_norm=True` the q/k norm gains are set to ones.
  That is NOT the identity (it rescales q and k to unit RMS per head), so such a
  model does not reproduce Qwen2's logits until trained; `MoTConfig.from_qwen2_config`
  sets `qk_norm=False` for an exact match.
- Tied embeddings: a checkpoint saved tied has no `lm_head.weight`; an untied
  backbone then gets a copy of the embedding (untying). The reverse (tying an untied
  checkpoint) is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from weft.model.backbone import MoTBackbone
from weft.model.config import MoTConfig

_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.und.weight",
    "lm_head.weight": "lm_head.weight",
}
_PER_LAYER = {
    "input_layernorm.weight": "attention.und.input_norm.weight",
    "self_attn.q_proj.weight": "attention.und.q_proj.weight",
    "self_attn.q_proj.bias": "attention.und.q_proj.bias",
    "self_attn.k_proj.weight": "attention.und.k_proj.weight",
    "self_attn.k_proj.bias": "attention.und.k_proj.bias",
    "self_attn.v_proj.weight": "attention.und.v_proj.weight",
    "self_attn.v_proj.bias": "attention.und.v_proj.bias",
    "self_attn.o_proj.weight": "attention.und.o_proj.weight",
    "post_attention_layernorm.weight": "feed_forward.und.norm.weight",
    "mlp.gate_proj.weight": "feed_forward.und.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "feed_forward.und.mlp.up_proj.weight",
    "mlp.down_proj.weight": "feed_forward.und.mlp.down_proj.weight",
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints saved; recomputed from the config here.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the backbone (every problem listed)."""


@dataclass
class LoadReport:
    """What `load_qwen2_into` did besides copying checkpoint tensors."""

    loaded: list[str] = field(default_factory=list)  # backbone names filled from the file
    copied: list[str] = field(default_factory=list)  # generation-expert names copied from und
    initialized: list[str] = field(default_factory=list)  # set to defaults (q/k norms)
    untied_lm_head: bool = False  # lm_head copied from the embedding


def backbone_name(checkpoint_key: str) -> str | None:
    """The backbone parameter a Qwen2 checkpoint key fills, or None if it has none."""
    if checkpoint_key in _TOP_LEVEL:
        return _TOP_LEVEL[checkpoint_key]
    match = _LAYER_KEY.fullmatch(checkpoint_key)
    if match and match.group(2) in _PER_LAYER:
        return f"layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}"
    return None


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {directory}")
    return files


def _scan(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """key -> (file, shape), from the headers only."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in found:
                    raise CheckpointError(f"{key} appears in {found[key][0].name} and "
                                          f"{path.name}")
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    return found


def _check_config(config: MoTConfig, directory: Path) -> bool:
    """Compare the checkpoint's config.json with the backbone's; returns its tie flag."""
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json")
    hf_config = json.loads(path.read_text())
    theirs = MoTConfig.from_qwen2_config(hf_config)
    problems = [f"{name}: checkpoint {getattr(theirs, name)}, backbone {getattr(config, name)}"
                for name in _SHAPE_FIELDS if getattr(theirs, name) != getattr(config, name)]
    if config.tie_word_embeddings and not theirs.tie_word_embeddings:
        problems.append("backbone ties embeddings but the checkpoint has its own lm_head")
    if problems:
        raise CheckpointError(f"{directory} does not match the backbone config: "
                              + "; ".join(problems))
    return theirs.tie_word_embeddings


def _is_qk_norm(name: str) -> bool:
    return name.endswith((".q_norm.weight", ".k_norm.weight"))


def _und_source(name: str) -> str | None:
    """For a generation-expert parameter, the understanding one it is copied from."""
    parts = name.split(".")
    if "gen" not in parts:
        return None
    return ".".join("und" if p == "gen" else p for p in parts)


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_qwen2_into(backbone: MoTBackbone, directory: str | Path) -> LoadReport:
    """Fill `backbone` from a Qwen2/Qwen2.5 safetensors checkpoint directory."""
    directory = Path(directory)
    checkpoint_tied = _check_config(backbone.config, directory)
    found = _scan(checkpoint_files(directory))
    params = dict(backbone.named_parameters())  # tied lm_head appears once, as embed_tokens
    tied = backbone.config.tie_word_embeddings

    plan: dict[str, str] = {}  # backbone name -> checkpoint key
    unexpected, mismatched = [], []
    for key, (_, shape) in found.items():
        name = backbone_name(key)
        if name == "lm_head.weight" and tied and checkpoint_tied:
            continue  # a tied checkpoint that also saved the (identical) head
        if name is None or name not in params:
            if not _IGNORED.fullmatch(key):
                unexpected.append(key)
            continue
        if tuple(params[name].shape) != shape:
            mismatched.append(f"{key} {list(shape)} vs {name} {list(params[name].shape)}")
            continue
        plan[name] = key

    report = LoadReport()
    if not tied and "lm_head.weight" not in plan and checkpoint_tied:
        report.untied_lm_head = True
    missing = [name for name in params
               if name not in plan and _und_source(name) is None and not _is_qk_norm(name)
               and not (name == "lm_head.weight" and report.untied_lm_head)]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"cannot load {directory}: " + "; ".join(problems))

    by_file: dict[Path, list[str]] = {}
    for name, key in plan.items():
        by_file.setdefault(found[key][0], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                params[name].copy_(f.get_tensor(plan[name]))
                report.loaded.append(name)

    if report.untied_lm_head:
        params["lm_head.weight"].copy_(params["embed_tokens.weight"])
    for name, param in params.items():
        if _is_qk_norm(name) and _und_source(name) is None:
            param.fill_(1.0)
            report.initialized.append(name)
    report.copied += copy_understanding_expert(backbone)  # after the q/k norms
    return report


@torch.no_grad()
def copy_understanding_expert(backbone: MoTBackbone) -> list[str]:
    """Set every generation-expert parameter to its understanding twin (BAGEL starts both
    experts from one LLM); returns the names set."""
    params = dict(backbone.named_parameters())
    copied = []
    for name, param in params.items():
        source = _und_source(name)
        if source is not None:
            param.copy_(params[source])
            copied.append(name)
    return copied
