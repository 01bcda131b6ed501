"""`weft audit trace` / `why` over a hand-made run: source -> clips -> stages, one shard set."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from weft.pipelines.audit.lineage import AmbiguousIdError, TraceError
from weft.pipelines.audit.trace import render_trace, render_why, trace_key, why
from weft.pipelines.shard import write_shards
from weft.schemas.ids import hash_of
from weft.schemas.ledger import LedgerEntry, write_ledger
from weft.schemas.run_dir import RunDir

PLAN = [("ingest", "map"), ("probe", "map"), ("clips", "expand"), ("quality", "map"),
        ("caption", "map")]
CLIP_A = "abcdef00" + "1" * 24  # kept, span in seconds
CLIP_D = "abcdef00" + "2" * 24  # kept, span in frames only (an older run)
CLIP_B = "0b" * 16  # dropped at clips: too short
CLIP_C = "0c" * 16  # errored at quality
DURATION = {"duration_s": {"min": 1.5, "max": 60.0}}


def _row(stage: str, entry: LedgerEntry) -> dict[str, Any]:
    index = [name for name, _ in PLAN].index(stage)
    return entry.to_row(run_id="run-1", stage=stage, stage_index=index, stage_version="1",
                        config_hash=f"cfg-{stage}", policy_hash="pol-1", code_version="test")


def _clip(item_id: str, source: str, decision: str = "keep", reason: str = "ok",
          **kw: Any) -> LedgerEntry:
    return LedgerEntry(item_id=item_id, item_kind="clip", parent_id=source, source_id=source,
                       decision=decision, reason=reason, **kw)


def _ledger(source: str, inputs: Path) -> list[dict[str, Any]]:
    src = {"item_kind": "source", "source_id": source}
    rows = [
        _row("ingest", LedgerEntry(source, decision="keep", reason="ok",
                                   details={"path": str(inputs / "a.mp4"), "size_bytes": 4000},
                                   scores={"exact_duplicate": 0.0}, **src)),
        _row("ingest", LedgerEntry(source, decision="drop", reason="exact_duplicate",
                                   details={"path": str(inputs / "copy.mp4"), "size_bytes": 4000,
                                            "duplicate_of": str(inputs / "a.mp4")},
                                   scores={"exact_duplicate": 1.0}, **src)),
        _row("probe", LedgerEntry(source, decision="keep", reason="ok",
                                  scores={"fps": 25.0, "duration_s": 8.0}, **src)),
        _row("clips", _clip(CLIP_A, source, scores={"duration_s": 2.0}, thresholds=DURATION,
                            details={"start_s": 1.0, "end_s": 3.0, "start_frame": 25,
                                     "end_frame": 75})),
        _row("clips", _clip(CLIP_D, source, scores={"duration_s": 2.0}, thresholds=DURATION,
                            details={"start_frame": 50, "end_frame": 100})),
        _row("clips", _clip(CLIP_B, source, "drop", "duration_s_below_min",
                            scores={"duration_s": 0.4}, thresholds=DURATION,
                            details={"start_frame": 175, "end_frame": 185})),
        _row("clips", _clip(CLIP_C, source, scores={"duration_s": 3.0}, thresholds=DURATION)),
        _row("quality", _clip(CLIP_C, source, "error", "decode_failed",
                              error_type="DecodeError", error_message="frame 3 is corrupt")),
    ]
    for clip in (CLIP_A, CLIP_D):
        rows.append(_row("quality", _clip(clip, source, scores={"clarity": 40.0},
                                          thresholds={"clarity": {"min": 5.0}})))
        rows.append(_row("caption", _clip(clip, source, scores={"num_captions": 2},
                                          model_id="cap-vlm", model_revision="rev1",
                                          prompt_hash="prompt1")))
    return rows


def _sample(clip: str, source: str, run: Path) -> dict[str, Any]:
    key = hash_of("sample", clip)
    record = {"key": key, "kind": "video_clip", "source_id": source,
              "parent_ids": [source, clip], "ledger_item_id": clip,
              "sequence": [{"type": "text", "role": "caption", "text": f"clip {clip[-4:]}"}],
              "scores": {"clarity": 40.0}, "licence": None}
    return {"key": key, "json": record, "members": {}, "dataset": "unit", "run_id": "run-1",
            "run_dir": str(run)}


@pytest.fixture
def made(tmp_path: Path) -> dict[str, Any]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = bytes(range(250)) * 16
    (inputs / "a.mp4").write_bytes(data)
    source = hashlib.sha256(data).hexdigest()
    run = tmp_path / "run"
    RunDir(run).claim(pipeline="video", config={"unit": True}, config_hash="cfg",
                      run_id="run-1", code_version="test",
                      plan=[{"name": n, "version": "1", "kind": k} for n, k in PLAN])
    write_ledger(_ledger(source, inputs), run / "ledger" / "part-0.parquet")
    shards = tmp_path / "shards"
    write_shards([_sample(CLIP_A, source, run), _sample(CLIP_D, source, run)], shards)
    return {"run": run, "shards": shards, "source": source, "inputs": inputs,
            "key_a": hash_of("sample", CLIP_A), "key_d": hash_of("sample", CLIP_D)}


def test_trace_follows_the_clip_to_the_source_bytes(made):
    trace = trace_key(made["key_a"], [made["shards"]], check_source=True)
    assert trace.ok, trace.problems
    assert [item.item_id for item in trace.chain] == [CLIP_A, made["source"]]
    assert [r.stage for r in trace.chain[0].rows] == ["clips", "quality", "caption"]
    assert [r.stage for r in trace.chain[1].rows] == ["ingest", "ingest", "probe"]
    caption = trace.chain[0].rows[-1]
    assert (caption.model_id, caption.model_revision, caption.prompt_hash) == \
        ("cap-vlm", "rev1", "prompt1")
    source = trace.source
    assert source.sha256 == made["source"]
    assert source.path == str(made["inputs"] / "a.mp4") and source.size_bytes == 4000
    assert (source.span.kind, source.span.start_s, source.span.end_s) == ("time", 1.0, 3.0)
    assert source.copies == [str(made["inputs"] / "copy.mp4")]
    assert source.bytes_check == "match"
    assert trace.location.json_ok and trace.location.members == [f"{made['key_a']}.json"]
    assert (trace.run_id, trace.dataset, trace.pipeline) == ("run-1", "unit", "video")
    text = render_trace(trace)
    assert made["key_a"] in text and "1.000 s - 3.000 s" in text and "no problems" in text
    json.dumps(trace.to_dict())


def test_span_in_frames_only_uses_the_probed_fps(made):
    trace = trace_key(made["key_d"][:12], [made["shards"]])
    assert trace.ledger_item_id == CLIP_D
    assert (trace.source.span.start_s, trace.source.span.end_s) == (2.0, 4.0)


def test_why_a_drop_names_stage_reason_and_the_broken_bound(made):
    (verdict,) = why(CLIP_B[:10], [made["run"]])
    assert verdict.item_id == CLIP_B
    assert (verdict.outcome, verdict.stage, verdict.reason) == \
        ("dropped", "clips", "duration_s_below_min")
    (bound,) = verdict.broken
    assert (bound.score, bound.value, bound.bound, bound.limit) == ("duration_s", 0.4, "min", 1.5)
    assert bound.by == pytest.approx(1.1) and bound.decisive
    assert verdict.ancestors[0]["item_id"] == made["source"]
    assert verdict.source.span.start_s == pytest.approx(7.0)  # frame 175 at 25 fps
    text = render_why([verdict])
    assert "dropped at clips" in text and "duration_s = 0.4 < min 1.5 (by 1.1)" in text
    json.dumps(verdict.to_dict())


def test_why_an_error_gives_its_type_and_message(made):
    (verdict,) = why(CLIP_C, [made["run"]])
    assert (verdict.outcome, verdict.stage, verdict.decision) == ("errored", "quality", "error")
    assert verdict.row.error_type == "DecodeError"
    assert verdict.row.error_message == "frame 3 is corrupt"
    assert verdict.passed == ["clips"]
    assert "DecodeError: frame 3 is corrupt" in render_why([verdict])


def test_why_a_kept_clip_and_an_expanded_source(made):
    (kept,) = why(CLIP_A, [made["run"]])
    assert (kept.outcome, kept.stage, kept.row) == ("kept", None, None)
    assert kept.passed == ["clips", "quality", "caption"]
    (source,) = why(made["source"][:8], [made["run"]])
    assert (source.outcome, source.stage) == ("expanded", "clips")
    assert source.children == {"keep": 3, "drop": 1}
    # ingest dropped a byte-identical copy under the same id: that does not stop the source
    assert source.passed == ["ingest", "probe"]
    assert source.source.copies == [str(made["inputs"] / "copy.mp4")]
    assert "copy.mp4" in render_why([source])


def test_prefixes_ambiguous_short_and_unknown(made):
    with pytest.raises(AmbiguousIdError, match=CLIP_D):
        why("abcdef00", [made["run"]])
    with pytest.raises(ValueError, match="at least 8 hex"):
        why("abcd", [made["run"]])
    with pytest.raises(LookupError, match="no item id starts with 99999999"):
        why("99999999", [made["run"]])
    with pytest.raises(LookupError) as err:
        trace_key("ffffffffffffffff", [made["shards"], made["run"] / "nowhere"])
    assert str(made["shards"]) in str(err.value) and "nowhere" in str(err.value)


def test_a_tampered_json_byte_is_a_sha_mismatch(made):
    row = pq.read_table(made["shards"] / "manifest.parquet").to_pylist()
    row = next(r for r in row if r["key"] == made["key_a"])
    shard = made["shards"] / row["shard"]
    data = bytearray(shard.read_bytes())
    at = data.index(f"clip {CLIP_A[-4:]}".encode(), row["offset"])
    data[at] ^= 0x20  # "clip" -> "Clip": still valid JSON, other bytes
    shard.write_bytes(bytes(data))
    trace = trace_key(made["key_a"], [made["shards"]])
    assert not trace.location.json_ok and not trace.ok
    assert any("json sha256 mismatch" in p for p in trace.problems)
    assert "MISMATCH" in render_trace(trace)


def test_a_missing_run_dir_or_ledger_row_is_said_plainly(made, tmp_path):
    ghost = _sample("f" * 32, made["source"], made["run"])
    write_shards([ghost], tmp_path / "ghost")
    with pytest.raises(TraceError, match=f"no row for item {'f' * 32}"):
        trace_key(ghost["key"], [tmp_path / "ghost"])
    shutil.rmtree(made["run"])
    with pytest.raises(TraceError, match="does not exist"):
        trace_key(made["key_a"], [made["shards"]])
