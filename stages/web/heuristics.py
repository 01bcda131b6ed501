"""Gopher, C4 and FineWeb text rules as scores: the measures, never the thresholds.

Every measure is a pure function of the document text (the text items joined
with a blank line). The `heuristics` stage records all of them; the policy
(`configs/policies/web.yaml`, block `heuristics`) holds the published
thresholds, so an auditor can re-threshold from the ledger without recomputing.

Definitions (all deterministic, hand-checkable):

- *lines*: the text split on "\\n", each stripped, empty ones dropped.
- *paragraphs*: the text split on blank lines, each stripped, empty ones dropped.
- *tokens*: the text split on whitespace; *words*: tokens with surrounding
  punctuation stripped, empty ones dropped.
- *characters* (the denominator of the line / paragraph character fractions):
  the summed length of the lines, i.e. the text without line breaks or
  leading / trailing spaces on a line.

Sources: Gopher (Rae et al. 2021, table A1: quality and repetition rules), C4
(Raffel et al. 2020: lorem ipsum, curly braces, JavaScript and policy lines)
and FineWeb (Penedo et al. 2024, datatrove's FineWebQualityFilter: line
punctuation, short lines, duplicated-line characters, newlines per word).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from weft.schemas.web import items_text
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig

# Gopher's stop words: a document must contain at least two of them (English).
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "‣", "⁃", "-", "*", "·")
ELLIPSES = ("...", "…")
# FineWeb counts a line as "ending in punctuation" with these final characters.
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "…", "。", "！", "？")
# C4's "policy" lines (its code drops each line holding one of these).
C4_POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                        "use of cookies", "use cookies")
SHORT_LINE_CHARS = 30  # FineWeb: a line of at most this many characters is short
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
_STRIP = string.punctuation + "“”‘’«»„‚…–—·•¡¿"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


# ---- splitting ---------------------------------------------------------------
def split_lines(text: str) -> list[str]:
    """Non-empty lines, stripped."""
    return [s for line in text.split("\n") if (s := line.strip())]


def split_paragraphs(text: str) -> list[str]:
    """Non-empty blank-line-separated blocks, each line stripped (so characters match lines)."""
    return [p for block in _PARAGRAPH_BREAK.split(text) if (p := "\n".join(split_lines(block)))]


def split_tokens(text: str) -> list[str]:
    """Whitespace-separated tokens, punctuation attached."""
    return text.split()


def split_words(text: str) -> list[str]:
    """Tokens without surrounding punctuation; pure-punctuation tokens are not words."""
    return [w for t in text.split() if (w := t.strip(_STRIP))]


def _ratio(part: float, whole: float) -> float:
    """part / whole, 0.0 for an empty whole (an empty document fails the word-count rule)."""
    return part / whole if whole else 0.0


# ---- Gopher quality ----------------------------------------------------------
def mean_word_length(words: Sequence[str]) -> float:
    """Mean characters per word (Gopher keeps 3..10)."""
    return _ratio(sum(len(w) for w in words), len(words))


def symbol_word_ratio(text: str, symbols: Sequence[str], n_words: int) -> float:
    """Occurrences of any of `symbols` per word (Gopher: '#' and '...' each <= 0.1)."""
    return _ratio(sum(text.count(s) for s in symbols), n_words)


def ellipsis_line_fraction(lines: Sequence[str]) -> float:
    """Fraction of lines ending with an ellipsis (Gopher <= 0.3)."""
    return _ratio(sum(line.endswith(ELLIPSES) for line in lines), len(lines))


def bullet_line_fraction(lines: Sequence[str]) -> float:
    """Fraction of lines starting with a bullet point (Gopher <= 0.9)."""
    return _ratio(sum(line.startswith(BULLETS) for line in lines), len(lines))


def alpha_word_fraction(tokens: Sequence[str]) -> float:
    """Fraction of tokens holding at least one letter (Gopher >= 0.8)."""
    return _ratio(sum(any(c.isalpha() for c in t) for t in tokens), len(tokens))


def stop_words_present(words: Sequence[str],
                       stop_words: frozenset[str] = GOPHER_STOP_WORDS) -> int:
    """How many distinct stop words occur (Gopher: at least 2 of its 8 English ones)."""
    return len(stop_words & {w.lower() for w in words})


# ---- Gopher repetition -------------------------------------------------------
def duplicate_stats(elements: Sequence[str]) -> tuple[int, int]:
    """(elements repeating an earlier one, their characters); the first copy is not counted."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element.replace("\n", ""))
        else:
            seen.add(element)
    return count, chars


def top_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Characters of the most frequent word n-gram, times its count, over all word characters.

    Words are lowercased. An n-gram seen once repeats nothing, so it scores 0
    (otherwise every 3-word text would score 2/3 on 2-grams).
    """
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    lowered = [w.lower() for w in words]
    counts = Counter(tuple(lowered[i:i + n]) for i in range(len(lowered) - n + 1))
    # Ties broken by the n-gram itself so the result never depends on dict order.
    gram, count = min(counts.items(), key=lambda kv: (-kv[1], -sum(map(len, kv[0])), kv[0]))
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / total


def dup_ngram_char_fraction(words: Sequence[str], n: int) -> float:
    """Characters of words covered by any word n-gram occurring twice or more, over all.

    Every occurrence counts (the first too) and a word covered by several
    overlapping duplicated n-grams counts once (RedPajama's reading of Gopher).
    """
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    lowered = [w.lower() for w in words]
    grams = [tuple(lowered[i:i + n]) for i in range(len(lowered) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total


# ---- C4 -----------------------------------------------------------------------
def has_lorem_ipsum(text: str) -> float:
    """1.0 when placeholder text appears anywhere (C4 drops the page)."""
    return float("lorem ipsum" in text.lower())


def has_curly_brace(text: str) -> float:
    """1.0 when a curly brace appears (C4 drops the page: code, templates)."""
    return float("{" in text or "}" in text)


def javascript_line_fraction(lines: Sequence[str]) -> float:
    """Fraction of lines mentioning JavaScript ("enable JavaScript"; C4 drops those lines)."""
    return _ratio(sum("javascript" in line.lower() for line in lines), len(lines))


def policy_line_fraction(lines: Sequence[str]) -> float:
    """Fraction of cookie / privacy / terms-of-use lines (C4 drops those lines)."""
    return _ratio(sum(any(p in line.lower() for p in C4_POLICY_SUBSTRINGS) for line in lines),
                  len(lines))


# ---- FineWeb ------------------------------------------------------------------
def line_punct_fraction(lines: Sequence[str]) -> float:
    """Fraction of lines ending with terminal punctuation (FineWeb >= 0.12)."""
    return _ratio(sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines), len(lines))


def short_line_fraction(lines: Sequence[str], max_chars: int = SHORT_LINE_CHARS) -> float:
    """Fraction of lines of at most `max_chars` characters (FineWeb <= 0.67)."""
    return _ratio(sum(len(line) <= max_chars for line in lines), len(lines))


def newline_word_ratio(lines: Sequence[str], n_words: int) -> float:
    """Line breaks between non-empty lines per word (FineWeb's list ratio, <= 0.3).

    Counted between non-empty lines so the blank line that joins text items
    does not count twice.
    """
    return _ratio(max(0, len(lines) - 1), n_words)


# ---- everything at once -------------------------------------------------------
def text_scores(text: str) -> dict[str, float]:
    """Every heuristic score of one document, rounded to 6 places, in a fixed order."""
    lines = split_lines(text)
    paragraphs = split_paragraphs(text)
    tokens = split_tokens(text)
    words = split_words(text)
    n_words = len(words)
    line_chars = sum(len(line) for line in lines)
    dup_lines, dup_line_chars = duplicate_stats(lines)
    dup_paras, dup_para_chars = duplicate_stats(paragraphs)
    scores: dict[str, float] = {
        # Gopher quality
        "word_count": n_words,
        "mean_word_length": mean_word_length(words),
        "hash_word_ratio": symbol_word_ratio(text, ("#",), n_words),
        "ellipsis_word_ratio": symbol_word_ratio(text, ELLIPSES, n_words),
        "bullet_line_fraction": bullet_line_fraction(lines),
        "ellipsis_line_fraction": ellipsis_line_fraction(lines),
        "alpha_word_fraction": alpha_word_fraction(tokens),
        "stop_words_present": stop_words_present(words),
        # Gopher repetition
        "dup_line_fraction": _ratio(dup_lines, len(lines)),
        "dup_paragraph_fraction": _ratio(dup_paras, len(paragraphs)),
        "dup_line_char_fraction": _ratio(dup_line_chars, line_chars),
        "dup_paragraph_char_fraction": _ratio(dup_para_chars, line_chars),
    }
    for n in TOP_NGRAM_SIZES:
        scores[f"top_{n}gram_char_fraction"] = top_ngram_char_fraction(words, n)
    for n in DUP_NGRAM_SIZES:
        scores[f"dup_{n}gram_char_fraction"] = dup_ngram_char_fraction(words, n)
    scores.update({
        # C4
        "has_lorem_ipsum": has_lorem_ipsum(text),
        "has_curly_brace": has_curly_brace(text),
        "javascript_line_fraction": javascript_line_fraction(lines),
        "policy_line_fraction": policy_line_fraction(lines),
        # FineWeb
        "line_punct_fraction": line_punct_fraction(lines),
        "short_line_fraction": short_line_fraction(lines),
        "newline_word_ratio": newline_word_ratio(lines, n_words),
    })
    return {k: v if isinstance(v, int) else round(float(v), 6) for k, v in scores.items()}


def document_text(row: dict[str, Any]) -> str:
    """A row's document text: its `text` column, else its text items joined by a blank line.

    Raises ItemError("empty_text") when there is no non-blank text.
    """
    text = row.get("text")
    if text is None and row.get("items") is not None:
        text = items_text(row["items"])
    if not isinstance(text, str) or not text.strip():
        raise ItemError("empty_text", f"document {row.get('item_id')} has no text")
    return text


class HeuristicsConfig(StageConfig):
    """Nothing to tune in how the rules measure; thresholds live in the policy."""

    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=64))


class HeuristicsStage(Stage):
    """Score Gopher / C4 / FineWeb text rules per document (policy block `heuristics`)."""

    name = "heuristics"
    version = "1"
    kind = "map"
    item_kind = "web_doc"
    Config = HeuristicsConfig
    input_columns = ("text",)  # adds no columns: every score goes to the ledger
    uses_model = False

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        text = document_text(row)
        scores = text_scores(text)
        details = {"chars": len(text), "lines": len(split_lines(text)),
                   "paragraphs": len(split_paragraphs(text))}
        return [Outcome(self.entry(row, scores, details=details), {})]
