"""The transformers backend on CUDA: same greedy answers as on CPU, batched, in bf16 too."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from weft.stages.infer.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"))["qwen2_5_vl"]


def _requests(n: int):
    from weft.stages.infer.prompts import load_prompt
    from weft.stages.infer.types import ChatRequest, SamplingParams

    prompt = load_prompt("caption_transition")
    rng = np.random.default_rng(0)
    return [ChatRequest(messages=prompt.messages(images=2, delta_s=f"{i / 2:.1f}"),
                        images=[rng.integers(0, 255, (64 + 8 * i, 96, 3), dtype=np.uint8)
                                for _ in range(2)],
                        sampling=SamplingParams(max_tokens=16), prompt_id=prompt.ref,
                        prompt_hash=prompt.prompt_hash) for i in range(n)]


def test_cuda_fp32_matches_cpu_and_bf16_runs(tiny_vlm) -> None:
    from weft.stages.infer.registry import ModelSpec
    from weft.stages.infer.transformers_backend import TransformersBackend

    requests = _requests(6)
    cpu = TransformersBackend(ModelSpec(path=str(tiny_vlm), kind="vlm", batch_size=3), "m")
    gpu = TransformersBackend(ModelSpec(path=str(tiny_vlm), kind="vlm", batch_size=3,
                                        device="cuda", dtype="float32"), "m")
    on_cpu, on_gpu = cpu.generate(requests), gpu.generate(requests)
    assert [c.error for c in on_gpu] == [None] * 6
    same = sum(a.text == b.text for a, b in zip(on_cpu, on_gpu, strict=True))
    assert same >= 5, [(a.text, b.text) for a, b in zip(on_cpu, on_gpu, strict=True)]
    bf16 = TransformersBackend(ModelSpec(path=str(tiny_vlm), kind="vlm", batch_size=6,
                                         device="cuda", dtype="bfloat16"), "m")
    out = bf16.generate(requests)
    assert all(c.error is None and 1 <= c.completion_tokens <= 16 for c in out)
