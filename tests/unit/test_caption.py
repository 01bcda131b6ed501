"""Caption scoring and the interleaved sample, without a model."""

from __future__ import annotations

import json

from weft.stages.base import ledger_rows_of
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.types import Completion
from weft.stages.video.caption import CaptionStage, cap_at_word, is_degenerate


def test_cap_at_word_cuts_only_captions_that_hit_the_cap() -> None:
    assert cap_at_word("A dog runs  left.", 5, "stop", 30) == ("A dog runs left.", False)
    assert cap_at_word("the camera pans to the ri", 30, "length", 30) == (
        "the camera pans to the", True)
    assert cap_at_word("oneword", 30, "length", 30) == ("oneword", True)


def test_degenerate_captions_are_detected() -> None:
    assert is_degenerate("go go go go")
    assert is_degenerate("the the cat the the cat the the cat")
    assert not is_degenerate("A man walks past the parked red car.")


def _row(texts: list[tuple[str, int, str]]) -> dict:
    n = len(texts) + 1
    return {"item_id": "clip1", "parent_id": "src", "source_id": "src", "item_kind": "clip",
            "keyframe_paths": [f"keyframes/clip1/{k}.jpg" for k in range(n)],
            "keyframe_times": [0.5 * k for k in range(n)],
            "caption_completions": [json.dumps(Completion(t, 40, n_tok, reason, 3.0).to_json())
                                    for t, n_tok, reason in texts]}


def _stage(run_context, rules: dict | None = None) -> CaptionStage:
    stage = CaptionStage(None, run_context(rules or {}))
    stage.model_id, stage.model_revision = "vlm", "rev1"
    stage.prompt = load_prompt("caption_transition")
    return stage


def test_interleaved_sample_alternates_frames_and_captions(run_context) -> None:
    rows = _stage(run_context).process_rows([_row([("A car enters.", 4, "stop"),
                                                   ("It turns left.", 4, "stop")])])
    (out,) = rows
    sequence = json.loads(out["sequence"])
    assert [item["type"] for item in sequence] == ["video_frame", "text", "video_frame", "text",
                                                   "video_frame"]
    assert sequence[1] == {"type": "text", "role": "caption", "text": "A car enters.",
                           "from_s": 0.0, "to_s": 0.5}
    assert out["captions"] == ["A car enters.", "It turns left."]
    (entry,) = ledger_rows_of(rows)
    assert entry["model_id"] == "vlm" and entry["model_revision"] == "rev1"
    assert entry["prompt_hash"] == load_prompt("caption_transition").prompt_hash
    assert json.loads(entry["details"])["captions"][0]["completion_tokens"] == 4


def test_policy_drops_empty_repeated_and_over_long_captions(run_context) -> None:
    rules = {"caption": {"empty_fraction": {"max": 0.0}, "repeated_fraction": {"max": 0.0},
                         "truncated_fraction": {"max": 0.5}}}
    cases = {
        "empty_fraction_above_max": [("", 1, "stop"), ("A door opens.", 4, "stop")],
        "repeated_fraction_above_max": [("A door opens.", 4, "stop"),
                                        ("a door opens.", 4, "stop")],
        "truncated_fraction_above_max": [("a b c d e f", 30, "length"),
                                         ("g h i j k", 30, "length")],
        "ok": [("A door opens.", 4, "stop"), ("A man walks in.", 5, "stop")],
    }
    for reason, texts in cases.items():
        (entry,) = ledger_rows_of(_stage(run_context, rules).process_rows([_row(texts)]))
        assert entry["reason"] == reason, (reason, entry["scores"])


def test_failed_inference_is_an_error_row(run_context) -> None:
    row = _row([("x", 1, "stop")])
    row["caption_completions"] = [json.dumps(Completion("", 0, 0, "error", 0.0,
                                                        error="CUDA OOM").to_json())]
    (entry,) = ledger_rows_of(_stage(run_context).process_rows([row]))
    assert entry["decision"] == "error" and entry["reason"] == "inference_failed"
    assert "CUDA OOM" in entry["error_message"]
