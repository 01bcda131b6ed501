"""The contracts every pipeline relies on: ids, policy, ledger invariant, stage adapter, run dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest

from weft.schemas.ids import clip_id, hash_of, source_id
from weft.schemas.ledger import (
    LEDGER_SCHEMA,
    LedgerEntry,
    LedgerInvariantError,
    StagePlan,
    check_invariant,
    ledger_table,
    read_ledger,
    write_ledger,
)
from weft.schemas.policy import Bounds, Policy
from weft.schemas.run_dir import ConfigMismatchError, RunDir, build_dir_once
from weft.stages.base import ItemError, Outcome, Stage, StageConfig, ledger_rows_of

# ---- ids -------------------------------------------------------------------


def test_source_id_is_sha256_of_bytes(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello weft")
    assert source_id(f) == hashlib.sha256(b"hello weft").hexdigest()


def test_clip_id_depends_on_span_and_splitter_and_is_dot_free() -> None:
    a = clip_id("src", 1.0, 2.0, "v1")
    assert a == clip_id("src", 1.0, 2.0, "v1")
    assert len({a, clip_id("src", 1.0, 2.5, "v1"), clip_id("src", 1.0, 2.0, "v2"),
                clip_id("other", 1.0, 2.0, "v1")}) == 4
    assert "." not in a and a.isalnum()


def test_hash_of_is_order_insensitive_for_dict_keys() -> None:
    assert hash_of({"a": 1, "b": 2}) == hash_of({"b": 2, "a": 1})


# ---- policy ----------------------------------------------------------------


def _policy() -> Policy:
    return Policy(name="p", version=1, rules={"quality": {
        "clarity": Bounds(min=10.0), "instability": Bounds(max=0.5)}})


def test_policy_decides_from_scores_with_reason_codes() -> None:
    p = _policy()
    assert p.decide("quality", {"clarity": 11.0, "instability": 0.1}) == ("keep", "ok")
    assert p.decide("quality", {"clarity": 9.0, "instability": 0.1}) == ("drop",
                                                                       "clarity_below_min")
    assert p.decide("quality", {"clarity": 11.0, "instability": 0.9}) == (
        "drop", "instability_above_max")
    assert p.decide("quality", {"clarity": None, "instability": 0.1}) == ("drop",
                                                                        "clarity_missing")
    assert p.decide("other", {}) == ("keep", "ok")


def test_policy_rule_without_score_is_a_stage_bug() -> None:
    with pytest.raises(KeyError, match=r"quality\.clarity"):
        _policy().decide("quality", {"instability": 0.1})


def test_policy_rejects_inverted_bounds_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="greater than max"):
        Bounds(min=2, max=1)
    with pytest.raises(ValueError):
        Policy.model_validate({"name": "p", "version": 1, "rulez": {}})


def test_policy_hash_changes_with_thresholds() -> None:
    stricter = Policy(name="p", version=1, rules={"quality": {"clarity": Bounds(min=20.0)}})
    assert _policy().policy_hash != stricter.policy_hash


# ---- ledger ----------------------------------------------------------------

PLAN = [StagePlan("ingest", "1"), StagePlan("probe", "1"), StagePlan("clips", "1", "expand"),
        StagePlan("crop", "1")]


def _row(stage: str, index: int, item: str, decision: str, parent: str | None = None,
         reason: str = "ok") -> dict[str, Any]:
    return LedgerEntry(item_id=item, item_kind="x", decision=decision, reason=reason,
                       parent_id=parent).to_row(
        run_id="r", stage=stage, stage_index=index, stage_version="1", config_hash="c",
        policy_hash="p", code_version="t")


def _good_ledger() -> list[dict[str, Any]]:
    return [
        _row("ingest", 0, "s1", "keep"), _row("ingest", 0, "s2", "keep"),
        _row("ingest", 0, "s3", "drop", reason="exact_duplicate"),
        _row("probe", 1, "s1", "keep"), _row("probe", 1, "s2", "error", reason="truncated"),
        _row("clips", 2, "c1", "keep", parent="s1"), _row("clips", 2, "c2", "drop", parent="s1",
                                                          reason="duration_s_below_min"),
        _row("crop", 3, "c1", "keep"),
    ]


def test_invariant_holds_and_funnel_counts() -> None:
    funnel = check_invariant(ledger_table(_good_ledger()), PLAN, n_inputs=3)
    by = {r.stage: r for r in funnel}
    assert (by["ingest"].items_in, by["ingest"].kept, by["ingest"].dropped) == (3, 2, 1)
    assert (by["probe"].items_in, by["probe"].errored) == (2, 1)
    assert by["probe"].error_reasons == {"truncated": 1}
    assert by["clips"].drop_reasons == {"duration_s_below_min": 1}
    for r in funnel:
        assert r.items_in == r.kept + r.dropped + r.errored


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows.pop(3), "probe"),  # a kept item never reached probe
    (lambda rows: rows.append(_row("crop", 3, "c2", "keep")), "crop"),  # a dropped item came back
    (lambda rows: rows.pop(0), "ingest"),  # an input never recorded
])
def test_invariant_catches_lost_or_extra_items(mutate, message) -> None:
    rows = _good_ledger()
    mutate(rows)
    with pytest.raises(LedgerInvariantError, match=message):
        check_invariant(ledger_table(rows), PLAN, n_inputs=3)


def test_ledger_roundtrip_is_deterministic(tmp_path: Path) -> None:
    rows = _good_ledger()
    write_ledger(rows, tmp_path / "a.parquet")
    write_ledger(list(reversed(rows)), tmp_path / "b" / "a.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b" / "a.parquet").read_bytes()
    table = read_ledger(tmp_path)
    assert table.schema.equals(LEDGER_SCHEMA, check_metadata=False)
    assert table.num_rows == len(rows)


def test_ledger_is_queryable_with_duckdb(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    write_ledger(_good_ledger(), tmp_path / "ledger" / "x.parquet")
    got = duckdb.sql(f"select stage, count(*) from read_parquet('{tmp_path}/ledger/*.parquet') "
                     "group by stage order by stage").fetchall()
    assert got == [("clips", 2), ("crop", 1), ("ingest", 3), ("probe", 2)]


# ---- stage adapter -----------------------------------------------------------


class _Lengths(Stage):
    name = "length"
    version = "1"
    item_kind = "doc"
    output_fields: ClassVar[list[pa.Field]] = [pa.field("n", pa.int64())]
    heavy_columns = ("payload",)

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        if row["payload"] == b"boom":
            raise ItemError("bad_payload", "payload says boom")
        if row["payload"] == b"bug":
            raise ZeroDivisionError("a bug in the stage")
        n = len(row["payload"])
        return [Outcome(self.entry(row, {"n": n}), {"n": n})]


class _Split(Stage):
    name = "split"
    version = "1"
    kind = "expand"
    item_kind = "part"
    output_fields: ClassVar[list[pa.Field]] = [pa.field("item_id", pa.string()),
                                               pa.field("parent_id", pa.string()),
                                               pa.field("part", pa.binary())]

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        out = []
        for i, part in enumerate(row["payload"].split(b" ")):
            item = f"{row['item_id']}-{i}"
            child = {"item_id": item, "parent_id": row["item_id"], "part": part}
            out.append(Outcome(self.entry(child, {"len": len(part)}, item_id=item,
                                          parent_id=row["item_id"]), child))
        return out


def test_stage_scores_decides_and_records_every_item(run_context) -> None:
    stage = _Lengths(StageConfig(), run_context({"length": {"n": {"min": 3}}}))
    batch = pa.Table.from_pylist([
        {"item_id": "a", "source_id": "a", "payload": b"hello"},
        {"item_id": "b", "source_id": "b", "payload": b"hi"},
        {"item_id": "c", "source_id": "c", "payload": b"boom"},
        {"item_id": "d", "source_id": "d", "payload": b"bug"},
    ])
    out = stage(batch).to_pylist()
    assert [r["_decision"] for r in out] == ["keep", "drop", "error", "error"]
    assert out[0]["n"] == 5 and out[1]["n"] == 2
    assert out[1]["payload"] is None  # heavy columns emptied once not kept
    ledger = ledger_rows_of(out)
    assert [r["reason"] for r in ledger] == ["ok", "n_below_min", "bad_payload",
                                              "exception_ZeroDivisionError"]
    assert json.loads(ledger[1]["thresholds"]) == {"n": {"min": 3.0}}
    assert ledger[3]["error_type"] == "ZeroDivisionError"


def test_expand_stage_carries_history_once_and_passes_dropped_rows(run_context) -> None:
    first = _Lengths(StageConfig(), run_context({"length": {"n": {"min": 3}}}))
    split = _Split(StageConfig(), run_context({"split": {"len": {"min": 2}}}, stage_index=1))
    batch = pa.Table.from_pylist([{"item_id": "a", "source_id": "a", "payload": b"ab c de"},
                                  {"item_id": "b", "source_id": "b", "payload": b"x"}])
    out = split(first(batch)).to_pylist()
    assert [r["item_id"] for r in out] == ["a-0", "a-1", "a-2", "b"]
    assert [r["_decision"] for r in out] == ["keep", "drop", "keep", "drop"]
    ledger = ledger_rows_of(out)
    assert len(ledger) == 2 + 3  # one row per item per stage, none duplicated
    table = ledger_table(ledger)
    plan = [StagePlan("length", "1"), StagePlan("split", "1", "expand")]
    funnel = check_invariant(table, plan, n_inputs=2)
    assert [(r.items_in, r.kept) for r in funnel] == [(2, 1), (3, 2)]


# ---- run dir ---------------------------------------------------------------


def test_run_dir_refuses_a_changed_config(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = {"a": 1, "nested": {"b": 2}}
    run.claim(pipeline="video", config=cfg, config_hash="h1", run_id="r", plan=[],
              code_version="t")
    run.claim(pipeline="video", config=cfg, config_hash="h1", run_id="r", plan=[],
              code_version="t")  # same config: fine
    with pytest.raises(ConfigMismatchError, match=r"nested.b: 2 -> 3"):
        run.claim(pipeline="video", config={"a": 1, "nested": {"b": 3}}, config_hash="h2",
                  run_id="r", plan=[], code_version="t")


def _build_marker(text: str):
    def build(tmp: Path) -> None:
        (tmp / "part.txt").write_text(text)
        (tmp / "done").write_text("")
    return build


def _is_done(path: Path) -> bool:
    return (path / "done").is_file()


def test_build_dir_once_builds_then_reuses_a_complete_dir(tmp_path: Path) -> None:
    out = build_dir_once(tmp_path / "a" / "model", _build_marker("first"), _is_done)
    assert (out / "part.txt").read_text() == "first"
    assert build_dir_once(out, _build_marker("second"), _is_done) == out
    assert (out / "part.txt").read_text() == "first"  # complete: not rebuilt
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temp dir left


def test_build_dir_once_replaces_an_incomplete_leftover(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "part.txt").write_text("half")  # a crash before the marker
    build_dir_once(out, _build_marker("whole"), _is_done)
    assert (out / "part.txt").read_text() == "whole" and _is_done(out)


def test_build_dir_once_leaves_nothing_when_the_build_fails(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "part.txt").write_text("half")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        build_dir_once(tmp_path / "model", broken, _is_done)
    assert list(tmp_path.iterdir()) == []


def test_error_messages_lose_native_pointers_so_reruns_match(run_context) -> None:
    class Fails(Stage):
        name, version, item_kind = "fails", "1", "source"

        def process(self, row):
            raise ItemError("unreadable", "[mov,mp4 @ 0x555eeadf3180] moov atom not found")

    rows = Fails(None, run_context()).process_rows([{"item_id": "a", "source_id": "a"}])
    (entry,) = ledger_rows_of(rows)
    assert entry["decision"] == "error" and entry["reason"] == "unreadable"
    assert entry["error_message"] == "[mov,mp4 @ 0x…] moov atom not found"
