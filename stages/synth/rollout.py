"""The `rollout` stage: N samples per input, each with its own seed.

A rollout's seed derives from the run's base seed, the input's *content* and
the rollout index, so the same prompt or pair gets the same seeds in any file,
run or order: a re-run asks the same questions (cache hits) and renders the same
pixels, and two copies of one prompt yield identical samples that dedup finds.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ids import hash_of
from weft.stages.base import Outcome, Stage, StageConfig
from weft.stages.synth.answers import decide
from weft.stages.synth.inputs import INPUT_FIELDS

SAMPLE_KIND = "synth_sample"
ROLLOUT_FIELDS = [
    *(f for f in INPUT_FIELDS if f.name not in ("item_kind",)),
    pa.field("item_kind", pa.string()),
    pa.field("input_id", pa.string()),
    pa.field("rollout", pa.int32()),
    pa.field("seed", pa.int64()),
]


class RolloutConfig(BaseModel):
    """How many samples each input yields, and the base seed they derive from (runs on the
    driver: no resources)."""

    model_config = ConfigDict(extra="forbid")
    rollouts: int = Field(2, ge=1, description="samples per input, each with its own seed")
    seed: int = Field(0, ge=0, description="base seed; every rollout seed derives from it")


def rollout_seed(base: int, content_id: str, index: int) -> int:
    """A 31-bit seed from (base seed, input content, rollout index)."""
    return int(hash_of("rollout-seed", base, content_id, index, length=8), 16) & 0x7FFFFFFF


class RolloutStage(Stage):
    """Expand a kept input into `rollouts` samples (ids hash the input id and index)."""

    name: ClassVar[str] = "rollout"
    version: ClassVar[str] = "1"
    kind: ClassVar[Literal["map", "expand"]] = "expand"
    item_kind: ClassVar[str] = SAMPLE_KIND
    Config: ClassVar[type[StageConfig]] = RolloutConfig  # type: ignore[assignment]
    output_fields: ClassVar[list[pa.Field]] = ROLLOUT_FIELDS

    def decide(self, scores: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        return decide(self.ctx.policy, self.name, scores)

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: RolloutConfig = self.config  # type: ignore[assignment]
        out = []
        for k in range(config.rollouts):
            seed = rollout_seed(config.seed, row["content_id"], k)
            child = {**row, "item_id": hash_of("rollout", row["item_id"], k),
                     "parent_id": row["item_id"], "item_kind": SAMPLE_KIND,
                     "input_id": row["item_id"], "rollout": k, "seed": seed}
            entry = self.entry(child, {}, details={"rollout": k, "seed": seed,
                                                   "task": row["task"]})
            out.append(Outcome(entry, child))
        return out
