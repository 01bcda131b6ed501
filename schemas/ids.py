"""Content-addressed identities.

A source is the sha256 of its bytes; anything derived hashes its parents' ids
with the parameters that made it, so a re-run computes the same ids and writes
to the same names. Ids are lowercase hex: dot-free, safe as WebDataset keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stable_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the canonical form we hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def hash_of(*parts: Any, length: int = 32) -> str:
    """A short hex digest of canonical JSON parts (default 128 bits)."""
    return hashlib.sha256(stable_json(list(parts)).encode()).hexdigest()[:length]


def source_id(path: str | Path) -> str:
    """A source's id is the full sha256 of its bytes (matches `sha256sum`)."""
    return sha256_file(path)


def clip_id(source: str, start_s: float, end_s: float, splitter_version: str) -> str:
    """A clip's id: its source, its span to the millisecond, and the splitter version."""
    return hash_of("clip", source, round(start_s * 1000), round(end_s * 1000), splitter_version)


def files_revision(paths: list[Path]) -> str:
    """A model's revision: sha256 over (name, sha256) of its defining files, 16 hex digits.

    Two runs that used different weights or configs never share a revision, and a
    directory moved or copied elsewhere keeps it.
    """
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:16]
