"""Prefect flows over the pipelines.

Each flow task runs one pipeline step; Ray runs the stages inside it. Task
cache keys are (input hash, config hash, code version) and results live in the
run directory, so a re-run with the same config recomputes nothing and a killed
run redoes only the partitions that were in flight.

Prefect uses its embedded server unless PREFECT_API_URL is set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import TaskRunContext

from weft.pipelines import common, mixture, synth, video, web
from weft.pipelines.common import StartedRun
from weft.pipelines.ray_runtime import init_ray
from weft.pipelines.shard import verify_shards
from weft.schemas.ids import hash_of
from weft.schemas.ledger import FunnelRow, StagePlan, check_invariant, read_ledger, write_ledger
from weft.schemas.run_dir import RunDir


def funnel_markdown(rows: list[FunnelRow]) -> str:
    """The funnel as a markdown table (Prefect artifact and summary file)."""
    lines = ["| stage | in | kept | dropped | errors | drop reasons | error reasons |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        drops = ", ".join(f"{k}: {v}" for k, v in r.drop_reasons.items()) or "-"
        errors = ", ".join(f"{k}: {v}" for k, v in r.error_reasons.items()) or "-"
        lines.append(f"| {r.stage} | {r.items_in} | {r.kept} | {r.dropped} | {r.errored} "
                     f"| {drops} | {errors} |")
    return "\n".join(lines)


def partition_key(tag: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A task cache key over one partition: (tag, partition, config hash, code, run dir)."""

    def key(_: TaskRunContext, params: dict[str, Any]) -> str:
        return hash_of(tag, params["partition_id"], params["config_hash"],
                       params["code_version"], params["run_dir"])

    return key


def global_key(tag: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """A task cache key over every partition of a run (order-free)."""

    def key(_: TaskRunContext, params: dict[str, Any]) -> str:
        return hash_of(tag, sorted(params["partition_ids"]), params["config_hash"],
                       params["code_version"], params["run_dir"])

    return key


_partition_key = partition_key("video-partition")  # video and web partitions (tag kept)



@task(name="curate-partition", cache_key_fn=_partition_key, persist_result=True,
      result_serializer="json")
def curate_partition(partition_id: str, group: list[dict[str, Any]], config_path: str | None,
                     run_dir: str, run_id: str, config_hash: str, code_version: str
                     ) -> dict[str, Any]:
    """Probe, detect shots, cut, crop, score and embed the videos of one partition."""
    loaded = video.load_config(config_path)
    return video.process_partition(group, loaded, RunDir(Path(run_dir)), run_id)


@task(name="dedup-clips", cache_key_fn=global_key("video-dedup"), persist_result=True,
      result_serializer="json")
def dedup_clips(partition_ids: list[str], config_path: str | None, run_dir: str, run_id: str,
                config_hash: str, code_version: str) -> dict[str, Any]:
    """Exact, perceptual and semantic dedup across every partition."""
    loaded = video.load_config(config_path)
    return video.run_dedup(loaded, RunDir(Path(run_dir)), run_id, partition_ids)



@task(name="caption-clips", cache_key_fn=global_key("video-caption"), persist_result=True,
      result_serializer="json")
def caption_clips(partition_ids: list[str], config_path: str | None, run_dir: str, run_id: str,
                  config_hash: str, code_version: str) -> dict[str, Any]:
    """Frame-transition captions for every clip dedup kept, through the request cache."""
    loaded = video.load_config(config_path)
    return video.run_captions(loaded, RunDir(Path(run_dir)), run_id)


def start_run(pipeline: str, loaded: Any, plan: list[StagePlan], input_dir: str, run_dir: str,
              config_path: str | None, doc_root: bool = False) -> StartedRun:
    """Claim the run directory, ingest every input file, partition, and start Ray."""
    run = RunDir(Path(run_dir).resolve())
    run_id = hash_of(pipeline, loaded.config_hash, length=16)
    run.claim(pipeline=pipeline, config=loaded.resolved, config_hash=loaded.config_hash,
              run_id=run_id, plan=[p.__dict__ for p in plan], code_version=common.code_version())
    files = common.discover(Path(input_dir), loaded.config.discover)
    sources, ingest_ledger = common.ingest(files, common.run_context(loaded, run, run_id))
    write_ledger(ingest_ledger, run.ledger_dir / "ingest.parquet")
    if doc_root:  # local references (a page's images) must stay inside the input folder
        for source in sources:
            source["doc_root"] = str(Path(input_dir).resolve())
    groups = common.partitions(sources, loaded.config.partition_size)
    pids = [common.partition_id(g) for g in groups]
    common.prune_stale_ledger(run, pids)
    cluster = init_ray(loaded.config.ray)
    get_run_logger().info("ray: %s; %d files, %d sources, %d partitions", cluster, len(files),
                          len(sources), len(groups))
    task_args = {"config_path": config_path, "run_dir": str(run.root), "run_id": run_id,
                 "config_hash": loaded.config_hash, "code_version": common.code_version()}
    return StartedRun(run, run_id, plan, len(files), groups, pids, task_args)


def run_partitions(started: StartedRun, partition_task: Any) -> list[dict[str, Any]]:
    """One cached Prefect task per partition; a finished partition is never redone."""
    results = []
    for pid, group in zip(started.pids, started.groups, strict=True):
        marker = started.run.partition_dir(pid) / "_SUCCESS"
        state = partition_task.with_options(
            result_storage=started.storage, refresh_cache=not marker.exists() or None
        )(partition_id=pid, group=group, return_state=True, **started.task_args)
        results.append({**state.result(), "state": state.name})
    return results


def run_global(started: StartedRun, global_task: Any, output: Path) -> dict[str, Any]:
    """A cached task over every partition; redone only when its output is missing."""
    state = global_task.with_options(
        result_storage=started.storage, refresh_cache=not output.exists() or None,
    )(partition_ids=started.pids, return_state=True, **started.task_args)
    return {**state.result(), "state": state.name}


def finish_run(started: StartedRun, key: str, title: str) -> list[FunnelRow]:
    """Check the ledger invariant, write the funnel and the HTML audit report, and
    publish both as Prefect artifacts (the report as a link to its file)."""
    from weft.pipelines.audit.report import write_report

    rows = check_invariant(read_ledger(started.run.ledger_dir), started.plan,
                           n_inputs=started.n_files)
    table = funnel_markdown(rows)
    started.run.summary_dir.mkdir(parents=True, exist_ok=True)
    (started.run.summary_dir / "funnel.md").write_text(table + "\n")
    report = write_report(started.run.root)
    create_markdown_artifact(key=key, markdown=f"# {title}\n\n{table}\n\n"
                             f"Audit report: {report.as_uri()}\n",
                             description=f"run {started.run_id} in {started.run.root}")
    create_link_artifact(key=f"{key}-report", link=report.as_uri(),
                         link_text=f"audit report of run {started.run_id}",
                         description="static HTML: funnel, reasons, score histograms, "
                                     "samples, models, prompts, config, policy")
    return rows


@flow(name="video_flow", log_prints=True)
def video_flow(input_dir: str, run_dir: str, config_path: str | None = None) -> dict[str, Any]:
    """Raw videos in, curated, deduplicated and captioned clips out, every decision recorded."""
    loaded = video.load_config(config_path)
    video.preflight(loaded)
    started = start_run(video.PIPELINE, loaded, video.plan(), input_dir, run_dir, config_path)
    partitions = run_partitions(started, curate_partition)
    outputs = started.run.outputs_dir
    dedup = run_global(started, dedup_clips, outputs / "clips.parquet")
    caption = run_global(started, caption_clips, outputs / "captions.parquet")
    get_run_logger().info("captions: %s", caption)
    rows = finish_run(started, "video-funnel", "Video funnel")
    return {"run_id": started.run_id, "run_dir": str(started.run.root),
            "inputs": started.n_files, "partitions": partitions, "dedup": dedup,
            "caption": caption, "funnel": [r.__dict__ for r in rows]}


# ---------------------------------------------------------------------------
# web documents
# ---------------------------------------------------------------------------

@task(name="curate-web-partition", cache_key_fn=_partition_key, persist_result=True,
      result_serializer="json")
def curate_web_partition(partition_id: str, group: list[dict[str, Any]], config_path: str | None,
                         run_dir: str, run_id: str, config_hash: str, code_version: str
                         ) -> dict[str, Any]:
    """Parse, identify the language, score and load the images of one partition's documents."""
    loaded = web.load_config(config_path)
    return web.process_partition(group, partition_id, loaded, RunDir(Path(run_dir)), run_id)



@task(name="web-global-steps", cache_key_fn=global_key("web-dedup"), persist_result=True,
      result_serializer="json")
def dedup_web_docs(partition_ids: list[str], config_path: str | None, run_dir: str,
                   run_id: str, config_hash: str, code_version: str) -> dict[str, Any]:
    """Image copies across documents, structure, MinHash near-duplicates, the LLM band."""
    loaded = web.load_config(config_path)
    return web.run_global(loaded, RunDir(Path(run_dir)), run_id, partition_ids)


@flow(name="web_flow", log_prints=True)
def web_flow(input_dir: str, run_dir: str, config_path: str | None = None) -> dict[str, Any]:
    """HTML pages and OmniCorpus-style records in, clean documents out, every decision recorded."""
    loaded = web.load_config(config_path)
    web.preflight(loaded)
    started = start_run(web.PIPELINE, loaded, web.plan(loaded), input_dir, run_dir, config_path,
                        doc_root=True)
    partitions = run_partitions(started, curate_web_partition)
    dedup = run_global(started, dedup_web_docs, started.run.outputs_dir / "docs.parquet")
    rows = finish_run(started, "web-funnel", "Web funnel")
    return {"run_id": started.run_id, "run_dir": str(started.run.root),
            "inputs": started.n_files, "partitions": partitions, "dedup": dedup,
            "funnel": [r.__dict__ for r in rows]}


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------

@task(name="shard-dataset")
def shard_dataset(config: dict[str, Any], out_dir: str, name: str) -> dict[str, Any]:
    """Convert, filter and write one dataset's shards and its ledger rows."""
    loaded = mixture.MixtureConfig.model_validate(config)
    return mixture.shard_dataset(loaded, Path(out_dir), Path(out_dir), name).as_dict()


@task(name="verify-shards")
def verify_dataset(shard_dir: str) -> dict[str, Any]:
    """Decode every sample, check hashes, the index and the manifest."""
    return verify_shards(shard_dir).as_dict()


def shards_markdown(results: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    lines = ["| dataset | rows | kept | dropped | errors | shards | bytes | verify |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r, v in zip(results, checks, strict=True):
        dropped = ", ".join(f"{k}: {n}" for k, n in r["dropped"].items()) or "0"
        errors = ", ".join(f"{k}: {n}" for k, n in r["errors"].items()) or "0"
        verdict = "ok" if v["ok"] else f"{len(v['problems'])} problems"
        lines.append(f"| {r['name']} | {r['rows']} | {r['kept']} | {dropped} | {errors} "
                     f"| {r['shards']} | {r['bytes']} | {verdict} |")
    return "\n".join(lines)


@flow(name="shards_flow", log_prints=True)
def shards_flow(config: dict[str, Any], out_dir: str, verify: bool = True) -> dict[str, Any]:
    """Curated runs in, WebDataset shards per dataset + mixture.json out, then verified.

    `config` is a mixture (weft.pipelines.mixture.MixtureConfig) whose run dirs are
    absolute.
    """
    loaded = mixture.MixtureConfig.model_validate(config)
    out = mixture.start_mixture(loaded, Path("/"), out_dir)
    results = [shard_dataset(loaded.model_dump(mode="json"), str(out), s.name)
               for s in loaded.sources]
    mixture.write_mixture_index(loaded, out, mixture.mixture_run_id(loaded), results)
    checks = [verify_dataset(str(out / s.name)) if verify else
              {"ok": True, "problems": [], "skipped": True} for s in loaded.sources]
    table = shards_markdown(results, checks)
    create_markdown_artifact(key="shards", markdown=f"# Shards\n\n{table}\n",
                             description=f"mixture {loaded.name} in {out}")
    return {"out_dir": str(out), "datasets": results, "verify": checks,
            "mixture": str(out / mixture.MIXTURE_FILE)}


# ---------------------------------------------------------------------------
# re-deciding a run under a new policy
# ---------------------------------------------------------------------------

def policy_markdown(stages: list[dict[str, Any]]) -> str:
    lines = ["| stage | kept before | kept after | dropped before | dropped after | errors |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['kept_before']} | {s['kept_after']} "
                     f"| {s['dropped_before']} | {s['dropped_after']} | {s['errored_after']} |")
    return "\n".join(lines)


@flow(name="policy_flow", log_prints=True)
def policy_flow(run_dir: str, policy_path: str, out_dir: str | None = None,
                shards_dir: str | None = None) -> dict[str, Any]:
    """Re-decide a finished run under a new policy from its stored scores, then shard it."""
    from weft.pipelines.audit.policy_apply import apply_policy
    from weft.pipelines.audit.report import write_report

    result = apply_policy(run_dir, policy_path, out_dir).as_dict()
    report = write_report(Path(result["run_dir"]))
    create_link_artifact(key="policy-apply-report", link=report.as_uri(),
                         link_text="audit report of the re-decided run")
    table = policy_markdown(result["stages"])
    create_markdown_artifact(key="policy-apply", markdown=f"# Policy applied\n\n{table}\n\n"
                             f"model calls: {result['model_calls']}\n",
                             description=f"{run_dir} -> {result['run_dir']}")
    shards = None
    if shards_dir is not None:
        config = mixture.single_run_mixture(result["run_dir"])
        shards = shards_flow(config=config.model_dump(mode="json"), out_dir=shards_dir)
    return {**result, "shards": shards}


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

@task(name="train")
def train_task(config: dict[str, Any], nproc: int = 1) -> dict[str, Any]:
    """One training run: in this process, or under torchrun with `nproc` ranks."""
    import json
    import subprocess

    import yaml

    from weft.train.config import TrainConfig

    loaded = TrainConfig.model_validate(config)
    run_dir = Path(loaded.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if nproc > 1:
        from weft.train.__main__ import torchrun_command

        path = run_dir / "train-config.yaml"
        path.write_text(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))
        subprocess.run(torchrun_command(str(path), nproc), check=True)
    else:
        from weft.train.__main__ import setup_logging
        from weft.train.loop import run_training

        setup_logging()  # step lines on the console, like `python -m weft.train`
        run_training(loaded)
    return json.loads((run_dir / "result.json").read_text())


@flow(name="train_flow", log_prints=True)
def train_flow(config: dict[str, Any], nproc: int = 1) -> dict[str, Any]:
    """Shards in, a trained and exported MoT out (checkpoints, TensorBoard, safetensors)."""
    result = train_task(config, nproc)
    last = result.get("last") or {}
    create_markdown_artifact(
        key="training", description=f"run {config.get('run_dir')}",
        markdown=(f"# Training\n\n| step | loss | CE | MSE |\n|---:|---:|---:|---:|\n"
                  f"| {result['step']} | {last.get('loss', float('nan')):.4f} "
                  f"| {last.get('ce', float('nan')):.4f} | {last.get('mse', float('nan')):.4f} |"
                  f"\n\nexport: {result.get('export_dir')}\n"))
    return result


# ---------------------------------------------------------------------------
# reasoning-augmented synthesis
# ---------------------------------------------------------------------------


@task(name="synth-partition", cache_key_fn=partition_key("synth-partition"), persist_result=True,
      result_serializer="json")
def synth_partition(partition_id: str, group: list[dict[str, Any]], config_path: str | None,
                    run_dir: str, run_id: str, config_hash: str, code_version: str
                    ) -> dict[str, Any]:
    """Parse one partition's inputs: prompts, edit triples, interleaved candidates."""
    loaded = synth.load_config(config_path)
    return synth.process_partition(group, partition_id, loaded, RunDir(Path(run_dir)), run_id)



@task(name="synth-global-steps", cache_key_fn=global_key("synth-global"), persist_result=True,
      result_serializer="json")
def synthesize(partition_ids: list[str], config_path: str | None, run_dir: str, run_id: str,
               config_hash: str, code_version: str) -> dict[str, Any]:
    """Judge, roll out, instruct, reason, render, verify and dedup (models via the cache)."""
    loaded = synth.load_config(config_path)
    return synth.run_global(loaded, RunDir(Path(run_dir)), run_id, partition_ids)


@flow(name="synth_flow", log_prints=True)
def synth_flow(input_dir: str | None, run_dir: str, config_path: str | None = None
               ) -> dict[str, Any]:
    """Prompts, edit triples and curated runs in; reasoning-augmented samples out."""
    loaded = synth.load_config(config_path)
    synth.preflight(loaded)
    started = synth.start_run(loaded, input_dir, run_dir, config_path)  # also starts Ray
    partitions = run_partitions(started, synth_partition)
    result = run_global(started, synthesize, started.run.outputs_dir / synth.OUTPUT)
    rows = finish_run(started, "synth-funnel", "Synthesis funnel")
    return {"run_id": started.run_id, "run_dir": str(started.run.root),
            "inputs": started.n_files, "partitions": partitions, "synth": result,
            "funnel": [r.__dict__ for r in rows]}
