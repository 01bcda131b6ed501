"""The model registry: name -> where the weights are and how to serve them.

`configs/models.yaml` holds the defaults (tiny local models that
`weft models make-tiny` builds); a user points a name at real weights by
changing `path`, or at a running server with `backend: http`. A model's
revision is the hash of its config and weight files, so the request cache and
the ledger never confuse two sets of weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weft.schemas.config_doc import validation_problems
from weft.schemas.ids import files_revision

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFINING_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja")


class ModelDirError(FileNotFoundError):
    """A registered model's directory is missing or incomplete: a start-up error."""


class HttpOptions(BaseModel):
    """An OpenAI-compatible server (`vllm serve`, SGLang, `transformers serve`)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field("http://127.0.0.1:8000/v1/chat/completions",
                     description="the chat completions endpoint")
    served_model: str | None = Field(None, description="`model` sent to the server; "
                                                       "null = the local path")
    api_key_env: str | None = Field(None, description="env var holding a bearer token")
    qps: int | None = Field(None, ge=1, description="requests per second per worker")
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(120.0, gt=0)


class VllmOptions(BaseModel):
    """vLLM engine settings for Ray Data LLM's `vLLMEngineProcessorConfig`."""

    model_config = ConfigDict(extra="forbid")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"max_model_len": 8192, "gpu_memory_utilization": 0.9,
                                 "tensor_parallel_size": 1},
        description="passed to the vLLM engine as they are")
    accelerator_type: str | None = Field(None, description="e.g. H100; null = any GPU")
    max_concurrent_batches: int = Field(8, ge=1)


class ModelSpec(BaseModel):
    """One registered model."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="local Hugging Face-format directory (~ and $VARS expand)")
    kind: Literal["vlm", "llm"] = Field(description="vlm: images + text in; llm: text only")
    backend: Literal["transformers", "vllm", "http"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("cpu", description="transformers backend: cpu, cuda, cuda:1")
    batch_size: int = Field(8, ge=1, description="requests per forward pass / per Ray batch")
    concurrency: int = Field(1, ge=1, description="workers (actors / engines / HTTP clients)")
    gpus: float = Field(0.0, ge=0, description="GPUs per worker (transformers on cuda)")
    max_tokens: int = Field(256, ge=1, description="cap on new tokens for any request")
    licence: str | None = Field(None, description="recorded in the audit inventory")
    revision: str | None = Field(None, description="override; null = hash of the local files")
    http: HttpOptions = Field(default_factory=HttpOptions)
    vllm: VllmOptions = Field(default_factory=VllmOptions)

    @model_validator(mode="after")
    def _gpu_backends(self) -> ModelSpec:
        if self.backend == "transformers" and self.device.startswith("cuda") and not self.gpus:
            self.gpus = 1.0
        return self

    @property
    def local_path(self) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(self.path)))


def model_files(path: Path) -> list[Path]:
    """The files that define a Hugging Face model directory (config, tokenizer, weights)."""
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist (`weft models make-tiny "
                            f"--out DIR` builds tiny ones; or point `path` at real weights)")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{path} has no config.json: not a Hugging Face model directory")
    files = [p for p in path.iterdir() if p.is_file()
             and (p.name in DEFINING_FILES or p.suffix in WEIGHT_SUFFIXES)]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelDirError(f"{path} has no weights (*.safetensors or *.bin)")
    return files


def model_revision(spec: ModelSpec) -> str:
    """The spec's revision override, else the hash of its local files."""
    if spec.revision:
        return spec.revision
    return files_revision(model_files(spec.local_path))


class ModelRegistry(BaseModel):
    """name -> ModelSpec, loaded from YAML."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelSpec] = Field(default_factory=dict)

    def get(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise KeyError(f"model {name!r} is not in the registry "
                           f"(known: {', '.join(sorted(self.models)) or 'none'})")
        return self.models[name]

    def check(self, name: str) -> str:
        """Fail clearly now if `name` is unknown or its files are missing; its revision."""
        spec = self.get(name)
        if spec.backend == "http" and spec.revision:
            return spec.revision
        return model_revision(spec)


def load_registry(path: str | Path, overrides: dict[str, Any] | None = None) -> ModelRegistry:
    """Load a registry YAML; a malformed one fails with the file named."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read model registry {path}: {exc}") from exc
    for name, spec in (overrides or {}).items():
        data.setdefault("models", {}).setdefault(name, {}).update(spec)
    try:
        return ModelRegistry.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ValueError(f"invalid model registry {path}: {problems}") from exc
