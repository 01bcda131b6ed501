"""Ready-made training configs: the tiny CPU recipe the demo and the tests run.

`configs/train-tiny.yaml` holds the recipe; `tiny_recipe` fills in what only this
machine knows (where the tiny models and the shards are) and takes the backbone's
shapes from the LLM checkpoint's config.json, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weft.model.config import MoTConfig
from weft.train.config import TrainConfig, load_train_config

TINY_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "train-tiny.yaml"


def tiny_recipe(llm_dir: str | Path, vit_dir: str | Path, vae_dir: str | Path,
                shards: str | Path, run_dir: str | Path,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The tiny CPU recipe over local tiny models and a shard folder."""
    recipe = load_train_config(TINY_RECIPE)
    llm = MoTConfig.from_qwen2_config(Path(llm_dir), **{
        k: getattr(recipe.model.unified.llm, k)
        for k in ("layer_mode", "attention_backend", "qk_norm")})
    paths: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {"llm_checkpoint": str(llm_dir), "vae_path": str(vae_dir),
                  "unified": {"llm": llm.model_dump(mode="json"), "vit_path": str(vit_dir)}},
        "data": {"shards": str(shards)},
    }
    from weft.schemas.config_doc import deep_merge

    merged = deep_merge(deep_merge(recipe.model_dump(mode="json"), paths), overrides or {})
    return TrainConfig.model_validate(merged)
