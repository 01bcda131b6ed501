"""The web flow end to end: real gimp-help pages, hostile input, classifier, LLM band, ledger."""

from __future__ import annotations

import http.server
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from weft.schemas.ledger import StagePlan, check_invariant, read_ledger
from weft.schemas.run_dir import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from web_inputs import GIMP_PAGES, copy_pages, fortunes, hostile_inputs, wiki_texts

pytestmark = pytest.mark.integration


def _long_prose(texts: list[str], n: int) -> list[str]:
    """n passages of 3 joined lead paragraphs each (enough words for the Gopher rules)."""
    return [" ".join(texts[3 * i:3 * i + 3]) for i in range(n)]


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Answers only after the client has given up: a URL that hangs."""

    def do_GET(self) -> None:
        time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hanging_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def web_run(tmp_path_factory, asset, hanging_url) -> dict[str, Any]:
    from weft.flows import web_flow
    from weft.stages.infer.tiny_models import make_tiny_models
    from weft.stages.web.fasttext_classifier import train_classifier

    root = tmp_path_factory.mktemp("web-flow")
    inputs = root / "inputs"
    inputs.mkdir()
    pages = copy_pages(asset("gimp-help-en"), inputs, GIMP_PAGES)
    # a lightly edited mirror of a page: a near-duplicate document
    mirror = inputs / "gimp-tool-shear-mirror.html"
    text = (inputs / "gimp-tool-shear.html").read_text()
    mirror.write_text(text.replace("Shear", "Shear (mirror copy)", 1))
    wiki = wiki_texts(asset("summaries_en-us.json"))
    files = hostile_inputs(inputs, _long_prose(wiki[100:], 10))
    # encyclopedic prose with one good picture: the classifier is sure, no LLM call
    rng = np.random.default_rng(0)
    picture = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (5, 5), 1.0)
    cv2.imwrite(str(inputs / "images" / "prose.png"), picture)
    prose = _long_prose(wiki[200:], 4)
    (inputs / "hang.html").write_text(f"<html><body><p>{prose[2]}</p>"
                                      f"<img src='{hanging_url}' alt='slow'>"
                                      f"<p>{prose[3]}</p></body></html>")
    (inputs / "prose.html").write_text(f"<html><body><p>{prose[0]}</p>"
                                       f"<img src='images/prose.png' alt='a picture'>"
                                       f"<p>{prose[1]}</p></body></html>")
    classifier = root / "classifier"
    train_classifier(wiki[:600] + fortunes(asset("fortunes-cookie"))[:600],
                     ["high"] * 600 + ["low"] * 600, classifier, seed=0,
                     data_source="wikipedia summaries (high) vs fortunes cookie (low)")
    tiny = make_tiny_models(root / "tiny")
    (root / "models.yaml").write_text(yaml.safe_dump({"models": {
        "filter-llm": {"path": str(tiny["qwen2_5"]), "kind": "llm", "batch_size": 4},
        "caption-vlm": {"path": str(tiny["qwen2_5_vl"]), "kind": "vlm", "batch_size": 4}}}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "models": str(root / "models.yaml"),
        "inference": {"cache_path": str(root / "requests.sqlite")},
        "quality_classifier": {"model_path": str(classifier / "model.bin")},
        "partition_size": 8,
        "image_load": {"fetch": {"timeout_s": 1.0, "deadline_s": 2.0, "retries": 1,
                                 "backoff_s": 0.1}},
        "ray": {"progress_bars": False},
    }))
    result = web_flow(input_dir=str(inputs), run_dir=str(root / "run"), config_path=str(config))
    return {"root": root, "run_dir": root / "run", "result": result, "files": files,
            "pages": pages, "mirror": mirror, "config": config}


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
