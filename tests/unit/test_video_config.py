"""The video config: defaults written out, partial YAML merged, bad config refused at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from weft.pipelines import video


def test_configs_video_yaml_matches_the_models() -> None:
    """Every default a user can change is written out in configs/video.yaml."""
    assert video.DEFAULT_CONFIG.read_text() == video.default_config_yaml(), (
        "configs/video.yaml is stale: run `weft config defaults video --write`")


def test_default_yaml_validates_to_the_model_defaults() -> None:
    data = yaml.safe_load(video.default_config_yaml())
    assert video.VideoPipelineConfig.model_validate(data) == video.VideoPipelineConfig()


def test_partial_user_config_merges_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("clips:\n  analysis_fps: 2.0\n")
    loaded = video.load_config(path)
    assert loaded.config.clips.analysis_fps == 2.0
    assert loaded.config.clips.rules.max_s == 10.0  # untouched default
    assert loaded.config_hash != video.load_config().config_hash


def test_resources_and_ray_do_not_change_the_config_hash(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("ray: {num_cpus: 8}\nshots: {resources: {concurrency: 3}}\n")
    assert video.load_config(path).config_hash == video.load_config().config_hash


@pytest.mark.parametrize(("text", "message"), [
    ("clips:\n  analysis_fpz: 2\n", r"clips\.analysis_fpz: Extra inputs"),
    ("partition_size: 0\n", r"partition_size: Input should be greater than or equal to 1"),
    ("shots: {detector: transnetv2, threshold: 3}\n", "probability"),
    ("policy: nowhere.yaml\n", "invalid or missing policy"),
    ("- a list\n", "must be a mapping"),
    ("clips: [\n", "cannot read config"),
])
def test_bad_config_fails_with_one_clear_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(video.ConfigError, match=message):
        video.load_config(path)


def test_policy_for_an_unknown_stage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "name: p\nversion: 1\nrules:\n  shotz: {num_shots: {min: 1}}\n")
    (tmp_path / "c.yaml").write_text("policy: p.yaml\n")
    with pytest.raises(video.ConfigError, match="unknown stages"):
        video.load_config(tmp_path / "c.yaml")


def test_configs_web_yaml_matches_the_models() -> None:
    from weft.pipelines import web

    assert web.DEFAULT_CONFIG.read_text() == web.default_config_yaml(), (
        "configs/web.yaml is stale: run `weft config defaults web --write`")
    assert web.load_config().config.discover.suffixes  # web inputs are pages and records only


def test_web_plan_follows_the_config(tmp_path: Path) -> None:
    from weft.pipelines import web

    names = [p.name for p in web.plan(web.load_config())]
    assert "quality_classifier" not in names and "llm_filter" not in names
    model = tmp_path / "model.bin"
    model.write_bytes(b"x")
    loaded = web.load_config(overrides={"quality_classifier": {"model_path": str(model)}})
    names = [p.name for p in web.plan(loaded)]
    assert names.index("quality_classifier") < names.index("image_load")
    assert names.index("structure") < names.index("llm_filter") < names.index("caption_first")


def test_train_yaml_is_current_and_loads() -> None:
    from weft.train.config import (
        DEFAULT_CONFIG,
        TrainConfig,
        default_config_yaml,
        load_train_config,
    )

    assert DEFAULT_CONFIG.read_text() == default_config_yaml(), (
        "configs/train.yaml is stale: run `weft config defaults train --write`")
    assert load_train_config(DEFAULT_CONFIG) == TrainConfig()
