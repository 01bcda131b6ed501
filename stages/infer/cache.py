"""The request cache: a model is never asked the same question twice.

A sqlite file keyed on the request key (model id + revision, prompt template
id + hash, sampling params, input hash; see `ChatRequest.key`). Only the
driver reads and writes it - workers get the misses and return answers - so
one writer, no locking across a cluster. Answers are JSON, never pickles.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from weft.stages.infer.types import Completion

_SCHEMA = """
create table if not exists requests (
    key text primary key,
    model_id text not null,
    revision text not null,
    prompt_id text not null,
    created_at real not null,
    response text not null
)
"""


def open_cache_db(path: Path, schema: str) -> sqlite3.Connection:
    """A cache's sqlite file (created on first use, write-ahead log) with its table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=60)
    db.execute("pragma journal_mode=wal")
    db.execute(schema)
    db.commit()
    return db


def select_by_keys(db: sqlite3.Connection, table: str, column: str, keys: Iterable[str]
                   ) -> list[tuple[str, object]]:
    """(key, column) of the given keys present in `table`, 500 keys per query."""
    wanted = sorted(set(keys))
    rows: list[tuple[str, object]] = []
    for start in range(0, len(wanted), 500):
        chunk = wanted[start:start + 500]
        marks = ",".join("?" * len(chunk))
        rows += db.execute(f"select key, {column} from {table} where key in ({marks})",
                           chunk).fetchall()
    return rows


class RequestCache:
    """key -> Completion, in one sqlite file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_cache_db(self.path, _SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        """Cached completions of the given keys (missing keys are absent), marked cached."""
        return {k: Completion.from_json(json.loads(v), cached=True)
                for k, v in select_by_keys(self._db, "requests", "response", keys)}

    def put_many(self, items: Iterable[tuple[str, str, str, str, Completion]]) -> int:
        """Store (key, model_id, revision, prompt_id, completion); errors are not cached."""
        rows = [(key, model_id, revision, prompt_id, time.time(),
                 json.dumps(c.to_json(), sort_keys=True))
                for key, model_id, revision, prompt_id, c in items if c.error is None]
        with self._db:
            self._db.executemany("insert or replace into requests values (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        return int(self._db.execute("select count(*) from requests").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
