"""The tiny Qwen2.5 / Qwen2.5-VL stand-ins load and run through the real transformers API.

Everything here goes through `from_pretrained` on a local directory, the same calls a
user with the real 7B/14B weights makes, so a pass means the inference code paths
(chat template, image token expansion, M-RoPE, generate) work end to end.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from weft.stages.infer.tiny_models import (
    MARKER,
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    make_tiny_models,
    save_tiny_qwen2_5,
    save_tiny_qwen2_5_vl,
)

pytestmark = pytest.mark.integration

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\ttabs\r\nCRLF 1234567 ",
    "Grüße aus Köln — “quotes”, naïve café; 日本語のテキスト, 한국어, emoji 🎬🦀.",
    "code: def f(x):\n    return x ** 2  # ok\n",
]


@pytest.fixture(scope="module")
def vocab(asset: Callable[[str], Path]) -> tuple[Path, Path]:
    return asset("gpt2-encoder.json"), asset("gpt2-vocab.bpe")


@pytest.fixture(scope="module")
def tiny(vocab: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny models, built once for the module."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def tokenizer(tiny: dict[str, Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["qwen2_5"])


@pytest.fixture(scope="module")
def processor(tiny: dict[str, Path]):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny["qwen2_5_vl"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tokenizer_round_trips_text(tokenizer, vocab: tuple[Path, Path]) -> None:
    built = build_bpe_tokenizer(*vocab)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert built.encode(text) == ids  # what was saved is what comes back
    # Qwen's pipeline NFC-normalises, so decomposed input comes back composed.
    decomposed = "cafe\u0301"
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    assert tokenizer.decode(tokenizer.encode(decomposed)) == composed
    assert len(tokenizer.encode(" the")) == 1  # GPT-2's merges, not a byte-per-token fallback


def test_special_tokens_are_single_ids(tokenizer, processor, tiny: dict[str, Path]) -> None:
    ids = {t: tokenizer.encode(t) for t in SPECIAL_TOKENS}
    assert all(len(v) == 1 for v in ids.values()), ids
    flat = {t: v[0] for t, v in ids.items()}
    assert list(flat.values()) == list(range(50256, 50256 + len(SPECIAL_TOKENS)))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    # Special tokens inside running text stay single ids and are skipped on request.
    text = "<|im_start|>user\nhi<|im_end|>"
    encoded = tokenizer.encode(text)
    assert encoded[0] == flat["<|im_start|>"] and encoded[-1] == flat["<|im_end|>"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nhi"
    # The VL processor's tokenizer is the same, and the model config points at its ids.
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    vl_config = json.loads((tiny["qwen2_5_vl"] / "config.json").read_text())
    assert vl_config["image_token_id"] == flat["<|image_pad|>"]
    assert vl_config["video_token_id"] == flat["<|video_pad|>"]
    assert vl_config["vision_start_token_id"] == flat["<|vision_start|>"]
    assert vl_config["vision_end_token_id"] == flat["<|vision_end|>"]
    for kind in ("qwen2_5", "qwen2_5_vl"):
        generation = json.loads((tiny[kind] / "generation_config.json").read_text())
        assert generation["eos_token_id"] == flat["<|im_end|>"]
        assert generation["pad_token_id"] == flat["<|endoftext|>"]
        config = json.loads((tiny[kind] / "config.json").read_text())
        vocab_size = config.get("vocab_size") or config["text_config"]["vocab_size"]
        assert vocab_size % 64 == 0 and len(tokenizer) <= vocab_size < len(tokenizer) + 64


def test_chat_template_string_and_list_content(tokenizer, processor) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    messages = [
        {"role": "system", "content": "Judge images."},
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A cat."},
    ]
    for render in (tokenizer.apply_chat_template, processor.apply_chat_template):
        text = render(messages, tokenize=False)
        assert text == ("<|im_start|>system\nJudge images.<|im_end|>\n"
                        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                        "What is shown?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n")
        assert text.count("<|image_pad|>") == 1


def test_text_model_greedy_generate_is_deterministic(tiny: dict[str, Path], tokenizer) -> None:
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["qwen2_5"]).eval()
    assert isinstance(model, Qwen2ForCausalLM)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write one word about rivers."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]
    runs = []
    for _ in range(2):
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        runs.append(out[0, prompt_len:].tolist())
    assert runs[0] == runs[1]
    assert 1 <= len(runs[0]) <= 6
    assert all(0 <= t < model.config.vocab_size for t in runs[0])
    assert isinstance(tokenizer.decode(runs[0], skip_special_tokens=True), str)


def test_vl_model_generates_from_two_images(tiny: dict[str, Path], processor) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["qwen2_5_vl"]).eval()
    images = [_image(64, 96, seed=1), _image(80, 120, seed=2)]  # (h, w): 96x64 and 120x80
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"},
        {"type": "text", "text": "Which of the two pictures is brighter?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 2  # one placeholder per image before expansion
    inputs = processor(text=[text], images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    merge = processor.image_processor.merge_size
    expected = int((grid.prod(-1) // merge**2).sum())
    n_pads = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_pads == expected > 0
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    prompt_len = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, prompt_len:].tolist()
    assert 1 <= len(new) <= 4
    assert new == again[0, prompt_len:].tolist()


def test_same_seed_writes_identical_weights(tiny: dict[str, Path], vocab: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    encoder_json, vocab_bpe = vocab
    rng_before = torch.random.get_rng_state()
    for kind, save in (("qwen2_5", save_tiny_qwen2_5), ("qwen2_5_vl", save_tiny_qwen2_5_vl)):
        reference = _sha(tiny[kind] / "model.safetensors")
        same = save(tmp_path / f"{kind}-0", 0, encoder_json=encoder_json, vocab_bpe=vocab_bpe)
        other = save(tmp_path / f"{kind}-1", 1, encoder_json=encoder_json, vocab_bpe=vocab_bpe)
        assert _sha(same / "model.safetensors") == reference
        assert _sha(other / "model.safetensors") != reference
        assert json.loads((other / MARKER).read_text())["seed"] == 1
    assert torch.equal(rng_before, torch.random.get_rng_state())  # global RNG untouched


def test_make_tiny_models_skips_complete_dirs(tiny: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from weft.cli import app

    root = tiny["qwen2_5"].parent
    stamps = {k: (p / "model.safetensors").stat().st_mtime_ns for k, p in tiny.items()}
    result = CliRunner().invoke(app, ["models", "make-tiny", "--out", str(root)])
    assert result.exit_code == 0, result.output
    assert str(tiny["qwen2_5_vl"]) in result.output and str(tiny["qwen2_5"]) in result.output
    assert {k: (p / "model.safetensors").stat().st_mtime_ns for k, p in tiny.items()} == stamps
