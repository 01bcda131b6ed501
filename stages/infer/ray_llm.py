"""Ray Data LLM processors: vLLM engines on a GPU cluster, or an OpenAI-compatible server.

Both take the request rows of `weft.stages.infer.runner` (request_key,
request JSON, images as .npy bytes) and return (request_key, completion JSON),
so the caller cannot tell which backend answered. The preprocess step runs on
CPU workers and turns pixels into data URLs; the engines never decode media.

vLLM cannot be installed on the CPU machines this project is developed on:
`build_vllm_processor` imports it lazily and fails with a clear message where
it is missing; the code is written against Ray Data LLM's public API
(`vLLMEngineProcessorConfig` + `build_processor`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from weft.stages.infer.registry import ModelSpec
from weft.stages.infer.types import Completion


def _sampling_dict(request: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    sampling = request["sampling"]
    return {"temperature": sampling["temperature"], "top_p": sampling["top_p"],
            "max_tokens": min(sampling["max_tokens"], spec.max_tokens),
            "seed": sampling["seed"], "repetition_penalty": sampling["repetition_penalty"]}


def _openai_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    from weft.stages.infer.runner import request_from_row

    return request_from_row(row).openai_messages()


def build_vllm_processor(spec: ModelSpec) -> Any:
    """A Ray Data LLM processor running vLLM engines (one per `concurrency`) on GPUs."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("backend 'vllm' needs vLLM on the Ray workers (pip install "
                           "'weft[gpu]' on a GPU machine); use backend 'transformers' or "
                           "'http' here") from exc
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=str(spec.local_path),
        engine_kwargs={"dtype": spec.dtype, **spec.vllm.engine_kwargs},
        batch_size=spec.batch_size,
        concurrency=spec.concurrency,
        accelerator_type=spec.vllm.accelerator_type,
        max_concurrent_batches=spec.vllm.max_concurrent_batches,
        prepare_multimodal_stage=spec.kind == "vlm",
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        request = json.loads(row["request"])
        return {"request_key": row["request_key"], "messages": _openai_messages(row),
                "sampling_params": _sampling_dict(request, spec),
                "max_new": _sampling_dict(request, spec)["max_tokens"]}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        generated = int(row.get("num_generated_tokens") or 0)
        completion = Completion(
            text=str(row.get("generated_text") or "").strip(),
            prompt_tokens=int(row.get("num_input_tokens") or 0),
            completion_tokens=generated,
            finish_reason="length" if generated >= int(row["max_new"]) else "stop",
            latency_ms=round(float(row.get("time_taken_llm") or 0) * 1000, 3))
        return {"request_key": row["request_key"],
                "completion": json.dumps(completion.to_json(), sort_keys=True)}

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


def build_http_processor(spec: ModelSpec) -> Any:
    """A Ray Data LLM processor posting to an OpenAI-compatible chat completions endpoint."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    headers = {"Content-Type": "application/json"}
    if spec.http.api_key_env:
        token = os.environ.get(spec.http.api_key_env)
        if not token:
            raise RuntimeError(f"{spec.http.api_key_env} is not set (api key for {spec.http.url})")
        headers["Authorization"] = f"Bearer {token}"
    config = HttpRequestProcessorConfig(
        url=spec.http.url, headers=headers, qps=spec.http.qps, batch_size=spec.batch_size,
        concurrency=spec.concurrency, max_retries=spec.http.max_retries)
    served = spec.http.served_model or str(spec.local_path)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        request = json.loads(row["request"])
        sampling = _sampling_dict(request, spec)
        payload = {"model": served, "messages": _openai_messages(row),
                   "max_tokens": sampling["max_tokens"], "temperature": sampling["temperature"],
                   "top_p": sampling["top_p"], "seed": sampling["seed"], "stream": False}
        return {"request_key": row["request_key"], "payload": payload,
                "sent_at": time.time()}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        response = row.get("http_response") or {}
        choices = response.get("choices") or []
        usage = response.get("usage") or {}
        latency = round((time.time() - float(row["sent_at"])) * 1000, 3)
        if not choices:
            completion = Completion("", 0, 0, "error", latency,
                                    error=f"no choices in response: {str(response)[:500]}")
        else:
            choice = choices[0]
            completion = Completion(
                text=str((choice.get("message") or {}).get("content") or "").strip(),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                latency_ms=latency)
        return {"request_key": row["request_key"],
                "completion": json.dumps(completion.to_json(), sort_keys=True)}

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)
