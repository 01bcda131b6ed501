"""Near-duplicates in synthesis: prompts and image pairs before the models, images after.

`input_dedup` (before any model is asked, so duplicates cost nothing):
    t2i           prompt_jaccard       MinHash Jaccard estimate of the prompt against
                                       better-ranked prompts (the web pipeline's MinHash:
                                       longer text first, then smaller id)
    edit/concept  pair_phash_distance  the smallest, over better-ranked pairs (by id), of
                                       max(source distance, target distance) in pHash bits

`dedup` (after verification):
    every sample  image_phash_distance pHash distance of its generated or target image to
                                       the nearest better-ranked sample (by id) *of another
                                       input* (rollouts of one input differ by seed and text)

Flat images (grayscale std below `flat_std`) get no pHash (all blanks hash alike)
and score NO_MATCH, as does a sample with nothing to compare with. Pairwise
pHash comparison is quadratic; at millions of samples, bucket by hash bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weft.stages.synth.images import NO_MATCH, measure
from weft.stages.web.minhash import near_duplicates


class SynthDedupConfig(BaseModel):
    """How prompts are shingled and images hashed; thresholds live in the policy."""

    model_config = ConfigDict(extra="forbid")
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle: int = Field(3, ge=1, description="words per shingle (prompts are short)")
    lsh_threshold: float = Field(0.5, gt=0, lt=1, description="LSH candidate threshold; pairs "
                                 "estimated below it score 0.0")
    seed: int = Field(1, ge=0, description="MinHash permutation seed")
    flat_std: float = Field(2.0, ge=0, description="images whose grayscale std is below this "
                            "are flat and not pHashed")


def _nearest(rows: Sequence[Sequence[int | None]], groups: Sequence[str]
             ) -> list[tuple[int, int | None]]:
    """(distance, index of the better one) per item, against earlier items of other groups.

    Each item has one hash or several (a pair): the distance is the largest of them.
    """
    out: list[tuple[int, int | None]] = []
    for i, mine in enumerate(rows):
        best, best_of = NO_MATCH, None
        if all(h is not None for h in mine):
            for j in range(i):
                theirs = rows[j]
                if groups[j] == groups[i] or any(h is None for h in theirs):
                    continue
                distance = max(int(np.bitwise_count(np.uint64(a) ^ np.uint64(b)))
                               for a, b in zip(mine, theirs, strict=True))
                if distance < best:
                    best, best_of = distance, j
        out.append((best, best_of))
    return out


def input_scores(rows: Sequence[dict[str, Any]], config: SynthDedupConfig
                 ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(scores, details) per input row, in input order (see the module doc)."""
    results: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})] * len(rows)
    prompts = [i for i, r in enumerate(rows) if r["task"] == "t2i"]
    found = near_duplicates([{"item_id": rows[i]["item_id"], "text": rows[i]["prompt"] or ""}
                             for i in prompts], config.lsh_threshold, config.num_perm,
                            shingle=config.shingle, seed=config.seed)
    for i, (scores, details) in zip(prompts, found, strict=True):
        results[i] = ({"prompt_jaccard": scores["near_duplicate_jaccard"]},
                      {"duplicate_of": details["duplicate_of"], "rank": details["rank"]})
    pairs = sorted((i for i, r in enumerate(rows) if r["task"] != "t2i"),
                   key=lambda i: rows[i]["item_id"])
    hashes = [[measure(rows[i][f"{role}_image"], config.flat_std).phash
               for role in ("source", "target")] for i in pairs]
    nearest = _nearest(hashes, [rows[i]["item_id"] for i in pairs])
    for rank, (i, (distance, better)) in enumerate(zip(pairs, nearest, strict=True)):
        results[i] = ({"pair_phash_distance": distance},
                      {"duplicate_of": None if better is None else rows[pairs[better]]["item_id"],
                       "rank": rank, "flat": any(h is None for h in hashes[rank])})
    return results


def output_scores(rows: Sequence[dict[str, Any]], config: SynthDedupConfig
                  ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(scores, details) per sample row, in input order: image_phash_distance."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["item_id"])
    hashes = [measure(rows[i]["target_image"], config.flat_std).phash for i in order]
    nearest = _nearest([[h] for h in hashes], [rows[i]["input_id"] for i in order])
    results: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})] * len(rows)
    for rank, (i, (distance, better)) in enumerate(zip(order, nearest, strict=True)):
        results[i] = ({"image_phash_distance": distance},
                      {"duplicate_of": None if better is None else rows[order[better]]["item_id"],
                       "rank": rank, "flat": hashes[rank] is None,
                       "phash": None if hashes[rank] is None else f"{hashes[rank]:016x}"})
    return results
