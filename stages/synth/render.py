"""The `render` stage: detailed prompts become images, each render paid for once.

Renders are cached like model answers: a `renders` table in the run's request
cache file, keyed on (renderer id + revision, its params, prompt, seed, size),
holding PNG bytes. Only misses reach a renderer: a Ray actor pool that loads
it once per worker (`render.resources`: concurrency, gpus), or a renderer
object handed in (tests, notebooks), called in this process. Failures are not
cached: an error row now, another try on the next run.

Text-to-image samples get `target_image` (PNG), the render size and the
renderer's provenance; edit samples keep their given target (`given`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from weft.schemas.ids import hash_of
from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy
from weft.stages.infer.cache import open_cache_db, select_by_keys
from weft.stages.synth.images import png_bytes
from weft.stages.synth.inputs import hash_of_bytes
from weft.stages.synth.renderers import (
    RenderConfig,
    Renderer,
    RenderFailure,
    build_renderer,
)
from weft.stages.synth.steps import StepResult, entry_for, skip

_SCHEMA = """
create table if not exists renders (
    key text primary key,
    model_id text not null,
    revision text not null,
    created_at real not null,
    height integer not null,
    width integer not null,
    png blob not null
)
"""
JOB_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("prompt", pa.string()),
                        pa.field("seed", pa.int64()), pa.field("height", pa.int32()),
                        pa.field("width", pa.int32())])
RESULT_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("png", pa.binary()),
                          pa.field("error_type", pa.string()),
                          pa.field("error_message", pa.string())])


class RenderCache:
    """key -> PNG bytes, in the request cache's sqlite file (table `renders`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_cache_db(self.path, _SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return {k: bytes(v) for k, v in select_by_keys(self._db, "renders", "png", keys)}

    def put_many(self, items: Iterable[tuple[str, str, str, int, int, bytes]]) -> None:
        """Store (key, model_id, revision, height, width, png)."""
        rows = [(k, m, r, time.time(), h, w, png) for k, m, r, h, w, png in items]
        with self._db:
            self._db.executemany("insert or replace into renders values (?, ?, ?, ?, ?, ?, ?)",
                                 rows)

    def __len__(self) -> int:
        return int(self._db.execute("select count(*) from renders").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RenderCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RenderJob:
    """One image to draw."""

    key: str
    prompt: str
    seed: int
    height: int
    width: int


@dataclass(frozen=True)
class RenderedImage:
    """A job's PNG bytes, or why there are none."""

    png: bytes | None
    error_type: str | None = None
    error_message: str | None = None


@dataclass
class RenderStats:
    """Renders asked for, answered from the cache, drawn, failed."""

    requests: int = 0
    unique: int = 0
    cache_hits: int = 0
    renderer_calls: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def render_key(model_id: str, revision: str, params: dict[str, Any], prompt: str, seed: int,
               height: int, width: int) -> str:
    return hash_of("render", model_id, revision, params, prompt, seed, height, width, length=40)


def render_with(renderer: Renderer, jobs: list[RenderJob]) -> dict[str, RenderedImage]:
    """Draw jobs with one renderer in this process (grouped by size, order kept)."""
    out: dict[str, RenderedImage] = {}
    sizes: dict[tuple[int, int], list[RenderJob]] = {}
    for job in jobs:
        sizes.setdefault((job.height, job.width), []).append(job)
    for (height, width), group in sorted(sizes.items()):
        images = renderer.render([j.prompt for j in group], [j.seed for j in group], height,
                                 width)
        for job, image in zip(group, images, strict=True):
            if isinstance(image, RenderFailure):
                out[job.key] = RenderedImage(None, image.error_type, image.message)
            else:
                out[job.key] = RenderedImage(png_bytes(image))
    return out


class RenderActor:
    """A Ray Data callable class: loads the renderer once per worker, draws batches."""

    def __init__(self, config: RenderConfig) -> None:
        self.renderer = build_renderer(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        jobs = [RenderJob(**r) for r in batch.to_pylist()]
        done = render_with(self.renderer, jobs)
        return pa.Table.from_pylist(
            [{"key": j.key, "png": done[j.key].png, "error_type": done[j.key].error_type,
              "error_message": done[j.key].error_message} for j in jobs], schema=RESULT_SCHEMA)


def render_on_ray(config: RenderConfig, jobs: list[RenderJob]) -> dict[str, RenderedImage]:
    """Draw jobs on a Ray actor pool of `render.resources.concurrency` workers."""
    import ray.data

    res = config.resources
    table = pa.Table.from_pylist([j.__dict__ for j in jobs], schema=JOB_SCHEMA)
    ds = ray.data.from_arrow(table).repartition(
        max(1, min(len(jobs) // res.batch_size, 4 * res.concurrency)))
    rows = ds.map_batches(RenderActor, fn_constructor_kwargs={"config": config},
                          compute=ray.data.ActorPoolStrategy(size=res.concurrency),
                          batch_size=res.batch_size, batch_format="pyarrow",
                          num_cpus=res.cpus, num_gpus=res.gpus or None,
                          memory=int(res.memory_gb * 2**30) or None).take_all()
    out = {r["key"]: RenderedImage(r["png"], r["error_type"], r["error_message"]) for r in rows}
    lost = {j.key for j in jobs} - set(out)
    if lost:
        raise RuntimeError(f"{len(lost)} render jobs came back without a result")
    return out


Draw = Callable[[list[RenderJob]], dict[str, RenderedImage]]


def render_step(rows: list[dict[str, Any]], policy: Policy, config: RenderConfig,
                identity: tuple[str, str, dict[str, Any]], cache: RenderCache, draw: Draw,
                stage: str = "render") -> tuple[list[StepResult], RenderStats]:
    """Render every t2i sample's detailed prompt (cache first); others keep their target.

    `identity`: (renderer id, revision, params) - the cache key's renderer part;
    `draw`: what draws the misses (`render_on_ray` or `render_with` a renderer).
    """
    model_id, revision, params = identity
    jobs: dict[str, RenderJob] = {}
    per_row: dict[str, RenderJob] = {}
    for row in rows:
        if row["task"] != "t2i":
            continue
        height = row.get("height") or config.height
        width = row.get("width") or config.width
        prompt = row.get("detailed_prompt") or row["prompt"]
        key = render_key(model_id, revision, params, prompt, row["seed"], height, width)
        per_row[row["item_id"]] = jobs.setdefault(key, RenderJob(key, prompt, row["seed"],
                                                                 height, width))
    stats = RenderStats(requests=len(per_row), unique=len(jobs))
    cached = cache.get_many(jobs)
    stats.cache_hits = len(cached)
    results = {k: RenderedImage(png) for k, png in cached.items()}
    misses = [jobs[k] for k in sorted(jobs) if k not in cached]
    if misses:
        fresh = draw(misses)
        stats.renderer_calls = len(misses)
        stats.errors = sum(1 for r in fresh.values() if r.png is None)
        cache.put_many((j.key, model_id, revision, j.height, j.width, fresh[j.key].png)
                       for j in misses if fresh[j.key].png is not None)
        results.update(fresh)
    out = []
    for row in rows:
        job = per_row.get(row["item_id"])
        if job is None:
            out.append(skip(row, policy, stage, "given"))
            continue
        result = results[job.key]
        details = {"task": row["task"], "render_key": job.key, "seed": job.seed,
                   "height": job.height, "width": job.width, "cached": job.key in cached}
        if result.png is None:
            out.append(StepResult(LedgerEntry(
                item_id=row["item_id"], item_kind=row.get("item_kind") or "synth_sample",
                parent_id=row.get("parent_id"), source_id=row.get("source_id"),
                decision="error", reason="render_failed", error_type=result.error_type,
                error_message=result.error_message, details=details, model_id=model_id,
                model_revision=revision)))
            continue
        entry = entry_for(row, policy, stage, {}, details, model=model_id, revision=revision)
        provenance = {"model": model_id, "revision": revision, "seed": job.seed,
                      "params": json.loads(json.dumps(params)), "height": job.height,
                      "width": job.width, "render_key": job.key}
        out.append(StepResult(entry, {
            "target_image": result.png, "target_sha256": hash_of_bytes(result.png),
            "render_height": job.height, "render_width": job.width,
            "generators": {**(row.get("generators") or {}), stage: provenance}}))
    return out, stats
