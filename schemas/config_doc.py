"""Render a pydantic config's defaults as commented YAML.

configs/*.yaml are generated from the models, and a test checks they still
match, so every default a user can change is written out where they look.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _render(model: BaseModel, data: dict[str, Any], indent: int) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.extend(_render(value, data[name], indent + 1))
        else:
            lines.append(f"{pad}{name}: {_scalar(data[name])}")
    return lines


def render_defaults(model: BaseModel, header: str) -> str:
    """YAML text of `model` with a header comment and one comment per described field."""
    head = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    return "\n".join([*head, *_render(model, model.model_dump(mode="json"), 0)]) + "\n"


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """A YAML file that must hold a mapping (empty file: {}); anything else raises
    `error` with one line naming `what` and the path."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, mappings merged key by key (a partial YAML over defaults)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: `field.path: message; ...` (the start-up message)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
