"""Versioned decision policies: stages score, the policy decides.

A policy maps stage -> score name -> bounds. Deciding is a pure function of
stored scores, so an auditor can re-threshold a run without recomputing.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from weft.schemas.ids import hash_of


class Bounds(BaseModel):
    """Keep a score only when min <= score <= max (either side optional)."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class Policy(BaseModel):
    """Thresholds for every stage's scores, named and versioned."""

    model_config = ConfigDict(extra="forbid")
    name: str
    version: int = Field(ge=1)
    rules: dict[str, dict[str, Bounds]] = Field(default_factory=dict)

    @property
    def policy_hash(self) -> str:
        return hash_of(self.model_dump(mode="json"), length=16)

    def thresholds(self, stage: str) -> dict[str, dict[str, float]]:
        """The bounds that apply to a stage, as plain dicts for the ledger."""
        return {
            score: bounds.model_dump(exclude_none=True)
            for score, bounds in self.rules.get(stage, {}).items()
        }

    def decide(self, stage: str, scores: dict[str, float | None]) -> tuple[str, str]:
        """(decision, reason) for a stage's scores: the first bound broken drops.

        Rules are checked in the order the policy lists them. A rule whose score
        is missing is an error in the stage, not a silent keep.
        """
        for score, bounds in self.rules.get(stage, {}).items():
            if score not in scores:
                raise KeyError(f"policy rule {stage}.{score} has no score from the stage")
            value = scores[score]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return "drop", f"{score}_missing"
            if bounds.min is not None and value < bounds.min:
                return "drop", f"{score}_below_min"
            if bounds.max is not None and value > bounds.max:
                return "drop", f"{score}_above_max"
        return "keep", "ok"


def load_policy(path: str | Path) -> Policy:
    """Load a policy YAML; a malformed file fails with the file named."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read policy {path}: {exc}") from exc
    try:
        return Policy.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"invalid policy {path}: {exc}") from exc
