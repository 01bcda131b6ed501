"""fastText quality classifiers: train on labelled text, score documents with them.

The DCLM / FineWeb-Edu recipe: a few thousand texts get labels - from a table
someone curated, or from an LLM through the inference layer (cached, prompt
versioned) - and a fastText classifier trained on them scores every document
cheaply. Training is reproducible: a seeded stratified split, a seeded
shuffle, one thread; the same inputs give the same model bytes. Each model
directory holds `model.bin` (or quantized `model.ftz`), the train / test files
and `card.json`: where the labels came from, label counts, split sizes,
hyper-parameters, held-out precision / recall / F1 per label, the model's
sha256 and the weft version that made it.

`QualityClassifierStage` loads such a model and scores `quality_score`, the
probability of the positive label(s); the policy block `quality_classifier`
decides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ids import sha256_file
from weft.stages.base import Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.infer.cache import RequestCache
from weft.stages.infer.prompts import PromptTemplate, load_prompt
from weft.stages.infer.registry import ModelSpec
from weft.stages.infer.runner import InferenceStats, run_requests
from weft.stages.infer.types import ChatRequest, SamplingParams
from weft.stages.web.heuristics import document_text
from weft.stages.web.langid import LABEL_PREFIX, load_fasttext, strip_label

PREPROCESS = "lowercase, punctuation split off, whitespace collapsed (v1)"
CARD_FILE = "card.json"
QUALITY_FIELDS = [
    pa.field("quality_score", pa.float64()),
    pa.field("quality_label", pa.string()),
]
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
_PUNCT = re.compile(r"([.,!?;:()\[\]{}\"“”«»…/\\])")
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """What fastText sees, in training and scoring alike: one lowercased line."""
    return _WHITESPACE.sub(" ", _PUNCT.sub(r" \1 ", text.lower())).strip()


# ---- deterministic training ----------------------------------------------------------
_M_PERTURB = -6  # glibc mallopt parameter


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


@contextmanager
def zeroed_allocations() -> Iterator[bool]:
    """Make malloc hand out zeroed memory while fastText trains; yields whether it could.

    fasttext-numpy2 keeps its matrices in `posix_memalign`ed memory that is never
    cleared, and its uniform initialisation fills one tenth of the input matrix
    per thread - so with `thread=1` nine tenths of the rows start as heap garbage:
    NaN crashes ("Encountered NaN.") or different models from the same seed.
    glibc's M_PERTURB with byte 0xff fills each allocation with 0x00, so those
    rows start at zero, run after run (large fresh allocations are zero pages anyway).
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    previous = int(os.environ.get("MALLOC_PERTURB_", "0") or 0)
    libc.mallopt(_M_PERTURB, 0xFF)
    try:
        yield True
    finally:
        libc.mallopt(_M_PERTURB, previous)


# ---- tables ----------------------------------------------------------------------
def read_table(path: str | Path) -> pa.Table:
    """A parquet, csv or jsonl table (by suffix); a missing or unreadable one fails clearly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except pa.ArrowException as exc:
        raise ValueError(f"cannot read table {path}: {exc}") from exc
    raise ValueError(f"table {path}: unknown format {suffix!r} (parquet, csv or jsonl)")


def _column(table: pa.Table, name: str, path: str | Path) -> list[Any]:
    if name not in table.column_names:
        raise ValueError(f"table {path} has no column {name!r} (columns: "
                         f"{', '.join(table.column_names)})")
    return table.column(name).to_pylist()


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The text column of a table (nulls become empty strings)."""
    return [t or "" for t in _column(read_table(path), text_column, path)]


def read_labelled(path: str | Path, text_column: str = "text",
                  label_column: str = "label") -> tuple[list[str], list[str | None]]:
    """(texts, labels) from a table; a null label means unlabelled."""
    table = read_table(path)
    texts = [t or "" for t in _column(table, text_column, path)]
    labels = [None if v is None else str(v) for v in _column(table, label_column, path)]
    return texts, labels


# ---- the card --------------------------------------------------------------------
class LabelMetrics(BaseModel):
    """Held-out precision, recall and F1 of one label (support = its test examples)."""

    model_config = ConfigDict(extra="forbid")
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


class ClassifierCard(BaseModel):
    """Everything needed to trust, reproduce or audit a trained classifier."""

    model_config = ConfigDict(extra="forbid")
    name: str
    created_by: str
    data_source: str
    labels: list[str]
    label_counts: dict[str, int] = Field(description="examples used, after de-duplication")
    unlabeled: int = Field(description="texts without a label (null / unparseable), left out")
    empty_texts: int = Field(description="texts with no words, left out")
    duplicates_removed: int = Field(description="texts repeating an earlier one, left out")
    label_conflicts: int = Field(description="duplicates that carried a different label")
    split: dict[str, Any]
    hyperparameters: dict[str, Any]
    preprocess: str
    zeroed_init: bool = Field(False, description="training memory was zeroed (see "
                              "zeroed_allocations); without it a model may not be reproducible")
    metrics: dict[str, LabelMetrics]
    accuracy: float | None
    model_file: str
    model_sha256: str
    model_bytes: int
    quantized: bool
    fasttext_package: str

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / CARD_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassifierCard:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        return cls.model_validate(json.loads(path.read_text()))


def _weft_version() -> str:
    from weft import __version__

    return f"weft {__version__}"


def _fasttext_package() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fasttext-numpy2", "fasttext", "fasttext-wheel"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "fasttext (unknown version)"


# ---- the classifier ----------------------------------------------------------------
class FastTextClassifier:
    """A loaded fastText classifier with the card's preprocessing applied to every input."""

    def __init__(self, path: str | Path, what: str = "classifier") -> None:
        self.path = Path(path).expanduser()
        self.model = load_fasttext(self.path, what)
        self.labels = sorted(strip_label(label) for label in self.model.get_labels())
        self.sha256 = sha256_file(self.path)

    def predict(self, texts: Sequence[str], k: int = -1) -> list[list[tuple[str, float]]]:
        """Per text, (label, probability) pairs, best first (all labels when k = -1)."""
        if not texts:
            return []
        labels, probs = self.model.predict([normalize_text(t) for t in texts], k=k)
        return [[(strip_label(lab), min(1.0, float(p))) for lab, p in zip(ls, ps, strict=True)]
                for ls, ps in zip(labels, probs, strict=True)]

    def top_labels(self, texts: Sequence[str]) -> list[str]:
        return [pairs[0][0] for pairs in self.predict(texts, k=1)]


def _split(labels: list[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: (shuffled train indices, sorted test indices)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for label in sorted(by_label):
        idx = np.asarray(by_label[label])
        n_test = round(len(idx) * test_fraction)
        if test_fraction > 0 and len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        perm = rng.permutation(len(idx))
        test.extend(int(i) for i in idx[perm[:n_test]])
        train.extend(int(i) for i in idx[perm[n_test:]])
    order = rng.permutation(len(train))  # fastText's SGD must not see one class, then the other
    return [train[i] for i in order], sorted(test)


def evaluate(predicted: Sequence[str], truth: Sequence[str],
             labels: Sequence[str]) -> tuple[dict[str, LabelMetrics], float | None]:
    """Per-label precision / recall / F1 and accuracy (0.0 where a ratio has no denominator)."""
    metrics: dict[str, LabelMetrics] = {}
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predicted, truth, strict=True))
        n_pred = sum(p == label for p in predicted)
        support = sum(t == label for t in truth)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics[label] = LabelMetrics(precision=round(precision, 6), recall=round(recall, 6),
                                      f1=round(f1, 6), support=support, predicted=n_pred)
    accuracy = (sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
                if truth else None)
    return metrics, None if accuracy is None else round(accuracy, 6)


def train_classifier(texts: Sequence[str], labels: Sequence[str | None], out_dir: str | Path,
                     *, seed: int = 0, epoch: int = 10, lr: float = 0.5, wordNgrams: int = 2,
                     dim: int = 50, test_fraction: float = 0.2, minCount: int = 1,
                     bucket: int = 200_000, loss: str = "softmax", quantize: bool = False,
                     data_source: str = "", name: str | None = None) -> ClassifierCard:
    """Train, evaluate on a held-out split and save a fastText classifier with its card.

    Unlabelled (None) and empty texts are left out and counted; exact duplicates
    (after preprocessing) are kept once so no test text is also a training text.
    """
    import fasttext

    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept_texts: list[str] = []
    kept_labels: list[str] = []
    first_label: dict[str, str] = {}
    unlabeled = empty = duplicates = conflicts = 0
    for text, label in zip(texts, labels, strict=True):
        if label is None:
            unlabeled += 1
            continue
        if not _LABEL.match(label):
            raise ValueError(f"label {label!r} is not one token of letters, digits, _ or -")
        norm = normalize_text(text or "")
        if not norm:
            empty += 1
            continue
        if norm in first_label:
            duplicates += 1
            conflicts += first_label[norm] != label
            continue
        first_label[norm] = label
        kept_texts.append(norm)
        kept_labels.append(label)
    counts = Counter(kept_labels)
    if len(counts) < 2:
        raise ValueError(f"need examples of at least two labels to train, got "
                         f"{dict(counts) or 'none'} ({unlabeled} texts without a label)")
    train_idx, test_idx = _split(kept_labels, test_fraction, seed)
    train_file, test_file = out / "train.txt", out / "test.txt"
    for path, idx in ((train_file, train_idx), (test_file, test_idx)):
        path.write_text("".join(f"{LABEL_PREFIX}{kept_labels[i]} {kept_texts[i]}\n"
                                for i in idx))
    params: dict[str, Any] = {"epoch": epoch, "lr": lr, "wordNgrams": wordNgrams, "dim": dim,
                              "minCount": minCount, "bucket": bucket, "loss": loss,
                              "seed": seed, "thread": 1}
    with zeroed_allocations() as zeroed:
        try:
            model = fasttext.train_supervised(input=str(train_file), verbose=0, **params)
            if quantize:
                model.quantize(input=str(train_file), qnorm=True, retrain=True,
                               cutoff=100_000, thread=1, verbose=0)
        except RuntimeError as exc:  # fastText's only complaint is "Encountered NaN."
            raise ValueError(f"fastText training diverged ({exc}); lower lr (was {lr})") from exc
    model_path = out / ("model.ftz" if quantize else "model.bin")
    model.save_model(str(model_path))
    classifier = FastTextClassifier(model_path)
    predicted = classifier.top_labels([kept_texts[i] for i in test_idx])
    ordered = sorted(counts)
    metrics, accuracy = evaluate(predicted, [kept_labels[i] for i in test_idx], ordered)
    card = ClassifierCard(
        name=name or out.name, created_by=_weft_version(),
        data_source=data_source or "unspecified", labels=ordered,
        label_counts={k: counts[k] for k in ordered}, unlabeled=unlabeled, empty_texts=empty,
        duplicates_removed=duplicates, label_conflicts=conflicts,
        split={"train": len(train_idx), "test": len(test_idx), "test_fraction": test_fraction,
               "seed": seed, "stratified": True,
               "train_label_counts": dict(sorted(Counter(kept_labels[i]
                                                         for i in train_idx).items())),
               "test_label_counts": dict(sorted(Counter(kept_labels[i]
                                                        for i in test_idx).items()))},
        hyperparameters=params, preprocess=PREPROCESS, zeroed_init=zeroed, metrics=metrics,
        accuracy=accuracy,
        model_file=model_path.name, model_sha256=classifier.sha256,
        model_bytes=model_path.stat().st_size, quantized=quantize,
        fasttext_package=_fasttext_package())
    card.save(out)
    return card


# ---- labels from an LLM ------------------------------------------------------------
@dataclass
class LlmLabels:
    """What an LLM labelling pass produced, and what it cost."""

    labels: list[str | None]
    answers: list[str]  # the raw answer per text ("" for a failed request)
    stats: InferenceStats
    prompt_ref: str
    prompt_hash: str
    model_id: str
    revision: str
    unparseable: list[int] = field(default_factory=list)  # indices whose answer gave no label

    def data_source(self, what: str = "texts") -> str:
        """A card's data-source line for labels made this way."""
        return (f"labels from LLM {self.model_id}@{self.revision}, prompt {self.prompt_ref} "
                f"({self.prompt_hash}), over {what}; {len(self.unparseable)} of "
                f"{len(self.labels)} answers unparseable")


def parse_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label an answer gives: its first word if that is a label, else the one label it
    names as a word ("The text is high."); None when it names none or several."""
    allowed = {label.lower(): label for label in labels}
    words = re.findall(r"[^\W_]+", answer.lower())
    if words and words[0] in allowed:
        return allowed[words[0]]
    named = {allowed[w] for w in words if w in allowed}
    return named.pop() if len(named) == 1 else None


def label_requests(texts: Sequence[str], prompt: PromptTemplate, sampling: SamplingParams,
                   max_chars: int) -> list[ChatRequest]:
    """One request per text (the text cut to `max_chars` characters at a space)."""
    out = []
    for text in texts:
        text = text.strip()
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0]
        out.append(ChatRequest(messages=prompt.messages(text=text), sampling=sampling,
                               prompt_id=prompt.ref, prompt_hash=prompt.prompt_hash))
    return out


def label_with_llm(texts: Sequence[str], spec: ModelSpec, model_id: str, revision: str,
                   cache: RequestCache, prompt: PromptTemplate | str = "quality_label", *,
                   labels: Sequence[str] = ("high", "low"), max_chars: int = 2000,
                   sampling: SamplingParams | None = None) -> LlmLabels:
    """Ask the LLM for a label per text through the request cache (Ray Data inference)."""
    template = load_prompt(prompt) if isinstance(prompt, str) else prompt
    sampling = sampling or SamplingParams(temperature=0.0, max_tokens=4)
    requests = label_requests(texts, template, sampling, max_chars)
    keys = [r.key(model_id, revision) for r in requests]
    unique = dict(zip(keys, requests, strict=True))
    answers, stats = run_requests(unique, spec, model_id, revision, cache, total=len(requests))
    raw: list[str] = []
    parsed: list[str | None] = []
    unparseable: list[int] = []
    for i, key in enumerate(keys):
        completion = answers[key]
        text = "" if completion.error else completion.text
        label = parse_label(text, labels) if text else None
        raw.append(text)
        parsed.append(label)
        if label is None:
            unparseable.append(i)
    return LlmLabels(labels=parsed, answers=raw, stats=stats, prompt_ref=template.ref,
                     prompt_hash=template.prompt_hash, model_id=model_id, revision=revision,
                     unparseable=unparseable)


def llm_labels(texts: Sequence[str], spec: ModelSpec, model_id: str, revision: str,
               cache: RequestCache, prompt: PromptTemplate | str = "quality_label",
               **kwargs: Any) -> list[str | None]:
    """One label (or None when the answer was unparseable) per text; see `label_with_llm`."""
    return label_with_llm(texts, spec, model_id, revision, cache, prompt, **kwargs).labels


# ---- the stage -------------------------------------------------------------------
class QualityClassifierConfig(StageConfig):
    """Which trained classifier scores documents and which of its labels count as good."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=64))
    model_path: str | None = Field(None, description="a model.bin / model.ftz from "
                                   "`weft web train-classifier`; required")
    positive_labels: list[str] = Field(default_factory=lambda: ["high"],
                                       description="quality_score = their summed probability")
    k: int = Field(2, ge=1, description="top labels recorded in the ledger details")


class QualityClassifierStage(Stage):
    """Score each document with a trained fastText classifier (policy `quality_classifier`)."""

    name = "quality_classifier"
    version = "1"
    kind = "map"
    item_kind = "web_doc"
    Config = QualityClassifierConfig
    input_columns = ("text",)
    output_fields = QUALITY_FIELDS
    uses_model = True

    def __init__(self, config: StageConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        self.classifier: FastTextClassifier | None = None
        self.model_name: str | None = None

    def setup(self) -> None:
        """Load the classifier once per worker; a missing path or unknown label fails here."""
        config: QualityClassifierConfig = self.config  # type: ignore[assignment]
        if not config.model_path:
            raise ValueError("quality_classifier.model_path is not set (train one with "
                             "`weft web train-classifier`)")
        self.classifier = FastTextClassifier(config.model_path, "quality_classifier")
        unknown = set(config.positive_labels) - set(self.classifier.labels)
        if unknown:
            raise ValueError(f"quality_classifier: positive labels {sorted(unknown)} are not "
                             f"labels of {config.model_path} ({self.classifier.labels})")
        card = self.classifier.path.parent / CARD_FILE
        self.model_name = (ClassifierCard.load(card).name if card.is_file()
                           else self.classifier.path.stem)

    def model_identity(self) -> tuple[str | None, str | None]:
        if self.classifier is None:
            return None, None
        return f"fasttext:{self.model_name}", self.classifier.sha256[:16]

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: QualityClassifierConfig = self.config  # type: ignore[assignment]
        assert self.classifier is not None, "setup() was not run"
        probs = self.classifier.predict([document_text(row)], k=-1)[0]
        score = round(min(1.0, sum(p for label, p in probs if label in config.positive_labels)),
                      6)
        scores = {"quality_score": score}
        details = {"top": [[label, round(p, 6)] for label, p in probs[:config.k]]}
        return [Outcome(self.entry(row, scores, details=details),
                        {"quality_score": score, "quality_label": probs[0][0]})]
