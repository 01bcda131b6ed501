"""The audit report of real video and web runs, opened in headless Chromium over CDP.

A report that looks right in a string test can still break in a browser (a bad
data: URI, markup that swallows a section); this loads it as an auditor would
and reads the funnel back from the DOM.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from weft.pipelines.audit.report import write_report
from weft.schemas.ledger import StagePlan, funnel, read_ledger
from weft.schemas.run_dir import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from cdp import CdpPage, Chromium, chromium_executable

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

FUNNEL_JS = """JSON.stringify(Array.from(document.querySelectorAll('#funnel tr[data-stage]'))
  .map(tr => [tr.dataset.stage, Object.fromEntries(Array.from(
     tr.querySelectorAll('td[data-col]')).map(td => [td.dataset.col, td.textContent.trim()]))]))"""
PAGE_JS = """JSON.stringify({
  charts: document.querySelectorAll('svg.hist').length,
  thresholds: document.querySelectorAll('svg.hist line.threshold').length,
  images: document.images.length,
  broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  external: Array.from(document.querySelectorAll('[src],[href]')).map(
    e => e.getAttribute('src') || e.getAttribute('href')).filter(
    u => !(u.startsWith('data:') || u.startsWith('#'))),
  sections: Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)})"""


def _ledger_funnel(run_dir: Path) -> list[list[Any]]:
    plan = [StagePlan(p["name"], p["version"], p["kind"])
            for p in RunDir(run_dir).manifest()["plan"]]
    return [[r.stage, {"in": str(r.items_in), "kept": str(r.kept), "dropped": str(r.dropped),
                       "errors": str(r.errored)}]
            for r in funnel(read_ledger(run_dir / "ledger"), plan)]


@pytest.mark.parametrize("kind", ["video", "web"])
def test_report_opens_cleanly_in_chromium(kind: str, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:
    exe = chromium_executable()
    if exe is None:
        pytest.fail("chromium is not installed: the project's setup installs Debian's "
                    "`chromium` package (apt-get install chromium); the report test needs it")
    run = request.getfixturevalue(f"{kind}_run")
    started = time.perf_counter()
    report = write_report(run["run_dir"])
    written_s = time.perf_counter() - started
    assert report == run["run_dir"] / "summary" / "report.html"

    browser = Chromium(exe, tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.start()
        page = CdpPage(browser.page_websocket())
        try:
            page.open(report.resolve().as_uri())
            page.drain(1.0)
            dom_funnel = json.loads(page.evaluate(FUNNEL_JS))
            facts = json.loads(page.evaluate(PAGE_JS))
            shot = page.screenshot(ARTIFACTS / f"audit-report-{kind}.png")
            page.drain(0.3)
            problems = page.problems()
            urls = page.requested_urls()
        finally:
            page.close()
    finally:
        browser.close()

    assert problems == [], f"the report logged problems in Chromium: {problems}"
    assert all(u.startswith(("file://", "data:")) for u in urls), urls
    assert dom_funnel == _ledger_funnel(run["run_dir"])
    assert facts["external"] == []
    assert facts["broken"] == 0 and facts["images"] > 0, facts
    assert facts["charts"] > 0 and facts["thresholds"] >= facts["charts"] // 2, facts
    assert len(facts["sections"]) == 7, facts["sections"]
    with Image.open(shot) as image:
        assert image.width >= 1000 and image.height >= 2000, image.size
        colours = image.convert("RGB").resize((256, 256)).getcolors(256 * 256)
        assert colours is not None and len(colours) > 50, "the screenshot is nearly blank"
    print(f"{kind}: report {report.stat().st_size / 1024:.0f} KiB written in {written_s:.2f}s, "
          f"screenshot {shot} {Image.open(shot).size}")
