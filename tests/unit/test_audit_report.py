"""The audit report on a small hand-built run: numbers, thresholds, escaping, no external assets."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from weft.pipelines.audit.report import write_report
from weft.pipelines.audit.svg import histogram
from weft.schemas.ledger import LedgerEntry, StagePlan, funnel, read_ledger, write_ledger
from weft.schemas.policy import Policy
from weft.stages.infer.prompts import load_prompt

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
POLICY = Policy(name="unit-policy", version=3, rules={"quality": {"clarity": {"min": 5.0}}})
PLAN = [StagePlan("ingest", "1"), StagePlan("quality", "1")]


class Page(HTMLParser):
    """Collects tags with their attributes, and the funnel cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.funnel: dict[str, dict[str, int]] = {}
        self._cell: tuple[str, str] | None = None
        self._stage: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and a.get("data-stage"):
            self._stage = a["data-stage"]
        if tag == "td" and a.get("data-col") and self._stage:
            self._cell = (self._stage, a["data-col"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._stage = None

    def handle_data(self, data: str) -> None:
        if self._cell:
            stage, col = self._cell
            self.funnel.setdefault(stage, {})[col] = int(data)
            self._cell = None


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def _row(entry: LedgerEntry, stage: int) -> dict[str, Any]:
    return entry.to_row(run_id="r1", stage=PLAN[stage].name, stage_index=stage,
                        stage_version="1", config_hash="c", policy_hash=POLICY.policy_hash,
                        code_version="test")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """5 inputs; quality keeps 3, drops 1 (clarity 2 < 5) and errors on 1 (hostile message)."""
    from weft.schemas.run_dir import RunDir

    root = tmp_path / "run"
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {"caption-vlm": {
        "path": "/nowhere", "kind": "vlm", "licence": "apache-2.0"}}}))
    config = {"policy": "policies/unit.yaml", "models": str(models),
              "caption": {"prompt": "caption_transition"}, "note": HOSTILE,
              "policy_resolved": POLICY.model_dump(mode="json")}
    RunDir(root).claim(pipeline="web", config=config, config_hash="c", run_id="r1",
                       plan=[{"name": s.name, "version": s.version, "kind": s.kind}
                             for s in PLAN], code_version="test")
    ids = [f"item{k}" for k in range(5)]
    rows = [_row(LedgerEntry(i, "web_doc", "keep", "ok", details={"path": f"/in/{i}.html"}), 0)
            for i in ids]
    prompt_hash = load_prompt("caption_transition").prompt_hash
    for i, clarity in zip(ids[:4], [10.0, 20.0, 30.0, 2.0], strict=True):
        decision, reason = POLICY.decide("quality", {"clarity": clarity})
        rows.append(_row(LedgerEntry(i, "web_doc", decision, reason, scores={"clarity": clarity},
                                     thresholds=POLICY.thresholds("quality"), elapsed_ms=4.0,
                                     model_id="caption-vlm", model_revision="rev1",
                                     prompt_hash=prompt_hash), 1))
    rows.append(_row(LedgerEntry(ids[4], "web_doc", "error", HOSTILE, error_type="ItemError",
                                 error_message=HOSTILE,
                                 thresholds=POLICY.thresholds("quality")), 1))
    write_ledger(rows, root / "ledger" / "part-0.parquet")
    docs = pa.table({"item_id": ids[:2], "title": [HOSTILE, "plain"],
                     "items": [[{"type": "image", "alt": HOSTILE}], []],
                     "image_bytes": [[_png()], [b"not an image"]]})
    (root / "partitions" / "p0").mkdir(parents=True)
    pq.write_table(docs, root / "partitions" / "p0" / "docs.parquet")
    return root


@pytest.fixture
def report(run_dir: Path) -> str:
    return write_report(run_dir).read_text()


def test_report_goes_to_summary_by_default(run_dir: Path, tmp_path: Path) -> None:
    assert write_report(run_dir) == run_dir / "summary" / "report.html"
    out = write_report(run_dir, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and out.read_text().startswith("<!DOCTYPE html>")


def test_funnel_table_holds_the_ledger_funnel(run_dir: Path, report: str) -> None:
    page = Page()
    page.feed(report)
    expected = {r.stage: {"in": r.items_in, "kept": r.kept, "dropped": r.dropped,
                          "errors": r.errored}
                for r in funnel(read_ledger(run_dir / "ledger"), PLAN)}
    assert page.funnel == expected
    assert expected["quality"] == {"in": 5, "kept": 3, "dropped": 1, "errors": 1}
    assert list(page.funnel) == ["ingest", "quality"]  # plan order


def test_threshold_line_sits_at_the_policy_value_between_dropped_and_kept(report: str) -> None:
    chart = re.search(r'<div class="chart" data-stage="quality" data-score="clarity">(.*?)</svg>',
                      report, re.S)
    assert chart, "no histogram for quality.clarity"
    line = re.search(r'<line class="threshold" data-bound="min" data-value="5.0" '
                     r'x1="([\d.]+)"', chart.group(1))
    assert line, "no threshold line at min 5.0"
    x = float(line.group(1))
    rects = re.findall(r'<rect class="(kept|dropped)" x="([\d.]+)" y="[\d.]+" '
                       r'width="([\d.]+)"', chart.group(1))
    assert {kind for kind, _, _ in rects} == {"kept", "dropped"}
    for kind, left, width in rects:
        if kind == "dropped":
            assert float(left) + float(width) <= x
        else:
            assert float(left) >= x


def test_histogram_line_positions_follow_the_axis() -> None:
    svg = histogram("s", [0.0, 10.0], [], {"min": 2.5, "max": 7.5})
    xs = {m[0]: float(m[1]) for m in re.findall(
        r'data-bound="(min|max)" data-value="[\d.]+" x1="([\d.]+)"', svg)}
    assert set(xs) == {"min", "max"}
    labels = re.findall(r'<text x="([\d.]+)" y="(\d+)" class="a" [^>]*>([^<]*)</text>', svg)
    bottom = max(int(y) for _, y, _ in labels)
    ticks = {text: float(x) for x, y, text in labels if int(y) == bottom}  # the x axis
    assert set(ticks) == {"0", "5", "10"}
    quarter = (ticks["10"] - ticks["0"]) / 4
    assert xs["min"] == pytest.approx(ticks["0"] + quarter, abs=0.2)
    assert xs["max"] == pytest.approx(ticks["10"] - quarter, abs=0.2)


def test_hostile_strings_stay_text(report: str) -> None:
    page = Page()
    page.feed(report)
    assert not [t for t, _ in page.tags if t in ("script", "iframe", "object", "embed")]
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]
    assert "<script>" not in report and "<img src=x" not in report
    # the page title, the image alt text, the error message and reason, the config value
    assert report.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 5
    srcs = [a.get("src") for t, a in page.tags if t == "img"]
    assert srcs and all(s and s.startswith("data:image/jpeg;base64,") for s in srcs)


def test_no_external_assets_or_scripts(report: str) -> None:
    page = Page()
    page.feed(report)
    for tag, attrs in page.tags:
        for key in ("src", "href", "xlink:href", "action", "poster", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not re.match(r"^(https?:|//|file:|ftp:)", value), (tag, key, value)
        assert tag not in ("script", "link", "iframe")
    assert "@import" not in report and "url(" not in report


def test_thumbnails_models_prompts_and_timings(report: str) -> None:
    assert report.count('src="data:image/jpeg;base64,') == 1  # the PNG; garbage bytes skipped
    models = re.search(r'<table id="models">.*?</table>', report, re.S).group(0)
    assert "caption-vlm" in models and "rev1" in models and "apache-2.0" in models
    prompts = re.search(r'<table id="prompts">.*?</table>', report, re.S).group(0)
    assert "caption_transition@1" in prompts and "caption.prompt" in prompts
    timings = re.search(r'<table id="timings">.*?</table>', report, re.S).group(0)
    assert re.search(r'data-stage="ingest">.*?<td class="n">-</td>', timings)
    assert re.search(r'data-stage="quality">.*?16\.0</td><td class="n">4\.0</td>', timings)
    assert "unit-policy v3" in report and POLICY.policy_hash in report


def test_reasons_table_names_dropped_items_and_error_messages(report: str) -> None:
    reasons = re.search(r'<table id="reasons">.*?</table>', report, re.S).group(0)
    assert re.search(r"clarity_below_min</td><td class=\"n\">1</td><td>.*item item3", reasons)
    assert "ItemError: &lt;script&gt;" in reasons


def test_report_is_the_same_when_written_twice(run_dir: Path, tmp_path: Path) -> None:
    a = write_report(run_dir, tmp_path / "a.html").read_bytes()
    assert write_report(run_dir, tmp_path / "b.html").read_bytes() == a


def test_a_folder_without_run_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)
