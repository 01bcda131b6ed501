"""Inline SVG charts for the audit report: no JavaScript, no external assets.

A histogram is drawn in Python so the report opens anywhere (a browser, an
e-mail attachment, an air-gapped laptop) and reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

KEPT_COLOUR = "#3f8f5f"
DROPPED_COLOUR = "#c8414f"
LINE_COLOUR = "#1d3557"
WIDTH, HEIGHT = 356, 170
LEFT, RIGHT, TOP, BOTTOM = 40, 12, 22, 30


@dataclass(frozen=True)
class Axis:
    """Maps a score to an x position; log10 when the values span several decades."""

    lo: float
    hi: float
    log: bool
    ticks: tuple[float, ...]

    def t(self, value: float) -> float:
        """The value in axis units (log10 on a log axis)."""
        return math.log10(value) if self.log else value

    def x(self, value: float) -> float:
        return LEFT + (self.t(value) - self.lo) / (self.hi - self.lo) * (WIDTH - LEFT - RIGHT)


@dataclass(frozen=True)
class Bar:
    """One column of the histogram: where it stands and what it counts."""

    x: float
    width: float
    kept: int
    dropped: int


def fmt(value: float) -> str:
    """A short human number: 3 significant digits, no trailing noise."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def is_discrete(values: Sequence[float], bounds: Sequence[float]) -> bool:
    """Few whole-number values over a short range (counts, flags): one bar per value."""
    points = [*values, *bounds]
    return (len(set(values)) <= 15 and all(float(v).is_integer() for v in points)
            and max(points) - min(points) <= 40)


def make_axis(values: Sequence[float], bounds: Sequence[float], discrete: bool) -> Axis:
    """Span every value and every threshold, so a line never falls off the chart."""
    points = [*values, *bounds]
    lo, hi = min(points), max(points)
    if discrete:
        return Axis(lo - 0.5, hi + 0.5, False, tuple(sorted({lo, round((lo + hi) / 2), hi})))
    log = lo > 0 and hi / lo > 1000 and len(set(values)) > 1
    ticks = (lo, (lo + hi) / 2, hi)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
        ticks = (10 ** lo, 10 ** ((lo + hi) / 2), 10 ** hi)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 0.5
        return Axis(lo - pad, hi + pad, log, (ticks[0],))
    pad = (hi - lo) * 0.03
    return Axis(lo - pad, hi + pad, log, ticks)


def bars(axis: Axis, kept: Sequence[float], dropped: Sequence[float], discrete: bool,
         n_bins: int) -> list[Bar]:
    """One bar per distinct value (discrete) or per equal-width bin over the axis."""
    plot_w = WIDTH - LEFT - RIGHT
    if discrete:
        width = min(plot_w / (axis.hi - axis.lo) * 0.8, 24.0)
        return [Bar(axis.x(v) - width / 2, width, kept.count(v), dropped.count(v))
                for v in sorted({*kept, *dropped})]
    counts = [[0, 0] for _ in range(n_bins)]
    for side, values in ((0, kept), (1, dropped)):
        for value in values:
            k = int((axis.t(value) - axis.lo) / (axis.hi - axis.lo) * n_bins)
            counts[min(max(k, 0), n_bins - 1)][side] += 1
    width = plot_w / n_bins
    return [Bar(LEFT + k * width + 0.5, width - 1, c[0], c[1])
            for k, c in enumerate(counts) if c[0] or c[1]]


def histogram(title: str, kept: Sequence[float], dropped: Sequence[float],
              bounds: dict[str, float], n_bins: int = 20) -> str:
    """A stacked kept/dropped histogram with a vertical line per threshold (min, max)."""
    values = [*kept, *dropped]
    discrete = is_discrete(values, list(bounds.values()))
    axis = make_axis(values, list(bounds.values()), discrete)
    columns = bars(axis, kept, dropped, discrete, n_bins)
    top = max([b.kept + b.dropped for b in columns] + [1])
    plot_h = HEIGHT - TOP - BOTTOM
    base = TOP + plot_h
    parts = [f'<svg class="hist" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
             f'<title>{escape(title)}</title>',
             f'<text x="{LEFT}" y="14" class="t">{escape(title)}'
             f'{" (log scale)" if axis.log else ""}</text>']
    for bar in columns:
        y = base
        for count, colour, kind in ((bar.kept, KEPT_COLOUR, "kept"),
                                    (bar.dropped, DROPPED_COLOUR, "dropped")):
            if count:
                h = count / top * plot_h
                y -= h
                parts.append(f'<rect class="{kind}" x="{bar.x:.1f}" y="{y:.1f}" '
                             f'width="{bar.width:.1f}" height="{h:.1f}" fill="{colour}">'
                             f'<title>{count} {kind}</title></rect>')
    parts.append(f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" '
                 'stroke="#555"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#555"/>')
    parts.append(f'<text x="{LEFT - 4}" y="{TOP + 4}" class="a" text-anchor="end">{top}</text>'
                 f'<text x="{LEFT - 4}" y="{base}" class="a" text-anchor="end">0</text>')
    for k, tick in enumerate(axis.ticks):
        anchor = "middle" if len(axis.ticks) == 1 or 0 < k < len(axis.ticks) - 1 else \
            ("start" if k == 0 else "end")
        parts.append(f'<text x="{axis.x(tick):.1f}" y="{base + 13}" class="a" '
                     f'text-anchor="{anchor}">{escape(fmt(tick))}</text>')
    for name, value in sorted(bounds.items(), key=lambda kv: kv[0] != "min"):
        if axis.log and value <= 0:
            continue
        x = axis.x(value)
        parts.append(f'<line class="threshold" data-bound="{escape(name)}" '
                     f'data-value="{value!r}" x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" '
                     f'y2="{base}" stroke="{LINE_COLOUR}" stroke-width="2" '
                     f'stroke-dasharray="5 3"><title>{escape(name)} {fmt(value)}</title></line>')
        anchor = "end" if x > WIDTH / 2 else "start"
        dx = -3 if anchor == "end" else 3
        parts.append(f'<text x="{x + dx:.1f}" y="{base + 26}" class="b" '
                     f'text-anchor="{anchor}">{escape(name)} {escape(fmt(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)
