"""pHash invariances, the embed stage without a model, and the dedup tiers' ranking and scores."""

from __future__ import annotations

import json
import random

import cv2
import numpy as np
import pyarrow as pa
import pytest

from weft.schemas.policy import Policy
from weft.schemas.video import CLIP_FIELDS, encode_frames
from weft.stages.base import ledger_rows_of
from weft.stages.video.dedup import (
    ClipRecord,
    DedupConfig,
    dedup_decisions,
    dedup_entries,
    rank_order,
    score_duplicates,
)
from weft.stages.video.embed import EmbedConfig, EmbedStage, clip_phashes, hamming, phash
from weft.stages.video.open_clip_model import ModelDirError


def picture(seed: int, h: int = 180, w: int = 320) -> np.ndarray:
    """A smooth random RGB picture with structure at several scales."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for cell in (8, 24, 64):
        small = rng.uniform(0, 255, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        out += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out / 3, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def test_phash_is_64_bits_and_survives_resize_recompression_and_brightness() -> None:
    image = picture(1)
    h = phash(image)
    assert 0 <= h < 2**64
    resized = cv2.resize(image, (160, 90), interpolation=cv2.INTER_AREA)
    brighter = np.clip(image.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    for variant in (resized, jpeg(image, 30), brighter):
        assert hamming(h, phash(variant)) <= 6
    others = [hamming(h, phash(picture(s))) for s in range(2, 12)]
    assert min(others) >= 16


def test_flat_frames_are_not_hashed() -> None:
    frames = np.stack([picture(1), np.zeros((180, 320, 3), np.uint8), picture(2)])
    hashes, flat = clip_phashes(frames, max_frames=16)
    assert len(hashes) == 2 and flat == 1
    hashes, _ = clip_phashes(np.stack([picture(s) for s in range(40)]), max_frames=16)
    assert len(hashes) == 16


def clip_row(item_id: str, seeds: list[int], **extra: object) -> dict:
    frames = np.stack([picture(s) for s in seeds])
    row = {"item_id": item_id, "source_id": "src", "parent_id": "src", "start_s": 0.0,
           "end_s": float(len(seeds)), "width": 320, "height": 180, "frame_scale": 1.0,
           "frames": encode_frames(frames), "frame_times": [float(k) for k in range(len(seeds))]}
    row.update(extra)
    return row


def test_embed_stage_without_a_model_hashes_frames_and_leaves_embedding_null(
        run_context) -> None:
    stage = EmbedStage(EmbedConfig(), run_context())
    table = pa.Table.from_pylist([clip_row("a", [1, 2, 3])],
                                 schema=pa.schema([f for f in CLIP_FIELDS
                                                   if f.name != "content_hash"]))
    out = stage(table)
    row = out.to_pylist()[0]
    assert out.schema.field("phashes").type == pa.list_(pa.uint64())
    assert row["phashes"] == [phash(picture(s)) for s in (1, 2, 3)]
    assert row["embedding"] is None
    entry = ledger_rows_of([row])[0]
    assert json.loads(entry["scores"]) == {"num_phashes": 3, "flat_frames": 0}
    assert entry["model_id"] is None


def test_embed_stage_with_a_missing_model_dir_fails_at_setup(run_context, tmp_path) -> None:
    stage = EmbedStage(EmbedConfig(model_dir=str(tmp_path / "nope")), run_context())
    with pytest.raises(ModelDirError, match="does not exist"):
        stage.ensure_setup()
    (tmp_path / "empty").mkdir()
    stage = EmbedStage(EmbedConfig(model_dir=str(tmp_path / "empty")), run_context())
    with pytest.raises(ModelDirError, match=r"open_clip_config\.json"):
        stage.setup()


def record(item_id: str, hashes: list[int], *, area: float = 100.0, duration: float = 1.0,
           clarity: float = 1.0, content_hash: str | None = None,
           embedding: list[float] | None = None) -> ClipRecord:
    return ClipRecord(item_id=item_id, source_id="s", content_hash=content_hash,
                      phashes=np.array(hashes, np.uint64),
                      embedding=None if embedding is None else np.array(embedding, np.float32),
                      area=area, duration_s=duration, clarity=clarity)


def test_rank_prefers_bigger_longer_sharper_and_breaks_ties_by_id() -> None:
    recs = [record("c", []), record("b", []), record("big", [], area=400.0),
            record("long", [], duration=3.0), record("a", []),
            record("sharp", [], clarity=20.0)]  # log1p(20) / log1p(1) = 4.4
    order = [recs[i].item_id for i in rank_order(recs)]
    assert order == ["sharp", "big", "long", "a", "b", "c"]


def test_glitch_level_clarity_gains_do_not_beat_a_longer_copy() -> None:
    # Megamind_bugy: the same frames muxed faster (shorter) with artefacts that
    # raise the Laplacian ~30%; the clean, longer original must rank first.
    recs = [record("glitchy", [], duration=3.17, clarity=612.0),
            record("clean", [], duration=4.0, clarity=460.0),
            record("blurred", [], duration=4.4, clarity=20.0)]
    assert [recs[i].item_id for i in rank_order(recs)] == ["clean", "glitchy", "blurred"]


def test_scores_do_not_depend_on_input_order() -> None:
    recs = [record(f"c{k}", [k * 3, k * 3 + 1, 2**63 + k], clarity=1 + k % 3,
                   content_hash=str(k % 4), embedding=[1.0, k % 5, 0.5]) for k in range(12)]
    base = dict(zip([r.item_id for r in recs], score_duplicates(recs), strict=True))
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip([r.item_id for r in shuffled], score_duplicates(shuffled), strict=True))
    assert again == base


def test_exact_duplicate_marks_only_the_worse_copy() -> None:
    recs = [record("a", [1], content_hash="h"), record("b", [1], content_hash="h"),
            record("c", [2**40], content_hash="other")]
    (sa, da), (sb, db), (sc, _) = score_duplicates(recs)
    assert sa["exact_duplicate"] == 0.0 and da["duplicate_of"] is None
    assert sb["exact_duplicate"] == 1.0 and db["duplicate_of"] == "a"
    assert sc["exact_duplicate"] == 0.0


def test_perceptual_similarity_is_the_matched_fraction_against_better_clips() -> None:
    full = [0, 2**20, 2**40, 2**60]
    near = [h ^ 0b111 for h in full[:2]]  # 3 bits from two of the long clip's frames
    recs = [record("long", full, duration=4.0), record("part", [*near, 2**63 - 1]),
            record("other", [0xFFFF_FFFF_0000_0000, 0x00FF_00FF_00FF_00FF])]
    results = dict(zip(["long", "part", "other"], score_duplicates(recs), strict=True))
    assert results["long"][0]["perceptual_similarity"] == 0.0  # nothing ranks above it
    assert results["part"][0]["perceptual_similarity"] == pytest.approx(2 / 3)
    assert results["part"][1]["perceptual_match"] == "long"
    assert results["other"][0]["perceptual_similarity"] == 0.0
    strict = score_duplicates(recs, DedupConfig(hamming_threshold=2))
    assert strict[1][0]["perceptual_similarity"] == 0.0


def test_semantic_similarity_is_the_max_cosine_to_a_better_clip() -> None:
    recs = [record("a", [], area=300.0, embedding=[1.0, 0.0]),
            record("b", [], area=200.0, embedding=[0.0, 1.0]),
            record("c", [], embedding=[0.6, 0.8]),
            record("d", [])]
    scores = [s for s, _ in score_duplicates(recs)]
    assert scores[0]["semantic_similarity"] == 0.0
    assert scores[1]["semantic_similarity"] == pytest.approx(0.0)
    assert scores[2]["semantic_similarity"] == pytest.approx(0.8)
    assert scores[3]["semantic_similarity"] == 0.0


def test_dedup_entries_drop_duplicates_with_the_reason_and_the_better_clip() -> None:
    policy = Policy(name="p", version=1, rules={"dedup": {
        "exact_duplicate": {"max": 0}, "perceptual_similarity": {"max": 0.5},
        "semantic_similarity": {"max": 0.95}}})
    rows = [clip_row("orig", [1, 2, 3, 4], content_hash="h1"),
            clip_row("copy", [1, 2, 3, 4], content_hash="h1", clarity=0.5),
            clip_row("reenc", [2, 3], content_hash="h2"),
            clip_row("new", [7, 8, 9], content_hash="h3")]
    seeds = {"orig": [1, 2, 3, 4], "copy": [1, 2, 3, 4], "reenc": [2, 3], "new": [7, 8, 9]}
    for row in rows:
        row["phashes"] = [phash(jpeg(picture(s), 40)) for s in seeds[row["item_id"]]]
        row["clarity"] = row.get("clarity", 1.0)
    entries = {e.item_id: e for e in dedup_entries(rows, policy)}
    assert (entries["orig"].decision, entries["new"].decision) == ("keep", "keep")
    assert entries["copy"].reason == "exact_duplicate_above_max"
    assert entries["copy"].details["duplicate_of"] == "orig"
    assert entries["reenc"].reason == "perceptual_similarity_above_max"
    assert entries["reenc"].details["duplicate_of"] == "orig"
    assert entries["new"].details["duplicate_of"] is None
    assert entries["copy"].thresholds["perceptual_similarity"] == {"max": 0.5}
    assert [s for s, _ in dedup_decisions(rows)] == [e.scores for e in entries.values()]
