"""Re-deciding a ledger under a new policy: pure, stage by stage, refusing what it cannot."""

from __future__ import annotations

import json

import pytest

from weft.pipelines.audit.policy_apply import PolicyApplyError, redecide_ledger
from weft.schemas.ledger import LedgerEntry, StagePlan
from weft.schemas.policy import Policy

PLAN = [StagePlan("ingest", "1"), StagePlan("probe", "1"), StagePlan("clips", "1", "expand"),
        StagePlan("quality", "1")]


def _policy(clarity_min: float, duration_min: float = 1.0) -> Policy:
    return Policy.model_validate({"name": "p", "version": 1, "rules": {
        "probe": {"duration_s": {"min": 1.0}},
        "clips": {"duration_s": {"min": duration_min}},
        "quality": {"clarity": {"min": clarity_min}}}})


def _row(stage: str, item: str, parent: str | None, decision: str, reason: str,
         scores: dict, policy: Policy) -> dict:
    entry = LedgerEntry(item_id=item, item_kind="x", decision=decision, reason=reason,
                        parent_id=parent, scores=scores, thresholds=policy.thresholds(stage))
    return entry.to_row(run_id="r", stage=stage, stage_index=[p.name for p in PLAN].index(stage),
                        stage_version="1", config_hash="c", policy_hash=policy.policy_hash,
                        code_version="t")


def _ledger(old: Policy) -> list[dict]:
    rows = [_row("ingest", "s1", None, "keep", "ok", {}, old),
            _row("ingest", "s2", None, "keep", "ok", {}, old),
            _row("probe", "s1", None, "keep", "ok", {"duration_s": 10.0}, old),
            _row("probe", "s2", None, "error", "decode_failed", {}, old)]
    clips = {"c1": (2.0, 50.0), "c2": (3.0, 8.0), "c3": (0.5, 90.0)}
    for cid, (duration, clarity) in clips.items():
        decision, reason = old.decide("clips", {"duration_s": duration})
        rows.append(_row("clips", cid, "s1", decision, reason, {"duration_s": duration}, old))
        if decision == "keep":
            d, r = old.decide("quality", {"clarity": clarity})
            rows.append(_row("quality", cid, "s1", d, r, {"clarity": clarity}, old))
    rows.append(_row("clips", "c4", "s1", "drop", "empty_clip", {"duration_s": 5.0}, old))
    return rows


def _decisions(rows: list[dict]) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r["stage"], r["item_id"]): (r["decision"], r["reason"]) for r in rows}


def test_stricter_threshold_drops_and_later_stages_lose_the_item() -> None:
    old, new = _policy(5.0), _policy(20.0)
    out = redecide_ledger(_ledger(old), PLAN, old, new)
    got = _decisions(out)
    assert got[("quality", "c1")] == ("keep", "ok")
    assert got[("quality", "c2")] == ("drop", "clarity_below_min")
    assert got[("probe", "s2")] == ("error", "decode_failed")  # errors stay errors
    assert got[("clips", "c4")] == ("drop", "empty_clip")  # not a threshold: unchanged
    assert got[("clips", "c3")] == ("drop", "duration_s_below_min")
    changed = next(r for r in out if r["stage"] == "quality" and r["item_id"] == "c2")
    assert json.loads(changed["thresholds"]) == {"clarity": {"min": 20.0}}
    assert changed["policy_hash"] == new.policy_hash


def test_an_item_dropped_earlier_never_reaches_a_later_stage() -> None:
    old = _policy(5.0)
    new = Policy.model_validate({"name": "p", "version": 2, "rules": {
        **old.model_dump()["rules"], "probe": {"duration_s": {"min": 60.0}}}})
    out = redecide_ledger(_ledger(old), PLAN, old, new)
    assert _decisions(out)[("probe", "s1")] == ("drop", "duration_s_below_min")
    assert {r["stage"] for r in out} == {"ingest", "probe"}


def test_looser_policy_is_refused() -> None:
    old = _policy(5.0, duration_min=1.0)
    with pytest.raises(PolicyApplyError, match="quality never scored"):
        redecide_ledger(_ledger(old), PLAN, old, _policy(5.0, duration_min=0.1))


def test_same_policy_changes_nothing() -> None:
    old = _policy(5.0)
    rows = _ledger(old)
    assert _decisions(redecide_ledger(rows, PLAN, old, old)) == _decisions(rows)
