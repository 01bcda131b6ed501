"""A shapes run: config file current, deterministic output, provenance in the ledger."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from weft.pipelines import shapes
from weft.pipelines.common import ConfigError
from weft.schemas.ledger import read_ledger
from weft.schemas.run_dir import ConfigMismatchError
from weft.stages.shapes.detect import detect_scene, match_scene
from weft.stages.shapes.render import read_image
from weft.stages.shapes.samples import make_sample
from weft.stages.shapes.scene import Scene

SMALL = {"samples": {"t2i": 12, "vqa": 6, "caption": 6, "edit": 8, "video": 4}}


def test_configs_shapes_yaml_matches_the_models() -> None:
    assert shapes.DEFAULT_CONFIG.read_text() == shapes.default_config_yaml(), (
        "configs/shapes.yaml is stale: write weft.pipelines.shapes.default_config_yaml() to it")
    assert shapes.ShapesConfig.model_validate(yaml.safe_load(shapes.default_config_yaml())) == \
        shapes.ShapesConfig()


def test_a_partial_config_merges_and_a_bad_one_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("scene: {image_size: 128}\nsamples: {video: 0}\n")
    config = shapes.load_config(path)
    assert config.scene.image_size == 128 and config.samples.video == 0
    assert config.samples.t2i == shapes.SampleCounts().t2i
    path.write_text("scene: {shapes: [circle, hexagon]}\n")
    with pytest.raises(ConfigError, match="hexagon"):
        shapes.load_config(path)


def test_a_run_is_deterministic_and_records_every_sample(tmp_path: Path) -> None:
    config = shapes.load_config(overrides=SMALL)
    first = shapes.generate_run(config, tmp_path / "a")
    second = shapes.generate_run(config, tmp_path / "b")
    assert first["samples"] == second["samples"] == 36
    assert first["by_kind"] == {"text_to_image": 12, "vqa": 12, "image_edit": 8,
                                "video_clip": 4}
    for rel in ("outputs/shapes.parquet", "ledger/generate.parquet", "inputs.parquet"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    assert first["funnel"][0] == {"stage": "generate", "items_in": 36, "kept": 36,
                                  "dropped": 0, "errored": 0, "drop_reasons": {},
                                  "error_reasons": {}}


def test_ids_seeds_and_images_trace_back(tmp_path: Path) -> None:
    config = shapes.load_config(overrides=SMALL)
    shapes.generate_run(config, tmp_path)
    rows = pq.read_table(tmp_path / "outputs" / "shapes.parquet").to_pylist()
    ledger = {r["item_id"]: r for r in read_ledger(tmp_path / "ledger").to_pylist()}
    assert set(ledger) == {r["item_id"] for r in rows}
    for row in rows:
        seed = json.loads(row["seed"])
        # the seed alone regenerates the sample, and its content hashes to the id
        sample = make_sample(row["task"], np.random.default_rng(seed), config.scene,
                             config.tasks)
        assert sample is not None and shapes.sample_id(sample) == row["item_id"]
        assert row["source_id"] == shapes.source_of(seed) == ledger[row["item_id"]]["source_id"]
        entry = ledger[row["item_id"]]
        assert (entry["stage"], entry["decision"], entry["item_kind"]) == \
            ("generate", "keep", row["kind"])
        details = json.loads(entry["details"])
        assert details["seed"] == seed and details["generator"] == row["generator"]
        assert json.loads(entry["scores"])["n_objects"] >= 1
        truth = json.loads(row["truth"])
        paths = [it["path"] for it in json.loads(row["sequence"]) if "path" in it]
        assert len(paths) == len(truth["scenes"])
        for path, scene in zip(paths, truth["scenes"], strict=True):
            image = read_image((tmp_path / path).read_bytes())
            assert match_scene(Scene.from_dict(scene), detect_scene(image), 0, 0)


def test_a_run_dir_refuses_another_config(tmp_path: Path) -> None:
    shapes.generate_run(shapes.load_config(overrides=SMALL), tmp_path)
    other = shapes.load_config(overrides={**SMALL, "seed": 1})
    with pytest.raises(ConfigMismatchError, match="seed"):
        shapes.generate_run(other, tmp_path)


def test_region_prompts_place_one_object_where_an_edit_would() -> None:
    """t2i "a red circle in the top left": the object sits at the region's centre, as
    move / add edits put it, and reads back there; every region is drawn."""
    from weft.stages.shapes.render import render
    from weft.stages.shapes.samples import TasksConfig
    from weft.stages.shapes.scene import REGIONS, SceneConfig, region_centre, region_of
    from weft.stages.shapes.text import noun

    cfg = SceneConfig(image_size=32, shapes=["circle", "square", "triangle"],
                      colours=["red", "green", "blue", "yellow"], max_objects=3,
                      min_size=0.3, max_size=0.45)
    tasks = TasksConfig(t2i={"categories": ["region"]})
    rng = np.random.default_rng(3)
    drawn = [s for s in (make_sample("t2i", rng, cfg, tasks) for _ in range(120)) if s]
    assert len(drawn) >= 100
    regions = set()
    for sample in drawn:
        [obj] = sample.scenes[0].objects
        region = sample.truth["region"]
        regions.add(region)
        assert sample.category == "region" and region_of(obj, cfg) == region
        assert (obj.x, obj.y) == region_centre(region, obj.size, cfg)
        assert sample.sequence[0]["text"] == f"{noun(obj.colour, obj.shape)} in the {region}"
        assert sample.sequence[1] == {"type": "image", "scene": 0}
        assert match_scene(sample.scenes[0], detect_scene(render(sample.scenes[0])), 1.0)
    assert regions == set(REGIONS)
    with pytest.raises(ValueError, match="categories"):
        TasksConfig(t2i={"categories": ["regions"]})


@pytest.mark.parametrize("world", ["default", "cpu recipe"])
def test_edit_ops_are_drawn_uniformly(world: str) -> None:
    """An op is drawn once and kept over scenes that do not allow it: drawn again with each
    scene, add (needs room) fell to 17% of the CPU recipe's edits and remove (needs two
    objects) to 20%."""
    from weft.stages.shapes.recipe import CPU_RECIPE, load_recipe

    config = shapes.ShapesConfig() if world == "default" else \
        load_recipe(CPU_RECIPE).shapes_config()
    n, counts = 1200, Counter()
    for index in range(n):
        drawn, _ = shapes.draw(config, "edit", index, set())
        counts[drawn.sample.category] += 1
    assert set(counts) == {"recolour", "move", "add", "remove"}
    assert all(abs(c / n - 0.25) < 0.04 for c in counts.values()), counts
