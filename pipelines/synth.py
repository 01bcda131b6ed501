"""The synthesis pipeline: reasoning-augmented text-to-image and editing samples.

    ingest        *prompts.jsonl and *edits.jsonl in --input, and the output table of
                  every run in `interleaved_runs` (video: captions.parquet, web: docs.parquet)
      -> parse        (expand, on Ray per partition) file -> inputs: t2i prompts, edit
                      triples, concept candidates (pairs of a clip's key frames or a page's
                      images)
      -> input_dedup  near-duplicate prompts (MinHash) and image pairs (pHash), before any
                      model is asked
      -> pair_judge   concept: a VLM judges whether the pair is a meaningful edit
      -> rollout      (expand) N samples per input, each with its own seed
      -> instruct     concept: a VLM writes the instruction (edit: given)
      -> reason       t2i: an LLM writes the reasoning and a detailed prompt;
                      edit / concept: a VLM writes the reasoning from instruction to target
      -> render       t2i: the renderer draws the detailed prompt (FLUX or weft's MoT)
      -> verify       rules (empty, too long, truncated, blank image, size) + a VLM judge
      -> dedup        near-duplicate output images across inputs (pHash)
    outputs/synth.parquet: one row per kept sample, kind reasoning_t2i | reasoning_edit

Every stage sees every sample (a stage with nothing to do for a task keeps it
as `not_applicable` or `given`), so the ledger invariant holds stage by stage.
Model answers go through the request cache and renders through a render cache
in the same file: a re-run pays for nothing and writes the same bytes.

For the Prefect flow: `load_config`, `preflight`, `start_run`, `process_partition`
(one task per partition), `run_global` (one task), then the ledger invariant
over `plan(loaded)`. `run` does all of that without Prefect.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from weft.pipelines.common import (
    CONFIGS_DIR,
    INGEST,
    ConfigError,
    DiscoverConfig,
    InferenceConfig,
    StartedRun,
    code_version,
    collect,
    discover,
    ingest,
    ledger_row,
    load_partitions,
    output_hash,
    partition_id,
    partitions,
    prune_stale_ledger,
    read_config,
    resolve_policy_and_models,
    run_context,
    write_partition,
    write_table_atomic,
)
from weft.pipelines.ray_runtime import RayConfig, apply_stage, init_ray
from weft.schemas.config_doc import render_defaults
from weft.schemas.ids import hash_of, stable_json
from weft.schemas.ledger import (
    FunnelRow,
    LedgerEntry,
    StagePlan,
    check_invariant,
    read_ledger,
    write_ledger,
)
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir, write_atomic
from weft.stages.base import DECISION_COLUMN, LEDGER_COLUMN, ledger_rows_of
from weft.stages.infer.cache import RequestCache
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.registry import ModelRegistry, model_revision
from weft.stages.infer.runner import InferenceStats, run_requests
from weft.stages.infer.types import ChatRequest, Completion
from weft.stages.synth.answers import decide
from weft.stages.synth.dedup import SynthDedupConfig, input_scores, output_scores
from weft.stages.synth.inputs import INPUT_KIND, INTERLEAVED_TABLES, ParseConfig, ParseStage
from weft.stages.synth.render import (
    RenderCache,
    render_on_ray,
    render_step,
    render_with,
)
from weft.stages.synth.renderers import (
    RenderConfig,
    Renderer,
    renderer_identity,
    renderer_params,
)
from weft.stages.synth.rollout import RolloutConfig, RolloutStage
from weft.stages.synth.steps import (
    InstructConfig,
    PairJudgeConfig,
    ReasonConfig,
    StepResult,
    instruct_step,
    pair_judge_step,
    reason_step,
)
from weft.stages.synth.verify import VerifyConfig, verify_step

PIPELINE = "synth"
DEFAULT_CONFIG = CONFIGS_DIR / "synth.yaml"
DEFAULT_POLICY = CONFIGS_DIR / "policies" / "synth.yaml"
OUTPUT = "synth.parquet"
PARSE = StagePlan(ParseStage.name, ParseStage.version, "expand")
INPUT_DEDUP = StagePlan("input_dedup", "1", "map")
PAIR_JUDGE = StagePlan("pair_judge", "1", "map")
ROLLOUT = StagePlan(RolloutStage.name, RolloutStage.version, "expand")
INSTRUCT = StagePlan("instruct", "1", "map")
REASON = StagePlan("reason", "1", "map")
RENDER = StagePlan("render", "1", "map")
VERIFY = StagePlan("verify", "1", "map")
DEDUP = StagePlan("dedup", "1", "map")
STAGES = [INGEST, PARSE, INPUT_DEDUP, PAIR_JUDGE, ROLLOUT, INSTRUCT, REASON, RENDER, VERIFY,
          DEDUP]
KIND_OF_TASK = {"t2i": "reasoning_t2i", "edit": "reasoning_edit", "concept": "reasoning_edit"}

SYNTH_FIELDS = [
    pa.field("item_id", pa.string()),  # the sample id (the shard key)
    pa.field("parent_id", pa.string()),  # the input it is a rollout of
    pa.field("source_id", pa.string()),  # the ingested file (prompts, edits, upstream table)
    pa.field("kind", pa.string()),  # reasoning_t2i | reasoning_edit (the shard format's kind)
    pa.field("task", pa.string()),  # t2i | edit | concept
    pa.field("input_id", pa.string()),
    pa.field("rollout", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("prompt", pa.string()),  # t2i: the user's prompt (role prompt)
    pa.field("instruction", pa.string()),  # edit: given or written (role instruction)
    pa.field("reasoning", pa.string()),  # role reasoning, before the generated image
    pa.field("detailed_prompt", pa.string()),  # t2i: what was rendered
    pa.field("source_image", pa.binary()),  # edit: original bytes
    pa.field("target_image", pa.binary()),  # t2i: the render (PNG); edit: original bytes
    pa.field("source_sha256", pa.string()),
    pa.field("target_sha256", pa.string()),
    pa.field("render_height", pa.int32()),
    pa.field("render_width", pa.int32()),
    pa.field("parent_ids", pa.list_(pa.string())),  # input, input file, upstream item, source
    pa.field("upstream", pa.string()),  # concept: JSON (run, clip or document, frames)
    pa.field("upstream_item_id", pa.string()),
    pa.field("upstream_source_id", pa.string()),
    pa.field("generator_model", pa.string()),  # who wrote the reasoning
    pa.field("generator_revision", pa.string()),
    pa.field("renderer_model", pa.string()),  # t2i: who drew the image
    pa.field("renderer_revision", pa.string()),
    pa.field("prompt_hashes", pa.string()),  # JSON: step -> "template@version#hash"
    pa.field("generators", pa.string()),  # JSON: step -> model, revision, prompt, seed ...
    pa.field("judge_score", pa.float64()),  # the verify judge: 1 yes, 0 no, null unparsed
    pa.field("licence", pa.string()),
]
SYNTH_SCHEMA = pa.schema(SYNTH_FIELDS, metadata={"weft.table": "synth",
                                                 "weft.schema_version": "1"})


class SynthPipelineConfig(BaseModel):
    """Everything the synthesis pipeline does, with every default visible in configs/synth.yaml."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    policy: str = Field("policies/synth.yaml", description="relative to this config's folder; "
                        "policies/synth-tiny-models.yaml for the tiny random models")
    partition_size: int = Field(8, ge=1, description="input files per resumable partition")
    discover: DiscoverConfig = Field(default_factory=lambda: DiscoverConfig(
        recursive=False, suffixes=["prompts.jsonl", "edits.jsonl"]))
    interleaved_runs: list[str] = Field(
        default_factory=list, description="finished video / web run directories whose "
        "curated clips or documents give conceptual-edit candidates (relative to this "
        "config's folder)")
    ray: RayConfig = Field(default_factory=RayConfig)
    parse: ParseConfig = Field(default_factory=ParseConfig)
    input_dedup: SynthDedupConfig = Field(default_factory=SynthDedupConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    models: str = Field("models.yaml", description="model registry, relative to this "
                                                   "config's folder")
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    pair_judge: PairJudgeConfig = Field(default_factory=PairJudgeConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    reason: ReasonConfig = Field(default_factory=ReasonConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    dedup: SynthDedupConfig = Field(default_factory=SynthDedupConfig)

    def models_used(self) -> set[str]:
        return {self.pair_judge.model, self.instruct.model, self.reason.model,
                self.reason.edit_model, self.verify.model}

    def prompts_used(self) -> list[str]:
        return [self.pair_judge.prompt, self.instruct.prompt, self.reason.prompt,
                self.reason.edit_prompt, self.reason.pair_prompt, self.verify.prompt,
                self.verify.edit_prompt]


CONFIG_HEADER = """\
weft synthesis pipeline: every default, written out. Generated from the pydantic
models by `weft config defaults synth --write`; a test checks it still matches.
Pass a YAML with only the keys you change: `weft synth run --config my.yaml`.
Thresholds are not here: they live in the policy (configs/policies/synth.yaml).
Inputs: --input DIR with *prompts.jsonl (t2i) and/or *edits.jsonl (edits), and/or
`interleaved_runs` (conceptual edits from finished video / web runs).
"""


def default_config_yaml() -> str:
    """configs/synth.yaml as the models define it (every default, commented)."""
    return render_defaults(SynthPipelineConfig(), CONFIG_HEADER)


class LoadedSynthConfig(BaseModel):
    """A validated config with its policy and registry, and the hash that names the run."""

    config: SynthPipelineConfig
    policy: Policy
    registry: ModelRegistry
    resolved: dict[str, Any]
    config_hash: str
    interleaved: list[str]


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> LoadedSynthConfig:
    """Defaults, the user's YAML, overrides; any problem is one ConfigError."""
    raw = read_config(SynthPipelineConfig, DEFAULT_CONFIG, path, overrides, PIPELINE)
    config: SynthPipelineConfig = raw.config
    policy, registry, resolved = resolve_policy_and_models(raw, {s.name for s in STAGES},
                                                           config.models_used())
    interleaved = [str(raw.resolve(p, "interleaved_runs")) for p in config.interleaved_runs]
    resolved.update(interleaved_runs=interleaved)
    config_hash = output_hash(PIPELINE, resolved,
                              ("ray", "policy", "models", "inference", "interleaved_runs"),
                              [ParseStage.name, RENDER.name])
    return LoadedSynthConfig(config=config, policy=policy, registry=registry, resolved=resolved,
                             config_hash=config_hash, interleaved=interleaved)


def plan(loaded: LoadedSynthConfig | None = None) -> list[StagePlan]:
    """The ledger's stage order (the same for every config)."""
    return list(STAGES)


def interleaved_tables(loaded: LoadedSynthConfig) -> list[Path]:
    """The output table of every interleaved run (ConfigError when one is not finished)."""
    tables = []
    for run_dir in loaded.interleaved:
        root = Path(run_dir)
        try:
            pipeline = json.loads((root / "run.json").read_text())["pipeline"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"interleaved run {root} is not a finished run directory (no "
                              f"readable run.json: {exc})") from exc
        names = {v: k for k, v in INTERLEAVED_TABLES.items()}
        if pipeline not in names:
            raise ConfigError(f"interleaved run {root} is a {pipeline!r} run; conceptual "
                              f"edits come from {sorted(names)} runs")
        table = root / "outputs" / names[pipeline]
        if not table.is_file():
            raise ConfigError(f"interleaved run {root} has no {table.name}: it has not finished")
        tables.append(table)
    return tables


def preflight(loaded: LoadedSynthConfig, renderer_given: bool = False) -> None:
    """Fail at start-up, clearly, for missing models, prompts, renderer or upstream runs."""
    config = loaded.config
    for name in sorted(config.models_used()):
        try:
            loaded.registry.check(name)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"synth model {name}: {exc}") from exc
    for name in config.prompts_used():
        try:
            load_prompt(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if not renderer_given:
        render = config.render
        path = Path(render.path).expanduser()
        if render.backend == "diffusers" and not (path / "model_index.json").is_file():
            raise ConfigError(f"render.path {path} is not a diffusers pipeline directory (no "
                              "model_index.json); build a tiny one with `weft models "
                              "make-tiny-flux --out DIR` or point it at a local FLUX.1 copy")
        if render.backend == "mot":
            for key, value in (("path", render.path), ("vae_path", render.vae_path),
                               ("tokenizer_path", render.tokenizer_path)):
                if not value or not Path(value).expanduser().exists():
                    raise ConfigError(f"render.{key} {value!r} does not exist (the MoT "
                                      "renderer needs an export, its VAE and a tokenizer)")
    interleaved_tables(loaded)


# ---------------------------------------------------------------------------
# start: claim the run, ingest the input files, partition (what flows.start_run does)
# ---------------------------------------------------------------------------

def input_files(loaded: LoadedSynthConfig, input_dir: str | Path | None) -> list[Path]:
    """Discovered prompt / edit files, then the interleaved runs' output tables."""
    files = discover(Path(input_dir), loaded.config.discover) if input_dir is not None else []
    return files + interleaved_tables(loaded)


def start_run(loaded: LoadedSynthConfig, input_dir: str | Path | None, run_dir: str | Path,
              config_path: str | None = None) -> StartedRun:
    """Claim the run directory, ingest every input file, partition, and start Ray."""
    files = input_files(loaded, input_dir)
    if not files:
        raise ConfigError("nothing to synthesise from: no *prompts.jsonl / *edits.jsonl in "
                          f"{input_dir} and no interleaved_runs")
    run = RunDir(Path(run_dir).resolve())
    run_id = hash_of(PIPELINE, loaded.config_hash, length=16)
    stages = plan(loaded)
    run.claim(pipeline=PIPELINE, config=loaded.resolved, config_hash=loaded.config_hash,
              run_id=run_id, plan=[p.__dict__ for p in stages], code_version=code_version())
    sources, ingest_ledger = ingest(files, run_context(loaded, run, run_id))
    write_ledger(ingest_ledger, run.ledger_dir / "ingest.parquet")
    groups = partitions(sources, loaded.config.partition_size)
    pids = [partition_id(g) for g in groups]
    prune_stale_ledger(run, pids)
    init_ray(loaded.config.ray)
    task_args = {"config_path": config_path, "run_dir": str(run.root), "run_id": run_id,
                 "config_hash": loaded.config_hash, "code_version": code_version()}
    return StartedRun(run, run_id, stages, len(files), groups, pids, task_args)


# ---------------------------------------------------------------------------
# per-partition Ray Data plan: parse
# ---------------------------------------------------------------------------

def process_partition(group: list[dict[str, Any]], pid: str, loaded: LoadedSynthConfig,
                      run: RunDir, run_id: str) -> dict[str, Any]:
    """Parse one partition's files into inputs on Ray and write them atomically."""
    import ray.data

    ds = ray.data.from_arrow(pa.Table.from_pylist(group))
    ctx = run_context(loaded, run, run_id, stage_index=1)
    ds = apply_stage(ds, ParseStage, loaded.config.parse, ctx)
    return write_partition(run, pid, collect(ds), INPUT_KIND, "inputs", {"files": len(group)})


# ---------------------------------------------------------------------------
# global steps on the driver: models go through the request cache
# ---------------------------------------------------------------------------

class RegistryGateway:
    """The steps' Gateway: registry models behind the run's request cache (misses on Ray)."""

    def __init__(self, loaded: LoadedSynthConfig, run: RunDir) -> None:
        self.loaded, self.run = loaded, run
        self.stats: dict[str, InferenceStats] = {}
        self._revisions: dict[str, str] = {}

    def revision(self, model: str) -> str:
        if model not in self._revisions:
            self._revisions[model] = model_revision(self.loaded.registry.get(model))
        return self._revisions[model]

    def ask(self, model: str, requests: list[ChatRequest]) -> list[Completion]:
        revision = self.revision(model)
        keys = [r.key(model, revision) for r in requests]
        with RequestCache(self.loaded.config.inference.cache_file(self.run)) as cache:
            answers, stats = run_requests(dict(zip(keys, requests, strict=True)),
                                          self.loaded.registry.get(model), model, revision,
                                          cache, total=len(keys))
        total = self.stats.setdefault(model, InferenceStats())
        for name, value in stats.as_dict().items():
            setattr(total, name, getattr(total, name) + value)
        return [answers[k] for k in keys]


@dataclass
class _Step:
    """Where the global steps are: the stage's ledger position and what it recorded."""

    loaded: LoadedSynthConfig
    run: RunDir
    run_id: str

    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def record(self, stage: StagePlan, rows: list[dict[str, Any]], results: list[StepResult],
               settings: Any) -> list[dict[str, Any]]:
        """Write the stage's ledger file; the kept rows with the stage's new columns."""
        now = time.perf_counter()
        self.seconds[stage.name] = round(now - self.started, 3)
        self.started = now
        ctx = run_context(self.loaded, self.run, self.run_id,
                          stage_index=STAGES.index(stage))
        config_hash = hash_of(stage.name, stage.version, settings, length=16)
        ledger = [ledger_row(r.entry, stage, config_hash, ctx) for r in results]
        write_ledger(ledger, self.run.ledger_dir / f"{stage.name}.parquet")
        return [{**row, **r.updates} for row, r in zip(rows, results, strict=True)
                if r.entry.decision == "keep"]


def _dedup_results(rows: list[dict[str, Any]], found: list[tuple[dict, dict]], policy: Policy,
                   stage: str) -> list[StepResult]:
    """Dedup scores decided by the policy; `duplicate_of` stays only on dropped samples."""
    out = []
    for row, (scores, details) in zip(rows, found, strict=True):
        decision, reason, thresholds = decide(policy, stage, scores)
        details = {**details, "task": row["task"]}
        if decision == "keep":
            details["nearest"], details["duplicate_of"] = details.pop("duplicate_of"), None
        out.append(StepResult(LedgerEntry(
            item_id=row["item_id"], item_kind=row["item_kind"], parent_id=row.get("parent_id"),
            source_id=row.get("source_id"), decision=decision, reason=reason, scores=scores,
            thresholds=thresholds, details=details)))
    return out


def _settings(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude={"resources"})


def run_global(loaded: LoadedSynthConfig, run: RunDir, run_id: str, partition_ids: list[str],
               renderer: Renderer | None = None) -> dict[str, Any]:
    """Every step after parse, over all partitions' inputs; writes outputs/synth.parquet.

    `renderer`: draw in this process with this renderer instead of the configured one
    on a Ray actor pool (tests wrap the tiny renderer to inject failures).
    """
    config, policy = loaded.config, loaded.policy
    step = _Step(loaded, run, run_id)
    gateway = RegistryGateway(loaded, run)
    table = load_partitions(run, partition_ids, "inputs")
    rows = [] if table is None else table.filter(
        pc.equal(table[DECISION_COLUMN], "keep")).drop_columns([DECISION_COLUMN]).to_pylist()
    counts: dict[str, int] = {"inputs": len(rows)}

    found = input_scores(rows, config.input_dedup)
    rows = step.record(INPUT_DEDUP, rows, _dedup_results(rows, found, policy, INPUT_DEDUP.name),
                       _settings(config.input_dedup))
    rows = step.record(PAIR_JUDGE, rows, pair_judge_step(
        rows, gateway, policy, config.pair_judge, load_prompt(config.pair_judge.prompt)),
        _settings(config.pair_judge))
    counts["judged_inputs"] = len(rows)

    rollout = RolloutStage(config.rollout, run_context(loaded, run, run_id,
                                                       stage_index=STAGES.index(ROLLOUT)))
    done = rollout.process_rows([{**r, LEDGER_COLUMN: [], DECISION_COLUMN: "keep"}
                                 for r in rows])
    write_ledger(ledger_rows_of(done), run.ledger_dir / f"{ROLLOUT.name}.parquet")
    step.started = time.perf_counter()
    rows = [{k: v for k, v in r.items() if k not in (LEDGER_COLUMN, DECISION_COLUMN)}
            for r in done if r[DECISION_COLUMN] == "keep"]
    counts["rollouts"] = len(rows)

    rows = step.record(INSTRUCT, rows, instruct_step(
        rows, gateway, policy, config.instruct, load_prompt(config.instruct.prompt)),
        _settings(config.instruct))
    templates = {"t2i": load_prompt(config.reason.prompt),
                 "edit": load_prompt(config.reason.edit_prompt),
                 "concept": load_prompt(config.reason.pair_prompt)}
    rows = step.record(REASON, rows, reason_step(rows, gateway, policy, config.reason,
                                                 templates), _settings(config.reason))

    identity = _render_identity(config.render, renderer)
    with RenderCache(config.inference.cache_file(run)) as cache:
        results, render_stats = render_step(
            rows, policy, config.render, identity, cache,
            (lambda jobs: render_with(renderer, jobs)) if renderer is not None
            else (lambda jobs: render_on_ray(config.render, jobs)))
    rows = step.record(RENDER, rows, results, {**_settings(config.render),
                                               "renderer": identity[:2]})

    verify_templates = {"t2i": load_prompt(config.verify.prompt),
                        "edit": load_prompt(config.verify.edit_prompt)}
    rows = step.record(VERIFY, rows, verify_step(rows, gateway, policy, config.verify,
                                                 verify_templates), _settings(config.verify))
    counts["verified"] = len(rows)

    found = output_scores(rows, config.dedup)
    rows = step.record(DEDUP, rows, _dedup_results(rows, found, policy, DEDUP.name),
                       _settings(config.dedup))
    table = write_outputs(run, rows)
    counts["samples"] = table.num_rows
    return {**counts, "inference": {m: s.as_dict() for m, s in sorted(gateway.stats.items())},
            "model_calls": sum(s.model_calls for s in gateway.stats.values()),
            "render": render_stats.as_dict(), "seconds": step.seconds}


def _render_identity(config: RenderConfig, renderer: Renderer | None
                     ) -> tuple[str, str, dict[str, Any]]:
    if renderer is not None:
        return renderer.model_id, renderer.revision, renderer.params()
    model_id, revision = renderer_identity(config)
    return model_id, revision, renderer_params(config)


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------

def sample_row(row: dict[str, Any]) -> dict[str, Any]:
    """A kept sample as a row of outputs/synth.parquet (provenance flattened)."""
    generators = row.get("generators") or {}
    reasoning = generators.get("reason") or {}
    render = generators.get("render") or {}
    hashes = {step: f"{g['prompt']}#{g['prompt_hash']}" for step, g in sorted(generators.items())
              if g.get("prompt_hash")}
    parents = [row["input_id"], row.get("source_id"), row.get("upstream_item_id"),
               row.get("upstream_source_id")]
    return {**{f.name: row.get(f.name) for f in SYNTH_FIELDS},
            "kind": KIND_OF_TASK[row["task"]],
            "parent_ids": list(dict.fromkeys(p for p in parents if p)),
            "generator_model": reasoning.get("model"),
            "generator_revision": reasoning.get("revision"),
            "renderer_model": render.get("model"), "renderer_revision": render.get("revision"),
            "prompt_hashes": stable_json(hashes), "generators": stable_json(generators)}


def write_outputs(run: RunDir, rows: list[dict[str, Any]]) -> pa.Table:
    """outputs/synth.parquet: the kept samples sorted by id (deterministic bytes)."""
    table = pa.Table.from_pylist(sorted((sample_row(r) for r in rows),
                                        key=lambda r: r["item_id"]), schema=SYNTH_SCHEMA)
    write_table_atomic(table, run.outputs_dir / OUTPUT)
    return table


# ---------------------------------------------------------------------------
# the whole run without Prefect (tests, notebooks, a CLI without a server)
# ---------------------------------------------------------------------------

def finish(started: StartedRun) -> list[FunnelRow]:
    """Check the ledger invariant and write summary/funnel.json."""
    rows = check_invariant(read_ledger(started.run.ledger_dir), started.plan,
                           n_inputs=started.n_files)
    write_atomic(started.run.summary_dir / "funnel.json",
                 (json.dumps([r.__dict__ for r in rows], indent=1, sort_keys=True) + "\n")
                 .encode())
    return rows


def run(input_dir: str | Path | None, run_dir: str | Path, config_path: str | None = None,
        overrides: dict[str, Any] | None = None, renderer: Renderer | None = None
        ) -> dict[str, Any]:
    """Load, check, ingest, parse every partition, run the global steps, check the ledger."""
    loaded = load_config(config_path, overrides)
    preflight(loaded, renderer_given=renderer is not None)
    started = start_run(loaded, input_dir, run_dir, config_path)
    parts = [process_partition(group, pid, loaded, started.run, started.run_id)
             for pid, group in zip(started.pids, started.groups, strict=True)]
    result = run_global(loaded, started.run, started.run_id, started.pids, renderer)
    funnel = finish(started)
    return {"run_id": started.run_id, "run_dir": str(started.run.root),
            "inputs": started.n_files, "partitions": parts, "synth": result,
            "funnel": [r.__dict__ for r in funnel]}
