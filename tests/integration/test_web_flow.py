"""The web flow end to end: real gimp-help pages, hostile input, classifier, LLM band, ledger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from weft.schemas.ledger import StagePlan, check_invariant, read_ledger
from weft.schemas.run_dir import RunDir

pytestmark = pytest.mark.integration


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_ledger(run_dir / "ledger").to_pylist()


def _names(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["item_id"]: Path(json.loads(r["details"])["path"]).name
            for r in rows if r["stage"] == "ingest"}


def _stage(rows: list[dict[str, Any]], stage: str) -> dict[str, dict[str, Any]]:
    """file name -> row, for one-document-per-file stages."""
    names = _names(rows)
    return {names[r["source_id"]] if r["source_id"] in names else r["item_id"]: r
            for r in rows if r["stage"] == stage}


def test_every_input_and_document_is_accounted_for(web_run) -> None:
    run = RunDir(web_run["run_dir"])
    plan = [StagePlan(**p) for p in run.manifest()["plan"]]
    n_inputs = sum(1 for p in web_run["root"].joinpath("inputs").rglob("*")
                   if p.is_file() and p.suffix in (".html", ".jsonl"))
    funnel = {r.stage: r for r in check_invariant(read_ledger(run.ledger_dir), plan, n_inputs)}
    assert [p.name for p in plan] == ["ingest", "parse", "langid", "heuristics",
                                      "quality_classifier", "image_load", "image_rules",
                                      "dedup", "image_dedup", "structure", "llm_filter",
                                      "caption_first", "summarize"]
    assert funnel["parse"].error_reasons == {"empty_document": 1, "invalid_json": 1,
                                             "invalid_record": 1}
    assert funnel["parse"].items_in == n_inputs - 1 + 3  # records.jsonl: 3 records, not 1
    assert funnel["llm_filter"].kept >= 1


def test_hostile_pages_get_reasons_and_nothing_escapes(web_run) -> None:
    rows = _rows(web_run["run_dir"])
    parse = _stage(rows, "parse")
    assert parse["deep.html"]["decision"] == "keep"  # 100k nested divs
    assert json.loads(parse["latin1.html"]["details"])["encoding"] == "cp1252"
    assert parse["malformed.html"]["decision"] == "keep"
    assert parse["empty.html"]["reason"] == "empty_document"
    loads = _stage(rows, "image_load")
    escape = json.loads(loads["escape.html"]["details"])
    # ../../etc/passwd escapes the input folder; a root-relative /etc/passwd resolves to
    # nothing without a site root: neither is read
    assert escape["reasons"] == {"path_escape": 1, "no_source": 1}
    assert json.loads(loads["bomb.html"]["details"])["reasons"] == {"decompression_bomb": 1}
    assert json.loads(loads["malformed.html"]["details"])["reasons"] == {"image_missing": 1}
    hang = json.loads(loads["hang.html"]["details"])
    assert hang["reasons"] == {"fetch_timeout": 1}, hang
    rules = _stage(rows, "image_rules")
    for name in ("escape.html", "bomb.html"):  # no usable image: not an interleaved document
        assert rules[name]["reason"] == "num_images_kept_below_min"
    assert _stage(rows, "langid")["binary.html"]["decision"] == "drop"


def test_mirror_page_is_a_near_duplicate(web_run) -> None:
    rows = _rows(web_run["run_dir"])
    dedup = [r for r in rows if r["stage"] == "dedup"]
    dropped = [r for r in dedup if r["decision"] == "drop"]
    assert len(dropped) == 1, [(r["reason"], r["scores"]) for r in dropped]
    (dup,) = dropped
    assert dup["reason"] == "near_duplicate_jaccard_above_max"
    names = _names(rows)
    pair = {names[dup["source_id"]],
            names[next(r["source_id"] for r in dedup
                       if r["item_id"] == json.loads(dup["details"])["duplicate_of"])]}
    assert pair == {"gimp-tool-shear.html", "gimp-tool-shear-mirror.html"}


def test_only_uncertain_documents_reach_the_llm(web_run) -> None:
    rows = _rows(web_run["run_dir"])
    llm = [r for r in rows if r["stage"] == "llm_filter"]
    asked = [r for r in llm if json.loads(r["details"])["asked_llm"]]
    stats = web_run["result"]["dedup"]["llm"]
    assert stats["in_band"] == len(asked) and stats["model_calls"] == len(asked)
    for r in llm:
        score = json.loads(r["details"])["quality_score"]
        in_band = 0.5 <= score <= 0.8
        assert json.loads(r["details"])["asked_llm"] == in_band
        assert (r["model_id"] == "filter-llm") == in_band
        if not in_band:
            assert r["decision"] == "keep" and r["reason"] == "outside_band"
    kept = {r["item_id"] for r in llm if r["decision"] == "keep"}
    out = pq.read_table(web_run["run_dir"] / "outputs" / "docs.parquet").to_pylist()
    assert {r["item_id"] for r in out} == kept


def test_output_documents_keep_only_images_that_passed(web_run) -> None:
    out = pq.read_table(web_run["run_dir"] / "outputs" / "docs.parquet").to_pylist()
    assert out
    for doc in out:
        images = [i for i in doc["items"] if i["type"] == "image"]
        assert len(images) == len(doc["image_status"]) >= 1
        assert all(s["reason"] == "ok" for s in doc["image_status"])
        assert doc["text"] and doc["detected_lang"] == "en"


def test_changed_config_is_refused_and_rerun_is_cached(web_run, tmp_path) -> None:
    from weft.flows import web_flow
    from weft.schemas.run_dir import ConfigMismatchError

    inputs = str(web_run["root"] / "inputs")
    again = web_flow(input_dir=inputs, run_dir=str(web_run["run_dir"]),
                     config_path=str(web_run["config"]))
    assert {p["state"] for p in again["partitions"]} == {"Cached"}
    assert again["dedup"]["state"] == "Cached"
    changed = tmp_path / "changed.yaml"
    cfg = yaml.safe_load(web_run["config"].read_text())
    cfg["dedup"] = {"num_perm": 64}
    changed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigMismatchError, match=r"dedup\.num_perm: 128 -> 64"):
        web_flow(input_dir=inputs, run_dir=str(web_run["run_dir"]), config_path=str(changed))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_each_kept_image_is_captioned_first_and_long_runs_summarised(web_run) -> None:
    out = pq.read_table(web_run["run_dir"] / "outputs" / "docs.parquet").to_pylist()
    rows = _rows(web_run["run_dir"])
    summarize = {r["item_id"]: json.loads(r["scores"]) for r in rows if r["stage"] == "summarize"}
    captioned = {r["item_id"]: r for r in rows if r["stage"] == "caption_first"}
    for doc in out:
        meta = json.loads(doc["metadata"])
        items = doc["items"]
        images = [k for k, i in enumerate(items) if i["type"] == "image"]
        # a caption (a text item listed in metadata.captions) right before every image
        assert [c["item_index"] + 1 for c in meta["captions"]] == images
        assert all(items[k - 1]["type"] == "text" and items[k - 1]["text"] for k in images)
        entry = captioned[doc["item_id"]]
        assert entry["model_id"] == "caption-vlm" and entry["prompt_hash"]
        assert json.loads(entry["scores"])["num_captioned"] == len(images)
        # long text runs replaced by shorter summaries, originals kept (the tiny random
        # LLM's answers are rarely shorter, so most runs keep their original text)
        assert len(meta["summaries"]) == summarize[doc["item_id"]]["num_summarised"]
        assert summarize[doc["item_id"]]["num_summarised"] <= \
            summarize[doc["item_id"]]["num_long_runs"]
        for s in meta["summaries"]:
            assert len(s["original"]) > len(items[s["item_index"]]["text"]) > 0
    assert sum(s["num_long_runs"] for s in summarize.values()) >= 1
    assert web_run["result"]["dedup"]["summarize"]["model_calls"] == sum(
        s["num_long_runs"] for s in summarize.values())
    stats = web_run["result"]["dedup"]
    assert stats["caption_first"]["model_calls"] == sum(
        json.loads(r["scores"])["num_images"] for r in captioned.values())
