"""The web-document pipeline: HTML pages and OmniCorpus-style records in, clean documents out.

    ingest (hash, exact dedup of files)
      -> parse (expand: page -> 1 document, records file -> N)
      -> langid -> heuristics -> [quality_classifier] -> image_load -> image_rules
                                                            (per partition, on Ray)
      -> dedup (global: MinHash LSH near-duplicate documents)
      -> image_dedup (global: an image's copies in other documents; drops images)
      -> structure (image/text layout, after images left)
      -> llm_filter (global: only documents whose classifier score is uncertain reach the LLM)
      -> caption_first (a VLM caption before each kept image)
      -> summarize (an LLM summary for each text run over max_run_tokens; original kept)

The per-document stages run as one Ray Data plan per partition (a fixed group
of input files), so a killed run redoes at most the partitions in flight.
`quality_classifier` runs when `quality_classifier.model_path` is set (train one
with `weft web train-classifier`); `llm_filter` asks the registry's LLM only
about documents whose `quality_score` lies in the policy's `llm_filter_band`.
"""

from __future__ import annotations

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
    collect,
    ledger_row,
    load_partitions,
    output_hash,
    read_config,
    resolve_policy_and_models,
    run_context,
    write_partition,
    write_table_atomic,
)
from weft.pipelines.ray_runtime import RayConfig, apply_stage
from weft.schemas.config_doc import render_defaults
from weft.schemas.ids import hash_of
from weft.schemas.ledger import LedgerEntry, StagePlan, write_ledger
from weft.schemas.policy import Policy
from weft.schemas.run_dir import RunDir
from weft.stages.base import DECISION_COLUMN, LEDGER_COLUMN, Stage, ledger_rows_of
from weft.stages.infer.cache import RequestCache
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.registry import ModelRegistry, model_revision
from weft.stages.infer.runner import InferenceStats, run_requests
from weft.stages.infer.types import ChatRequest, Completion, SamplingParams
from weft.stages.web.enrich import (
    CaptionFirstConfig,
    SummarizeConfig,
    TextRun,
    apply_enrichment,
    caption_requests,
    long_runs,
    summary_requests,
    usable_summary,
)
from weft.stages.web.fasttext_classifier import QualityClassifierStage, label_requests, parse_label
from weft.stages.web.heuristics import HeuristicsStage
from weft.stages.web.image_rules import ImageDedupConfig, ImageRulesStage, image_dedup_entries
from weft.stages.web.images import ImageLoadStage
from weft.stages.web.langid import LangIdStage
from weft.stages.web.minhash import NearDupConfig, near_duplicate_entries
from weft.stages.web.parse import ParseStage
from weft.stages.web.structure import StructureStage

PIPELINE = "web"
DEFAULT_CONFIG = CONFIGS_DIR / "web.yaml"
DEFAULT_POLICY = CONFIGS_DIR / "policies" / "web.yaml"
IMAGE_DEDUP = StagePlan("image_dedup", "1", "map")
DEDUP = StagePlan("dedup", "1", "map")
LLM_FILTER = StagePlan("llm_filter", "1", "map")
CAPTION_FIRST = StagePlan("caption_first", "1", "map")
SUMMARIZE = StagePlan("summarize", "1", "map")
BAND_RULES = "llm_filter_band"  # policy block: quality_score bounds of the uncertain band


def partition_stages(config: WebPipelineConfig) -> list[type[Stage]]:
    """The per-document stages this config runs, in order."""
    stages: list[type[Stage]] = [ParseStage, LangIdStage, HeuristicsStage]
    if config.quality_classifier.model_path:
        stages.append(QualityClassifierStage)
    stages += [ImageLoadStage, ImageRulesStage]
    return stages


ALL_PARTITION_STAGES: list[type[Stage]] = [ParseStage, LangIdStage, HeuristicsStage,
                                           QualityClassifierStage, ImageLoadStage,
                                           ImageRulesStage]
GLOBAL_STAGE_NAMES = (IMAGE_DEDUP.name, StructureStage.name, DEDUP.name, LLM_FILTER.name,
                      CAPTION_FIRST.name, SUMMARIZE.name)


class LlmFilterConfig(BaseModel):
    """The LLM fine filter over the classifier's uncertain band."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="needs a quality score: runs only with "
                                            "quality_classifier.model_path set")
    model: str = Field("filter-llm", description="a name in the model registry")
    prompt: str = Field("quality_label", description="configs/prompts/<prompt>.yaml")
    positive_label: str = "high"
    labels: list[str] = Field(default_factory=lambda: ["high", "low"])
    max_chars: int = Field(4000, ge=100, description="document text sent to the LLM, at most")
    max_tokens: int = Field(4, ge=1)


class WebPipelineConfig(BaseModel):
    """Everything the web pipeline does, with every default visible in configs/web.yaml."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    policy: str = Field("policies/web.yaml", description="relative to this config's folder")
    partition_size: int = Field(32, ge=1, description="input files per resumable partition")
    discover: DiscoverConfig = Field(default_factory=lambda: DiscoverConfig(suffixes=[
        ".html", ".htm", ".xhtml", ".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".parquet"]))
    ray: RayConfig = Field(default_factory=RayConfig)
    parse: ParseStage.Config = Field(default_factory=ParseStage.Config)
    langid: LangIdStage.Config = Field(default_factory=LangIdStage.Config)
    heuristics: HeuristicsStage.Config = Field(default_factory=HeuristicsStage.Config)
    quality_classifier: QualityClassifierStage.Config = Field(
        default_factory=QualityClassifierStage.Config)
    image_load: ImageLoadStage.Config = Field(default_factory=ImageLoadStage.Config)
    image_rules: ImageRulesStage.Config = Field(default_factory=ImageRulesStage.Config)
    image_dedup: ImageDedupConfig = Field(default_factory=ImageDedupConfig)
    structure: StructureStage.Config = Field(default_factory=StructureStage.Config)
    dedup: NearDupConfig = Field(default_factory=NearDupConfig)
    models: str = Field("models.yaml", description="model registry, relative to this "
                                                   "config's folder")
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    llm_filter: LlmFilterConfig = Field(default_factory=LlmFilterConfig)
    caption_first: CaptionFirstConfig = Field(default_factory=CaptionFirstConfig)
    summarize: SummarizeConfig = Field(default_factory=SummarizeConfig)

    def stage_config(self, stage_cls: type[Stage]) -> Any:
        return getattr(self, stage_cls.name)


CONFIG_HEADER = """\
weft web pipeline: every default, written out. Generated from the pydantic
models by `weft config defaults web --write`; a test checks it still matches.
Pass a YAML with only the keys you change: `weft web run --config my.yaml`.
Thresholds are not here: they live in the policy (configs/policies/web.yaml).
"""


def default_config_yaml() -> str:
    """configs/web.yaml as the models define it (every default, commented)."""
    return render_defaults(WebPipelineConfig(), CONFIG_HEADER)


class LoadedWebConfig(BaseModel):
    """A validated config with its policy and registry, and the hash that names the run."""

    config: WebPipelineConfig
    policy: Policy
    registry: ModelRegistry
    resolved: dict[str, Any]
    config_hash: str

    @property
    def llm_filter_active(self) -> bool:
        return bool(self.config.llm_filter.enabled and self.config.quality_classifier.model_path)


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> LoadedWebConfig:
    """Defaults, the user's YAML, overrides; any problem is one ConfigError."""
    raw = read_config(WebPipelineConfig, DEFAULT_CONFIG, path, overrides, PIPELINE)
    config: WebPipelineConfig = raw.config
    stages = {s.name for s in ALL_PARTITION_STAGES} | {*GLOBAL_STAGE_NAMES, BAND_RULES,
                                                       f"{ImageRulesStage.name}_per_image"}
    used = {config.llm_filter.model, config.caption_first.model, config.summarize.model}
    policy, registry, resolved = resolve_policy_and_models(raw, stages, used)
    config_hash = output_hash(PIPELINE, resolved, ("ray", "policy", "models", "inference"),
                              [s.name for s in (*ALL_PARTITION_STAGES, StructureStage)])
    return LoadedWebConfig(config=config, policy=policy, registry=registry, resolved=resolved,
                           config_hash=config_hash)


def plan(loaded: LoadedWebConfig) -> list[StagePlan]:
    """The ledger's stage order for this config."""
    stages = [StagePlan(s.name, s.version, s.kind) for s in partition_stages(loaded.config)]
    structure = StagePlan(StructureStage.name, StructureStage.version, "map")
    config = loaded.config
    return [INGEST, *stages, DEDUP, IMAGE_DEDUP, structure,
            *([LLM_FILTER] if loaded.llm_filter_active else []),
            *([CAPTION_FIRST] if config.caption_first.enabled else []),
            *([SUMMARIZE] if config.summarize.enabled else [])]


def preflight(loaded: LoadedWebConfig) -> None:
    """Fail at start-up, clearly, for missing models and prompts."""
    classifier = loaded.config.quality_classifier.model_path
    if classifier and not Path(classifier).expanduser().is_file():
        raise ConfigError(f"quality_classifier.model_path {classifier} does not exist "
                          "(train one with `weft web train-classifier`)")
    for name, step in (("caption_first", loaded.config.caption_first),
                       ("summarize", loaded.config.summarize)):
        if step.enabled:
            try:
                loaded.registry.check(step.model)
                load_prompt(step.prompt)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    if loaded.llm_filter_active:
        if BAND_RULES not in loaded.policy.rules:
            raise ConfigError(f"the policy has no `{BAND_RULES}` block: the LLM filter needs "
                              "the quality_score band it looks at")
        try:
            loaded.registry.check(loaded.config.llm_filter.model)
            load_prompt(loaded.config.llm_filter.prompt)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"llm_filter: {exc}") from exc


# ---------------------------------------------------------------------------
# per-partition Ray Data plan
# ---------------------------------------------------------------------------

def process_partition(group: list[dict[str, Any]], pid: str, loaded: LoadedWebConfig,
                      run: RunDir, run_id: str) -> dict[str, Any]:
    """Run every per-document stage over one partition and write its outputs atomically."""
    import ray.data

    ds = ray.data.from_arrow(pa.Table.from_pylist(group))
    for index, stage_cls in enumerate(partition_stages(loaded.config), start=1):
        ctx = run_context(loaded, run, run_id, stage_index=index)
        ds = apply_stage(ds, stage_cls, loaded.config.stage_config(stage_cls), ctx)
    return write_partition(run, pid, collect(ds), "web_doc", "docs", {"files": len(group)})


# ---------------------------------------------------------------------------
# global steps: near-duplicate documents, then the LLM fine filter
# ---------------------------------------------------------------------------

def _keep(entries: list[LedgerEntry], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r, e in zip(rows, entries, strict=True) if e.decision == "keep"]


def run_global(loaded: LoadedWebConfig, run: RunDir, run_id: str,
               partition_ids: list[str]) -> dict[str, Any]:
    """The steps that compare documents with each other, then the LLM; writes outputs."""
    docs = load_partitions(run, partition_ids, "docs")
    rows = [] if docs is None else \
        docs.filter(pc.equal(docs[DECISION_COLUMN], "keep")).to_pylist()
    index = len(partition_stages(loaded.config)) + 1
    ledger: list[dict[str, Any]] = []
    n_in = len(rows)

    # dedup: MinHash near-duplicate documents
    ctx = run_context(loaded, run, run_id, stage_index=index)
    entries = near_duplicate_entries(rows, loaded.policy, loaded.config.dedup)
    config_hash = hash_of(DEDUP.name, loaded.config.dedup.model_dump(), length=16)
    ledger += [ledger_row(e, DEDUP, config_hash, ctx) for e in entries]
    rows = _keep(entries, rows)

    # image_dedup: copies of an image across documents leave all but the best one
    ctx = run_context(loaded, run, run_id, stage_index=index + 1)
    found = image_dedup_entries(rows, loaded.policy, loaded.config.image_dedup)
    config_hash = hash_of(IMAGE_DEDUP.name, loaded.config.image_dedup.model_dump(), length=16)
    for row, (entry, columns) in zip(rows, found, strict=True):
        row.update(columns)
        ledger.append(ledger_row(entry, IMAGE_DEDUP, config_hash, ctx))

    # structure: judged on the images that are left
    structure = StructureStage(loaded.config.structure,
                               run_context(loaded, run, run_id, stage_index=index + 2))
    for row in rows:
        row[LEDGER_COLUMN] = []
    done = structure.process_rows(rows)
    ledger += ledger_rows_of(done)
    rows = [r for r in done if r[DECISION_COLUMN] == "keep"]
    write_ledger(ledger, run.ledger_dir / "global.parquet")

    llm_stats: dict[str, Any] = {}
    index += 3
    if loaded.llm_filter_active:
        rows, llm_stats = run_llm_filter(rows, loaded, run, run_id, index)
        index += 1
    rows, enrich_stats = run_enrich(rows, loaded, run, run_id, index)
    write_outputs(run, rows, docs)
    return {"docs_in": n_in, "docs_kept": len(rows), "llm": llm_stats, **enrich_stats}


def ask_model(loaded: LoadedWebConfig, run: RunDir, model: str, revision: str,
              requests: list[ChatRequest]) -> tuple[list[Completion], InferenceStats]:
    """Answers in request order, through the run's request cache (misses only reach the model)."""
    keys = [r.key(model, revision) for r in requests]
    with RequestCache(loaded.config.inference.cache_file(run)) as cache:
        answers, stats = run_requests(dict(zip(keys, requests, strict=True)),
                                      loaded.registry.get(model), model, revision, cache,
                                      total=len(keys))
    return [answers[k] for k in keys], stats


def run_llm_filter(docs: list[dict[str, Any]], loaded: LoadedWebConfig, run: RunDir,
                   run_id: str, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ask the LLM only about documents in the uncertain band; the ledger says which."""
    cfg = loaded.config.llm_filter
    revision = model_revision(loaded.registry.get(cfg.model))
    prompt = load_prompt(cfg.prompt)
    ctx = run_context(loaded, run, run_id, stage_index=index)
    band = loaded.policy.thresholds(BAND_RULES)
    in_band = [d for d in docs
               if loaded.policy.decide(BAND_RULES, {"quality_score": d["quality_score"]})[0]
               == "keep"]
    requests = label_requests([d["text"] or "" for d in in_band], prompt,
                              SamplingParams(max_tokens=cfg.max_tokens), cfg.max_chars)
    completions, stats = ask_model(loaded, run, cfg.model, revision, requests)
    asked = {d["item_id"]: c for d, c in zip(in_band, completions, strict=True)}
    config_hash = hash_of(LLM_FILTER.name, LLM_FILTER.version, cfg.model_dump(mode="json"),
                          length=16)
    ledger, kept = [], []
    for doc in docs:
        completion = asked.get(doc["item_id"])
        details: dict[str, Any] = {"band": band, "quality_score": doc["quality_score"],
                                   "asked_llm": completion is not None}
        model_id = model_rev = prompt_hash = None
        if completion is None:  # confident classifier: no LLM call, the classifier decides
            scores: dict[str, Any] = {"llm_quality": None}
            decision, reason = "keep", "outside_band"
        else:
            label = parse_label(completion.text, cfg.labels)
            scores = {"llm_quality": None if label is None else float(label == cfg.positive_label)}
            decision, reason = loaded.policy.decide(LLM_FILTER.name, scores)
            details.update(answer=completion.text, label=label,
                           prompt_tokens=completion.prompt_tokens,
                           completion_tokens=completion.completion_tokens,
                           latency_ms=completion.latency_ms)
            model_id, model_rev, prompt_hash = cfg.model, revision, prompt.prompt_hash
        entry = LedgerEntry(item_id=doc["item_id"], item_kind="web_doc",
                            parent_id=doc.get("parent_id"), source_id=doc.get("source_id"),
                            decision=decision, reason=reason, scores=scores,
                            thresholds=loaded.policy.thresholds(LLM_FILTER.name),
                            details=details, model_id=model_id, model_revision=model_rev,
                            prompt_hash=prompt_hash)
        ledger.append(ledger_row(entry, LLM_FILTER, config_hash, ctx))
        if decision == "keep":
            kept.append(doc)
    write_ledger(ledger, run.ledger_dir / "llm_filter.parquet")
    return kept, {**stats.as_dict(), "in_band": len(in_band), "docs": len(docs)}


def run_enrich(docs: list[dict[str, Any]], loaded: LoadedWebConfig, run: RunDir,
               run_id: str, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Caption-first and summaries of long text runs; ledger rows for both stages."""
    cap_cfg, sum_cfg = loaded.config.caption_first, loaded.config.summarize
    stats: dict[str, Any] = {}
    model_ids: dict[str, str] = {}
    captions: list[list[Completion]] = [[] for _ in docs]
    runs: list[list[TextRun]] = [[] for _ in docs]
    summaries: list[list[Completion]] = [[] for _ in docs]
    ledger: list[dict[str, Any]] = []
    ctx = run_context(loaded, run, run_id, stage_index=index)
    if cap_cfg.enabled:
        revision = model_revision(loaded.registry.get(cap_cfg.model))
        prompt = load_prompt(cap_cfg.prompt)
        per_doc = [caption_requests(d, prompt, cap_cfg) for d in docs]
        flat, cap_stats = ask_model(loaded, run, cap_cfg.model, revision,
                                    [r for reqs in per_doc for r in reqs])
        answers = iter(flat)
        captions = [[next(answers) for _ in reqs] for reqs in per_doc]
        model_ids["caption_first"] = f"{cap_cfg.model}@{revision}"
        stats["caption_first"] = cap_stats.as_dict()
        config_hash = hash_of(CAPTION_FIRST.name, cap_cfg.model_dump(mode="json"), length=16)
        for doc, answers_of_doc in zip(docs, captions, strict=True):
            scores = {"num_images": len(answers_of_doc),
                      "num_captioned": sum(1 for a in answers_of_doc
                                           if a.error is None and a.text.strip()),
                      "caption_errors": sum(1 for a in answers_of_doc if a.error)}
            details = {"captions": [{"text": a.text, "completion_tokens": a.completion_tokens,
                                     "latency_ms": a.latency_ms, "error": a.error}
                                    for a in answers_of_doc]}
            ledger.append(ledger_row(_doc_entry(doc, loaded, CAPTION_FIRST, scores, details,
                                                cap_cfg.model, revision, prompt.prompt_hash),
                                     CAPTION_FIRST, config_hash, ctx))
        index += 1
    if sum_cfg.enabled:
        import transformers

        spec = loaded.registry.get(sum_cfg.model)
        revision = model_revision(spec)
        prompt = load_prompt(sum_cfg.prompt)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec.local_path))

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        runs = [long_runs(d["items"], count, sum_cfg.max_run_tokens) for d in docs]
        flat, sum_stats = ask_model(loaded, run, sum_cfg.model, revision,
                                    [r for doc_runs in runs
                                     for r in summary_requests(doc_runs, prompt, sum_cfg)])
        answers = iter(flat)
        summaries = [[next(answers) for _ in doc_runs] for doc_runs in runs]
        model_ids["summarize"] = f"{sum_cfg.model}@{revision}"
        stats["summarize"] = sum_stats.as_dict()
        config_hash = hash_of(SUMMARIZE.name, sum_cfg.model_dump(mode="json"), length=16)
        ctx = run_context(loaded, run, run_id, stage_index=index)
        for doc, doc_runs, answers_of_doc in zip(docs, runs, summaries, strict=True):
            scores = {"num_long_runs": len(doc_runs),
                      "num_summarised": sum(usable_summary(r, a) for r, a in
                                            zip(doc_runs, answers_of_doc, strict=True)),
                      "summary_errors": sum(1 for a in answers_of_doc if a.error),
                      "tokens_before": sum(count(r.text) for r in doc_runs),
                      "tokens_after": sum(a.completion_tokens for a in answers_of_doc)}
            details = {"runs": [[r.start, r.end] for r in doc_runs]}
            ledger.append(ledger_row(_doc_entry(doc, loaded, SUMMARIZE, scores, details,
                                                sum_cfg.model, revision, prompt.prompt_hash),
                                     SUMMARIZE, config_hash, ctx))
    write_ledger(ledger, run.ledger_dir / "enrich.parquet")
    for k, doc in enumerate(docs):
        doc.update(apply_enrichment(doc, captions[k], runs[k], summaries[k], model_ids))
    return docs, stats


def _doc_entry(doc: dict[str, Any], loaded: LoadedWebConfig, stage: StagePlan,
               scores: dict[str, Any], details: dict[str, Any], model_id: str, revision: str,
               prompt_hash: str) -> LedgerEntry:
    """A kept document's entry for an enrichment stage (the policy may still drop it)."""
    decision, reason = loaded.policy.decide(stage.name, scores)
    return LedgerEntry(item_id=doc["item_id"], item_kind="web_doc",
                       parent_id=doc.get("parent_id"), source_id=doc.get("source_id"),
                       decision=decision, reason=reason, scores=scores,
                       thresholds=loaded.policy.thresholds(stage.name), details=details,
                       model_id=model_id, model_revision=revision, prompt_hash=prompt_hash)


def write_outputs(run: RunDir, kept: list[dict[str, Any]], docs: pa.Table | None) -> None:
    """outputs/docs.parquet: the kept documents (images as the global steps left them)."""
    if docs is None:
        table = pa.table({"item_id": pa.array([], pa.string())})
    else:
        schema = pa.schema([f for f in docs.schema if f.name != DECISION_COLUMN])
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in kept],
                                     schema=schema)
    write_table_atomic(table, run.outputs_dir / "docs.parquet")


