"""Run many requests through the request cache and one backend on Ray Data.

    requests -> cache lookup (driver) -> misses as a Ray Dataset
             -> transformers actor pool | vLLM processor | HTTP processor
             -> completions -> cache write (driver)

Duplicate requests are sent once. The returned stats count what reached the
model, so a test (or an operator) can see that a re-run paid for nothing.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from weft.stages.infer.cache import RequestCache
from weft.stages.infer.registry import ModelSpec
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams

REQUEST_SCHEMA = pa.schema([
    pa.field("request_key", pa.string()),
    pa.field("request", pa.string()),  # messages, sampling, prompt ids (JSON)
    pa.field("images", pa.list_(pa.binary())),  # uint8 H x W x 3 as .npy bytes
])
COMPLETION_SCHEMA = pa.schema([
    pa.field("request_key", pa.string()),
    pa.field("completion", pa.string()),  # Completion.to_json()
])


def encode_image(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def request_row(key: str, request: ChatRequest) -> dict[str, Any]:
    return {"request_key": key,
            "request": json.dumps({"messages": request.messages,
                                   "sampling": request.sampling.model_dump(mode="json"),
                                   "prompt_id": request.prompt_id,
                                   "prompt_hash": request.prompt_hash}, sort_keys=True),
            "images": [encode_image(im) for im in request.images]}


def request_from_row(row: dict[str, Any]) -> ChatRequest:
    data = json.loads(row["request"])
    return ChatRequest(messages=data["messages"],
                       images=[decode_image(b) for b in row.get("images") or []],
                       sampling=SamplingParams(**data["sampling"]),
                       prompt_id=data["prompt_id"], prompt_hash=data["prompt_hash"])


class TransformersActor:
    """A Ray Data callable class: loads the model once per worker, answers batches."""

    def __init__(self, spec: ModelSpec, model_id: str) -> None:
        from weft.stages.infer.transformers_backend import TransformersBackend

        self.backend = TransformersBackend(spec, model_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        completions = self.backend.generate([request_from_row(r) for r in rows])
        return pa.Table.from_pylist(
            [{"request_key": r["request_key"], "completion": json.dumps(c.to_json(),
                                                                        sort_keys=True)}
             for r, c in zip(rows, completions, strict=True)], schema=COMPLETION_SCHEMA)


def infer_dataset(ds: Any, spec: ModelSpec, model_id: str) -> Any:
    """Request rows in, (request_key, completion) rows out, on the spec's backend."""
    import ray.data

    if spec.backend == "transformers":
        return ds.map_batches(
            TransformersActor, fn_constructor_kwargs={"spec": spec, "model_id": model_id},
            compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
            batch_size=spec.batch_size, batch_format="pyarrow", num_gpus=spec.gpus or None,
            num_cpus=1)
    from weft.stages.infer import ray_llm

    build = ray_llm.build_vllm_processor if spec.backend == "vllm" else \
        ray_llm.build_http_processor
    return build(spec)(ds).select_columns(["request_key", "completion"])


@dataclass
class InferenceStats:
    """What a batch of requests cost: requests, distinct ones, cache hits, model calls."""

    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    model_calls: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def run_requests(requests: dict[str, ChatRequest], spec: ModelSpec, model_id: str,
                 revision: str, cache: RequestCache, total: int | None = None
                 ) -> tuple[dict[str, Completion], InferenceStats]:
    """Answer every request (key -> request), asking the model only for cache misses.

    With `backend: http`, a server that cannot be reached (or times out) raises
    `HttpBackendError` with one readable line; nothing is cached then.
    """
    import ray.data
    import ray.exceptions

    stats = InferenceStats(requests=total if total is not None else len(requests),
                           unique=len(requests))
    answers = cache.get_many(requests)
    stats.cache_hits = len(answers)
    misses = sorted(k for k in requests if k not in answers)
    if misses:
        table = pa.Table.from_pylist([request_row(k, requests[k]) for k in misses],
                                     schema=REQUEST_SCHEMA)
        ds = ray.data.from_arrow(table).repartition(
            max(1, min(len(misses) // spec.batch_size, 4 * spec.concurrency)))
        try:
            rows = infer_dataset(ds, spec, model_id).take_all()
        except ray.exceptions.RayError as exc:
            if spec.backend != "http":
                raise
            from weft.stages.infer.ray_llm import http_backend_error

            raise http_backend_error(spec, exc) from None  # Ray's text holds every payload
        fresh = {r["request_key"]: Completion.from_json(json.loads(r["completion"]))
                 for r in rows}
        lost = set(misses) - set(fresh)
        if lost:
            raise RuntimeError(f"{len(lost)} requests came back without an answer")
        stats.model_calls = len(misses)
        stats.errors = sum(1 for c in fresh.values() if c.error)
        cache.put_many((k, model_id, revision, requests[k].prompt_id, fresh[k]) for k in misses)
        answers.update(fresh)
    return answers, stats
