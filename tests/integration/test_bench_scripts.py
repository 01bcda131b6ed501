"""The benchmark scripts run at small sizes and print their ratio against the reference
measured in the same run: a benchmark nobody can run is no measurement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_attention_bench_compares_flex_and_docs_with_dense() -> None:
    out = _run("attention.py", "--tokens", "512", "--repeat", "1", "--backward",
               "--device", "cpu")
    row = next(line for line in out.splitlines() if line.strip().startswith("512 "))
    ratios = [float(x) for x in re.findall(r"([\d.]+)x", row)]
    assert len(ratios) >= 3 and all(r > 0 for r in ratios), row
    max_diff = float(row.split()[-1])
    assert max_diff < 1e-3, row  # every backend computed the same attention


def test_train_bench_reports_mot_against_dense() -> None:
    out = _run("train.py", "--tokens", "512", "--steps", "2", "--warmup", "1", "--layers",
               "1", "--device", "cpu")
    assert re.search(r"mot:\s+[\d,]+ tokens/s", out), out
    assert re.search(r"mot/dense tokens/s: [\d.]+x", out), out


def test_shards_bench_reads_and_writes_against_tarfile() -> None:
    out = _run("shards.py", "--samples", "300", "--sizes", "64", "--repeat", "1")
    rows = {line[:32].strip(): float(line.split()[-1]) for line in out.splitlines()
            if line.startswith(("write", "read"))}
    assert rows["write  tarfile (reference)"] == 1.0 and rows["read   tarfile (reference)"] == 1.0
    assert rows["read   weft ShardDataset"] > 0 and rows["write  weft write_shards"] > 0


def test_web_bench_reports_ratios_against_its_references() -> None:
    out = _run("web.py", "--docs", "200")
    assert len(re.findall(r"ratio [\d.]+", out)) >= 3, out


def test_device_check_dry_run_passes_every_step(tmp_path) -> None:
    """bench/device_check.sh as the first GPU session will run it, minus the wheels and
    CUDA: every step exits 0 and the recipe smoke says why it did not run."""
    import os

    env = {**os.environ, "SKIP_WHEELS": "1", "ATTN_TOKENS": "512", "PYTHON": sys.executable,
           "TRAIN_BENCH_ARGS": "--tokens 512 --steps 2 --warmup 1 --layers 1",
           "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH / "device_check.sh"), "run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[:5] == [f"{step}: exit 0" for step in
                           ("env", "recipe-config", "gpu-tests", "attention", "train-bench")]
    assert summary[5] == "recipe-smoke: skipped (no CUDA)"
    assert "smoke recipe: steps 300" in (tmp_path / "recipe-config.log").read_text()


def test_shapes_ablation_refuses_an_unknown_layer_mode() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "shapes_ablation.py"), "--modes", "mot",
                           "moa"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "invalid choice: 'moa'" in done.stderr, done.stderr


def test_shapes_ablation_trains_each_layer_mode_on_the_same_tokens(tmp_path,
                                                                 tiny_shapes_recipe) -> None:
    """The ablation's claim is equal training tokens: the three modes must report the same
    count; the side-by-side table (in the order `--modes` gives) and the loss-curve plot
    are written."""
    args = ["--out", str(tmp_path), "--modes", "mot", "dense", "moe"]
    for pair in tiny_shapes_recipe:
        args += ["--set", pair]
    out = _run("shapes_ablation.py", *args)
    tokens = {m: int(n) for m, n in re.findall(r"^(dense|moe|mot): (\d+) loss tokens", out,
                                               re.MULTILINE)}
    assert set(tokens) == {"dense", "moe", "mot"}, out
    assert len(set(tokens.values())) == 1 and tokens["mot"] > 0, tokens
    table = (tmp_path / "tables.md").read_text()
    assert table.splitlines()[0] == "| category | mot | dense | moe | chance |"
    assert "| geneval/color_attr |" in table and "| caption |" in table
    assert re.search(r"\| rows above chance \(p < 0\.05\) \| \d+ of 17 \| \d+ of 17 \| "
                     r"\d+ of 17 \| \|", table), table
    assert (tmp_path / "curves.png").stat().st_size > 0
