"""Versioned prompt templates, kept in `configs/prompts/*.yaml`, never in code.

A template has an id, a version, optional system text and a user text with
`{placeholders}`. Its hash covers everything that shapes the model's input, so
changing a word changes every request key and no stale cached answer is reused.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weft.schemas.ids import hash_of

PROMPTS_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "prompts"


class PromptTemplate(BaseModel):
    """One versioned prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    version: int = Field(ge=1)
    description: str = ""
    system: str | None = None
    user: str
    variables: list[str] = Field(default_factory=list, description="placeholders in `user`")

    @model_validator(mode="after")
    def _variables_match(self) -> PromptTemplate:
        found = sorted({name for _, name, _, _ in string.Formatter().parse(self.user) if name})
        if found != sorted(self.variables):
            raise ValueError(f"prompt {self.id}: placeholders {found} but variables "
                             f"{sorted(self.variables)}")
        return self

    @property
    def ref(self) -> str:
        """`id@version`, as the ledger records it."""
        return f"{self.id}@{self.version}"

    @property
    def prompt_hash(self) -> str:
        return hash_of("prompt", self.system, self.user, length=16)

    def render(self, **values: Any) -> str:
        missing = set(self.variables) - set(values)
        if missing:
            raise KeyError(f"prompt {self.ref} needs {sorted(missing)}")
        return self.user.format(**values)

    def messages(self, images: int = 0, **values: Any) -> list[dict[str, Any]]:
        """Chat messages: the system text, then `images` image parts and the rendered text."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        text = self.render(**values)
        if images:
            content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": "user", "content": text})
        return out


def load_prompt(name: str, prompts_dir: str | Path | None = None) -> PromptTemplate:
    """Load `configs/prompts/<name>.yaml` (or from `prompts_dir`); fails with the file named."""
    path = Path(prompts_dir or PROMPTS_DIR) / f"{name}.yaml"
    try:
        return PromptTemplate.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"invalid or missing prompt template {path}: {exc}") from exc
