"""The video pipeline: raw videos in, curated and deduplicated clips out.

    ingest (hash, exact dedup of files)
      -> probe -> shots -> clips (expand) -> crop -> quality -> keyframes -> embed
      -> dedup (global: exact, perceptual, semantic)
      -> caption_prep -> [VLM through the request cache] -> caption

Ingest runs on the driver; the per-video stages run as one Ray Data plan per
partition (a fixed group of sources), so a killed run redoes at most the
partitions in flight; dedup runs once over every partition's survivors, and
only the clips dedup keeps are captioned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from weft.pipelines.common import (
    CONFIGS_DIR,
    INGEST,
    ConfigError,
    DiscoverConfig,
    InferenceConfig,
    collect,
    ledger_row,
    load_partitions,
    output_hash,
    partition_id,
    read_config,
    read_policy,
    run_context,
    write_partition,
    write_table_atomic,
)
from weft.pipelines.ray_runtime import RayConfig, apply_stage
from weft.schemas.config_doc import render_defaults
from weft.schemas.ids import hash_of
from weft.schemas.ledger import StagePlan, write_ledger
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir
from weft.stages.base import DECISION_COLUMN, Stage, ledger_rows_of
from weft.stages.infer.cache import RequestCache
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.registry import ModelRegistry, load_registry, model_revision
from weft.stages.infer.runner import run_requests
from weft.stages.video.caption import (
    CaptionConfig,
    CaptionPrepStage,
    CaptionStage,
    transition_requests,
)
from weft.stages.video.clips import ClipsStage
from weft.stages.video.crop import CropStage
from weft.stages.video.dedup import DedupConfig, dedup_entries
from weft.stages.video.embed import EmbedStage
from weft.stages.video.keyframes import KeyframesStage
from weft.stages.video.probe import ProbeStage
from weft.stages.video.quality import QualityStage
from weft.stages.video.shots import ShotsStage

PIPELINE = "video"
DEFAULT_CONFIG = CONFIGS_DIR / "video.yaml"
DEFAULT_POLICY = CONFIGS_DIR / "policies" / "video.yaml"
PARTITION_STAGES: list[type[Stage]] = [
    ProbeStage, ShotsStage, ClipsStage, CropStage, QualityStage, KeyframesStage, EmbedStage,
]
DEDUP = StagePlan("dedup", "1", "map")
CAPTION_STAGES: list[type[Stage]] = [CaptionPrepStage, CaptionStage]


class VideoPipelineConfig(BaseModel):
    """Everything the video pipeline does, with every default visible in configs/video.yaml."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    policy: str = Field("policies/video.yaml", description="relative to this config's folder")
    partition_size: int = Field(4, ge=1, description="sources per resumable partition")
    discover: DiscoverConfig = Field(default_factory=DiscoverConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    probe: ProbeStage.Config = Field(default_factory=ProbeStage.Config)
    shots: ShotsStage.Config = Field(default_factory=ShotsStage.Config)
    clips: ClipsStage.Config = Field(default_factory=ClipsStage.Config)
    crop: CropStage.Config = Field(default_factory=CropStage.Config)
    quality: QualityStage.Config = Field(default_factory=QualityStage.Config)
    keyframes: KeyframesStage.Config = Field(default_factory=KeyframesStage.Config)
    embed: EmbedStage.Config = Field(default_factory=EmbedStage.Config)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    models: str = Field("models.yaml", description="model registry, relative to this "
                                                   "config's folder")
    inference: InferenceConfig = Field(default_factory=lambda: InferenceConfig())
    caption: CaptionConfig = Field(default_factory=CaptionConfig)

    def stage_config(self, stage_cls: type[Stage]) -> Any:
        return getattr(self, stage_cls.name)


CONFIG_HEADER = """\
weft video pipeline: every default, written out. Generated from the pydantic
models by `weft config defaults video --write`; a test checks it still matches.
Pass a YAML with only the keys you change: `weft video --config my.yaml`.
Thresholds are not here: they live in the policy (configs/policies/video.yaml).
Changing anything but `ray` and a stage's `resources` changes the config hash,
so an existing run directory refuses the new config.
"""


def default_config_yaml() -> str:
    """configs/video.yaml as the models define it (every default, commented)."""
    return render_defaults(VideoPipelineConfig(), CONFIG_HEADER)


class LoadedConfig(BaseModel):
    """A validated config with its policy, and the hash that names the run."""

    config: VideoPipelineConfig
    policy: Policy
    registry: ModelRegistry
    resolved: dict[str, Any]
    config_hash: str


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """Built-in defaults, then the user's YAML (partial is fine), then overrides.

    Any problem - unreadable YAML, an unknown key, a bad value, a missing
    policy or model directory - raises ConfigError with one clear message.
    """
    raw = read_config(VideoPipelineConfig, DEFAULT_CONFIG, path, overrides, PIPELINE)
    config: VideoPipelineConfig = raw.config
    policy_path = raw.resolve(config.policy, "policy")
    stages = {s.name for s in (*PARTITION_STAGES, *CAPTION_STAGES)} | {DEDUP.name}
    policy = read_policy(policy_path, stages)
    registry_path = raw.resolve(config.models, "models")
    try:
        registry = load_registry(registry_path)
        caption_spec = registry.get(config.caption.model)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"caption.model: {exc}") from exc
    resolved = config.model_dump(mode="json")
    resolved["policy"] = str(policy_path)
    resolved["policy_resolved"] = policy.model_dump(mode="json")
    resolved["models"] = str(registry_path)
    resolved["caption_model_resolved"] = {
        k: v for k, v in caption_spec.model_dump(mode="json").items()
        if k not in ("concurrency", "licence")}
    config_hash = output_hash(PIPELINE, resolved, ("ray", "policy", "models", "inference"),
                              [s.name for s in (*PARTITION_STAGES, CaptionStage)])
    return LoadedConfig(config=config, policy=policy, registry=registry, resolved=resolved,
                        config_hash=config_hash)


def plan() -> list[StagePlan]:
    """The ledger's stage order for this pipeline."""
    return [INGEST, *(StagePlan(s.name, s.version, s.kind) for s in PARTITION_STAGES), DEDUP,
            *(StagePlan(s.name, s.version, s.kind) for s in CAPTION_STAGES)]


def preflight(loaded: LoadedConfig) -> None:
    """Fail at start-up, clearly, for missing tools and models."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise ConfigError(f"{tool} is not on PATH; install it (apt-get install ffmpeg)")
    embed_dir = loaded.config.embed.model_dir
    if embed_dir is not None and not Path(embed_dir).is_dir():
        raise ConfigError(f"embed.model_dir {embed_dir} does not exist (make one with "
                          "`weft models make-tiny-clip` or point it at a real open_clip model)")
    try:
        loaded.registry.check(loaded.config.caption.model)
        load_prompt(loaded.config.caption.prompt)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"caption: {exc}") from exc
    weights = getattr(loaded.config.shots, "weights_path", None)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"shots.weights_path {weights} does not exist")


# ---------------------------------------------------------------------------
# ingest: discover and hash inputs (driver side)
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# per-partition Ray Data plan
# ---------------------------------------------------------------------------

def process_partition(group: list[dict[str, Any]], loaded: LoadedConfig, run: RunDir,
                      run_id: str) -> dict[str, Any]:
    """Run every per-video stage over one partition and write its outputs atomically."""
    import ray.data

    pid = partition_id(group)
    ds = ray.data.from_arrow(pa.Table.from_pylist(group))
    for index, stage_cls in enumerate(PARTITION_STAGES, start=1):
        ctx = run_context(loaded, run, run_id, stage_index=index)
        ds = apply_stage(ds, stage_cls, loaded.config.stage_config(stage_cls), ctx)
    # pixels never leave the partition
    return write_partition(run, pid, collect(ds.drop_columns(["frames"])), "clip", "clips",
                           {"sources": len(group)})


# ---------------------------------------------------------------------------
# global dedup
# ---------------------------------------------------------------------------

def run_dedup(loaded: LoadedConfig, run: RunDir, run_id: str,
              partition_ids: list[str]) -> dict[str, Any]:
    """Score every surviving clip against better ones; the policy decides; write outputs."""
    items = load_partitions(run, partition_ids, "clips")
    if items is None:
        items = pa.table({"item_id": pa.array([], pa.string()),
                          DECISION_COLUMN: pa.array([], pa.string())})
    survivors = items.filter(pc.equal(items[DECISION_COLUMN], "keep"))
    ctx = run_context(loaded, run, run_id, stage_index=len(PARTITION_STAGES) + 1)
    config_hash = hash_of(DEDUP.name, DEDUP.version, loaded.config.dedup.model_dump(mode="json"),
                          length=16)
    entries = dedup_entries(survivors.to_pylist(), loaded.policy, loaded.config.dedup)
    write_ledger([ledger_row(e, DEDUP, config_hash, ctx) for e in entries],
                 run.ledger_dir / "dedup.parquet")
    kept = survivors.filter(pa.array([e.decision == "keep" for e in entries], pa.bool_()))
    write_table_atomic(kept.drop_columns([DECISION_COLUMN]), run.outputs_dir / "clips.parquet")
    return {"clips_in": survivors.num_rows, "clips_kept": kept.num_rows}


# ---------------------------------------------------------------------------
# frame-transition captions over the clips dedup kept
# ---------------------------------------------------------------------------

CAPTION_INPUT_FIELDS = [
    pa.field("item_id", pa.string()),  # the clip id
    pa.field("parent_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("keyframe_paths", pa.list_(pa.string())),
    pa.field("keyframe_times", pa.list_(pa.float64())),
]
CAPTION_INPUT_COLUMNS = tuple(f.name for f in CAPTION_INPUT_FIELDS)


def _prepare_captions(clips: pa.Table, loaded: LoadedConfig, run: RunDir,
                      run_id: str) -> list[dict[str, Any]]:
    """caption_prep over the kept clips on Ray (CPU workers read and resize key frames)."""
    import ray.data

    if clips.num_rows == 0:
        return []
    table = clips.select(list(CAPTION_INPUT_COLUMNS)).append_column(
        "item_kind", pa.array(["clip"] * clips.num_rows, pa.string()))
    ctx = run_context(loaded, run, run_id, stage_index=len(PARTITION_STAGES) + 2)
    ds = apply_stage(ray.data.from_arrow(table), CaptionPrepStage, loaded.config.caption, ctx)
    return sorted(collect(ds).to_pylist(), key=lambda r: r["item_id"])


def run_captions(loaded: LoadedConfig, run: RunDir, run_id: str) -> dict[str, Any]:
    """Caption every clip dedup kept; only cache misses reach the model. Writes outputs."""
    config = loaded.config.caption
    spec = loaded.registry.get(config.model)
    revision = model_revision(spec)
    prompt = load_prompt(config.prompt)
    clips = pq.read_table(run.outputs_dir / "clips.parquet")
    rows = _prepare_captions(clips, loaded, run, run_id)
    per_row: dict[str, list[str]] = {}
    requests = {}
    for row in rows:
        if row[DECISION_COLUMN] != "keep":
            continue
        keys = []
        for request in transition_requests(row, prompt, config.sampling()):
            key = request.key(config.model, revision)
            requests[key] = request
            keys.append(key)
        per_row[row["item_id"]] = keys
    with RequestCache(loaded.config.inference.cache_file(run)) as cache:
        answers, stats = run_requests(requests, spec, config.model, revision, cache,
                                      total=sum(len(k) for k in per_row.values()))
    for row in rows:
        row["caption_completions"] = [json.dumps(answers[k].to_json(), sort_keys=True)
                                      for k in per_row.get(row["item_id"], [])]
    stage = CaptionStage(config, run_context(loaded, run, run_id,
                                             stage_index=len(PARTITION_STAGES) + 3))
    stage.model_id, stage.model_revision, stage.prompt = config.model, revision, prompt
    done = stage.process_rows(rows)
    write_ledger(ledger_rows_of(done), run.ledger_dir / "caption.parquet")
    kept = [r for r in done if r[DECISION_COLUMN] == "keep"]
    schema = pa.schema([*CAPTION_INPUT_FIELDS, *stage.output_fields])
    samples = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in kept],
                                   schema=schema)
    write_table_atomic(samples, run.outputs_dir / "captions.parquet")
    return {"clips_in": len(rows), "samples": samples.num_rows, "model": config.model,
            "model_revision": revision, "prompt": prompt.ref, **stats.as_dict()}


