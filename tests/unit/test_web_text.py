"""Web text rules on hand-made texts with hand-computed values; stages' scores and decisions.

Nothing here loads a real model: langid runs on a stand-in with fastText's
`predict` contract, the quality classifier on a fastText model trained in
milliseconds on synthetic lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from weft.schemas.policy import load_policy
from weft.stages.base import DECISION_COLUMN, ledger_rows_of
from weft.stages.infer.prompts import load_prompt
from weft.stages.infer.types import SamplingParams
from weft.stages.web import heuristics as h
from weft.stages.web.fasttext_classifier import (
    ClassifierCard,
    FastTextClassifier,
    QualityClassifierConfig,
    QualityClassifierStage,
    _split,
    evaluate,
    label_requests,
    normalize_text,
    parse_label,
    read_labelled,
    read_texts,
    train_classifier,
)
from weft.stages.web.heuristics import HeuristicsStage, document_text, text_scores
from weft.stages.web.langid import LangIdConfig, LangIdStage, one_line

POLICY = Path(__file__).resolve().parents[2] / "configs" / "policies" / "web.yaml"

# A hand-checked document: two equal lines, a hash heading ending in "...", a bullet.
SAMPLE = "The cat sat.\nThe cat sat.\n\n# Big news...\n- item one"
# Prose that passes every default rule (74 words, no repetition, sentences end in ".").
PROSE = (
    "The river runs through the old town and past the market, where farmers have sold "
    "vegetables, cheese and bread for more than three hundred years. In the spring the "
    "water rises with melted snow from the mountains, and the town council has built "
    "stone walls to protect the lower streets.\n\n"
    "Visitors often walk along the bank to the bridge, which was rebuilt after a flood "
    "in 1887 with money raised by the local guilds."
)


def _row(text: str | None, item_id: str = "doc0", **extra: Any) -> dict[str, Any]:
    return {"item_id": item_id, "source_id": f"src-{item_id}", "text": text, **extra}


# ---- splitting -----------------------------------------------------------------------
def test_splitting_lines_paragraphs_words() -> None:
    assert h.split_lines(SAMPLE) == ["The cat sat.", "The cat sat.", "# Big news...",
                                     "- item one"]
    assert h.split_paragraphs(SAMPLE) == ["The cat sat.\nThe cat sat.",
                                          "# Big news...\n- item one"]
    assert len(h.split_tokens(SAMPLE)) == 12  # '#' and '-' are tokens
    assert h.split_words(SAMPLE) == ["The", "cat", "sat", "The", "cat", "sat", "Big", "news",
                                     "item", "one"]  # ... but not words
    assert h.split_paragraphs("  a  \n \t \n\n b ") == ["a", "b"]


def test_sample_scores_by_hand() -> None:
    s = text_scores(SAMPLE)
    assert s["word_count"] == 10
    assert s["mean_word_length"] == pytest.approx(32 / 10)  # 3*7 + 4 + 4 + 3 letters
    assert s["hash_word_ratio"] == pytest.approx(0.1)
    assert s["ellipsis_word_ratio"] == pytest.approx(0.1)
    assert s["bullet_line_fraction"] == pytest.approx(1 / 4)
    assert s["ellipsis_line_fraction"] == pytest.approx(1 / 4)
    assert s["alpha_word_fraction"] == pytest.approx(10 / 12, abs=1e-6)
    assert s["stop_words_present"] == 1  # only "the"
    assert s["dup_line_fraction"] == pytest.approx(1 / 4)
    assert s["dup_paragraph_fraction"] == 0
    # Line characters: 12 + 12 + 13 + 10 = 47; the repeated line has 12.
    assert s["dup_line_char_fraction"] == pytest.approx(12 / 47, abs=1e-6)
    assert s["dup_paragraph_char_fraction"] == 0
    # Word characters 32; "the cat" and "cat sat" each twice (6 letters x 2).
    assert s["top_2gram_char_fraction"] == pytest.approx(12 / 32)
    assert s["top_3gram_char_fraction"] == pytest.approx(18 / 32)  # "the cat sat" x 2
    assert s["top_4gram_char_fraction"] == 0  # no 4-gram repeats
    assert all(s[f"dup_{n}gram_char_fraction"] == 0 for n in range(5, 11))
    assert s["line_punct_fraction"] == pytest.approx(3 / 4)  # "- item one" has none
    assert s["short_line_fraction"] == 1.0
    assert s["newline_word_ratio"] == pytest.approx(3 / 10)
    assert (s["has_lorem_ipsum"], s["has_curly_brace"]) == (0.0, 0.0)
    assert (s["javascript_line_fraction"], s["policy_line_fraction"]) == (0.0, 0.0)


def test_ngram_repetition_by_hand() -> None:
    words = h.split_words("one two three four five one two three four five six")
    # Word characters: (3+3+5+4+4) * 2 + 3 = 41. The repeated 5-gram covers 38 of them.
    assert h.dup_ngram_char_fraction(words, 5) == pytest.approx(38 / 41)
    assert h.dup_ngram_char_fraction(words, 6) == 0  # every 6-gram is unique
    # Every repeated 2-gram occurs twice; the longest is "three four" (9 letters).
    assert h.top_ngram_char_fraction(words, 2) == pytest.approx(18 / 41)
    assert h.top_ngram_char_fraction(["a", "b", "c"], 2) == 0  # seen once: no repetition
    assert h.top_ngram_char_fraction(["a"], 2) == 0
    # Overlapping duplicates count each word once: "x x x x x x" -> every word covered.
    assert h.dup_ngram_char_fraction(["x"] * 6, 5) == 1.0
    # Case does not hide repetition.
    assert h.top_ngram_char_fraction(["The", "cat", "the", "CAT"], 2) == pytest.approx(1.0)


def test_duplicates_and_stop_words() -> None:
    s = text_scores("Alpha beta.\n\nAlpha beta.\n\nGamma.")
    assert s["dup_paragraph_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    assert s["dup_paragraph_char_fraction"] == pytest.approx(11 / 28, abs=1e-6)
    assert s["dup_line_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    assert h.duplicate_stats(["a", "b", "a", "a"]) == (2, 2)
    assert h.stop_words_present(["the", "The", "THE", "and", "cat"]) == 2  # distinct words


def test_c4_and_fineweb_rules() -> None:
    text = "Lorem ipsum dolor {x}\nPlease enable JavaScript.\nRead our Cookie Policy."
    s = text_scores(text)
    assert (s["has_lorem_ipsum"], s["has_curly_brace"]) == (1.0, 1.0)
    assert s["javascript_line_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    assert s["policy_line_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    lines = ["x" * 30, "y" * 31 + ".", "z" * 40 + "”"]
    assert h.short_line_fraction(lines) == pytest.approx(1 / 3)  # 30 chars is still short
    assert h.line_punct_fraction(lines) == pytest.approx(2 / 3)
    assert h.bullet_line_fraction(["• a", "* b", "c"]) == pytest.approx(2 / 3)
    assert h.ellipsis_line_fraction(["wait…", "more...", "done."]) == pytest.approx(2 / 3)
    assert h.symbol_word_ratio("a … b ... c", h.ELLIPSES, 3) == pytest.approx(2 / 3)


def test_degenerate_texts_stay_numeric() -> None:
    s = text_scores("... --- ###")
    assert s["word_count"] == 0 and s["mean_word_length"] == 0.0
    assert all(isinstance(v, int | float) for v in s.values())


def test_document_text_joins_items_and_rejects_empty() -> None:
    items = [{"type": "text", "text": "First."}, {"type": "image", "src": "a.png"},
             {"type": "text", "text": "Second."}]
    assert document_text({"items": items}) == "First.\n\nSecond."
    assert document_text({"text": "given", "items": items}) == "given"
    for bad in ({"text": ""}, {"text": "  \n "}, {"items": [{"type": "image"}]}, {}):
        with pytest.raises(h.ItemError) as err:
            document_text(bad)
        assert err.value.reason == "empty_text"


# ---- the default policy ------------------------------------------------------------
def test_default_policy_names_scores_the_stages_produce() -> None:
    policy = load_policy(POLICY)
    assert (policy.name, policy.version) == ("web-default", 1)
    assert set(policy.rules["heuristics"]) <= set(text_scores(PROSE))
    assert list(policy.rules["langid"]) == ["lang_in_allowed", "lang_score"]
    assert list(policy.rules["quality_classifier"]) == ["quality_score"]
    # Published values, spot-checked.
    rules = policy.rules["heuristics"]
    assert (rules["word_count"].min, rules["word_count"].max) == (50, 100000)
    assert rules["top_2gram_char_fraction"].max == 0.2
    assert rules["dup_10gram_char_fraction"].max == 0.1
    assert rules["line_punct_fraction"].min == 0.12
    assert policy.rules["langid"]["lang_score"].min == 0.65


def test_heuristics_stage_scores_and_policy_decides(run_context) -> None:
    ctx = run_context()
    ctx = type(ctx)(**{**ctx.__dict__, "policy": load_policy(POLICY)})
    stage = HeuristicsStage(None, ctx)
    repeated = "\n".join(["Click here to subscribe to our newsletter today."] * 12)
    rows = stage.process_rows([_row(PROSE, "good"), _row(SAMPLE, "short"),
                               _row(repeated, "boiler"), _row("", "empty"),
                               {**_row("x", "gone"), DECISION_COLUMN: "drop"}])
    out = {r["item_id"]: r for r in rows}
    entries = {e["item_id"]: e for e in ledger_rows_of(rows)}
    assert out["good"][DECISION_COLUMN] == "keep" and entries["good"]["reason"] == "ok"
    scores = json.loads(entries["good"]["scores"])
    assert scores == text_scores(PROSE) and scores["word_count"] == 74
    thresholds = json.loads(entries["good"]["thresholds"])
    assert thresholds["word_count"] == {"min": 50.0, "max": 100000.0}
    assert entries["short"]["decision"] == "drop"
    assert entries["short"]["reason"] == "word_count_below_min"
    assert entries["boiler"]["decision"] == "drop"  # 96 words, but one line 12 times
    assert entries["boiler"]["reason"] == "stop_words_present_below_min"
    assert entries["empty"]["decision"] == "error" and entries["empty"]["reason"] == "empty_text"
    assert "gone" not in entries  # no longer kept: passed on untouched
    assert out["gone"][DECISION_COLUMN] == "drop"


def test_heuristics_rule_order_gives_the_reason(run_context) -> None:
    repeated = "\n".join(["The cat and the dog have a nap with the sun."] * 12)
    stage = HeuristicsStage(None, run_context({"heuristics": {
        "word_count": {"min": 50}, "dup_line_fraction": {"max": 0.3},
        "top_2gram_char_fraction": {"max": 0.2}}}))
    (entry,) = ledger_rows_of(stage.process_rows([_row(repeated)]))
    assert (entry["decision"], entry["reason"]) == ("drop", "dup_line_fraction_above_max")
    assert json.loads(entry["scores"])["dup_line_fraction"] == pytest.approx(11 / 12, abs=1e-6)


# ---- langid on a stand-in model ---------------------------------------------------
class FakeLid:
    """fastText's predict contract: one line in, (labels, probs) out, '\\n' refused."""

    def predict(self, text: str, k: int = 1) -> tuple[tuple[str, ...], np.ndarray]:
        if "\n" in text:
            raise ValueError("predict processes one line at a time (remove '\\n')")
        if "bonjour" in text.lower():
            ranked = [("__label__fr", 0.9), ("__label__en", 0.05), ("__label__it", 0.01)]
        else:
            ranked = [("__label__en", 0.55), ("__label__de", 0.3), ("__label__nl", 0.1)]
        ranked = ranked[:k]
        return tuple(r[0] for r in ranked), np.array([r[1] for r in ranked])


def test_langid_stage_scores_with_newlines(run_context) -> None:
    stage = LangIdStage(LangIdConfig(k=2, allowed_langs=["en", "de"]), run_context(
        {"langid": {"lang_in_allowed": {"min": 1.0}, "lang_score": {"min": 0.65}}}))
    stage.model, stage._ready = FakeLid(), True
    rows = stage.process_rows([_row("Hello\nthere\n\nfriend", "en"),
                               _row("Bonjour\n\ntout le monde", "fr"), _row("\n", "empty")])
    entries = {e["item_id"]: e for e in ledger_rows_of(rows)}
    out = {r["item_id"]: r for r in rows}
    assert json.loads(entries["en"]["scores"]) == {"lang_score": 0.55, "lang_in_allowed": 1.0}
    assert entries["en"]["reason"] == "lang_score_below_min"
    assert json.loads(entries["en"]["details"]) == {"lang": "en",
                                                    "top": [["en", 0.55], ["de", 0.3]]}
    assert (out["en"]["detected_lang"], out["en"]["lang_score"]) == ("en", 0.55)
    assert json.loads(entries["fr"]["scores"])["lang_in_allowed"] == 0.0
    assert entries["fr"]["reason"] == "lang_in_allowed_below_min"
    assert entries["empty"]["decision"] == "error" and entries["empty"]["reason"] == "empty_text"
    assert one_line("a\n\nb\tc \r\n") == "a b c"


def test_langid_missing_model_fails_at_setup(run_context, tmp_path: Path) -> None:
    stage = LangIdStage(LangIdConfig(model_path=str(tmp_path / "nope.ftz")), run_context())
    with pytest.raises(FileNotFoundError, match=r"nope\.ftz"):
        stage.ensure_setup()


# ---- fastText classifier pieces ---------------------------------------------------------
def test_normalize_and_parse_label() -> None:
    assert normalize_text("Hello, World!\n\nIt's  (fine).") == "hello , world ! it's ( fine ) ."
    assert normalize_text(normalize_text("A.B, c")) == normalize_text("A.B, c")
    labels = ("high", "low")
    assert parse_label("High.", labels) == "high"
    assert parse_label("  low\n", labels) == "low"
    assert parse_label("The text is high quality.", labels) == "high"
    assert parse_label("high or low", labels) == "high"  # the first word decides
    assert parse_label("it is high, not low", labels) is None  # names both
    assert parse_label("<|im_end|>", labels) is None
    assert parse_label("", labels) is None


def test_split_is_seeded_and_stratified() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"]
    train, test = _split(labels, 0.2, seed=3)
    assert sorted(train + test) == list(range(16))
    assert [labels[i] for i in test].count("a") == 2 and [labels[i] for i in test].count("b") == 1
    assert "c" not in [labels[i] for i in test]  # a lone example stays in training
    assert _split(labels, 0.2, seed=3) == (train, test)
    assert _split(labels, 0.2, seed=4) != (train, test)


def test_evaluate_by_hand() -> None:
    metrics, accuracy = evaluate(["h", "h", "l", "l", "h"], ["h", "l", "l", "l", "h"],
                                 ["h", "l"])
    assert (metrics["h"].precision, metrics["h"].recall) == (pytest.approx(2 / 3, abs=1e-6), 1.0)
    assert (metrics["l"].precision, metrics["l"].recall) == (1.0, pytest.approx(2 / 3, abs=1e-6))
    assert metrics["h"].f1 == pytest.approx(0.8)
    assert (metrics["h"].support, metrics["h"].predicted) == (2, 3)
    assert accuracy == 0.8


def test_label_requests_use_the_versioned_prompt() -> None:
    prompt = load_prompt("quality_label")
    (short, long) = label_requests(["A fine text.", "word " * 1000], prompt,
                                   SamplingParams(max_tokens=4), max_chars=50)
    assert short.prompt_id == "quality_label@1" and short.prompt_hash == prompt.prompt_hash
    assert "A fine text." in short.messages[-1]["content"]
    assert "word word" in long.messages[-1]["content"]
    assert len(long.messages[-1]["content"]) < len(prompt.user) + 60


def _synthetic(n: int = 60) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    good = ["science", "history", "river", "research", "museum", "language", "theory"]
    bad = ["lol", "click", "free", "win", "omg", "cheap", "now"]
    texts, labels = [], []
    for i in range(n):
        vocab, label = (good, "high") if i % 2 == 0 else (bad, "low")
        texts.append(" ".join(rng.choice(vocab, 8)) + f" {i}")
        labels.append(label)
    return texts, labels


def test_train_classifier_writes_model_and_card(tmp_path: Path) -> None:
    texts, labels = _synthetic()
    texts += [texts[0], "", "unlabelled text"]
    labels += ["low", "high", None]
    card = train_classifier(texts, labels, tmp_path / "clf", seed=1, epoch=5, dim=8,
                            bucket=1000, data_source="synthetic words")
    assert card.labels == ["high", "low"] and card.label_counts == {"high": 30, "low": 30}
    assert (card.unlabeled, card.empty_texts) == (1, 1)
    assert (card.duplicates_removed, card.label_conflicts) == (1, 1)
    assert card.split["train"] + card.split["test"] == 60
    assert card.split["test_label_counts"] == {"high": 6, "low": 6}
    assert card.metrics["high"].precision == 1.0 and card.accuracy == 1.0
    assert card.hyperparameters["thread"] == 1 and card.created_by.startswith("weft ")
    saved = ClassifierCard.load(tmp_path / "clf")
    assert saved == card and (tmp_path / "clf" / "model.bin").is_file()
    clf = FastTextClassifier(tmp_path / "clf" / "model.bin")
    assert clf.sha256 == card.model_sha256 and clf.labels == ["high", "low"]
    with pytest.raises(ValueError, match="at least two labels"):
        train_classifier(["a", "b"], ["x", None], tmp_path / "one")
    with pytest.raises(ValueError, match="one token"):
        train_classifier(["a", "b"], ["x y", "z"], tmp_path / "bad")


def test_quality_stage_scores_positive_probability(run_context, tmp_path: Path) -> None:
    texts, labels = _synthetic()
    train_classifier(texts, labels, tmp_path / "clf", seed=1, epoch=5, dim=8, bucket=1000)
    config = QualityClassifierConfig(model_path=str(tmp_path / "clf" / "model.bin"))
    stage = QualityClassifierStage(config, run_context(
        {"quality_classifier": {"quality_score": {"min": 0.5}}}))
    rows = stage.process_rows([_row("science river museum history theory", "good"),
                               _row("lol click free win omg now", "bad"), _row("", "empty")])
    entries = {e["item_id"]: e for e in ledger_rows_of(rows)}
    out = {r["item_id"]: r for r in rows}
    good = json.loads(entries["good"]["scores"])["quality_score"]
    bad = json.loads(entries["bad"]["scores"])["quality_score"]
    assert good > 0.9 > 0.1 > bad
    assert entries["good"]["decision"] == "keep" and entries["bad"]["decision"] == "drop"
    assert entries["bad"]["reason"] == "quality_score_below_min"
    assert out["good"]["quality_label"] == "high" and out["good"]["quality_score"] == good
    assert [lab for lab, _ in json.loads(entries["bad"]["details"])["top"]] == ["low", "high"]
    assert entries["good"]["model_id"] == "fasttext:clf"
    assert entries["empty"]["reason"] == "empty_text"


def test_quality_stage_fails_at_setup_without_a_model(run_context, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_path is not set"):
        QualityClassifierStage(None, run_context()).ensure_setup()
    missing = QualityClassifierConfig(model_path=str(tmp_path / "none.bin"))
    with pytest.raises(FileNotFoundError, match=r"none\.bin"):
        QualityClassifierStage(missing, run_context()).ensure_setup()


def test_read_tables(tmp_path: Path) -> None:
    table = pa.table({"text": ["a", None, "c"], "label": ["high", "low", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("text,label\na,high\nb,low\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "high"}\n{"text": "b"}\n')
    assert read_labelled(tmp_path / "t.parquet") == (["a", "", "c"], ["high", "low", None])
    assert read_labelled(tmp_path / "t.csv") == (["a", "b"], ["high", "low"])
    assert read_texts(tmp_path / "t.jsonl") == ["a", "b"]
    with pytest.raises(ValueError, match="no column 'body'"):
        read_texts(tmp_path / "t.csv", "body")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.csv")
