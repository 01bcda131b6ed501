"""Dedup tiers and quality scores on real media.

Analysis frames are decoded here with decord at 4 fps, 320 px wide, the way the
clips stage hands them on. decord is read *sequentially* from frame 0: its
random access returns wrong frames on the Megamind AVIs (MPEG-4 part 2, no
usable timestamps), so a sparse `get_batch` is not a safe reference decoder.

Megamind_bugy.avi holds the same 270 frames as Megamind.avi, re-encoded and
muxed at 30 fps instead of 23.976 (so it is shorter). Both cut at frames 98,
154 and 200 (measured from consecutive frame differences), giving four shots
whose clips must match across the two files and not across shots.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import lru_cache
from pathlib import Path

import decord
import numpy as np
import pytest

from weft.schemas.policy import Policy
from weft.schemas.video import encode_frames
from weft.stages.base import ledger_rows_of
from weft.stages.video.dedup import dedup_decisions, dedup_entries
from weft.stages.video.embed import EmbedConfig, EmbedStage
from weft.stages.video.open_clip_model import (
    ModelDirError,
    load_open_clip,
    model_revision,
    save_tiny_open_clip,
)
from weft.stages.video.quality import QualityStage

pytestmark = pytest.mark.integration

ANALYSIS_FPS = 4.0
ANALYSIS_WIDTH = 320
MEGAMIND_SHOTS = [(1, 98), (98, 154), (154, 200), (200, 270)]  # [start, end) frames
DUP_MIN = 0.8  # a duplicate pair scores at least this ...
DISTINCT_MAX = 0.3  # ... and a distinct pair at most this (policy max sits between: 0.5)
POLICY = Policy(name="measured", version=1, rules={
    "quality": {"duration_s": {"min": 2.0}, "min_side": {"min": 224},
                "clarity": {"min": 30.0}, "motion": {"min": 0.002},
                "instability": {"max": 0.05}},
    "dedup": {"exact_duplicate": {"max": 0.0}, "perceptual_similarity": {"max": 0.5},
              "semantic_similarity": {"max": 0.95}},
})


@lru_cache(maxsize=4)
def _decoded(path: str, upto: int) -> tuple[np.ndarray, float, int, int]:
    """Frames [0, upto] at the analysis width, decoded sequentially; fps, source w, h."""
    probe = decord.VideoReader(path)
    fps = float(probe.get_avg_fps())
    h, w = probe[0].shape[:2]
    height = 2 * round(h * ANALYSIS_WIDTH / w / 2)
    reader = decord.VideoReader(path, width=ANALYSIS_WIDTH, height=height)
    last = min(upto, len(reader) - 1)
    return reader.get_batch(list(range(last + 1))).asnumpy(), fps, w, h


def analysis_row(path: Path, start_s: float, end_s: float, item_id: str) -> dict:
    """A clip row as the clips stage makes it: 4 fps analysis frames of [start_s, end_s)."""
    fps = float(decord.VideoReader(str(path)).get_avg_fps())
    times = np.arange(start_s, end_s - 1e-6, 1.0 / ANALYSIS_FPS)
    wanted = [round(t * fps) for t in times]
    frames, fps, w, h = _decoded(str(path), max(wanted))
    index = [min(i, len(frames) - 1) for i in wanted]
    data = encode_frames(np.ascontiguousarray(frames[index]))
    return {"item_id": item_id, "source_id": path.name, "parent_id": path.name,
            "item_kind": "clip", "path": str(path), "start_s": start_s, "end_s": end_s,
            "fps": fps, "width": w, "height": h, "frames": data,
            "frame_times": [i / fps for i in index], "frame_scale": ANALYSIS_WIDTH / w,
            "content_hash": hashlib.sha256(data).hexdigest()}


def scored(rows: list[dict], ctx, model_dir: str | None = None) -> list[dict]:
    """Run quality then embed on rows, as the pipeline does before dedup."""
    rows = QualityStage(None, ctx).process_rows(rows)
    return EmbedStage(EmbedConfig(model_dir=model_dir), ctx).process_rows(rows)


def pair_similarity(a: dict, b: dict) -> float:
    """Perceptual similarity of the worse-ranked of two clips against the better one."""
    return max(s["perceptual_similarity"] for s, _ in dedup_decisions([a, b]))


def megamind_rows(asset) -> list[dict]:
    rows = []
    for name, tag, fps in (("Megamind.avi", "M", 2997 / 125), ("Megamind_bugy.avi", "B", 30.0)):
        for k, (first, end) in enumerate(MEGAMIND_SHOTS):
            # 0.1 s trimmed at each cut, as the clip rules do
            rows.append(analysis_row(asset(name), first / fps + 0.1, end / fps - 0.1,
                                     f"{tag}{k}"))
    return rows


def test_megamind_reencode_matches_shot_by_shot_and_shots_stay_distinct(
        asset, run_context) -> None:
    rows = {r["item_id"]: r for r in scored(megamind_rows(asset), run_context())}
    results = dict(zip(rows, dedup_decisions(list(rows.values())), strict=True))
    sims = {}
    for k in range(len(MEGAMIND_SHOTS)):
        scores, details = results[f"B{k}"]  # the bugy copy is shorter, so it ranks lower
        sims[f"B{k}"] = scores["perceptual_similarity"]
        assert scores["perceptual_similarity"] >= DUP_MIN, (k, scores)
        assert details["perceptual_match"] == f"M{k}"
        assert scores["exact_duplicate"] == 0.0  # a re-encode is not byte-identical
        assert results[f"M{k}"][0]["perceptual_similarity"] <= DISTINCT_MAX
    for j in range(4):
        for k in range(j + 1, 4):
            assert pair_similarity(rows[f"M{j}"], rows[f"M{k}"]) <= DISTINCT_MAX
            assert pair_similarity(rows[f"M{j}"], rows[f"B{k}"]) <= DISTINCT_MAX
    entries = {e.item_id: e for e in dedup_entries(list(rows.values()), POLICY)}
    assert sorted(i for i, e in entries.items() if e.decision == "keep") == [
        "M0", "M1", "M2", "M3"]
    assert all(entries[f"B{k}"].details["duplicate_of"] == f"M{k}" for k in range(4))
    print("megamind bugy-vs-original perceptual:", sims)


def test_different_videos_are_not_duplicates(asset, run_context) -> None:
    rows = scored([analysis_row(asset("bikes.mp4"), 2.0, 6.0, "bikes"),
                   analysis_row(asset("cityCC0.mpg"), 1.0, 5.0, "city"),
                   analysis_row(asset("vtest.avi"), 10.0, 14.0, "vtest"),
                   analysis_row(asset("Megamind.avi"), 0.2, 3.9, "mega")], run_context())
    pairs = {(a["item_id"], b["item_id"]): pair_similarity(a, b)
             for i, a in enumerate(rows) for b in rows[i + 1:]}
    print("distinct videos perceptual:", pairs)
    assert max(pairs.values()) <= DISTINCT_MAX
    assert all(s["exact_duplicate"] == 0.0 for s, _ in dedup_decisions(rows))


def test_reencoded_and_resized_copy_is_a_duplicate(asset, ffmpeg, run_context,
                                                   tmp_path) -> None:
    copy = tmp_path / "bikes_small.mp4"
    ffmpeg("-ss", "2", "-t", "4", "-i", str(asset("bikes.mp4")), "-vf", "scale=320:-2",
           "-c:v", "libx264", "-crf", "30", "-an", str(copy))
    rows = scored([analysis_row(asset("bikes.mp4"), 2.0, 6.0, "orig"),
                   analysis_row(copy, 0.0, 4.0, "small")], run_context())
    (s_orig, _), (s_small, d_small) = dedup_decisions(rows)
    print("bikes 2-6 vs crf30 320px copy perceptual:", s_small["perceptual_similarity"])
    assert s_orig["perceptual_similarity"] == 0.0  # 640 px original ranks first
    assert s_small["perceptual_similarity"] >= DUP_MIN
    assert d_small["duplicate_of"] == "orig"
    decided = {e.item_id: (e.decision, e.reason) for e in dedup_entries(rows, POLICY)}
    assert decided == {"orig": ("keep", "ok"),
                       "small": ("drop", "perceptual_similarity_above_max")}


def test_exact_copy_of_a_file_is_an_exact_duplicate(asset, run_context, tmp_path) -> None:
    twin = tmp_path / "twin.avi"
    shutil.copyfile(asset("Megamind.avi"), twin)
    rows = scored([analysis_row(asset("Megamind.avi"), 0.2, 3.9, "a"),
                   analysis_row(twin, 0.2, 3.9, "b")], run_context())
    assert rows[0]["content_hash"] == rows[1]["content_hash"]
    decided = {e.item_id: e for e in dedup_entries(rows, POLICY)}
    assert decided["a"].decision == "keep"
    assert (decided["b"].reason, decided["b"].details["duplicate_of"]) == (
        "exact_duplicate_above_max", "a")


def test_semantic_tier_with_a_tiny_open_clip_model(asset, run_context, tmp_path) -> None:
    model_dir = save_tiny_open_clip(tmp_path / "tiny-clip")
    assert model_revision(model_dir) == model_revision(save_tiny_open_clip(tmp_path / "again"))
    mega = analysis_row(asset("Megamind.avi"), 0.2, 3.9, "mega")
    rows = scored([mega, {**mega, "item_id": "mega-again"},
                   analysis_row(asset("bikes.mp4"), 2.0, 6.0, "bikes")],
                  run_context(), model_dir=str(model_dir))
    for row in rows:
        emb = np.asarray(row["embedding"], np.float32)
        assert emb.shape == (32,)
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    a, b, c = (np.asarray(r["embedding"], np.float64) for r in rows)
    print("tiny open_clip cosine: same clip", float(a @ b), "megamind vs bikes", float(a @ c))
    assert float(a @ b) == pytest.approx(1.0, abs=1e-6)
    assert float(a @ c) < 0.98  # random features: only "different video" is measurable
    entry = ledger_rows_of(rows)[-1]
    assert (entry["model_id"], entry["model_revision"]) == (
        "open_clip:tiny-clip", model_revision(model_dir))
    scores = {r["item_id"]: s for r, (s, _) in zip(rows, dedup_decisions(rows), strict=True)}
    assert max(scores["mega"]["semantic_similarity"],
               scores["mega-again"]["semantic_similarity"]) == pytest.approx(1.0, abs=1e-5)
    (model_dir / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelDirError, match="no weights"):
        load_open_clip(model_dir)


def test_static_camera_scores_low_motion_and_no_shake(asset, run_context) -> None:
    ctx = run_context(POLICY.model_dump()["rules"])
    rows = QualityStage(None, ctx).process_rows([
        analysis_row(asset("vtest.avi"), 10.0, 20.0, "vtest"),
        analysis_row(asset("bikes.mp4"), 2.0, 6.0, "bikes")])
    q = {r["item_id"]: r for r in rows}
    print("quality:", {k: {f: round(v[f], 5) for f in ("clarity", "motion", "instability")}
                       for k, v in q.items()})
    assert q["vtest"]["motion"] < 0.5 * q["bikes"]["motion"]
    assert q["vtest"]["instability"] < 0.002 < q["bikes"]["instability"]
    assert q["vtest"]["motion"] > 0.002  # people walk: static camera, not a frozen picture
    decisions = {r["item_id"]: r["decision"] for r in ledger_rows_of(rows)}
    assert decisions == {"vtest": "keep", "bikes": "keep"}

