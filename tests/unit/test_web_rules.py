"""Web image rules, document structure and near-duplicate documents on hand-made documents.

Images are generated here (numpy + PIL), written to disk and loaded by the real
`image_load` code, so the rules see exactly what a pipeline hands them. The
policy is the shipped configs/policies/web.yaml.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from weft.schemas.policy import Policy, load_policy
from weft.schemas.web import ITEM_TYPE, WEB_DOC_FIELDS
from weft.stages.base import DECISION_COLUMN, RunContext, ledger_rows_of
from weft.stages.web.image_rules import (
    NO_MATCH,
    ImageRulesConfig,
    ImageRulesStage,
    check_policy,
    cross_doc_image_duplicates,
    decode_for_analysis,
    drop_images,
    image_dedup_entries,
    measure_document,
    neighbour_texts,
)
from weft.stages.web.images import IMAGE_FIELDS, load_images
from weft.stages.web.minhash import (
    NearDupConfig,
    estimated_jaccard,
    minhash_signature,
    near_duplicate_entries,
    near_duplicates,
    normalize_text,
)
from weft.stages.web.structure import StructureStage, structure_scores

POLICY = Path(__file__).resolve().parents[2] / "configs" / "policies" / "web.yaml"


# ---- images and documents --------------------------------------------------------------------
def checkerboard(side: int = 256, cell: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    board = (((y // cell) + (x // cell)) % 2 * 255).astype(np.uint8)
    return np.stack([board] * 3, axis=-1)


def picture(seed: int, h: int = 240, w: int = 320) -> np.ndarray:
    """A smooth random RGB picture with structure at several scales."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for cell in (8, 24, 64):
        small = rng.uniform(0, 255, (h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        out += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out / 3, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def text(words: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    return {"type": "text", "text": " ".join(rng.choice(VOCAB) for _ in range(words)) + "."}


def image(name: str) -> dict[str, Any]:
    return {"type": "image", "src": name, "alt": None, "path": name, "url": None}


def document(root: Path, doc_id: str, parts: list[tuple[str, Any]]) -> dict[str, Any]:
    """A row as image_load leaves it: ("text", n_words) or (file name, encoded bytes or None)."""
    items: list[dict[str, Any]] = []
    for n, (kind, value) in enumerate(parts):
        if kind == "text":
            items.append(text(value, seed=n))
        else:
            if value is not None:
                (root / kind).write_bytes(value)
            items.append(image(kind))
    results = load_images(items, root)
    return {"item_id": doc_id, "doc_id": doc_id, "source_id": doc_id, "items": items,
            "image_status": [r.to_row() for r in results],
            "image_bytes": [r.data for r in results]}


def context(policy: Policy | None = None) -> RunContext:
    return RunContext(run_id="test-run", run_dir="/tmp/weft-test",
                      policy=policy or load_policy(POLICY), code_version="test")


def run_stage(stage: Any, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    (out,) = stage.process_rows([row])
    (entry,) = ledger_rows_of([out])
    return out, entry


@pytest.fixture
def mixed_doc(tmp_path: Path) -> dict[str, Any]:
    sharp = checkerboard()
    blurred = cv2.GaussianBlur(sharp, (0, 0), 16)
    rng = np.random.default_rng(0)
    truncated = encode(picture(3))[:200]
    return document(tmp_path, "doc-mixed", [
        ("text", 40),
        ("sharp.png", encode(sharp)),
        ("text", 30),
        ("blurred.png", encode(blurred)),
        ("strip.png", encode(rng.integers(0, 255, (10, 400, 3), dtype=np.uint8))),
        ("tiny.png", encode(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))),
        ("text", 20),
        ("photo.png", encode(picture(1))),
        ("photo-copy.jpg", encode(picture(1), "JPEG")),
        ("broken.png", truncated),
        ("text", 10),
    ])


# ---- image rules ---------------------------------------------------------------------------
def test_each_image_gets_its_decision_and_reason(mixed_doc: dict[str, Any]) -> None:
    stage = ImageRulesStage(None, context())
    out, entry = run_stage(stage, mixed_doc)
    assert entry["stage"] == "image_rules" and entry["item_kind"] == "web_doc"
    details = json.loads(entry["details"])
    reasons = {d["src"]: d["dropped_reason"] for d in details["images"]}
    assert reasons == {
        "sharp.png": None,
        "blurred.png": "clarity_below_min",
        "strip.png": "aspect_ratio_above_max",
        "tiny.png": "min_side_below_min",
        "photo.png": None,
        "photo-copy.jpg": "doc_phash_distance_below_min",
        "broken.png": "decode_ok_below_min",
    }
    by_src = {d["src"]: d for d in details["images"]}
    assert by_src["broken.png"]["load_reason"] == "image_undecodable"
    assert by_src["broken.png"]["scores"]["clarity"] is None
    assert by_src["photo-copy.jpg"]["better_copy"] == by_src["photo.png"]["position"]
    assert by_src["photo-copy.jpg"]["scores"]["doc_phash_distance"] <= 2
    assert by_src["strip.png"]["scores"]["aspect_ratio"] == 40.0
    assert by_src["tiny.png"]["scores"]["min_side"] == 16
    assert by_src["sharp.png"]["scores"]["clarity"] > 1000 > 10 > (
        by_src["blurred.png"]["scores"]["clarity"])
    assert by_src["photo.png"]["scores"]["doc_phash_distance"] == NO_MATCH  # largest: ranked 1st
    assert by_src["sharp.png"]["scores"]["doc_phash_distance"] > 10  # vs photo.png: no copy
    assert details["dropped_reasons"]["clarity_below_min"] == 1
    assert details["per_image_thresholds"]["min_side"] == {"min": 150.0}

    # The document goes on with only the kept images, its image columns aligned.
    assert out[DECISION_COLUMN] == "keep" and entry["reason"] == "ok"
    kept = [i["src"] for i in out["items"] if i["type"] == "image"]
    assert kept == ["sharp.png", "photo.png"]
    assert sum(i["type"] == "text" for i in out["items"]) == 4
    assert [s["src"] for s in out["image_status"]] == kept
    assert len(out["image_bytes"]) == len(out["image_phashes"]) == 2
    assert out["image_bytes"][1] == mixed_doc["image_bytes"][4]
    # Every image stays on the record with its reason.
    decisions = out["image_decisions"]
    assert [d["item_index"] for d in decisions] == [1, 3, 4, 5, 7, 8, 9]
    assert [d["kept"] for d in decisions] == [True, False, False, False, True, False, False]
    assert decisions[1]["dropped_reason"] == "clarity_below_min"

    scores = json.loads(entry["scores"])
    assert scores == {"num_images": 7, "num_images_kept": 2, "num_images_dropped": 5,
                      "kept_image_fraction": round(2 / 7, 6)}
    assert json.loads(entry["thresholds"]) == {"num_images_kept": {"min": 1.0}}


def test_document_without_a_usable_image_is_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    row = document(tmp_path, "doc-bad", [
        ("text", 50),
        ("tiny.png", encode(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))),
        ("missing.png", None),
    ])
    out, entry = run_stage(ImageRulesStage(None, context()), row)
    assert (entry["decision"], entry["reason"]) == ("drop", "num_images_kept_below_min")
    assert out["image_bytes"] is None  # a dropped document does not carry pixels on
    reasons = [d["dropped_reason"] for d in json.loads(entry["details"])["images"]]
    assert reasons == ["min_side_below_min", "decode_ok_below_min"]
    assert json.loads(entry["details"])["images"][1]["load_reason"] == "image_missing"


def test_larger_copy_wins_wherever_it_sits(tmp_path: Path) -> None:
    small = picture(5)
    large = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
    row = document(tmp_path, "doc-copies", [("small.png", encode(small)), ("text", 5),
                                            ("large.png", encode(large))])
    measures = measure_document(row, ImageRulesConfig())
    assert measures[1].scores["doc_phash_distance"] == NO_MATCH  # the larger one, later
    assert measures[0].scores["doc_phash_distance"] <= 4 and measures[0].better_copy == 1
    assert all(m.rgb is None for m in measures)  # no pixels kept past scoring


def test_undecodable_image_is_dropped_even_without_a_rule(tmp_path: Path) -> None:
    row = document(tmp_path, "doc-x", [("text", 5), ("gone.png", None)])
    out, entry = run_stage(ImageRulesStage(None, context(Policy(name="empty", version=1))), row)
    assert json.loads(entry["details"])["images"][0]["dropped_reason"] == "not_decoded"
    assert out["image_status"] == [] and out["image_decisions"][0]["kept"] is False


def test_policy_naming_a_score_that_is_off_fails_at_start_up() -> None:
    policy = Policy.model_validate({"name": "p", "version": 1, "rules": {
        "image_rules_per_image": {"unsafe_score": {"max": 0.5}}}})
    with pytest.raises(ValueError, match="safety: true"):
        ImageRulesStage(None, context(policy))
    check_policy(policy, ImageRulesConfig(safety=True))  # fine once the score exists
    with pytest.raises(ValueError, match="Extra inputs"):
        ImageRulesConfig(thresholds={"clarity": 3})  # type: ignore[call-arg]


def test_transparent_pixels_read_as_white_and_big_jpegs_decode_small() -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent black
    rgb, w, h = decode_for_analysis(encode(rgba))
    assert (w, h) == (40, 40) and rgb.min() == 255
    big = cv2.resize(picture(2), (3200, 2400))
    rgb, w, h = decode_for_analysis(encode(big, "JPEG"), analysis_side=512)
    assert (w, h) == (3200, 2400) and min(rgb.shape[:2]) == 512


def test_neighbour_texts_are_the_nearest_text_on_each_side() -> None:
    items = [{"type": "text", "text": "alpha  beta\ngamma"}, image("a"), image("b"),
             {"type": "text", "text": "delta epsilon"}]
    assert neighbour_texts(items, 1, 300) == ("alpha beta gamma", "delta epsilon")
    assert neighbour_texts(items, 2, 5) == ("gamma", "delta")
    assert neighbour_texts(items[1:3], 0, 10) == (None, None)


def test_safety_model_scores_every_decoded_image(mixed_doc: dict[str, Any]) -> None:
    pytest.importorskip("nudenet")
    stage = ImageRulesStage(ImageRulesConfig(safety=True), context())
    _, entry = run_stage(stage, mixed_doc)
    assert entry["model_id"] == "nudenet:320n" and entry["model_revision"]
    images = json.loads(entry["details"])["images"]
    unsafe = {d["src"]: d["scores"]["unsafe_score"] for d in images}
    assert unsafe["broken.png"] is None
    assert all(0.0 <= v < 0.2 for k, v in unsafe.items() if k != "broken.png")  # nothing to see
    assert json.loads(entry["scores"])["max_unsafe_score"] < 0.2


def test_clip_text_similarity_runs_with_a_tiny_clip(mixed_doc: dict[str, Any],
                                                   tmp_path: Path) -> None:
    """The tiny random CLIP exercises the code path; its similarities mean nothing."""
    pytest.importorskip("open_clip")
    from weft.stages.video.open_clip_model import save_tiny_open_clip

    model_dir = save_tiny_open_clip(tmp_path / "clip")
    stage = ImageRulesStage(ImageRulesConfig(clip_model_dir=str(model_dir)), context())
    _, entry = run_stage(stage, mixed_doc)
    assert entry["model_id"].startswith("open_clip:")
    sims = {d["src"]: d["scores"]["text_similarity"]
            for d in json.loads(entry["details"])["images"]}
    assert sims["broken.png"] is None
    assert all(-1.0 <= v <= 1.0 for k, v in sims.items() if k != "broken.png")
    assert -1.0 <= json.loads(entry["scores"])["mean_text_similarity"] <= 1.0


# ---- across documents ------------------------------------------------------------------------
def rules_out(tmp_path: Path, doc_id: str, parts: list[tuple[str, Any]]) -> dict[str, Any]:
    root = tmp_path / doc_id
    root.mkdir()
    out, _ = run_stage(ImageRulesStage(None, context()), document(root, doc_id, parts))
    return out


def test_cross_document_image_duplicates(tmp_path: Path) -> None:
    photo = picture(7)
    docs = [
        rules_out(tmp_path, "a", [("text", 20), ("p.png", encode(photo)),
                                  ("q.png", encode(picture(8)))]),
        rules_out(tmp_path, "b", [("text", 20), ("big.jpg", encode(
            cv2.resize(photo, (640, 480), interpolation=cv2.INTER_CUBIC), "JPEG"))]),
        rules_out(tmp_path, "c", [("text", 20), ("r.png", encode(picture(9)))]),
    ]
    results = cross_doc_image_duplicates(docs)
    (a, a_details), (b, b_details), (c, _) = results
    first = a_details["images"][0]
    assert first["scores"]["cross_doc_phash_distance"] <= 4
    assert first["duplicate_of"] == {"doc_id": "b", "position": 0}  # the larger copy wins
    assert first["scores"]["cross_doc_copies"] == 1
    assert a_details["images"][1]["scores"]["cross_doc_phash_distance"] > 10
    assert b_details["images"][0]["scores"]["cross_doc_phash_distance"] > 10
    assert a["num_images"] == 2 and b["max_cross_doc_copies"] == 1
    assert c["max_cross_doc_copies"] == 0
    # Independent of the input order.
    again = cross_doc_image_duplicates(list(reversed(docs)))
    assert json.dumps(list(reversed(again)), sort_keys=True) == json.dumps(results, sort_keys=True)

    entries = image_dedup_entries(docs, load_policy(POLICY))
    (entry_a, update_a), (entry_b, update_b), _ = entries
    assert entry_a.decision == "keep" and entry_a.scores["num_images_dropped"] == 1
    assert [i["src"] for i in update_a["items"] if i["type"] == "image"] == ["q.png"]
    assert [d["dropped_reason"] for d in update_a["image_decisions"]] == [
        "cross_doc_phash_distance_below_min", None]
    assert len(update_a["image_bytes"]) == len(update_a["image_phashes"]) == 1
    assert update_b == {} and entry_b.details["images"][0]["duplicate_of"] is None


def test_drop_images_keeps_columns_aligned() -> None:
    row = {"items": [text(3), image("a"), image("b"), text(2), image("c")],
           "image_status": [{"src": s} for s in "abc"], "image_bytes": [b"a", b"b", b"c"],
           "image_phashes": [1, 2, 3],
           "image_decisions": [{"item_index": 0, "kept": False, "dropped_reason": "x"}] + [
               {"item_index": i, "kept": True, "dropped_reason": None} for i in (1, 2, 4)]}
    out = drop_images(row, {1: "cross_doc_copies_above_max"})
    assert [i.get("src") for i in out["items"]] == [None, "a", None, "c"]
    assert out["image_bytes"] == [b"a", b"c"] and out["image_phashes"] == [1, 3]
    assert [d["dropped_reason"] for d in out["image_decisions"]] == [
        "x", None, "cross_doc_copies_above_max", None]


# ---- structure -------------------------------------------------------------------------------
def test_structure_scores_by_hand() -> None:
    items = [{"type": "text", "text": "One two three."},          # 3 words, 14 chars
             {"type": "text", "text": "Four, five!"},             # 2 words, 11 chars
             image("a"),
             {"type": "text", "text": "six seven eight nine"},    # 4 words, 20 chars
             image("b"), image("c")]
    scores, details = structure_scores(items)
    assert scores == {"num_items": 6, "num_text_items": 3, "num_images_kept": 3,
                      "text_chars": 45, "text_words": 9,
                      "images_per_1k_words": round(3000 / 9, 6),
                      "longest_text_run_words": 5}
    assert details == {"longest_text_run_chars": 25, "text_runs": 2}
    assert structure_scores([])[0]["images_per_1k_words"] == 0.0
    assert structure_scores([image("a")])[0]["images_per_1k_words"] == 1000.0


def test_structure_policy_decisions() -> None:
    stage = StructureStage(None, context())
    interleaved = {"item_id": "i", "items": [text(200, 1), image("a"), text(100, 2)]}
    gallery = {"item_id": "g", "items": [text(20, 1)] + [image(str(n)) for n in range(5)]}
    text_only = {"item_id": "t", "items": [text(300, 1)]}
    outs = stage.process_rows([interleaved, gallery, text_only])
    entries = ledger_rows_of(outs)
    assert [(e["decision"], e["reason"]) for e in entries] == [
        ("keep", "ok"), ("drop", "images_per_1k_words_above_max"),
        ("drop", "num_images_kept_below_min")]
    assert json.loads(entries[0]["scores"])["longest_text_run_words"] == 200


# ---- near-duplicate documents ------------------------------------------------------------------
_WORDS = ("the of and to in is was for on that with as by at from his her an are were which "
         "this be or had not but have they one all their new first two has been more after "
         "who other when also into its time would about only over some such these than most "
         "made like between city where many through used during while world under because "
         "called known later three part state each well being both river people high school "
         "war early team life name season since long then house north several year same work "
         "family area university around however them following those water group series "
         "played century south national film music four government game large local album "
         "church west number east island small built public same second still home until "
         "village released based including line began became became often county member")
VOCAB = _WORDS.split()


def prose(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    sentences, n = [], 0
    while n < words:
        k = rng.randint(8, 18)
        sentences.append(" ".join(rng.choice(VOCAB) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(sentences)


def lightly_edited(text_: str, seed: int) -> str:
    """Three word substitutions, a deleted word, and punctuation/case noise."""
    rng = random.Random(seed)
    words = text_.split()
    for i in rng.sample(range(len(words)), 3):
        words[i] = "edited"
    del words[len(words) // 2]
    return " ".join(words).upper().replace(".", " ;")


def test_lightly_edited_copy_is_a_near_duplicate_and_others_are_not() -> None:
    base = prose(1)
    copy = lightly_edited(base, 2)
    other = prose(3)
    a, b, c = (minhash_signature(t, 128, 5) for t in (base, copy, other))
    assert a is not None and b is not None and c is not None
    assert a.shape == (128,) and minhash_signature("  ;; ", 128, 5) is None
    assert estimated_jaccard(a, b) >= 0.8
    assert estimated_jaccard(a, c) < 0.3

    docs = [{"item_id": "base", "text": base},
            {"item_id": "copy", "items": [{"type": "text", "text": copy}]},
            {"item_id": "other", "text": other},
            {"item_id": "short", "text": base[:300]}]
    results = near_duplicates(docs, threshold=0.5, num_perm=128)
    by_id = {d["item_id"]: r for d, r in zip(docs, results, strict=True)}
    # Longer normalised text wins (ties: smaller id).
    longer, shorter = (("base", "copy") if len(normalize_text(base)) >= len(normalize_text(copy))
                       else ("copy", "base"))
    assert by_id[longer][0]["near_duplicate_jaccard"] < 0.3
    assert by_id[shorter][0]["near_duplicate_jaccard"] >= 0.8
    assert by_id[shorter][1]["duplicate_of"] == longer
    assert by_id["other"][0]["near_duplicate_jaccard"] < 0.3
    assert by_id["other"][1]["duplicate_of"] is None
    assert by_id["short"][0]["near_duplicate_jaccard"] < 0.3  # Jaccard, not containment

    # Deterministic whatever the input order.
    for seed in range(3):
        shuffled = docs[:]
        random.Random(seed).shuffle(shuffled)
        again = near_duplicates(shuffled, threshold=0.5, num_perm=128)
        assert {d["item_id"]: r for d, r in zip(shuffled, again, strict=True)} == by_id

    entries = near_duplicate_entries(docs, load_policy(POLICY), NearDupConfig())
    decisions = {e.item_id: (e.decision, e.reason) for e in entries}
    assert decisions[longer] == ("keep", "ok") and decisions["other"] == ("keep", "ok")
    assert decisions[shorter] == ("drop", "near_duplicate_jaccard_above_max")
    dropped = next(e for e in entries if e.item_id == shorter)
    assert dropped.details["duplicate_of"] == longer and dropped.item_kind == "web_doc"
    assert dropped.thresholds == {"near_duplicate_jaccard": {"max": 0.8}}


def test_stage_runs_on_arrow_batches(mixed_doc: dict[str, Any], tmp_path: Path) -> None:
    """What Ray calls: a pyarrow batch in, the declared schema out (uint64 pHashes included)."""
    schema = pa.schema([*WEB_DOC_FIELDS[:1], pa.field("item_id", pa.string()),
                        pa.field("source_id", pa.string()),
                        pa.field("items", pa.list_(ITEM_TYPE)), *IMAGE_FIELDS])
    rows = [mixed_doc, document(tmp_path, "empty", [("text", 5)])]
    batch = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows],
                                 schema=schema)
    out = ImageRulesStage(None, context())(batch)
    assert out.schema.field("image_phashes").type == pa.list_(pa.uint64())
    first, empty = out.to_pylist()
    assert [d["kept"] for d in first["image_decisions"]].count(True) == 2
    assert empty[DECISION_COLUMN] == "drop" and empty["image_decisions"] == []


def test_the_same_document_read_twice_is_an_exact_duplicate() -> None:
    doc = {"item_id": "same", "text": prose(4)}
    scores = sorted(s["near_duplicate_jaccard"] for s, _ in near_duplicates([doc, dict(doc)]))
    assert scores == [0.0, 1.0]
