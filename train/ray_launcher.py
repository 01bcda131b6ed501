"""Training on a Ray cluster with Ray Train's TorchTrainer: one `run_training` per worker.

Ray Train starts `num_workers` workers (one GPU each with `use_gpu`), creates the torch
process group (gloo on CPU; nccl for CUDA tensors plus gloo for CPU ones on GPU) and
sets RANK / WORLD_SIZE / LOCAL_RANK, which `init_distributed` picks up as it does under
torchrun. Everything else (FSDP2, DCP checkpoints, resume, metrics, export) is the same
code path. The run directory must be on storage every worker sees (a shared or network
filesystem); it is made absolute on the driver.

Ray is imported inside the function: `weft.train` imports without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weft.train.config import TrainConfig, load_train_config


def _worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: rebuild the config, train, report to the driver."""
    import ray.train

    from weft.train.__main__ import setup_logging
    from weft.train.loop import run_training

    setup_logging()
    config = TrainConfig.model_validate(loop_config["config"])
    codec_factory = loop_config.get("codec_factory")
    result = run_training(config, codec=codec_factory() if codec_factory else None,
                          data_factory=loop_config.get("data_factory"))
    last = result.last
    ray.train.report({
        "step": result.step, "start_step": result.start_step,
        "loss": last.loss if last else None, "ce": last.ce if last else None,
        "mse": last.mse if last else None,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "export_dir": str(result.export_dir) if result.export_dir else None,
    })


def launch_on_ray(config_path: str | Path | None, num_workers: int, use_gpu: bool = False,
                  overrides: dict[str, Any] | None = None, *,
                  data_factory: Callable[..., Any] | None = None,
                  codec_factory: Callable[[], Any] | None = None,
                  resources_per_worker: dict[str, float] | None = None) -> dict[str, Any]:
    """Run one training job on Ray (local, or the cluster of RAY_ADDRESS); wait for it.

    The config is loaded and validated here, on the driver (a bad config fails before any
    worker starts). data_factory(config, info) / codec_factory() replace the shard loader
    / the VAE of `model.vae_path` (tests; they must pickle with Ray's cloudpickle).
    Returns rank 0's summary (RUN/result.json): step, start_step, last (the last step's
    global losses, grad norm, lr), checkpoint, export_dir.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    config = load_train_config(config_path, overrides)
    run_dir = Path(config.run_dir).resolve()
    config = config.model_copy(update={"run_dir": str(run_dir)})
    if use_gpu:
        config.parallel.device = "cuda"
    elif config.parallel.device == "auto":
        config.parallel.device = "cpu"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config.model_dump(mode="json"),
                           "data_factory": data_factory, "codec_factory": codec_factory},
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training on Ray failed: {result.error}") from result.error
    # Ray Train keeps reported metrics only with a Ray checkpoint; ours are DCP directories
    # in run_dir, so rank 0's summary is read from the file the loop writes.
    return json.loads((run_dir / "result.json").read_text())
