"""The synthesis config: configs/synth.yaml is what the models say, and bad configs,
missing models, renderers or unfinished upstream runs fail at start-up with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from weft.pipelines import synth
from weft.pipelines.common import ConfigError
from weft.stages.infer.registry import ModelRegistry


def test_configs_synth_yaml_matches_the_models() -> None:
    assert synth.DEFAULT_CONFIG.read_text() == synth.default_config_yaml(), (
        "configs/synth.yaml is stale: regenerate it from synth.default_config_yaml()")
    data = yaml.safe_load(synth.default_config_yaml())
    assert data["rollout"]["rollouts"] >= 1 and data["render"]["backend"] == "diffusers"


def test_defaults_load_with_the_shipped_policies() -> None:
    loaded = synth.load_config()
    assert loaded.policy.name == "synth"
    tiny = synth.load_config(overrides={"policy": "policies/synth-tiny-models.yaml"})
    assert tiny.policy.name == "synth-tiny-models"
    assert tiny.config_hash != loaded.config_hash
    assert [s.name for s in synth.plan(loaded)] == [
        "ingest", "parse", "input_dedup", "pair_judge", "rollout", "instruct", "reason",
        "render", "verify", "dedup"]


def test_resources_and_where_things_run_do_not_change_the_hash() -> None:
    base = synth.load_config().config_hash
    assert synth.load_config(overrides={"render": {"resources": {"concurrency": 3}},
                                        "ray": {"num_cpus": 8}}).config_hash == base
    assert synth.load_config(overrides={"rollout": {"rollouts": 4}}).config_hash != base


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rollout": {"rollouts": 0}}, "rollout.rollouts"),
    ({"render": {"backend": "dalle"}}, "render.backend"),
    ({"reason": {"tempreature": 1}}, "reason.tempreature"),
    ({"policy": "policies/nope.yaml"}, r"nope\.yaml"),
])
def test_a_bad_config_is_one_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        synth.load_config(overrides=overrides)


def test_a_policy_for_an_unknown_stage_is_refused(tmp_path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"name": "p", "version": 1,
                                      "rules": {"paint": {"x": {"min": 1}}}}))
    with pytest.raises(ConfigError, match="paint"):
        synth.load_config(overrides={"policy": str(policy)})


def _registry(tmp_path: Path) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {
        name: {"path": str(tmp_path / "missing" / name), "kind": kind}
        for name, kind in (("caption-vlm", "vlm"), ("filter-llm", "llm"))}}))
    return str(path)


def test_preflight_names_a_missing_model_directory(tmp_path) -> None:
    loaded = synth.load_config(overrides={"models": _registry(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        synth.preflight(loaded)


def test_preflight_names_a_missing_renderer_and_an_unfinished_upstream_run(
        tmp_path, monkeypatch) -> None:
    loaded = synth.load_config(overrides={"render": {"path": str(tmp_path / "no-flux")}})
    monkeypatch.setattr(ModelRegistry, "check", lambda self, name: "rev")
    with pytest.raises(ConfigError, match="make-tiny-flux"):
        synth.preflight(loaded)
    run = tmp_path / "video"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"pipeline": "video", "run_id": "v"}))
    loaded = synth.load_config(overrides={"interleaved_runs": [str(run)]})
    with pytest.raises(ConfigError, match=r"captions\.parquet"):
        synth.preflight(loaded, renderer_given=True)
    (run / "run.json").write_text(json.dumps({"pipeline": "synth", "run_id": "v"}))
    with pytest.raises(ConfigError, match="'synth' run"):
        synth.preflight(loaded, renderer_given=True)


def test_interleaved_runs_resolve_relative_to_the_config_file(tmp_path) -> None:
    config = tmp_path / "conf" / "synth.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"interleaved_runs": ["../runs/video"]}))
    loaded = synth.load_config(config)
    assert loaded.interleaved == [str((tmp_path / "runs" / "video").resolve())]


def test_nothing_to_synthesise_is_a_start_up_error(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    with pytest.raises(ConfigError, match="nothing to synthesise"):
        synth.start_run(synth.load_config(), tmp_path / "in", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is claimed
