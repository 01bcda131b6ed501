"""The shapes pipeline: a run directory of synthetic samples whose every answer is known.

    generate   one item per sample: draw (seeded), render its scenes, record it
    outputs/shapes.parquet   one row per sample: kind, sequence (image paths), truth

There are no input files: a sample's source is the generator (name and version)
and its seed (config seed, task, index, attempt), which give the same sample on any
machine. `inputs.parquet` lists those seeds, one per item, so the ledger invariant
reads as for any run: the generate stage has one row per input, all kept. A draw
that does not fit (no nameable object, no room to move) or repeats an earlier sample
is drawn again with the next attempt number; the summary counts those redraws.

Images are PNGs under RUN/images/, named by the hash of their scene: re-running the
same config writes the same bytes. `pipelines/shard_samples.py` turns the output
table into shard samples (`weft shards write --run-dir RUN`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from weft.pipelines.common import CONFIGS_DIR, code_version, read_config, write_table_atomic
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
from weft.schemas.run_dir import RunDir, write_atomic
from weft.stages.shapes.render import RENDER_VERSION, png_bytes, render
from weft.stages.shapes.samples import (
    GENERATOR,
    GENERATOR_VERSION,
    TASKS,
    ShapeSample,
    TasksConfig,
    make_sample,
)
from weft.stages.shapes.scene import Scene, SceneConfig

PIPELINE = "shapes"
DEFAULT_CONFIG = CONFIGS_DIR / "shapes.yaml"
OUTPUT = "shapes.parquet"
GENERATE = StagePlan("generate", GENERATOR_VERSION, "map")
MAX_ATTEMPTS = 100  # draws per sample before the config is called unworkable

SHAPES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),  # the sample id (the shard key)
        pa.field("source_id", pa.string(), nullable=False),  # the generator + seed
        pa.field("parent_ids", pa.list_(pa.string())),  # source, then the image ids
        pa.field("kind", pa.string(), nullable=False),  # the shard format's kind
        pa.field("task", pa.string(), nullable=False),  # t2i | vqa | caption | edit | video
        pa.field("category", pa.string()),  # GenEval category, question types, edit op
        pa.field("sequence", pa.string(), nullable=False),  # JSON, images as run-relative paths
        pa.field("truth", pa.string(), nullable=False),  # JSON: scenes, prompt spec, answers
        pa.field("seed", pa.string(), nullable=False),  # JSON [config seed, task, index, attempt]
        pa.field("generator", pa.string(), nullable=False),
        pa.field("scores", pa.string(), nullable=False),  # JSON: n_objects, n_images, n_texts
        pa.field("licence", pa.string()),
    ],
    metadata={"weft.table": "shapes", "weft.schema_version": "1"},
)
# inputs.parquet: the draws, one per item (what the generate stage's row count must equal)
INPUTS_SCHEMA = pa.schema([pa.field("item_id", pa.string()), pa.field("source_id", pa.string()),
                           pa.field("task", pa.string()), pa.field("seed", pa.string())])


class SampleCounts(BaseModel):
    """How many samples of each task a run draws."""

    model_config = ConfigDict(extra="forbid")
    t2i: int = Field(3000, ge=0, description="text_to_image: a GenEval-style prompt, an image")
    vqa: int = Field(1500, ge=0, description="vqa: an image, question / answer turns")
    caption: int = Field(1500, ge=0, description="vqa: an image, 'Describe the image.', "
                                                 "its caption")
    edit: int = Field(2000, ge=0, description="image_edit: image, instruction, image")
    video: int = Field(500, ge=0, description="video_clip: frames with transition captions")


class ShapesConfig(BaseModel):
    """Everything a shapes run draws, with every default visible in configs/shapes.yaml."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    seed: int = Field(0, description="every sample's seed derives from it (and the task, "
                                     "index and attempt)")
    licence: str | None = Field(None, description="recorded on every sample; null = none")
    scene: SceneConfig = Field(default_factory=SceneConfig)
    samples: SampleCounts = Field(default_factory=SampleCounts)
    tasks: TasksConfig = Field(default_factory=TasksConfig)

    @property
    def config_hash(self) -> str:
        return hash_of(PIPELINE, self.model_dump(mode="json"), length=16)


CONFIG_HEADER = """\
weft shapes world: every default, written out. Generated from the pydantic models
(`weft.pipelines.shapes.default_config_yaml()`); a test checks it still matches.
A run draws synthetic scenes of coloured shapes and writes text-to-image, VQA,
caption, edit and video samples whose every answer is known (RUN/outputs/shapes.parquet).
"""


def default_config_yaml() -> str:
    """configs/shapes.yaml as the models define it (every default, commented)."""
    return render_defaults(ShapesConfig(), CONFIG_HEADER)


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> ShapesConfig:
    """Defaults, the user's YAML (partial is fine), overrides; ConfigError when bad."""
    return read_config(ShapesConfig, DEFAULT_CONFIG, path, overrides, PIPELINE).config


def plan() -> list[StagePlan]:
    """The ledger's stage order."""
    return [GENERATE]


def seed_of(config: ShapesConfig, task: str, index: int, attempt: int) -> list[int]:
    """The seed of one draw: the numpy SeedSequence entropy (stable across versions)."""
    return [config.seed, TASKS.index(task), index, attempt]


def source_of(seed: list[int]) -> str:
    """A sample's source id: the generator, its version and the draw's seed."""
    return hash_of(GENERATOR, GENERATOR_VERSION, seed)


def image_id(scene: Scene) -> str:
    """An image's id (and file stem): the hash of the scene it draws."""
    return hash_of("shapes-image", RENDER_VERSION, scene.to_dict())


def sample_id(sample: ShapeSample) -> str:
    """The content-addressed id: the sample's content, its kind and the generator version."""
    return hash_of(GENERATOR, GENERATOR_VERSION, sample.content())


@dataclass
class Drawn:
    """A sample that made it, with the seed that made it."""

    sample: ShapeSample
    item_id: str
    seed: list[int]
    index: int


@dataclass
class RunSummary:
    """What a shapes run wrote."""

    run_id: str
    run_dir: str
    config_hash: str
    samples: int = 0
    by_task: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)
    redraws: dict[str, int] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    funnel: list[dict[str, Any]] = field(default_factory=list)

    def count(self, drawn: Drawn, redraws: int) -> None:
        task, kind, category = drawn.sample.task, drawn.sample.kind, drawn.sample.category
        self.samples += 1
        self.by_task[task] = self.by_task.get(task, 0) + 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        cats = self.by_category.setdefault(task, {})
        cats[category] = cats.get(category, 0) + 1
        self.redraws[task] = self.redraws.get(task, 0) + redraws

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def draw(config: ShapesConfig, task: str, index: int, seen: set[str]) -> tuple[Drawn, int]:
    """The index-th sample of a task (new to `seen`), and how many draws were redone."""
    for attempt in range(MAX_ATTEMPTS):
        seed = seed_of(config, task, index, attempt)
        sample = make_sample(task, np.random.default_rng(seed), config.scene, config.tasks)
        if sample is None:
            continue
        item = sample_id(sample)
        if item in seen:
            continue
        seen.add(item)
        return Drawn(sample, item, seed, index), attempt
    raise RuntimeError(f"{task} sample {index}: {MAX_ATTEMPTS} draws and none fits; the scene "
                       "config leaves no room (raise image_size, lower max_size or gap)")


def write_images(run: RunDir, scenes: list[Scene]) -> list[str]:
    """Each scene's PNG under RUN/images/ (written once), as run-relative paths."""
    paths = []
    for scene in scenes:
        rel = f"images/{image_id(scene)}.png"
        path = run.root / rel
        if not path.exists():
            write_atomic(path, png_bytes(render(scene)))
        paths.append(rel)
    return paths


def output_row(drawn: Drawn, paths: list[str], licence: str | None) -> dict[str, Any]:
    """The sample's row of outputs/shapes.parquet (images swapped in as paths)."""
    s = drawn.sample
    sequence = []
    for item in s.sequence:
        if "scene" in item:
            out = {k: v for k, v in item.items() if k != "scene"}
            sequence.append({**out, "path": paths[item["scene"]]})
        else:
            sequence.append(item)
    source = source_of(drawn.seed)
    images = list(dict.fromkeys(Path(p).stem for p in paths))
    truth = {"scenes": [sc.to_dict() for sc in s.scenes], **s.truth}
    return {"item_id": drawn.item_id, "source_id": source, "parent_ids": [source, *images],
            "kind": s.kind, "task": s.task, "category": s.category,
            "sequence": stable_json(sequence), "truth": stable_json(truth),
            "seed": stable_json(drawn.seed), "generator": f"{GENERATOR}@{GENERATOR_VERSION}",
            "scores": stable_json(s.scores()), "licence": licence}


def ledger_row(drawn: Drawn, row: dict[str, Any], run_id: str,
               config_hash: str) -> dict[str, Any]:
    """The generate stage's keep row: scores, and the scenes and seed as provenance (no
    timings, so a re-run writes the same ledger)."""
    s = drawn.sample
    details = {"task": s.task, "category": s.category, "seed": drawn.seed,
               "generator": row["generator"], "index": drawn.index,
               "scenes": [sc.to_dict() for sc in s.scenes],
               "images": [it["path"] for it in json.loads(row["sequence"]) if "path" in it]}
    entry = LedgerEntry(item_id=drawn.item_id, item_kind=s.kind, decision="keep", reason="ok",
                        source_id=row["source_id"], scores=s.scores(), details=details,
                        model_id=GENERATOR, model_revision=GENERATOR_VERSION)
    return entry.to_row(run_id=run_id, stage=GENERATE.name, stage_index=0,
                        stage_version=GENERATE.version, config_hash=config_hash,
                        policy_hash="none", code_version=code_version())


def claim(config: ShapesConfig, run_dir: str | Path) -> tuple[RunDir, str]:
    """The run directory for this config (ConfigMismatchError when it holds another)."""
    run = RunDir(Path(run_dir))
    run_id = hash_of(PIPELINE, config.config_hash, length=16)
    run.claim(pipeline=PIPELINE, config=config.model_dump(mode="json"),
              config_hash=config.config_hash, run_id=run_id,
              plan=[p.__dict__ for p in plan()], code_version=code_version())
    return run, run_id


def generate_run(config: ShapesConfig, run_dir: str | Path) -> dict[str, Any]:
    """Draw, render and record every sample of the config into run_dir; the summary.

    Deterministic: the same config writes the same ids, images and tables. The
    ledger invariant is checked before returning (LedgerInvariantError otherwise).
    """
    started = time.perf_counter()
    run, run_id = claim(config, run_dir)
    summary = RunSummary(run_id, str(run.root.resolve()), config.config_hash)
    seen: set[str] = set()
    rows, ledger, inputs = [], [], []
    images: set[str] = set()
    for task in TASKS:
        for index in range(getattr(config.samples, task)):
            drawn, redraws = draw(config, task, index, seen)
            paths = write_images(run, drawn.sample.scenes)
            row = output_row(drawn, paths, config.licence)
            rows.append(row)
            ledger.append(ledger_row(drawn, row, run_id, config.config_hash))
            inputs.append({"item_id": drawn.item_id, "source_id": row["source_id"],
                           "task": task, "seed": row["seed"]})
            images.update(paths)
            summary.count(drawn, redraws)
    rows.sort(key=lambda r: r["item_id"])
    write_table_atomic(pa.Table.from_pylist(inputs, schema=INPUTS_SCHEMA), run.inputs_path)
    write_ledger(ledger, run.ledger_dir / f"{GENERATE.name}.parquet")
    write_table_atomic(pa.Table.from_pylist(rows, schema=SHAPES_SCHEMA),
                       run.outputs_dir / OUTPUT)
    funnel = check_funnel(run, len(rows))
    summary.images = len(images)
    summary.funnel = [f.__dict__ for f in funnel]
    summary.seconds = round(time.perf_counter() - started, 3)
    stored = {k: v for k, v in summary.as_dict().items() if k != "seconds"}
    write_atomic(run.summary_dir / "shapes.json",
                 (json.dumps(stored, indent=2, sort_keys=True) + "\n").encode())
    return summary.as_dict()


def check_funnel(run: RunDir, n_inputs: int) -> list[FunnelRow]:
    """The ledger invariant over the run's plan (raises LedgerInvariantError when broken)."""
    return check_invariant(read_ledger(run.ledger_dir), plan(), n_inputs)


__all__ = ["DEFAULT_CONFIG", "GENERATE", "INPUTS_SCHEMA", "OUTPUT", "PIPELINE", "SHAPES_SCHEMA",
           "RunSummary",
           "SampleCounts", "ShapesConfig", "check_funnel", "default_config_yaml",
           "generate_run", "image_id", "load_config", "plan", "sample_id", "source_of"]
