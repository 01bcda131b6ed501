"""Start or join Ray, and turn a stage into a Ray Data step with its declared resources."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import ray
import ray.data
from pydantic import BaseModel, ConfigDict, Field

from weft.stages.base import RunContext, Stage, StageConfig


class RayConfig(BaseModel):
    """Where Ray runs. `RAY_ADDRESS` in the environment wins over `address`."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="ray://host:10001 or auto; null = local")
    num_cpus: int | None = Field(
        None, ge=2, description="logical CPUs of the local cluster; null = max(4, cores), so "
        "every stage of the streaming plan can hold a worker on a small machine")
    progress_bars: bool = True


def init_ray(config: RayConfig) -> dict[str, Any]:
    """Start an embedded cluster (>= 2 workers) or connect to RAY_ADDRESS; idempotent."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or config.address
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                  "include_dashboard": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            num_cpus = config.num_cpus or max(4, os.cpu_count() or 2)
            ray.init(num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = config.progress_bars
    ctx.execution_options.preserve_order = True
    return {"address": ray.get_runtime_context().gcs_address,
            "cpus": ray.cluster_resources().get("CPU", 0)}


class StageActor:
    """A Ray Data callable class: builds the stage and runs setup() once per worker."""

    def __init__(self, stage_cls: type[Stage], config: StageConfig, ctx: RunContext) -> None:
        self.stage = stage_cls(config, ctx)
        self.stage.ensure_setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.stage(batch)


def run_stage_task(batch: pa.Table, stage_cls: type[Stage], config: StageConfig,
                   ctx: RunContext) -> pa.Table:
    """A Ray Data task for stages without models (no worker to keep warm)."""
    return stage_cls(config, ctx)(batch)


def apply_stage(ds: ray.data.Dataset, stage_cls: type[Stage], config: StageConfig,
                ctx: RunContext) -> ray.data.Dataset:
    """Append one stage to a Ray Data plan with the resources the stage declares."""
    res = config.resources
    common: dict[str, Any] = {
        "batch_format": "pyarrow",
        "batch_size": res.batch_size,
        "num_cpus": res.cpus,
        "num_gpus": res.gpus or None,
    }
    if res.memory_gb:
        common["memory"] = int(res.memory_gb * 2**30)
    if stage_cls.uses_model:
        return ds.map_batches(StageActor, fn_constructor_kwargs={
            "stage_cls": stage_cls, "config": config, "ctx": ctx},
            compute=ray.data.ActorPoolStrategy(size=res.concurrency), **common)
    return ds.map_batches(run_stage_task, fn_kwargs={
        "stage_cls": stage_cls, "config": config, "ctx": ctx}, **common)
