"""Web-document scoring throughput against the plain libraries, measured in the same run.

Both measurements run over the same N documents (Wikipedia lead paragraphs from
the `summaries_en-us.json` asset, none of them used in training):

  - quality classifier: a fastText classifier is trained first (not timed) on
    Wikipedia ("high") against fortune cookies ("low"), ~1,000 texts each, into a
    temp dir. Reference: the fastText model loaded directly, `model.predict` on
    the already normalised one-line texts in one call. Ours: `QualityClassifierStage`
    through its batch adapter `stage(pa.Table)`, in batches of its configured
    batch size (what Ray hands it), with the policy `configs/policies/web.yaml`.
  - near duplicates: reference is plain datasketch `MinHash` signatures of the same
    documents (same normalisation, same word shingles, num_perm, seed and scheme);
    ours is `near_duplicates` with the default `NearDupConfig` (signatures + LSH +
    scoring), so the ratio shows what LSH and scoring cost over the signatures alone.

Prints docs/s of each and the ratio (ours / reference); it never asserts speed.

    python bench/web.py [--docs 5000] [--seed 0] [--repeat 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "configs" / "policies" / "web.yaml"
PER_CLASS = 1000  # training texts per quality class


def inputs(n_docs: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(high training texts, low training texts, N benchmark documents), seeded.

    The documents are Wikipedia summaries not used in training; past the ~9,000
    there are, further documents join two random summaries.
    """
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from web_inputs import fortunes, wiki_texts

    from weft.assets import fetch

    rng = random.Random(seed)
    wiki = wiki_texts(fetch("summaries_en-us.json"))
    rng.shuffle(wiki)
    low = fortunes(fetch("fortunes-cookie"))
    rng.shuffle(low)
    high, unseen = wiki[:PER_CLASS], wiki[PER_CLASS:]
    docs = unseen[:n_docs]
    while len(docs) < n_docs:
        a, b = rng.sample(unseen, 2)
        docs.append(f"{a}\n\n{b}")
    return high, low[:PER_CLASS], docs


def best_of(repeat: int, fn):
    """(shortest wall time, result of the last call) over `repeat` calls."""
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def bench_quality(docs: list[str], high: list[str], low: list[str], seed: int, repeat: int,
                  work: Path) -> None:
    from weft.schemas.policy import load_policy
    from weft.stages.base import RunContext
    from weft.stages.web.fasttext_classifier import (
        FastTextClassifier,
        QualityClassifierConfig,
        QualityClassifierStage,
        normalize_text,
        train_classifier,
    )
    from weft.stages.web.langid import load_fasttext

    card = train_classifier(high + low, ["high"] * len(high) + ["low"] * len(low),
                            work / "quality", seed=seed, data_source="bench: wiki vs fortunes")
    model_path = work / "quality" / card.model_file
    n = len(docs)
    print(f"classifier: {card.label_counts} trained, held-out accuracy {card.accuracy}, "
          f"{card.model_bytes / 1e6:.1f} MB")

    # Reference: the fastText model itself, one predict call over pre-normalised lines.
    model = load_fasttext(model_path, "bench")
    lines = [normalize_text(t) for t in docs]
    model.predict(lines, k=-1)  # warm-up: page in the model (first calls run slower)
    ref_s, (labels, _) = best_of(repeat, lambda: model.predict(lines, k=-1))
    ref = n / ref_s
    print(f"reference  fastText model.predict (1 call)  : {ref:10.1f} docs/s")

    wrapped = FastTextClassifier(model_path)
    wrap_s, _ = best_of(repeat, lambda: wrapped.predict(docs, k=-1))
    print(f"FastTextClassifier.predict (1 call, +norm.) : {n / wrap_s:10.1f} docs/s  "
          f"ratio {(n / wrap_s) / ref:.3f}")

    ctx = RunContext(run_id="bench", run_dir=str(work / "run"),
                     policy=load_policy(POLICY), code_version="bench")
    stage = QualityClassifierStage(QualityClassifierConfig(model_path=str(model_path)), ctx)
    stage.ensure_setup()  # model load is not timed
    size = stage.resources.batch_size
    rows = [{"item_id": f"doc-{i:06d}", "source_id": "bench", "item_kind": "web_doc",
             "text": t} for i, t in enumerate(docs)]
    batches = [pa.Table.from_pylist(rows[i:i + size]) for i in range(0, n, size)]

    def run_stage() -> list[pa.Table]:
        return [stage(b) for b in batches]

    stage(batches[0])  # warm-up, like the reference's
    stage_s, outs = best_of(repeat, run_stage)
    kept = sum(o.column("_decision").to_pylist().count("keep") for o in outs)
    label = f"quality_classifier stage (batches of {size})"
    print(f"{label:<44}: {n / stage_s:10.1f} docs/s  "
          f"ratio {(n / stage_s) / ref:.3f}  ({kept}/{n} kept; raw top label 'high' "
          f"for {sum(ls[0] == '__label__high' for ls in labels)})")


def bench_minhash(docs: list[str], repeat: int) -> None:
    from datasketch import MinHash

    from weft.stages.web.minhash import (
        SCHEME,
        NearDupConfig,
        minhash_signature,
        near_duplicates,
        normalize_text,
        shingles,
    )

    cfg = NearDupConfig()
    n = len(docs)

    def signatures() -> list:
        out = []
        for text in docs:
            grams = shingles(normalize_text(text), cfg.shingle)
            mh = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME)
            mh.update_batch(list(grams))
            out.append(mh.hashvalues)
        return out

    ref_s, sigs = best_of(repeat, signatures)
    for text, sig in zip(docs[:50], sigs, strict=False):  # the same signatures, not a speed check
        assert (minhash_signature(text, cfg.num_perm, cfg.shingle, cfg.seed) == sig).all()
    ref = n / ref_s
    print(f"reference  datasketch MinHash signatures    : {ref:10.1f} docs/s  "
          f"(num_perm {cfg.num_perm}, {cfg.shingle}-word shingles)")

    rows = [{"item_id": f"doc-{i:06d}", "text": t} for i, t in enumerate(docs)]
    ours_s, results = best_of(repeat, lambda: near_duplicates(
        rows, cfg.lsh_threshold, cfg.num_perm, shingle=cfg.shingle, seed=cfg.seed))
    with_candidates = sum(d["num_candidates"] > 0 for _, d in results)
    over = sum(s["near_duplicate_jaccard"] > 0.8 for s, _ in results)
    print(f"near_duplicates (signatures + LSH + score)  : {n / ours_s:10.1f} docs/s  "
          f"ratio {(n / ours_s) / ref:.3f}  ({with_candidates} docs with LSH candidates, "
          f"{over} above 0.8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many timings")
    args = parser.parse_args()

    high, low, docs = inputs(args.docs, args.seed)
    chars = sum(len(d) for d in docs)
    print(f"documents: {len(docs)} Wikipedia lead paragraphs unseen in training "
          f"({chars / len(docs):.0f} chars mean), seed {args.seed}, best of {args.repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_quality(docs, high, low, args.seed, args.repeat, Path(tmp))
    bench_minhash(docs, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
