"""What every inference backend takes and returns.

A request is an OpenAI-style chat (`messages`, whose `{"type": "image"}` parts
refer to `images` in order) plus sampling parameters. Images travel already
decoded and resized (uint8 H×W×3 arrays) so no backend decodes media; the
HTTP and vLLM paths encode them to data URLs in their CPU preprocess step.

A request's `key` hashes the model identity, the prompt template, the sampling
parameters and the exact input (text and pixels): it is the request cache's
key, so the same question to the same model is never paid for twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ids import hash_of


class SamplingParams(BaseModel):
    """Decoding settings; greedy by default so outputs are reproducible."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(32, ge=1, description="new tokens generated at most")
    seed: int = Field(0, description="sampling seed (ignored when greedy)")
    repetition_penalty: float = Field(1.0, gt=0)


def image_digest(image: np.ndarray) -> str:
    """sha256 of an image's shape and pixels: the image's part of a request key."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def image_data_url(image: np.ndarray, quality: int = 95) -> str:
    """A JPEG data URL for OpenAI-compatible servers and vLLM."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class ChatRequest:
    """One prompt: chat messages, the images their image parts refer to, sampling params."""

    messages: list[dict[str, Any]]
    images: list[np.ndarray] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt_id: str = ""  # template id@version, recorded in the ledger
    prompt_hash: str = ""  # hash of the template text

    def __post_init__(self) -> None:
        parts = sum(1 for m in self.messages if isinstance(m.get("content"), list)
                    for p in m["content"] if p.get("type") == "image")
        if parts != len(self.images):
            raise ValueError(f"{parts} image parts in the messages but {len(self.images)} images")

    def key(self, model_id: str, revision: str) -> str:
        """The request cache key: model, revision, prompt template, sampling, input."""
        return hash_of("chat", model_id, revision, self.prompt_id, self.prompt_hash,
                       self.sampling.model_dump(mode="json"), self.messages,
                       [image_digest(im) for im in self.images], length=40)

    def openai_messages(self) -> list[dict[str, Any]]:
        """The messages with image parts as `image_url` data URLs (OpenAI chat format)."""
        images = iter(self.images)
        out = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, list):
                content = [{"type": "image_url", "image_url": {"url": image_data_url(next(images))}}
                           if p.get("type") == "image" else p for p in content]
            out.append({**message, "content": content})
        return out


@dataclass(frozen=True)
class Completion:
    """A backend's answer to one request, with what the ledger records about it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    latency_ms: float
    cached: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "latency_ms": self.latency_ms,
                "error": self.error}

    @classmethod
    def from_json(cls, data: dict[str, Any], cached: bool = False) -> Completion:
        return cls(text=data["text"], prompt_tokens=int(data["prompt_tokens"]),
                   completion_tokens=int(data["completion_tokens"]),
                   finish_reason=data["finish_reason"], latency_ms=float(data["latency_ms"]),
                   cached=cached, error=data.get("error"))


@runtime_checkable
class InferenceBackend(Protocol):
    """Text LLMs and VLMs behind one call: requests in, completions out (same order)."""

    model_id: str
    revision: str

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answer every request; a failed request is a Completion with `error`, not a raise."""
        ...

    def close(self) -> None:
        """Release the model or the connection."""
        ...
