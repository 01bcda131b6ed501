"""`weft audit report RUN_DIR`: one static, self-contained HTML page about a run.

The page is meant to be mailed, archived next to a dataset card or opened on an
air-gapped laptop, so it carries everything inline (CSS, SVG charts, JPEG
thumbnails as data: URIs), runs no JavaScript and loads nothing from anywhere.
Every string that came from data (paths, titles, error messages, captions,
config values) is HTML-escaped: a hostile page title stays text.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path
from typing import Any

import yaml

from weft.pipelines.audit.report_data import ReportData, ScoreSeries, gather
from weft.pipelines.audit.samples import SampleItem, sample_items
from weft.pipelines.audit.svg import DROPPED_COLOUR, KEPT_COLOUR, fmt, histogram
from weft.schemas.run_dir import RunDir, write_atomic

SAMPLE_SIZE = 12
MAX_SCORES_SHOWN = 6

CSS = f"""
body{{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;
margin:0;background:#f6f7f9}}
main{{max-width:1180px;margin:0 auto;padding:18px 24px 60px}}
h1{{font-size:22px;margin:8px 0 4px}} h2{{font-size:18px;margin:28px 0 8px;
border-bottom:2px solid #d8dde3;padding-bottom:4px}} h3{{font-size:15px;margin:16px 0 6px}}
nav a{{margin-right:12px;color:#1d4f91}}
table{{border-collapse:collapse;background:#fff;margin:6px 0}}
th,td{{border:1px solid #d8dde3;padding:3px 8px;text-align:left;vertical-align:top}}
th{{background:#eef1f4}} td.n{{text-align:right;font-variant-numeric:tabular-nums}}
.meta th{{width:170px}} code,.mono{{font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:12px;word-break:break-all}}
.bar{{display:inline-block;height:10px;background:{KEPT_COLOUR};vertical-align:middle}}
.bar.d{{background:{DROPPED_COLOUR}}} .bar.e{{background:#e0a030}}
.charts{{display:flex;flex-wrap:wrap;gap:10px}}
.chart{{background:#fff;border:1px solid #d8dde3;padding:4px}}
.chart p{{margin:2px 4px;font-size:12px;color:#555}}
svg .t{{font:bold 12px system-ui,sans-serif}} svg .a{{font:10px system-ui,sans-serif;fill:#444}}
svg .b{{font:10px system-ui,sans-serif;fill:#1d3557}}
.legend span{{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px}}
.cards{{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px;
align-items:start}}
.card{{background:#fff;border:1px solid #d8dde3;border-left:5px solid {KEPT_COLOUR};
padding:6px 8px;overflow-wrap:anywhere}}
.card.drop{{border-left-color:{DROPPED_COLOUR}}} .card.error{{border-left-color:#e0a030}}
.card img{{max-width:calc(50% - 8px);max-height:160px;margin:2px 4px 2px 0;border:1px solid #ccc}}
.card .why{{font-weight:600}} .card .txt{{color:#444;font-size:12px}}
.card .sc{{font-size:11px;color:#333}}
pre{{background:#fff;border:1px solid #d8dde3;padding:8px;overflow:auto;max-height:480px;
font-size:12px}}
.ok{{color:#1f7a3f}} .bad{{color:#b3261e;font-weight:600}} .muted{{color:#777}}
.notes li{{color:#8a4b00}} #glance{{font-size:15px}}
"""


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes).

    Control characters (binary pages, broken decodes) become U+FFFD: they are not
    allowed in HTML text and would only confuse a reader.
    """
    return escape(CONTROL.sub("\ufffd", "" if value is None else str(value)), quote=True)


def policy_yaml(policy: dict[str, Any]) -> str:
    """The policy as YAML, one line per rule (`score: {min: 1.0}`), open sides left out."""
    if not policy:
        return "(none recorded)"
    rules = {stage: {score: {k: v for k, v in (bounds or {}).items() if v is not None}
                     for score, bounds in (scores or {}).items()}
             for stage, scores in (policy.get("rules") or {}).items()}
    head = {k: v for k, v in policy.items() if k != "rules"}
    return yaml.safe_dump(head, sort_keys=False) + yaml.safe_dump(
        {"rules": rules}, sort_keys=False, default_flow_style=None, width=100)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def header(data: ReportData) -> str:
    """Who made this run, with which code, config and policy."""
    m, policy = data.manifest, data.policy
    rows = [
        ("pipeline", m.get("pipeline")), ("run id", m.get("run_id")),
        ("run directory", str(data.run_dir)), ("code version", m.get("code_version")),
        ("config hash", m.get("config_hash")),
        ("policy", f"{policy.get('name', '-')} v{policy.get('version', '-')}"),
        ("policy hash", ", ".join(data.policy_hashes) or "-"),
        ("policy file", data.config.get("policy")),
        ("run.json written", data.created),
        ("ledger invariant", data.invariant),
    ]
    body = "".join(
        f"<tr><th>{esc(k)}</th><td class=\"mono"
        f"{' ok' if v and str(v).startswith('holds') else ''}"
        f"{' bad' if v and str(v).startswith('broken') else ''}\">{esc(v or '-')}</td></tr>"
        for k, v in rows)
    notes = "".join(f"<li>{esc(n)}</li>" for n in data.notes)
    if data.unplanned_stages:
        notes += f"<li>ledger rows for stages not in the plan: " \
                 f"{esc(', '.join(data.unplanned_stages))}</li>"
    glance = ""
    if data.funnel:
        first, last = data.funnel[0], data.funnel[-1]
        glance = (f'<p id="glance"><b>{first.items_in}</b> inputs ({esc(first.stage)}) → '
                  f"<b>{last.kept}</b> kept by the last stage ({esc(last.stage)}); "
                  f"{sum(r.dropped for r in data.funnel)} drops and "
                  f"{sum(r.errored for r in data.funnel)} errors over {len(data.funnel)} "
                  "stages.</p>")
    return (f'<h1>weft audit report: {esc(m.get("pipeline"))} run '
            f'<code>{esc(m.get("run_id"))}</code></h1>'
            f'<table class="meta" id="run-meta">{body}</table>{glance}'
            + (f'<ul class="notes">{notes}</ul>' if notes else ""))


def funnel_table(data: ReportData) -> str:
    """The funnel in plan order; data-* attributes let a test read the numbers."""
    width = 220 / max([r.items_in for r in data.funnel] + [1])  # one scale for every row
    body = []
    for row in data.funnel:
        bars = "".join(f'<span class="bar{cls}" style="width:{n * width:.1f}px"></span>'
                       for n, cls in ((row.kept, ""), (row.dropped, " d"), (row.errored, " e"))
                       if n)
        reasons = "; ".join(f"{k}: {v}" for k, v in
                            {**row.drop_reasons, **row.error_reasons}.items()) or "-"
        body.append(
            f'<tr data-stage="{esc(row.stage)}"><th>{esc(row.stage)}</th>'
            f'<td class="n" data-col="in">{row.items_in}</td>'
            f'<td class="n" data-col="kept">{row.kept}</td>'
            f'<td class="n" data-col="dropped">{row.dropped}</td>'
            f'<td class="n" data-col="errors">{row.errored}</td>'
            f"<td>{bars}</td><td>{esc(reasons)}</td></tr>")
    return ('<table id="funnel"><thead><tr><th>stage</th><th>in</th><th>kept</th>'
            '<th>dropped</th><th>errors</th><th>kept / dropped / errors</th>'
            f'<th>reasons</th></tr></thead><tbody>{"".join(body)}</tbody></table>')


def reasons_table(data: ReportData) -> str:
    """Every drop and error reason per stage, with example error messages."""
    body = []
    for row in data.funnel:
        for decision, reasons in (("drop", row.drop_reasons), ("error", row.error_reasons)):
            for reason, count in reasons.items():
                examples = data.examples.get(row.stage, {}).get(reason, [])
                shown = "".join(f"<div class=\"mono\">{esc(e)}</div>" for e in examples)
                body.append(f'<tr data-stage="{esc(row.stage)}"><td>{esc(row.stage)}</td>'
                            f"<td>{decision}</td><td>{esc(reason)}</td>"
                            f'<td class="n">{count}</td><td>{shown or "-"}</td></tr>')
    if not body:
        return "<p>No item was dropped or errored.</p>"
    return ('<table id="reasons"><thead><tr><th>stage</th><th>decision</th><th>reason</th>'
            '<th>count</th><th>examples</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def charts(series: list[ScoreSeries]) -> str:
    """A histogram per ruled score, grouped by stage, threshold lines at the bounds."""
    if not series:
        return "<p>The policy rules on no score of this run.</p>"
    out, stage = [], None
    for one in series:
        if one.stage != stage:
            if stage is not None:
                out.append("</div>")
            stage = one.stage
            out.append(f'<h3>{esc(stage)}</h3><div class="charts">')
        title = f"{one.score}{' (per image)' if one.unit == 'image' else ''}"
        n = len(one.kept) + len(one.dropped)
        bounds = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(
            one.bounds.items(), key=lambda kv: kv[0] != "min")) or "none"
        caption = (f"{n} values ({len(one.kept)} kept, {len(one.dropped)} dropped)"
                   f"{f', {one.missing} missing' if one.missing else ''}; bounds: {bounds}")
        chart = histogram(title, one.kept, one.dropped, one.bounds) if n else \
            f"<p><b>{esc(title)}</b>: no numeric value to plot</p>"
        out.append(f'<div class="chart" data-stage="{esc(one.stage)}" '
                   f'data-score="{esc(one.score)}">{chart}<p>{esc(caption)}</p></div>')
    out.append("</div>")
    legend = (f'<p class="legend"><span style="background:{KEPT_COLOUR}"></span>kept '
              f'<span style="background:{DROPPED_COLOUR}"></span>dropped (by any rule of the '
              "stage) &nbsp; dashed lines: policy bounds</p>")
    return legend + "".join(out)


def _short(value: Any) -> str:
    """A score as a few characters (numbers to 3 significant digits)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return fmt(value)
    return str(value)


def _card(item: SampleItem) -> str:
    # the score the reason names (`clarity_below_min`) first: it is why the item left
    scores = sorted(item.scores.items(), key=lambda kv: not item.reason.startswith(f"{kv[0]}_"))
    shown = ", ".join(f"{k}={_short(v)}" for k, v in scores[:MAX_SCORES_SHOWN])
    more = f" (+{len(scores) - MAX_SCORES_SHOWN} more)" if len(scores) > MAX_SCORES_SHOWN else ""
    thumbs = "".join(f'<img src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">'
                     for uri, alt in item.thumbs)
    parts = [f'<div class="mono">{esc(item.item_id)}</div>',
             f'<div><span class="why">{esc(item.stage)}: {esc(item.decision)}</span> '
             f"{esc(item.reason)}</div>"]
    if item.label:
        parts.append(f"<div>{esc(item.label)}</div>")
    if thumbs:
        parts.append(f"<div>{thumbs}</div>")
    if item.text:
        parts.append(f'<div class="txt">{esc(item.text)}</div>')
    if item.error:
        parts.append(f'<div class="mono bad">{esc(item.error[:300])}</div>')
    if shown:
        parts.append(f'<div class="sc mono">{esc(shown + more)}</div>')
    return f'<div class="card {esc(item.decision)}">{"".join(parts)}</div>'


def samples_section(kept: list[SampleItem], dropped: list[SampleItem]) -> str:
    """Kept items (final stage) and dropped or errored ones, one card each."""
    def grid(items: list[SampleItem], what: str) -> str:
        if not items:
            return f"<p>No {what} item.</p>"
        return f'<div class="cards" id="sample-{what}">{"".join(map(_card, items))}</div>'

    return (f"<h3>Kept by the last stage (first {SAMPLE_SIZE} by id)</h3>{grid(kept, 'kept')}"
            f"<h3>Dropped or errored (up to {SAMPLE_SIZE}, spread over stages and reasons)"
            f"</h3>{grid(dropped, 'dropped')}")


def inventory(data: ReportData) -> str:
    """Models (id, revision, licence) and prompts (hash, template) per stage."""
    order = {s.name: k for k, s in enumerate(data.plan)}
    models = sorted(data.models, key=lambda m: (order.get(m.stage, 99), m.model_id))
    rows = "".join(
        f"<tr><td>{esc(m.stage)}</td><td class=\"mono\">{esc(m.model_id)}</td>"
        f"<td class=\"mono\">{esc(m.revision or '-')}</td><td>{esc(m.licence or 'not recorded')}"
        f"</td><td class=\"mono\">{esc(m.path or '-')}</td><td class=\"n\">{m.rows}</td></tr>"
        for m in models)
    out = ('<table id="models"><thead><tr><th>stage</th><th>model id</th><th>revision</th>'
           '<th>licence</th><th>path (registry)</th><th>ledger rows</th></tr></thead>'
           f"<tbody>{rows}</tbody></table>" if rows else "<p>No stage recorded a model.</p>")
    prompts = sorted(data.prompts, key=lambda p: (order.get(p.stage, 99), p.prompt_hash))
    rows = "".join(
        f"<tr><td>{esc(p.stage)}</td><td class=\"mono\">{esc(p.prompt_hash)}</td>"
        f"<td class=\"mono\">{esc(p.ref or 'no template named in the config has this hash')}"
        f"</td><td class=\"mono\">{esc(p.config_key or '-')}</td><td class=\"n\">{p.rows}</td>"
        "</tr>" for p in prompts)
    out += ("<h3>Prompts</h3>" + (
        '<table id="prompts"><thead><tr><th>stage</th><th>prompt hash</th><th>template</th>'
        '<th>config key</th><th>ledger rows</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>" if rows else "<p>No stage recorded a prompt.</p>"))
    return out


def timing_table(data: ReportData) -> str:
    """Sum and mean of the ledger's elapsed_ms per stage ('-' where nothing was timed)."""
    rows = "".join(
        f'<tr data-stage="{esc(t.stage)}"><td>{esc(t.stage)}</td>'
        f'<td class="n">{t.timed_rows}</td><td class="n">{_num(t.total_ms)}</td>'
        f'<td class="n">{_num(t.mean_ms)}</td></tr>' for t in data.timings)
    return ('<table id="timings"><thead><tr><th>stage</th><th>timed rows</th>'
            '<th>total ms</th><th>mean ms</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
            '<p class="muted">Per-item wall time as stages recorded it; batched stages '
            "share a batch's time among its items, and global steps may record none.</p>")


def config_section(data: ReportData) -> str:
    """run.json, the policy and config.yaml as they are, escaped."""
    return (f'<h3>Policy</h3><pre id="policy-yaml">{esc(policy_yaml(data.policy))}</pre>'
            f'<h3>run.json</h3><pre id="run-json">{esc(json.dumps(data.manifest, indent=2))}'
            "</pre><details><summary>config.yaml (the resolved config, every default)"
            f'</summary><pre id="config-yaml">{esc(data.config_text or "(missing)")}</pre>'
            "</details>")


SECTIONS = (("funnel-section", "Funnel"), ("reasons-section", "Drop and error reasons"),
            ("scores-section", "Scores and thresholds"), ("samples-section", "Samples"),
            ("models-section", "Models and prompts"), ("timing-section", "Run time"),
            ("config-section", "Config and policy"))


def render(data: ReportData, kept: list[SampleItem], dropped: list[SampleItem]) -> str:
    """The whole page as one string."""
    bodies = {"funnel-section": funnel_table(data), "reasons-section": reasons_table(data),
              "scores-section": charts(data.series),
              "samples-section": samples_section(kept, dropped),
              "models-section": inventory(data), "timing-section": timing_table(data),
              "config-section": config_section(data)}
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS)
    sections = "".join(f'<section id="{key}"><h2>{title}</h2>{bodies[key]}</section>'
                       for key, title in SECTIONS)
    title = f"weft audit: {data.manifest.get('pipeline')} run {data.manifest.get('run_id')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # No network, no scripts: the page can only show what is inline.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{header(data)}<nav>{nav}</nav>{sections}</main></body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's audit report (default RUN_DIR/summary/report.html) atomically."""
    run_dir = Path(run_dir)
    data = gather(run_dir)
    kept, dropped = sample_items(run_dir, data.rows, data.plan, SAMPLE_SIZE)
    path = Path(out) if out is not None else RunDir(run_dir).summary_dir / "report.html"
    write_atomic(path, render(data, kept, dropped).encode("utf-8"))
    return path
