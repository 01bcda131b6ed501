"""Near-duplicate documents across a run: MinHash signatures, LSH candidates, a keep rule.

Pure functions over document rows, deterministic whatever the input order:

1. Text. A document's text is its `text` column, else its text items joined
   by a blank line; it is normalised (NFKC, lowercase, every run of
   non-alphanumeric characters becomes one space) so markup and punctuation
   noise do not hide a copy.
2. Signature. `minhash_signature(text, num_perm, shingle)`: the MinHash
   (datasketch, scheme "affine32", fixed seed) of the set of word
   `shingle`-grams; a text shorter than one shingle is one shingle. The
   estimate of Jaccard similarity between two sets is the fraction of equal
   signature slots (standard error about sqrt(J(1-J)/num_perm): ±0.035 at
   J=0.8 with 128 permutations).
3. Rank. Longer text (characters after normalisation) wins, ties go to the
   smaller document id: of two copies the fuller one survives.
4. Score. Documents are visited best first; each queries an LSH index of the
   better-ranked documents (threshold `lsh_threshold`, far below the policy's
   bound so the policy can be lowered without recomputing) and scores
   `near_duplicate_jaccard`, the highest MinHash estimate over those
   candidates (0.0 when LSH finds none), with `duplicate_of` naming that
   document. Scores are taken against *all* better-ranked documents, not only
   kept ones, so they do not depend on the policy; in a chain A≈B≈C with A and
   C apart, C is dropped with B.
5. Decide. Policy block `dedup` (`near_duplicate_jaccard: {max: 0.8}`).

Cost: one signature per document (linear in its words) and LSH queries that
touch only candidates, so it scales to millions of documents per process; past
one machine, shard the LSH bands (each band is an independent hash join).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field

from weft.schemas.ledger import LedgerEntry
from weft.schemas.policy import Policy
from weft.schemas.web import items_text

DEDUP_STAGE = "dedup"
DEDUP_VERSION = "1"
SCHEME = "affine32"  # datasketch >= 2.0's default permutation scheme, pinned explicitly
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


class NearDupConfig(BaseModel):
    """How documents are shingled and hashed, and how wide the LSH candidate net is."""

    model_config = ConfigDict(extra="forbid")
    num_perm: int = Field(128, ge=16, description="MinHash permutations (signature length)")
    shingle: int = Field(5, ge=1, description="words per shingle")
    lsh_threshold: float = Field(0.5, gt=0, lt=1, description="LSH candidate threshold; pairs "
                                 "estimated below it are rarely candidates and score 0.0")
    seed: int = Field(1, ge=0, description="MinHash permutation seed (fixes every signature)")


def normalize_text(text: str) -> str:
    """NFKC, lowercase, non-alphanumeric runs to one space, stripped."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def shingles(text: str, shingle: int = 5) -> set[bytes]:
    """The set of word `shingle`-grams of normalised text; a shorter text is one shingle."""
    words = normalize_text(text).split()
    if not words:
        return set()
    if len(words) <= shingle:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + shingle]).encode() for i in range(len(words) - shingle + 1)}


def minhash_signature(text: str, num_perm: int = 128, shingle: int = 5,
                      seed: int = 1) -> np.ndarray | None:
    """The MinHash signature (uint32 array of num_perm) of a text; None for a text without words."""
    grams = shingles(text, shingle)
    if not grams:
        return None
    mh = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)
    mh.update_batch(sorted(grams))
    return np.asarray(mh.hashvalues).copy()


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard estimate of two signatures: the fraction of equal slots."""
    if a.shape != b.shape:
        raise ValueError(f"signatures differ in length: {a.shape} vs {b.shape}")
    return float(np.count_nonzero(a == b)) / len(a)


def document_text(row: dict[str, Any]) -> str:
    """A row's text column, else its text items joined by a blank line ("" when none)."""
    text = row.get("text")
    if isinstance(text, str):
        return text
    return items_text(row.get("items"))


def _doc_id(row: dict[str, Any]) -> str:
    return str(row.get("item_id") or row.get("doc_id"))


def near_duplicates(docs: Sequence[dict[str, Any]], threshold: float = 0.5, num_perm: int = 128,
                    *, shingle: int = 5, seed: int = 1,
                    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(scores, details) per document row, in input order (see the module docstring).

    `threshold` is the LSH candidate threshold, not the policy's bound.
    """
    ids = [_doc_id(d) for d in docs]  # a repeated id (same content read twice) scores 1.0
    texts = [normalize_text(document_text(d)) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: (-len(texts[i]), ids[i]))
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    signatures: dict[int, np.ndarray] = {}
    results: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})] * len(docs)
    for rank, i in enumerate(order):
        # Normalised already: shingling it again changes nothing (normalisation is idempotent).
        sig = minhash_signature(texts[i], num_perm, shingle, seed)
        best, best_of, candidates = 0.0, None, []
        if sig is not None:
            lean = LeanMinHash(seed=seed, hashvalues=sig, scheme=SCHEME)
            candidates = sorted(lsh.query(lean))  # ranks of better documents
            for r in candidates:
                j = order[r]
                score = estimated_jaccard(sig, signatures[j])
                if score > best:  # strict: the better-ranked candidate wins ties
                    best, best_of = score, j
            lsh.insert(rank, lean)
            signatures[i] = sig
        scores = {"near_duplicate_jaccard": round(best, 6)}
        details = {"duplicate_of": None if best_of is None else ids[best_of], "rank": rank,
                   "text_chars": len(texts[i]), "num_candidates": len(candidates),
                   "no_text": sig is None}
        results[i] = (scores, details)
    return results


def near_duplicate_entries(rows: Sequence[dict[str, Any]], policy: Policy,
                           config: NearDupConfig | None = None) -> list[LedgerEntry]:
    """Ledger entries (stage `dedup`) for document rows, decided by the policy.

    `details.duplicate_of` stays only on dropped documents (the better copy that
    caused the drop); a kept document keeps its nearest match as `nearest`.
    """
    config = config or NearDupConfig()
    results = near_duplicates(rows, config.lsh_threshold, config.num_perm,
                              shingle=config.shingle, seed=config.seed)
    entries: list[LedgerEntry] = []
    for row, (scores, details) in zip(rows, results, strict=True):
        decision, reason = policy.decide(DEDUP_STAGE, scores)
        details = dict(details, config=config.model_dump())
        if decision == "keep":
            details["nearest"] = details.pop("duplicate_of")
            details["duplicate_of"] = None
        entries.append(LedgerEntry(
            item_id=_doc_id(row), item_kind="web_doc", parent_id=row.get("parent_id"),
            source_id=row.get("source_id"), decision=decision, reason=reason, scores=scores,
            thresholds=policy.thresholds(DEDUP_STAGE), details=details))
    return entries
