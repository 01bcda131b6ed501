"""Prefect flows over the pipelines.

Each flow task runs one pipeline step; Ray runs the stages inside it. Task
cache keys are (input hash, config hash, code version) and results live in the
run directory, so a re-run with the same config recomputes nothing and a killed
run redoes only the partitions that were in flight.

Prefect uses its embedded server unless PREFECT_API_URL is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from weft.pipelines import common, video, web
from weft.pipelines.ray_runtime import init_ray
from weft.schemas.ids import hash_of
from weft.schemas.ledger import FunnelRow, check_invariant, write_ledger
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


def _partition_key(_: TaskRunContext, params: dict[str, Any]) -> str:
    return hash_of("video-partition", params["partition_id"], params["config_hash"],
                   params["code_version"], params["run_dir"])


def _dedup_key(_: TaskRunContext, params: dict[str, Any]) -> str:
    return hash_of("video-dedup", sorted(params["partition_ids"]), params["config_hash"],
                   params["code_version"], params["run_dir"])


@task(name="curate-partition", cache_key_fn=_partition_key, persist_result=True,
      result_serializer="json")
def curate_partition(partition_id: str, group: list[dict[str, Any]], config_path: str | None,
                     run_dir: str, run_id: str, config_hash: str, code_version: str
                     ) -> dict[str, Any]:
    """Probe, detect shots, cut, crop, score and embed the videos of one partition."""
    loaded = video.load_config(config_path)
    return video.process_partition(group, loaded, RunDir(Path(run_dir)), run_id)


@task(name="dedup-clips", cache_key_fn=_dedup_key, persist_result=True, result_serializer="json")
def dedup_clips(partition_ids: list[str], config_path: str | None, run_dir: str, run_id: str,
                config_hash: str, code_version: str) -> dict[str, Any]:
    """Exact, perceptual and semantic dedup across every partition."""
    loaded = video.load_config(config_path)
    return video.run_dedup(loaded, RunDir(Path(run_dir)), run_id, partition_ids)


def _caption_key(_: TaskRunContext, params: dict[str, Any]) -> str:
    return hash_of("video-caption", sorted(params["partition_ids"]), params["config_hash"],
                   params["code_version"], params["run_dir"])


@task(name="caption-clips", cache_key_fn=_caption_key, persist_result=True,
      result_serializer="json")
def caption_clips(partition_ids: list[str], config_path: str | None, run_dir: str, run_id: str,
                  config_hash: str, code_version: str) -> dict[str, Any]:
    """Frame-transition captions for every clip dedup kept, through the request cache."""
    loaded = video.load_config(config_path)
    return video.run_captions(loaded, RunDir(Path(run_dir)), run_id)


@flow(name="video_flow", log_prints=True)
def video_flow(input_dir: str, run_dir: str, config_path: str | None = None) -> dict[str, Any]:
    """Raw videos in, curated, deduplicated and captioned clips out, every decision recorded."""
    logger = get_run_logger()
    loaded = video.load_config(config_path)
    video.preflight(loaded)
    run = RunDir(Path(run_dir).resolve())
    run_id = hash_of(video.PIPELINE, loaded.config_hash, length=16)
    plan = video.plan()
    run.claim(pipeline=video.PIPELINE, config=loaded.resolved, config_hash=loaded.config_hash,
              run_id=run_id, plan=[p.__dict__ for p in plan], code_version=common.code_version())
    files = common.discover(Path(input_dir), loaded.config.discover)
    ctx = video.run_context(loaded, run, run_id)
    sources, ingest_ledger = common.ingest(files, ctx)
    write_ledger(ingest_ledger, run.ledger_dir / "ingest.parquet")
    groups = common.partitions(sources, loaded.config.partition_size)
    pids = [common.partition_id(g) for g in groups]
    common.prune_stale_ledger(run, pids)
    cluster = init_ray(loaded.config.ray)
    logger.info("ray: %s; %d files, %d sources, %d partitions", cluster, len(files),
                len(sources), len(groups))
    storage = run.prefect_dir / "results"
    task_args = {"config_path": config_path, "run_dir": str(run.root), "run_id": run_id,
                 "config_hash": loaded.config_hash, "code_version": common.code_version()}
    partition_results = []
    for pid, group in zip(pids, groups, strict=True):
        marker = run.partition_dir(pid) / "_SUCCESS"
        state = curate_partition.with_options(
            result_storage=storage, refresh_cache=not marker.exists() or None
        )(partition_id=pid, group=group, return_state=True, **task_args)
        partition_results.append({**state.result(), "state": state.name})
    dedup_state = dedup_clips.with_options(
        result_storage=storage,
        refresh_cache=not (run.outputs_dir / "clips.parquet").exists() or None,
    )(partition_ids=pids, return_state=True, **task_args)
    dedup_result = dedup_state.result()
    caption_state = caption_clips.with_options(
        result_storage=storage,
        refresh_cache=not (run.outputs_dir / "captions.parquet").exists() or None,
    )(partition_ids=pids, return_state=True, **task_args)
    caption_result = caption_state.result()
    logger.info("captions: %s", caption_result)
    rows = check_invariant(video.read_run_ledger(run), plan, n_inputs=len(files))
    table = funnel_markdown(rows)
    run.summary_dir.mkdir(parents=True, exist_ok=True)
    (run.summary_dir / "funnel.md").write_text(table + "\n")
    create_markdown_artifact(key="video-funnel", markdown=f"# Video funnel\n\n{table}\n",
                             description=f"run {run_id} in {run.root}")
    return {
        "run_id": run_id,
        "run_dir": str(run.root),
        "inputs": len(files),
        "partitions": partition_results,
        "dedup": {**dedup_result, "state": dedup_state.name},
        "caption": {**caption_result, "state": caption_state.name},
        "funnel": [r.__dict__ for r in rows],
    }


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


def _web_dedup_key(_: TaskRunContext, params: dict[str, Any]) -> str:
    return hash_of("web-dedup", sorted(params["partition_ids"]), params["config_hash"],
                   params["code_version"], params["run_dir"])


@task(name="web-global-steps", cache_key_fn=_web_dedup_key, persist_result=True,
      result_serializer="json")
def dedup_web_docs(partition_ids: list[str], config_path: str | None, run_dir: str,
                   run_id: str, config_hash: str, code_version: str) -> dict[str, Any]:
    """Image copies across documents, structure, MinHash near-duplicates, the LLM band."""
    loaded = web.load_config(config_path)
    return web.run_global(loaded, RunDir(Path(run_dir)), run_id, partition_ids)


@flow(name="web_flow", log_prints=True)
def web_flow(input_dir: str, run_dir: str, config_path: str | None = None) -> dict[str, Any]:
    """HTML pages and OmniCorpus-style records in, clean documents out, every decision recorded."""
    logger = get_run_logger()
    loaded = web.load_config(config_path)
    web.preflight(loaded)
    run = RunDir(Path(run_dir).resolve())
    run_id = hash_of(web.PIPELINE, loaded.config_hash, length=16)
    plan = web.plan(loaded)
    run.claim(pipeline=web.PIPELINE, config=loaded.resolved, config_hash=loaded.config_hash,
              run_id=run_id, plan=[p.__dict__ for p in plan], code_version=common.code_version())
    files = common.discover(Path(input_dir), loaded.config.discover)
    sources, ingest_ledger = common.ingest(files, web.run_context(loaded, run, run_id))
    for source in sources:  # local image paths must stay inside the input folder
        source["doc_root"] = str(Path(input_dir).resolve())
    write_ledger(ingest_ledger, run.ledger_dir / "ingest.parquet")
    groups = common.partitions(sources, loaded.config.partition_size)
    pids = [common.partition_id(g) for g in groups]
    common.prune_stale_ledger(run, pids)
    cluster = init_ray(loaded.config.ray)
    logger.info("ray: %s; %d files, %d sources, %d partitions", cluster, len(files),
                len(sources), len(groups))
    storage = run.prefect_dir / "results"
    task_args = {"config_path": config_path, "run_dir": str(run.root), "run_id": run_id,
                 "config_hash": loaded.config_hash, "code_version": common.code_version()}
    partition_results = []
    for pid, group in zip(pids, groups, strict=True):
        marker = run.partition_dir(pid) / "_SUCCESS"
        state = curate_web_partition.with_options(
            result_storage=storage, refresh_cache=not marker.exists() or None
        )(partition_id=pid, group=group, return_state=True, **task_args)
        partition_results.append({**state.result(), "state": state.name})
    dedup_state = dedup_web_docs.with_options(
        result_storage=storage,
        refresh_cache=not (run.outputs_dir / "docs.parquet").exists() or None,
    )(partition_ids=pids, return_state=True, **task_args)
    dedup_result = dedup_state.result()
    rows = check_invariant(web.read_run_ledger(run), plan, n_inputs=len(files))
    table = funnel_markdown(rows)
    run.summary_dir.mkdir(parents=True, exist_ok=True)
    (run.summary_dir / "funnel.md").write_text(table + "\n")
    create_markdown_artifact(key="web-funnel", markdown=f"# Web funnel\n\n{table}\n",
                             description=f"run {run_id} in {run.root}")
    return {"run_id": run_id, "run_dir": str(run.root), "inputs": len(files),
            "partitions": partition_results, "dedup": {**dedup_result, "state": dedup_state.name},
            "funnel": [r.__dict__ for r in rows]}
