"""`python -m weft.train --config FILE`: one training run, single process or under torchrun.

    python -m weft.train --config configs/train.yaml
    torchrun --nproc-per-node 8 -m weft.train --config configs/train.yaml
    python -m weft.train --config f.yaml --set optim.lr=3e-4 --set steps=2000
    python -m weft.train --export RUN_DIR          # safetensors from the latest checkpoint

Rank and world come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Only rank 0 logs at INFO; the others log warnings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import yaml


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for weft.train: rank 0 at `level`, other ranks warnings only."""
    rank = int(os.environ.get("RANK", "0") or 0)
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    logger = logging.getLogger("weft.train")
    logger.handlers[:] = [handler]
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["optim.lr=3e-4", "steps=10"] -> {"optim": {"lr": 3e-4}, "steps": 10} (YAML values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs KEY=VALUE, got {pair!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def torchrun_command(config_path: str, nproc_per_node: int,
                     overrides: list[str] | None = None, nnodes: int = 1) -> list[str]:
    """The argv that runs this entry point under torchrun (for a CLI or a flow to spawn)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
            str(nproc_per_node), "--nnodes", str(nnodes)]
    if nnodes == 1:
        argv.append("--standalone")
    argv += ["-m", "weft.train", "--config", str(config_path)]
    for pair in overrides or []:
        argv += ["--set", pair]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training YAML (partial is fine: defaults fill in)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (dotted key, YAML value); repeatable")
    parser.add_argument("--export", metavar="RUN_DIR",
                        help="export the latest checkpoint of RUN_DIR as safetensors and exit")
    args = parser.parse_args(argv)
    setup_logging()
    log = logging.getLogger("weft.train")

    from weft.train.config import TrainConfigError, load_train_config

    if args.export:
        from weft.train.checkpoint import export_checkpoint

        log.info("exported to %s", export_checkpoint(args.export))
        return 0
    try:
        config = load_train_config(args.config, parse_overrides(args.set))
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from weft.train.loop import run_training

    try:
        result = run_training(config)
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = result.last
    log.info("done: step %d%s", result.step,
             f", loss {last.loss:.4f} (ce {last.ce:.4f}, mse {last.mse:.4f})" if last else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
