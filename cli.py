"""The `weft` command line: every command with one line of help (`weft --help`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

# Set before Prefect or Ray import (the `weft` script imports this module first): no
# internet on curation machines, so Prefect's telemetry would only log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

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
shards_app = typer.Typer(no_args_is_help=True,
                         help="WebDataset shards: write them from curated runs, verify them.")
app.add_typer(shards_app, name="shards")
audit_app = typer.Typer(no_args_is_help=True,
                        help="Answer an auditor from the ledger: trace a sample, explain a drop, "
                             "report a run.")
app.add_typer(audit_app, name="audit")
synth_app = typer.Typer(no_args_is_help=True,
                        help="Reasoning-augmented synthesis: text-to-image and edits with "
                             "reasoning traces.")
app.add_typer(synth_app, name="synth")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate trained checkpoints.")
app.add_typer(eval_app, name="eval")
shapes_app = typer.Typer(no_args_is_help=True,
                         help="The shapes world: generated data where every answer is known.")
app.add_typer(shapes_app, name="shapes")
policy_app = typer.Typer(no_args_is_help=True,
                         help="Re-decide a finished run under another policy, from stored scores.")
app.add_typer(policy_app, name="policy")
web_app = typer.Typer(no_args_is_help=True,
                      help="Web documents: run the curation flow, train text classifiers.")
app.add_typer(web_app, name="web")
console = Console()

DEMO_VIDEOS = ["bikes.mp4", "cityCC0.mpg", "Megamind.avi", "Megamind_bugy.avi"]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _run_flow(pipeline: Any, flow_name: str, input: Path, run_dir: Path,
              config: Path | None) -> dict[str, Any]:
    """Check the config before Prefect or Ray start, run the flow, fail with one message."""
    from weft import flows
    from weft.pipelines.common import ConfigError
    from weft.schemas.run_dir import ConfigMismatchError

    try:
        pipeline.preflight(pipeline.load_config(config))
        if not input.is_dir():
            raise ConfigError(f"--input {input} is not a directory")
        return getattr(flows, flow_name)(input_dir=str(input), run_dir=str(run_dir),
                                         config_path=str(config) if config else None)
    except (ConfigError, ConfigMismatchError) as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


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
    from weft.pipelines import video as pipeline

    result = _run_flow(pipeline, "video_flow", input, run_dir, config)
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
    """Fetch sample videos, build tiny models, curate, synthesize, shard, train the tiny
    MoT, sample."""
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
    synth_dir = _demo_synth(models_dir, registry, run_dir)
    mixture = run_dir.parent / f"{run_dir.name}-mixture.yaml"
    mixture.write_text(yaml.safe_dump({"name": "demo", "sources": [
        {"name": "video", "run_dir": str(run_dir.resolve()), "weight": 1.0},
        {"name": "synth", "run_dir": str(synth_dir.resolve()), "weight": 1.0}]},
        sort_keys=False))
    shards = run_dir.parent / f"{run_dir.name}-shards"
    shards_write(out=shards, mixture_file=mixture, run_dir=None, name=None, seed=0,
                 max_shard_bytes=1_000_000_000, verify=True)
    _demo_train(models_dir, tiny["qwen2_5"], shards, run_dir)


DEMO_PROMPTS = ["a red bicycle in a city street", "a cartoon hero with a blue head",
                "a bowl of ramen, top view", "a lighthouse at dusk"]


def _demo_synth(models_dir: Path, registry: Path, video_run: Path) -> Path:
    """Reasoning-augmented samples: text-to-image from a few prompts (tiny FLUX renders)
    and conceptual edits drawn from the demo's curated clips."""
    import json

    import yaml

    from weft import flows
    from weft.pipelines.video import CONFIGS_DIR
    from weft.stages.synth.tiny_renderer import make_tiny_flux

    inputs = video_run.parent / f"{video_run.name}-synth-inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in DEMO_PROMPTS))
    config = video_run.parent / f"{video_run.name}-synth-config.yaml"
    config.write_text(yaml.safe_dump({
        # Tiny random models: the policy records their verdicts without deciding on them.
        "policy": str(CONFIGS_DIR / "policies" / "synth-tiny-models.yaml"),
        "models": str(registry.resolve()),
        "interleaved_runs": [str(video_run.resolve())],
        "parse": {"max_pairs_per_run": 4},
        "rollout": {"rollouts": 1},
        "reason": {"max_tokens": 64},
        "render": {"path": str(make_tiny_flux(models_dir / "flux")), "height": 64,
                   "width": 64, "steps": 4},
    }, sort_keys=False))
    out = video_run.parent / f"{video_run.name}-synth"
    result = flows.synth_flow(input_dir=str(inputs), run_dir=str(out), config_path=str(config))
    print_funnel(result["funnel"])
    return out


def _demo_train(models_dir: Path, llm_dir: Path, shards: Path, run_dir: Path) -> None:
    """Train the tiny MoT on the demo shards, then sample an image and a caption."""
    from weft.flows import train_flow
    from weft.model.tiny_parts import make_tiny_siglip2, make_tiny_vae
    from weft.train.recipes import tiny_recipe
    from weft.train.sample import sample_run

    train_dir = run_dir.parent / f"{run_dir.name}-train"
    config = tiny_recipe(llm_dir, make_tiny_siglip2(models_dir / "siglip2"),
                         make_tiny_vae(models_dir / "vae"), shards, train_dir)
    result = train_flow(config=config.model_dump(mode="json"))
    console.print(f"trained the tiny MoT to step {result['step']} in {train_dir} "
                  f"(CE {result['last']['ce']:.3f}, MSE {result['last']['mse']:.3f})")
    frame = sorted((run_dir / "keyframes").glob("*/0.jpg"))[0]
    sample = sample_run(train_dir, "a frame of a video", frame, size=(64, 96), steps=10)
    console.print(f"sampled image: {sample.image_path}; caption of {frame.name}: "
                  f"{sample.caption!r} (a tiny random model: words, not sense)")


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


@models_app.command("make-tiny-flux")
def make_tiny_flux_cmd(out: Annotated[Path, typer.Option("--out")] = Path(
        "~/.cache/weft/models/tiny/flux")) -> None:
    """Save a tiny random-init FLUX pipeline (the synthesis renderer in tests and the demo)."""
    from weft.stages.synth.tiny_renderer import make_tiny_flux

    console.print(f"tiny FLUX pipeline: {make_tiny_flux(out.expanduser())}")


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
    pipeline: Annotated[str, typer.Argument(help="config name: video | web | synth | "
                                                 "train")] = "video",
    write: Annotated[bool, typer.Option("--write", help="rewrite configs/<pipeline>.yaml")] = False,
) -> None:
    """Print every default of a config (video, web, train) as commented YAML (or rewrite it)."""
    from weft.pipelines import synth as synth_pipeline
    from weft.pipelines import video as video_pipeline
    from weft.pipelines import web as web_pipeline
    from weft.train import config as train_config

    renderers = {"synth": (synth_pipeline.default_config_yaml, synth_pipeline.DEFAULT_CONFIG),
                 "video": (video_pipeline.default_config_yaml, video_pipeline.DEFAULT_CONFIG),
                 "web": (web_pipeline.default_config_yaml, web_pipeline.DEFAULT_CONFIG),
                 "train": (train_config.default_config_yaml, train_config.DEFAULT_CONFIG)}
    if pipeline not in renderers:
        _fail(f"unknown pipeline {pipeline!r}; known: {', '.join(renderers)}")
    render, path = renderers[pipeline]
    if write:
        path.write_text(render())
        console.print(f"wrote {path}")
    else:
        sys.stdout.write(render())


@web_app.command("run")
def web_run(
    input: Annotated[Path, typer.Option("--input", help="folder of HTML pages / record files")],
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where outputs and ledger go")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML over defaults")] = None,
) -> None:
    """Curate web documents: parse, language, heuristics, classifier, images, dedup, LLM band."""
    from weft.pipelines import web as pipeline

    result = _run_flow(pipeline, "web_flow", input, run_dir, config)
    print_funnel(result["funnel"])
    llm = result["dedup"].get("llm") or {}
    if llm:
        console.print(f"llm_filter: {llm['in_band']} of {llm['docs']} documents in the "
                      f"uncertain band; {llm['model_calls']} model calls, "
                      f"{llm['cache_hits']} from the cache")
    console.print(f"run {result['run_id']}: outputs in {result['run_dir']}")


@web_app.command("train-classifier")
def web_train_classifier(
    out: Annotated[Path, typer.Option("--out", help="directory for the model and card.json")],
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="table (parquet/csv/jsonl) with text and label columns")] = None,
    llm: Annotated[str | None, typer.Option(
        "--llm", help="label --texts with this registry model instead")] = None,
    texts: Annotated[Path | None, typer.Option("--texts", help="table of texts (with --llm)")]
    = None,
    models: Annotated[Path | None, typer.Option(
        "--models", help="model registry YAML (default configs/models.yaml)")] = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="LLM request cache (default OUT/llm_cache.sqlite)")] = None,
    prompt: Annotated[str, typer.Option(help="configs/prompts/<prompt>.yaml")] = "quality_label",
    text_column: Annotated[str, typer.Option(help="column holding the text")] = "text",
    label_column: Annotated[str, typer.Option(help="column holding the label")] = "label",
    seed: Annotated[int, typer.Option(help="split and training seed")] = 0,
    epoch: Annotated[int, typer.Option(help="fastText epochs")] = 10,
    lr: Annotated[float, typer.Option(help="fastText learning rate")] = 0.5,
    word_ngrams: Annotated[int, typer.Option(help="fastText word n-grams")] = 2,
    dim: Annotated[int, typer.Option(help="fastText vector size")] = 50,
    test_fraction: Annotated[float, typer.Option(help="held-out share per label")] = 0.2,
    quantize: Annotated[bool, typer.Option(help="save a quantized model.ftz")] = False,
) -> None:
    """Train a fastText quality classifier on labels from a table or from an LLM."""
    from weft.stages.web.fasttext_classifier import read_labelled, read_texts, train_classifier

    if (labels is None) == (llm is None):
        _fail("give exactly one of --labels TABLE or --llm MODEL_NAME --texts TABLE")
    try:
        if labels is not None:
            text_list, label_list = read_labelled(labels, text_column, label_column)
            source = f"table {labels} (columns {text_column!r}, {label_column!r})"
        else:
            if texts is None:
                _fail("--llm needs --texts TABLE")
            text_list = read_texts(texts, text_column)
            label_list, source = _llm_labels(text_list, llm, models,
                                             cache or out / "llm_cache.sqlite", prompt, out,
                                             str(texts))
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    try:
        card = train_classifier(text_list, label_list, out, seed=seed, epoch=epoch, lr=lr,
                                wordNgrams=word_ngrams, dim=dim, test_fraction=test_fraction,
                                quantize=quantize, data_source=source)
    except ValueError as exc:
        _fail(str(exc))
    table = Table(title=f"held-out metrics ({card.split['test']} test, "
                        f"{card.split['train']} train)")
    for col in ("label", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "label" else "right")
    for name, m in card.metrics.items():
        table.add_row(name, f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.f1:.4f}",
                      str(m.support))
    console.print(table)
    if card.accuracy is not None:
        console.print(f"accuracy: {card.accuracy:.4f}")
    console.print(f"model: {out / card.model_file} (sha256 {card.model_sha256[:16]})")
    console.print(f"card: {out / 'card.json'}")


def _llm_labels(text_list: list[str], llm: str, models: Path | None, cache_path: Path,
                prompt: str, out: Path, what: str) -> tuple[list[str | None], str]:
    """Label texts with a registry model (Ray Data, request cache); answers go to OUT."""
    import json

    from weft.pipelines.ray_runtime import RayConfig, init_ray
    from weft.stages.infer.cache import RequestCache
    from weft.stages.infer.registry import ModelDirError, load_registry
    from weft.stages.web.fasttext_classifier import label_with_llm

    registry = load_registry(models or Path(__file__).resolve().parent / "configs" /
                             "models.yaml")
    try:
        spec = registry.get(llm)
        revision = registry.check(llm)
    except (KeyError, ModelDirError) as exc:
        _fail(str(exc).strip('"'))
    init_ray(RayConfig())
    with RequestCache(cache_path) as cache:
        result = label_with_llm(text_list, spec, llm, revision, cache, prompt)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "llm_labels.jsonl", "w") as fh:
        for i, (answer, label) in enumerate(zip(result.answers, result.labels, strict=True)):
            fh.write(json.dumps({"index": i, "answer": answer, "label": label}) + "\n")
    st = result.stats
    console.print(f"LLM labels: {len(text_list) - len(result.unparseable)} of {len(text_list)} "
                  f"parseable; {st.requests} requests, {st.cache_hits} from the cache, "
                  f"{st.model_calls} model calls ({llm}@{revision}, {result.prompt_ref}); "
                  f"answers in {out / 'llm_labels.jsonl'}")
    return result.labels, result.data_source(what)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", help="training YAML over "
                                                "configs/train.yaml")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override "
                                                   "(dotted key, YAML value); repeatable")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="ranks on this node (torchrun)")] = 1,
    ray_workers: Annotated[int, typer.Option("--ray-workers", help="run on a Ray cluster with "
                                             "this many workers (Ray Train)")] = 0,
    use_gpu: Annotated[bool, typer.Option("--gpu/--no-gpu", help="with --ray-workers")] = False,
) -> None:
    """Train the MoT model on shards (one process, torchrun ranks, or Ray Train workers)."""
    from weft.train.__main__ import parse_overrides
    from weft.train.config import TrainConfigError, load_train_config

    overrides = parse_overrides(set_ or [])
    try:
        loaded = load_train_config(config, overrides)
    except TrainConfigError as exc:
        _fail(str(exc))
    if ray_workers:
        from weft.train.ray_launcher import launch_on_ray

        if config is None:
            _fail("--ray-workers needs --config (the workers read the file)")
        result = launch_on_ray(str(config), ray_workers, use_gpu, overrides)
    else:
        from weft.flows import train_flow

        result = train_flow(config=loaded.model_dump(mode="json"), nproc=nproc)
    last = result.get("last") or {}
    console.print(f"trained to step {result['step']}: CE {last.get('ce', float('nan')):.4f}, "
                  f"MSE {last.get('mse', float('nan')):.4f}; export {result.get('export_dir')}")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="a training run directory (with export/)")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="generate an image")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="caption this image")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Euler steps")] = 20,
    size: Annotated[tuple[int, int], typer.Option("--size", help="height width")] = (64, 64),
) -> None:
    """Sample from a trained run: an image for --prompt, a caption for --image."""
    from weft.train.sample import sample_run

    if prompt is None and image is None:
        _fail("give --prompt, --image or both")
    result = sample_run(run_dir, prompt, image, size=size, steps=steps)
    if result.image_path:
        console.print(f"image for {prompt!r}: {result.image_path} {result.image_size}")
    if image is not None:
        console.print(f"caption of {image}: {result.caption!r}")


@shards_app.command("write")
def shards_write(
    out: Annotated[Path, typer.Option("--out", help="output folder (one shard set per "
                                                    "dataset, mixture.json)")],
    mixture_file: Annotated[Path | None, typer.Option("--mixture", help="mixture YAML "
                                                      "(configs/mixtures/example.yaml)")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="shard one finished run "
                                                 "(instead of --mixture)")] = None,
    name: Annotated[str | None, typer.Option("--name", help="dataset name with --run-dir "
                                             "(default: the pipeline)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="with --run-dir")] = 0,
    max_shard_bytes: Annotated[int, typer.Option("--max-shard-bytes", help="with "
                                                 "--run-dir")] = 1_000_000_000,
    verify: Annotated[bool, typer.Option("--verify/--no-verify")] = True,
) -> None:
    """Write curated runs to WebDataset shards (a Prefect flow), then verify them."""
    from weft.flows import shards_flow
    from weft.pipelines.common import ConfigError
    from weft.pipelines.mixture import load_mixture, single_run_mixture, source_dir

    if (mixture_file is None) == (run_dir is None):
        _fail("give exactly one of --mixture FILE or --run-dir RUN_DIR")
    try:
        if mixture_file is not None:
            config, base = load_mixture(mixture_file)
        else:
            config, base = single_run_mixture(run_dir, name, seed, max_shard_bytes), Path(".")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    resolved = config.model_dump(mode="json")
    for source, data in zip(config.sources, resolved["sources"], strict=True):
        data["run_dir"] = str(source_dir(source, base))
    result = shards_flow(config=resolved, out_dir=str(out.resolve()), verify=verify)
    print_shards(result["datasets"], result["verify"])
    console.print(f"mixture index: {result['mixture']}")
    if not all(v["ok"] for v in result["verify"]):
        raise typer.Exit(1)


def print_shards(datasets: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    """The end-of-step summary: rows, kept, drops and errors, shards, bytes, verification."""
    table = Table(title="shards")
    for col in ("dataset", "rows", "kept", "dropped", "errors", "shards", "bytes", "verify"):
        table.add_column(col, justify="left" if col in ("dataset", "dropped", "errors",
                                                        "verify") else "right")
    for r, v in zip(datasets, checks, strict=True):
        table.add_row(r["name"], str(r["rows"]), str(r["kept"]),
                      ", ".join(f"{k}={n}" for k, n in r["dropped"].items()) or "0",
                      ", ".join(f"{k}={n}" for k, n in r["errors"].items()) or "0",
                      str(r["shards"]), f"{r['bytes']:,}",
                      "skipped" if v.get("skipped") else "ok" if v["ok"] else
                      f"{len(v['problems'])} problems")
    console.print(table)


@shards_app.command("verify")
def shards_verify(path: Annotated[Path, typer.Argument(help="a shard set or a mixture "
                                                              "output folder")]) -> None:
    """Decode every sample, check shard hashes, the index and the manifest; exit 1 on any
    mismatch."""
    from tqdm import tqdm

    from weft.pipelines.mixture import shard_sets
    from weft.pipelines.shard import verify_shards

    try:
        sets = shard_sets(path)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    table = Table(title=f"verify {path}")
    for col in ("shard set", "shards", "samples", "images", "problems"):
        table.add_column(col, justify="left" if col == "shard set" else "right")
    problems = []
    for shard_dir in tqdm(sets, desc="verify", unit="set", disable=len(sets) < 2):
        report = verify_shards(shard_dir)
        table.add_row(str(shard_dir), str(report.n_shards), str(report.n_samples),
                      str(report.n_images), str(len(report.problems)))
        problems += report.problems
    console.print(table)
    for problem in problems:
        console.print(f"[red]problem:[/] {problem}", markup=True, highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print("[green]all samples decode; hashes, index and manifest agree[/]")


@audit_app.command("trace")
def audit_trace(
    key: Annotated[str, typer.Argument(help="a shard sample key (or a unique prefix, >= 8 hex)")],
    shards: Annotated[list[Path], typer.Option("--shards", help="shard set or mixture folder "
                                               "(repeatable)")],
    check_source: Annotated[bool, typer.Option("--check-source", help="re-hash the source "
                                               "file at its recorded path")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The whole chain of a shard sample back to its source bytes: stages, scores,
    thresholds, models and prompts."""
    import json

    from rich.markdown import Markdown

    from weft.pipelines.audit.trace import render_trace, trace_key
    from weft.pipelines.mixture import shard_sets

    try:
        dirs = [d for path in shards for d in shard_sets(path)]
        trace = trace_key(key, dirs, check_source=check_source)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(trace.to_dict(), indent=2, default=str))
    else:
        console.print(Markdown(render_trace(trace)))
    if not trace.ok:
        raise typer.Exit(1)


@audit_app.command("report")
def audit_report(
    run_dir: Annotated[Path, typer.Argument(help="a curation run directory")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file (default "
                                             "RUN_DIR/summary/report.html)")] = None,
) -> None:
    """One static HTML report: funnel, reasons, score histograms with thresholds, sample
    thumbnails, models, prompts, config, policy and run time per stage."""
    from weft.pipelines.audit.report import write_report

    try:
        path = write_report(run_dir, out)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(f"report: {path} (open it in a browser; no server, no external assets)")


@audit_app.command("why")
def audit_why(
    item_id: Annotated[str, typer.Argument(help="an item id (or a unique prefix, >= 8 hex)")],
    run_dirs: Annotated[list[Path], typer.Option("--run-dir", help="run directory to search "
                                                 "(repeatable)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """For an item: the stage that stopped it, the reason and the numbers against the
    thresholds (or that it was kept everywhere), and where it came from."""
    import json

    from rich.markdown import Markdown

    from weft.pipelines.audit.trace import render_why, why

    try:
        verdicts = why(item_id, run_dirs)
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps([v.to_dict() for v in verdicts], indent=2, default=str))
    else:
        console.print(Markdown(render_why(verdicts)))


@synth_app.command("run")
def synth_run(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where outputs and ledger go")],
    input: Annotated[Path | None, typer.Option("--input", help="folder with prompts.jsonl "
                                               "and/or edits.jsonl (optional when the config "
                                               "lists interleaved_runs)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML over "
                                                "configs/synth.yaml")] = None,
) -> None:
    """Synthesize reasoning-augmented samples (a Prefect flow on Ray)."""
    from weft import flows
    from weft.pipelines import synth
    from weft.pipelines.common import ConfigError
    from weft.schemas.run_dir import ConfigMismatchError

    try:
        synth.preflight(synth.load_config(config))
        if input is not None and not input.is_dir():
            raise ConfigError(f"--input {input} is not a directory")
        result = flows.synth_flow(input_dir=str(input) if input else None,
                                  run_dir=str(run_dir),
                                  config_path=str(config) if config else None)
    except (ConfigError, ConfigMismatchError) as exc:
        _fail(str(exc))
    print_funnel(result["funnel"])
    console.print(f"run {result['run_id']}: outputs in {result['run_dir']}")


@eval_app.command("shapes")
def eval_shapes(
    checkpoint: Annotated[Path, typer.Argument(help="a training run directory (with export/)")],
    out: Annotated[Path | None, typer.Option("--out", help="where the table and grids go")
                   ] = None,
    shapes_config: Annotated[Path | None, typer.Option("--shapes-config", help="the shapes "
                                                       "config the data used (default: "
                                                       "read from the run's shards)")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="evaluate as this "
                                                "recipe's eval section does (items, steps, "
                                                "guidance, shift, weights); the options "
                                                "below override it")] = None,
    n: Annotated[int | None, typer.Option("--n", help="held-out items per category "
                                          "[default: the recipe's, else 8]")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Euler steps per image "
                                              "[default: the recipe's, else 20]")] = None,
    cfg_text: Annotated[float | None, typer.Option("--cfg-text", help="text guidance scale, "
                                                   "1 = none [default: the recipe's, else "
                                                   "4.0]")] = None,
    cfg_image: Annotated[float | None, typer.Option("--cfg-image", help="image guidance "
                                                    "scale of edits [default: the "
                                                    "recipe's, else 1.5]")] = None,
    autoguidance: Annotated[float | None, typer.Option("--autoguidance", help="guide "
                                                       "against the run's model at "
                                                       "--guide-step, 1 = off [default: "
                                                       "the recipe's, else 1]")] = None,
    guide_step: Annotated[int | None, typer.Option("--guide-step", help="the step of the "
                                                   "earlier export that autoguides "
                                                   "(checkpoint.export_steps)")] = None,
    diagnose: Annotated[bool, typer.Option("--diagnose", help="also where generation "
                                           "fails: completion from noised right images "
                                           "per t0, and velocity error with the item's "
                                           "prompt vs another's")] = False,
) -> None:
    """Toy GenEval, edit, VQA and caption accuracy of a run against chance, with grids;
    what it was asked is written to OUT/settings.json."""
    from weft.stages.shapes.evaluate import eval_shapes_cli
    from weft.stages.shapes.recipe import RecipeError

    try:
        markdown, pngs = eval_shapes_cli(checkpoint, out, shapes_config, diagnose, recipe,
                                         n_per_category=n, steps=steps,
                                         cfg_text_scale=cfg_text, cfg_image_scale=cfg_image,
                                         autoguidance=autoguidance, guide_step=guide_step)
    except (RecipeError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(markdown)
    for path in pngs:
        console.print(f"grid: {path}")


@shapes_app.command("generate")
def shapes_generate(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="where the shapes run goes")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML over "
                                                "configs/shapes.yaml")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override; "
                                                   "repeatable")] = None,
) -> None:
    """Generate shapes-world samples (captions, prompts, VQA, edits, clips) as a run with a
    ledger; shard it with `weft shards write --run-dir`."""
    from weft.pipelines.common import ConfigError
    from weft.pipelines.shapes import generate_run, load_config
    from weft.train.__main__ import parse_overrides

    try:
        loaded = load_config(config, parse_overrides(set_ or []))
    except ConfigError as exc:
        _fail(str(exc))
    summary = generate_run(loaded, run_dir)
    table = Table(title=f"shapes run {run_dir}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, int | float | str):
            table.add_row(str(key), str(value))
    console.print(table)


@shapes_app.command("recipe")
def shapes_recipe(
    recipe: Annotated[Path, typer.Argument(help="a recipe YAML, e.g. "
                                           "configs/shapes-recipe-cpu.yaml")],
    out: Annotated[Path, typer.Option("--out", help="where data, VAE, ViT, the training "
                                      "run and the evaluation go")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. "
                                                   "train.steps=500; repeatable")] = None,
) -> None:
    """Data, VAE, ViT, training and the shapes evaluation of one recipe, end to end; prints
    the table (accuracy against chance per category) and what each step took."""
    from weft.stages.shapes.evaluate import chance_summary, task_means
    from weft.stages.shapes.recipe import RecipeError, load_recipe, run_recipe
    from weft.train.__main__ import parse_overrides, setup_logging
    from weft.train.config import TrainConfigError

    try:
        loaded = load_recipe(recipe, parse_overrides(set_ or []))
    except RecipeError as exc:
        _fail(str(exc))
    setup_logging()  # the trainer's metric lines
    try:
        result = run_recipe(loaded, out, log=console.print, progress=True)
    except TrainConfigError as exc:  # e.g. a run directory of another model
        _fail(str(exc))
    console.print(result.table.to_markdown())
    table = Table(title=f"shapes recipe {recipe.name}")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in result.seconds.items():
        table.add_row(step, f"{seconds:.0f}")
    table.add_row("total", f"{result.total_seconds:.0f}")
    console.print(table)
    console.print(f"per task: {task_means(result.table)}; grids: "
                  f"{', '.join(map(str, result.pngs))}")
    console.print(chance_summary(result.table))


@policy_app.command("apply")
def policy_apply(
    run_dir: Annotated[Path, typer.Argument(help="a finished video or web run")],
    policy: Annotated[Path, typer.Option("--policy", help="the new policy YAML")],
    out: Annotated[Path | None, typer.Option("--out", help="new run directory (default: "
                                             "RUN_DIR-policy-<hash>)")] = None,
    shards: Annotated[Path | None, typer.Option("--shards", help="where the new shard set "
                                                "goes (default: NEW_RUN/shards)")] = None,
    write_shards: Annotated[bool, typer.Option("--write-shards/--no-shards")] = True,
) -> None:
    """Re-decide RUN_DIR under --policy without recomputing scores or calling models, write
    a new shard set, and print kept/dropped counts per stage before and after."""
    from weft.flows import policy_flow
    from weft.pipelines.audit.policy_apply import PolicyApplyError, default_out_dir
    from weft.pipelines.common import ConfigError, read_policy

    try:
        new_policy = read_policy(policy, _policy_blocks(policy))
    except ConfigError as exc:
        _fail(str(exc))
    target = (out or default_out_dir(run_dir.resolve(), new_policy)).resolve()
    shards_dir = (shards or target / "shards").resolve() if write_shards else None
    try:
        result = policy_flow(run_dir=str(run_dir), policy_path=str(policy),
                             out_dir=str(target), shards_dir=str(shards_dir)
                             if shards_dir else None)
    except (ConfigError, PolicyApplyError) as exc:
        _fail(str(exc))
    table = Table(title=f"policy {new_policy.name} v{new_policy.version} applied")
    for col in ("stage", "kept before", "kept after", "dropped before", "dropped after",
                "errors"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in result["stages"]:
        changed = s["kept_before"] != s["kept_after"]
        style = "bold yellow" if changed else None
        table.add_row(s["stage"], str(s["kept_before"]), str(s["kept_after"]),
                      str(s["dropped_before"]), str(s["dropped_after"]),
                      str(s["errored_after"]), style=style)
    console.print(table)
    console.print(f"model calls: {result['model_calls']}; new run: {result['run_dir']}")
    if result["shards"]:
        print_shards(result["shards"]["datasets"], result["shards"]["verify"])


def _policy_blocks(path: Path) -> set[str]:
    """The blocks a policy file names (read_policy checks them against the run later)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    rules = data.get("rules") if isinstance(data, dict) else None
    return set(rules) if isinstance(rules, dict) else set()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
