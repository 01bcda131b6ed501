"""The `weft` command line: every command with one line of help (`weft --help`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="weft: curate multimodal training data and train a MoT model on it.")
assets_app = typer.Typer(no_args_is_help=True, help="Fetch real sample media into the cache.")
ledger_app = typer.Typer(no_args_is_help=True, help="Read a run's decision ledger.")
models_app = typer.Typer(no_args_is_help=True, help="Build tiny local models for tests and demo.")
config_app = typer.Typer(no_args_is_help=True, help="Show or regenerate the default configs.")
app.add_typer(assets_app, name="assets")
app.add_typer(ledger_app, name="ledger")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
console = Console()

DEMO_VIDEOS = ["bikes.mp4", "cityCC0.mpg", "Megamind.avi", "Megamind_bugy.avi"]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def print_funnel(funnel: list[dict]) -> None:
    """The end-of-run summary table: in / kept / dropped by reason / errors per stage."""
    table = Table(title="funnel", show_lines=False)
    for col in ("stage", "in", "kept", "dropped", "errors", "drop reasons", "error reasons"):
        table.add_column(col, justify="right" if col in ("in", "kept", "dropped", "errors")
                         else "left", overflow="fold")
    for r in funnel:
        table.add_row(r["stage"], str(r["items_in"]), str(r["kept"]), str(r["dropped"]),
                      str(r["errored"]),
                      ", ".join(f"{k}={v}" for k, v in r["drop_reasons"].items()) or "-",
                      ", ".join(f"{k}={v}" for k, v in r["error_reasons"].items()) or "-")
    console.print(table)


@app.command()
def video(
    input: Annotated[Path, typer.Option("--input", help="folder of raw videos")],
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where outputs and ledger go")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML over defaults")] = None,
) -> None:
    """Curate videos: shots, clips, crop, quality, dedup, key frames (a Prefect flow on Ray)."""
    from weft.pipelines.video import ConfigError, load_config, preflight
    from weft.schemas.run_dir import ConfigMismatchError

    try:  # bad configuration fails here, before Prefect or Ray start
        preflight(load_config(config))
        if not input.is_dir():
            raise ConfigError(f"--input {input} is not a directory")
    except ConfigError as exc:
        _fail(str(exc))
    from weft.flows import video_flow

    try:
        result = video_flow(input_dir=str(input), run_dir=str(run_dir),
                            config_path=str(config) if config else None)
    except (ConfigError, ConfigMismatchError) as exc:
        _fail(str(exc))
    print_funnel(result["funnel"])
    cap = result["caption"]
    console.print(f"captions: {cap['samples']} samples from {cap['clips_in']} clips; "
                  f"{cap['requests']} requests, {cap['cache_hits']} from the cache, "
                  f"{cap['model_calls']} model calls ({cap['model']}@{cap['model_revision']})")
    console.print(f"run {result['run_id']}: outputs in {result['run_dir']}")


@app.command()
def demo(
    run_dir: Annotated[Path, typer.Option("--run-dir")] = Path("runs/demo"),
    models_dir: Annotated[Path, typer.Option("--models-dir", help="where tiny models are "
                                             "built")] = Path("~/.cache/weft/models/tiny"),
) -> None:
    """Fetch sample videos, build tiny models, and run the demo flow to captions."""
    import yaml

    from weft.assets import fetch
    from weft.pipelines.video import CONFIGS_DIR
    from weft.stages.infer.tiny_models import make_tiny_models
    from weft.stages.video.open_clip_model import save_tiny_open_clip

    inputs = run_dir.parent / f"{run_dir.name}-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for name in DEMO_VIDEOS:
        src = fetch(name)
        dst = inputs / name
        if not dst.exists():
            shutil.copyfile(src, dst)
        console.print(f"input {dst} ({dst.stat().st_size:,} bytes)")
    models_dir = models_dir.expanduser().resolve()
    tiny = make_tiny_models(models_dir)
    clip_dir = models_dir / "open_clip"
    if not (clip_dir / "open_clip_config.json").exists():
        save_tiny_open_clip(clip_dir)
    console.print(f"tiny models (random weights, no semantics) in {models_dir}")
    registry = run_dir.parent / f"{run_dir.name}-models.yaml"
    registry.write_text(yaml.safe_dump({"models": {
        "caption-vlm": {"path": str(tiny["qwen2_5_vl"]), "kind": "vlm"},
        "filter-llm": {"path": str(tiny["qwen2_5"]), "kind": "llm"}}}))
    config = run_dir.parent / f"{run_dir.name}-config.yaml"
    config.write_text(yaml.safe_dump({
        # Tiny random models: the policy records their scores without deciding on them.
        "policy": str(CONFIGS_DIR / "policies" / "video-tiny-models.yaml"),
        "models": str(registry.resolve()),
        "embed": {"model_dir": str(clip_dir)},
    }, sort_keys=False))
    video(input=inputs, run_dir=run_dir, config=config)


@assets_app.command("fetch")
def assets_fetch(names: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Download assets (all when none are named) into $WEFT_ASSETS or ~/.cache/weft/assets."""
    from weft.assets import fetch_all

    for name, path in fetch_all(names).items():
        console.print(f"{name}: {path}")


@ledger_app.command("funnel")
def ledger_funnel(run_dir: Path) -> None:
    """Print a run's funnel and check in = kept + dropped + errored for every stage."""
    from weft.schemas.ledger import StagePlan, check_invariant, read_ledger
    from weft.schemas.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.manifest_path.exists():
        _fail(f"{run_dir} is not a run directory (no run.json)")
    manifest = run.manifest()
    plan = [StagePlan(**p) for p in manifest["plan"]]
    import pyarrow.parquet as pq

    n_inputs = pq.read_metadata(run.inputs_path).num_rows if run.inputs_path.exists() else None
    table = read_ledger(run.ledger_dir)
    if n_inputs is None:
        n_inputs = sum(1 for s in table.column("stage").to_pylist() if s == plan[0].name)
    rows = check_invariant(table, plan, n_inputs)
    print_funnel([r.__dict__ for r in rows])


@models_app.command("make-tiny-clip")
def make_tiny_clip(out: Annotated[Path, typer.Option("--out")]) -> None:
    """Save a tiny random-init open_clip image model in the format `embed.model_dir` reads."""
    from weft.stages.video.open_clip_model import save_tiny_open_clip

    save_tiny_open_clip(out)
    console.print(f"tiny open_clip model saved to {out}")


@models_app.command("make-tiny")
def make_tiny(out: Annotated[Path, typer.Option("--out")]) -> None:
    """Save tiny random-init Qwen2.5-VL and Qwen2.5 models in Hugging Face format under DIR."""
    from weft.assets import AssetUnavailableError
    from weft.stages.infer.tiny_models import make_tiny_models

    try:
        paths = make_tiny_models(out)
    except AssetUnavailableError as exc:
        _fail(f"cannot fetch the GPT-2 vocabulary the tiny models use: {exc}")
    for name, path in paths.items():
        console.print(f"{name}: {path}")


@config_app.command("defaults")
def config_defaults(
    pipeline: Annotated[str, typer.Argument(help="pipeline name: video")] = "video",
    write: Annotated[bool, typer.Option("--write", help="rewrite configs/<pipeline>.yaml")] = False,
) -> None:
    """Print every default of a pipeline's config as commented YAML (or rewrite the file)."""
    from weft.pipelines import video as video_pipeline

    renderers = {"video": (video_pipeline.default_config_yaml, video_pipeline.DEFAULT_CONFIG)}
    if pipeline not in renderers:
        _fail(f"unknown pipeline {pipeline!r}; known: {', '.join(renderers)}")
    render, path = renderers[pipeline]
    if write:
        path.write_text(render())
        console.print(f"wrote {path}")
    else:
        sys.stdout.write(render())


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
