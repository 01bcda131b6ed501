"""Ray Data LLM processors: vLLM engines on a GPU cluster, or an OpenAI-compatible server.

Both take the request rows of `weft.stages.infer.runner` (request_key,
request JSON, images as .npy bytes) and return (request_key, completion JSON),
so the caller cannot tell which backend answered. The preprocess step runs on
CPU workers and turns pixels into data URLs; the engines never decode media.

vLLM cannot be installed on the CPU machines this project is developed on:
`build_vllm_processor` imports it lazily and fails with a clear message where
it is missing; the code is written against Ray Data LLM's public API
(`vLLMEngineProcessorConfig` + `build_processor`).

The HTTP path is tested against `transformers serve` (tests/integration/
test_http_backend.py). A server that cannot be reached makes Ray Data raise a
multi-page error with every payload in it; `http_backend_error` turns that into
one line naming the URL and the cause.
"""

from __future__ import annotations

import functools
import json
import os
import re
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


class HttpBackendError(RuntimeError):
    """Requests to an OpenAI-compatible server failed as a whole (unreachable, timed out...)."""


# "module.SomeError: message" lines of the tracebacks Ray folds into its error text.
_CAUSE_LINE = re.compile(r"^\s*((?:\w+\.)*\w+(?:Error|Exception|Timeout)\w*): (.+)$", re.M)
_PREVIOUS = re.compile(r"Previous Exception: (\w+)")


def http_backend_error(spec: ModelSpec, exc: BaseException) -> HttpBackendError:
    """One readable line for a Ray Data failure of the HTTP processor.

    Ray's text holds whole tracebacks and, in Ray Data LLM's retry message, each
    failed payload (images as data URLs): only the innermost cause is kept.
    """
    text = str(exc)
    causes = [f"{name.rsplit('.', 1)[-1]}: {message.strip()}"
              for name, message in _CAUSE_LINE.findall(text)
              if not name.startswith("ray.") and not message.startswith("Reached maximum retries")]
    previous = _PREVIOUS.findall(text)
    cause = causes[-1] if causes else previous[-1] if previous else type(exc).__name__
    if len(cause) > 300:
        cause = cause[:300] + "..."
    return HttpBackendError(
        f"backend 'http': requests to {spec.http.url} failed ({cause}) after "
        f"{spec.http.max_retries} retries with a {spec.http.timeout_s:g}s timeout; is the server "
        f"running, serving {spec.http.served_model or str(spec.local_path)!r}, and reachable "
        f"from the Ray workers?")


def _payload_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields for a request's sampling dict (after the spec's max_tokens cap)."""
    payload = {"max_tokens": sampling["max_tokens"], "temperature": sampling["temperature"],
               "top_p": sampling["top_p"], "seed": sampling["seed"]}
    if sampling["repetition_penalty"] == 1.0:
        # OpenAI's neutral value. `transformers serve` maps it to repetition_penalty=1.0, so a
        # model whose generation_config sets a penalty (Qwen2.5: 1.05) decodes as the
        # transformers backend does instead of with that hidden default.
        payload["frequency_penalty"] = 0.0
    else:
        # vLLM / SGLang extension; a server without it rejects the request (an error
        # completion) rather than silently decoding without the penalty.
        payload["repetition_penalty"] = sampling["repetition_penalty"]
    return payload


def build_http_processor(spec: ModelSpec) -> Any:
    """A Ray Data LLM processor posting to an OpenAI-compatible chat completions endpoint."""
    import aiohttp
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    headers = {"Content-Type": "application/json"}
    if spec.http.api_key_env:
        token = os.environ.get(spec.http.api_key_env)
        if not token:
            raise RuntimeError(f"{spec.http.api_key_env} is not set (api key for {spec.http.url})")
        headers["Authorization"] = f"Bearer {token}"
    # Ray Data LLM's aiohttp session has no timeout of its own but aiohttp's 5 minutes.
    session_factory = functools.partial(
        aiohttp.ClientSession, timeout=aiohttp.ClientTimeout(total=spec.http.timeout_s))
    config = HttpRequestProcessorConfig(
        url=spec.http.url, headers=headers, qps=spec.http.qps, batch_size=spec.batch_size,
        concurrency=spec.concurrency, max_retries=spec.http.max_retries,
        session_factory=session_factory)
    served = spec.http.served_model or str(spec.local_path)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        request = json.loads(row["request"])
        payload = {"model": served, "messages": _openai_messages(row),
                   **_payload_sampling(_sampling_dict(request, spec)), "stream": False}
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
