"""Shared fixtures: real assets fetched by the project, ffmpeg, and a run context."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Prefect keeps its embedded server's database under PREFECT_HOME: one per test session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="weft-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from weft.assets import AssetUnavailableError, fetch
from weft.schemas.policy import Policy
from weft.stages.base import RunContext


@pytest.fixture(scope="session")
def asset() -> Callable[[str], Path]:
    """Fetch a real asset (ASSETS.md) into the cache; skip only if the registry is unreachable."""

    def get(name: str) -> Path:
        try:
            return fetch(name)
        except AssetUnavailableError as exc:
            pytest.skip(f"asset {name} unavailable: registry not reachable ({exc})")

    return get


@pytest.fixture(scope="session")
def ffmpeg() -> Callable[..., None]:
    """Run ffmpeg (required: the setup script installs it)."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        pytest.fail("ffmpeg is not installed; run the README's setup (it installs ffmpeg)")

    def run(*args: str) -> None:
        proc = subprocess.run([exe, "-hide_banner", "-loglevel", "error", "-y", *args],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr[-1000:]}")

    return run


def make_context(policy: Policy | dict | None = None, run_dir: str | Path = "/tmp/weft-test",
                 stage_index: int = 0) -> RunContext:
    """A RunContext for calling a stage directly in a test."""
    if policy is None:
        policy = Policy(name="test", version=1, rules={})
    elif isinstance(policy, dict):
        policy = Policy.model_validate({"name": "test", "version": 1, "rules": policy})
    return RunContext(run_id="test-run", run_dir=str(run_dir), policy=policy,
                      code_version="test", stage_index=stage_index)


@pytest.fixture
def run_context(tmp_path: Path) -> Callable[..., RunContext]:
    """Build a RunContext with a policy given as {stage: {score: {min/max}}}."""

    def build(rules: dict | None = None, stage_index: int = 0) -> RunContext:
        return make_context(rules, run_dir=tmp_path, stage_index=stage_index)

    return build


@pytest.fixture
def tiny_shapes_recipe() -> list[str]:
    """KEY=VALUE overrides that shrink the CPU shapes recipe to a minute's run (every step
    of it still runs: data, VAE, ViT, training, evaluation)."""
    return ["shapes.samples.t2i=12", "shapes.samples.vqa=8", "shapes.samples.caption=4",
            "shapes.samples.edit=8", "shapes.samples.video=0",
            "vae.steps=3", "vae.batch_size=2", "vae.widths=[8,8,8,8]",
            "vit.hidden_size=16", "vit.num_layers=1", "vit.pretrain_steps=3",
            "vit.pretrain_batch_size=2",
            "train.steps=2", "train.checkpoint.every_steps=2", "train.data.num_workers=0",
            "train.model.unified.llm.hidden_size=32", "train.model.unified.llm.num_layers=1",
            "train.model.unified.llm.intermediate_size=64",
            "train.model.unified.llm.num_heads=2", "train.model.unified.llm.num_kv_heads=1",
            "eval.n_per_category=1", "eval.steps=2", "eval.guide_step=1"]
