"""The inference layer's pure parts: request keys, prompts, registry, request cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weft.stages.infer.cache import RequestCache
from weft.stages.infer.prompts import PromptTemplate, load_prompt
from weft.stages.infer.registry import ModelDirError, load_registry, model_revision
from weft.stages.infer.runner import request_from_row, request_row
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams

PROMPT = PromptTemplate(id="t", version=1, system="sys", user="Say {what}.", variables=["what"])


def _request(pixels: int = 0, temperature: float = 0.0, prompt: PromptTemplate = PROMPT
             ) -> ChatRequest:
    image = np.full((8, 6, 3), pixels, np.uint8)
    return ChatRequest(messages=prompt.messages(images=1, what="hi"), images=[image],
                       sampling=SamplingParams(temperature=temperature),
                       prompt_id=prompt.ref, prompt_hash=prompt.prompt_hash)


def test_request_key_changes_with_every_input_that_shapes_the_answer() -> None:
    base = _request().key("m", "r1")
    assert base == _request().key("m", "r1")
    assert base != _request(pixels=1).key("m", "r1")  # other pixels
    assert base != _request(temperature=0.5).key("m", "r1")  # other sampling
    assert base != _request().key("m", "r2")  # other weights
    assert base != _request().key("m2", "r1")  # other model
    reworded = PromptTemplate(id="t", version=1, system="sys", user="Tell {what}.",
                              variables=["what"])
    assert base != _request(prompt=reworded).key("m", "r1")  # other template text


def test_image_parts_must_match_images() -> None:
    with pytest.raises(ValueError, match="1 image parts"):
        ChatRequest(messages=PROMPT.messages(images=1, what="x"), images=[])


def test_request_rows_round_trip_pixels_and_messages() -> None:
    request = _request(pixels=7)
    back = request_from_row(request_row("k", request))
    assert back.messages == request.messages and back.sampling == request.sampling
    assert np.array_equal(back.images[0], request.images[0])
    assert back.key("m", "r") == request.key("m", "r")


def test_openai_messages_carry_images_as_jpeg_data_urls() -> None:
    messages = _request().openai_messages()
    part = messages[1]["content"][0]
    assert part["type"] == "image_url"
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert messages[1]["content"][1] == {"type": "text", "text": "Say hi."}


def test_prompt_templates_are_versioned_files_with_checked_placeholders() -> None:
    prompt = load_prompt("caption_transition")
    assert prompt.ref == "caption_transition@1" and prompt.variables == ["delta_s"]
    assert "1.5 seconds" in prompt.render(delta_s="1.5")
    with pytest.raises(KeyError, match="delta_s"):
        prompt.render()
    with pytest.raises(ValueError, match="placeholders"):
        PromptTemplate(id="x", version=1, user="{a} {b}", variables=["a"])


def test_request_cache_returns_stored_answers_and_skips_errors(tmp_path: Path) -> None:
    ok = Completion("a cat", 10, 3, "stop", 5.0)
    bad = Completion("", 0, 0, "error", 1.0, error="boom")
    with RequestCache(tmp_path / "c.sqlite") as cache:
        assert cache.put_many([("k1", "m", "r", "p", ok), ("k2", "m", "r", "p", bad)]) == 1
    with RequestCache(tmp_path / "c.sqlite") as cache:  # survives reopening
        found = cache.get_many(["k1", "k2", "k3"])
        assert set(found) == {"k1"} and len(cache) == 1
        assert found["k1"].text == "a cat" and found["k1"].cached


def _hf_dir(root: Path, weights: bytes = b"w") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_registry_resolves_paths_and_revisions_follow_the_weights(tmp_path: Path) -> None:
    a, b = _hf_dir(tmp_path / "a"), _hf_dir(tmp_path / "b", weights=b"other")
    reg = tmp_path / "models.yaml"
    reg.write_text(f"models:\n  vlm: {{path: {a}, kind: vlm}}\n  llm: {{path: {b}, kind: llm}}\n")
    registry = load_registry(reg)
    assert registry.check("vlm") != registry.check("llm")
    assert model_revision(registry.get("vlm")) == registry.check("vlm")
    with pytest.raises(KeyError, match="not in the registry"):
        registry.get("nope")
    (a / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="no weights"):
        registry.check("vlm")


def test_registry_rejects_unknown_fields_with_the_file_named(tmp_path: Path) -> None:
    reg = tmp_path / "models.yaml"
    reg.write_text("models:\n  m: {path: /x, kind: vlm, bakend: vllm}\n")
    with pytest.raises(ValueError, match=r"models\.yaml.*bakend"):
        load_registry(reg)
