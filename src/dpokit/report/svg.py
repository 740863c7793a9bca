"""Line charts as inline SVG strings, drawn from the numbers with no plotting library.

The report must be one HTML file that opens anywhere, offline, years later: no
CDN, no JavaScript, no matplotlib in the install. A training curve needs little
more than a polyline, a few "nice" ticks and a legend, so it is drawn here.

Conventions the report relies on:
- every series is a `<path class="series" data-series=KEY d=...>`; a missing or
  non-finite value (NaN is stored as null in metrics.jsonl) breaks the line
  instead of being drawn as 0, and is marked with a red cross on the x axis;
- eval series (few points) get a dot per point with a `<title>` tooltip;
- vertical dashed lines mark the steps at which a diagnosis fired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Optional, Sequence

Point = tuple[float, Optional[float]]  # (step, value); None = absent or non-finite

WIDTH, HEIGHT = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 12, 30  # plot margins, room for tick labels


@dataclass
class Series:
    key: str  # metric name, e.g. "eval_loss"
    label: str
    points: list[Point]
    color: str
    dashed: bool = False
    dots: bool = False  # one marker per point (sparse series such as eval)


@dataclass
class Rule:
    """A reference line: horizontal at a value (`axis="y"`) or vertical at a step (`axis="x"`)."""

    at: float
    label: str
    color: str = "#94a3b8"
    axis: str = "y"


@dataclass
class Chart:
    key: str
    series: list[Series]
    rules: list[Rule] = field(default_factory=list)
    y_range: Optional[tuple[float, float]] = None  # fixed range (accuracies: 0..1)


def fmt(value: float) -> str:
    """A short label for a tick or tooltip: 3 significant digits, scientific only for tiny/huge values."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 1e3:  # 1839.4 -> "1840" (tokens/s), where "{:.3g}" would print "1.84e+03"
        return f"{round(value, 2 - math.floor(math.log10(abs(value)))):.0f}"
    return f"{value:.3g}"


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """`fmt` labels, with more significant digits where 3 would print two different ticks alike (7.5912, 7.5914)."""
    labels = [fmt(t) for t in ticks]
    digits = 4
    while len(set(labels)) < len(labels) and digits <= 12:
        labels = ["0" if t == 0 else f"{t:.{digits}g}" for t in ticks]
        digits += 1
    return labels


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering [low, high], about `count` of them."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-6:
        if value >= low - step * 1e-6:
            ticks.append(round(value, 12))
        value += step
    return ticks or [low]


def _finite(points: Sequence[Point]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if y is not None and math.isfinite(y)]


def _value_range(chart: Chart) -> tuple[float, float]:
    if chart.y_range is not None:
        return chart.y_range
    values = [y for s in chart.series for _, y in _finite(s.points)]
    values += [r.at for r in chart.rules if r.axis == "y"]
    low, high = min(values), max(values)
    if high - low < 1e-12:  # a flat line: give it some room instead of dividing by zero
        pad = abs(high) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.06
    return low - pad, high + pad


def _segments(points: Sequence[Point]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive finite points; a gap (None) starts a new run."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


def line_chart(chart: Chart) -> str:
    """One chart as an `<svg>` element; the caller checks that some series has a finite point."""
    steps = [x for s in chart.series for x, _ in s.points] + [r.at for r in chart.rules if r.axis == "x"]
    x_low, x_high = min(steps), max(steps)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = _value_range(chart)
    y_ticks = nice_ticks(y_low, y_high)
    y_low, y_high = min(y_low, y_ticks[0]), max(y_high, y_ticks[-1])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return TOP + (y_high - y) / (y_high - y_low) * plot_h

    out = [
        f'<svg class="chart" data-chart="{escape(chart.key)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(chart.key)} by step" preserveAspectRatio="xMidYMid meet">'
    ]
    for tick, label in zip(y_ticks, tick_labels(y_ticks)):  # grid and y labels
        y = sy(tick)
        out.append(f'<line class="gridline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 3.5:.1f}" text-anchor="end">{label}</text>')
    for tick in nice_ticks(x_low, x_high, 6):
        if tick != int(tick):  # steps are integers
            continue
        x = sx(tick)
        out.append(f'<line class="xtick" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{int(tick)}</text>')
    out.append(f'<text class="axis-label" x="{WIDTH - RIGHT}" y="{HEIGHT - 2}" text-anchor="end">step</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>')
    for rule in chart.rules:
        if rule.axis == "y" and y_low <= rule.at <= y_high:
            y = sy(rule.at)
            out.append(
                f'<line class="rule" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{rule.color}">'
                f"<title>{escape(rule.label)}</title></line>"
            )
            out.append(
                f'<text class="rule-label" x="{WIDTH - RIGHT - 4}" y="{y - 4:.1f}" text-anchor="end" fill="{rule.color}">{escape(rule.label)}</text>'
            )
        elif rule.axis == "x":
            x = sx(rule.at)
            out.append(
                f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="{rule.color}">'
                f"<title>{escape(rule.label)}</title></line>"
            )
    for series in chart.series:
        out.extend(_draw_series(series, sx, sy, TOP + plot_h))
    out.append("</svg>")
    return "".join(out)


def _draw_series(series: Series, sx, sy, axis_y: float) -> list[str]:
    out = []
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    segments = _segments(series.points)
    if segments:
        d = " ".join("M" + " L".join(f"{sx(x):.1f} {sy(y):.1f}" for x, y in run) for run in segments)
        out.append(
            f'<path class="series" data-series="{escape(series.key)}" d="{d}" fill="none" '
            f'stroke="{series.color}" stroke-width="2" stroke-linejoin="round"{dash}/>'
        )
    lonely = {run[0] for run in segments if len(run) == 1}  # a one-point run draws no line: show a dot
    for x, y in _finite(series.points):
        if series.dots or (x, y) in lonely:
            out.append(
                f'<circle class="dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{series.color}">'
                f"<title>{escape(series.label)} at step {fmt(x)}: {fmt(y)}</title></circle>"
            )
    for x, y in series.points:
        if y is None or not math.isfinite(y):
            cx = sx(x)
            out.append(
                f'<path class="nonfinite" d="M{cx - 4:.1f} {axis_y - 4:.1f} L{cx + 4:.1f} {axis_y + 4:.1f} '
                f'M{cx - 4:.1f} {axis_y + 4:.1f} L{cx + 4:.1f} {axis_y - 4:.1f}" stroke="#dc2626" stroke-width="2">'
                f"<title>{escape(series.label)} is NaN/Inf at step {fmt(x)}</title></path>"
            )
    return out
