"""The transformers backend: batched generation on CPU or one GPU.

VLMs load with `AutoModelForImageTextToText` (for Qwen2.5-VL that is
`Qwen2_5_VLForConditionalGeneration`) and `AutoProcessor`; text LLMs with
`AutoModelForCausalLM` and `AutoTokenizer`. Requests are grouped by sampling
parameters and run `batch_size` at a time with left padding. A batch that
fails is retried one request at a time, so one bad input costs one error
completion and not its neighbours.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from weft.stages.infer.registry import ModelSpec, model_revision
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


class TransformersBackend:
    """One model in this process; `generate` is what a Ray actor calls per batch."""

    def __init__(self, spec: ModelSpec, model_id: str) -> None:
        import torch
        import transformers

        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model {model_id}: device {spec.device} but CUDA is not available")
        self.spec = spec
        self.model_id = model_id
        self.revision = model_revision(spec)
        path = str(spec.local_path)
        dtype = _torch_dtype(spec.dtype, spec.device)
        if spec.kind == "vlm":
            self.processor = transformers.AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
            model_cls = transformers.AutoModelForImageTextToText
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model_cls = transformers.AutoModelForCausalLM
        self.tokenizer.padding_side = "left"
        self.model = model_cls.from_pretrained(path, dtype=dtype).to(spec.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else next(iter(self.eos_ids)))
        self.calls = 0  # requests that reached the model (for tests and stats)

    # ---- batching -----------------------------------------------------------
    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[SamplingParams, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.sampling, []).append(i)
        for sampling, indices in groups.items():
            for start in range(0, len(indices), self.spec.batch_size):
                chunk = indices[start:start + self.spec.batch_size]
                for i, completion in zip(chunk, self._generate_safely(
                        [requests[i] for i in chunk], sampling), strict=True):
                    out[i] = completion
        return [c for c in out if c is not None]

    def _generate_safely(self, batch: list[ChatRequest],
                         sampling: SamplingParams) -> list[Completion]:
        try:
            return self._generate_batch(batch, sampling)
        except Exception as exc:
            if len(batch) == 1:
                return [Completion("", 0, 0, "error", 0.0,
                                   error=f"{type(exc).__name__}: {exc}"[:1000])]
            return [c for r in batch for c in self._generate_safely([r], sampling)]

    def _inputs(self, batch: list[ChatRequest]) -> Any:
        if self.processor is None:
            texts = [self.tokenizer.apply_chat_template(r.messages, tokenize=False,
                                                        add_generation_prompt=True) for r in batch]
            return self.tokenizer(texts, return_tensors="pt", padding=True)
        from PIL import Image

        texts = [self.processor.apply_chat_template(r.messages, tokenize=False,
                                                    add_generation_prompt=True) for r in batch]
        images = [Image.fromarray(np.ascontiguousarray(im)) for r in batch for im in r.images]
        return self.processor(text=texts, images=images or None, return_tensors="pt",
                              padding=True)

    def _generate_batch(self, batch: list[ChatRequest],
                        sampling: SamplingParams) -> list[Completion]:
        import torch

        started = time.perf_counter()
        inputs = self._inputs(batch).to(self.spec.device)
        max_new = min(sampling.max_tokens, self.spec.max_tokens)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.pad_id,
                                  "repetition_penalty": sampling.repetition_penalty}
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        self.calls += len(batch)
        prompt_len = inputs["input_ids"].shape[1]
        latency = (time.perf_counter() - started) * 1000 / len(batch)
        out = []
        for row, attention in zip(sequences[:, prompt_len:].tolist(),
                                  inputs["attention_mask"].tolist(), strict=True):
            stop = next((k for k, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[:stop]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            out.append(Completion(text=text, prompt_tokens=int(sum(attention)),
                                  completion_tokens=len(tokens) + (stop is not None),
                                  finish_reason="length" if stop is None else "stop",
                                  latency_ms=round(latency, 3)))
        return out

    def close(self) -> None:
        del self.model
