"""Line charts as inline SVG, shared by ``serve``'s page and ``ui``: axes with tick labels, one line per
series (attempts, runs), a legend, the final metric as a dashed line.

Pure functions of numbers and labels; every label is escaped here (metric names are user input), and
coordinates stay finite for any finite value (spans are computed halved: ``high - low`` of ``+-1e308``
overflows).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

PALETTE = ("#2563eb", "#f59e0b", "#16a34a", "#9333ea", "#0891b2", "#db2777", "#65a30d", "#ea580c", "#475569", "#0d9488")
FINAL_COLOR = "#dc2626"
CHAR_W = 6.6  # the width of a character of the 11 px sans-serif labels, a little generous
LEGEND_CHARS = 22  # a legend label's most characters (cut in the middle)
MAX_DRAWN_POINTS = 1200  # per series: more are thinned to this many before drawing
_FONT = 'font-family="system-ui, sans-serif"'


@dataclass
class Series:
    """One line: its legend label and its points ``(x, y)`` in drawing order."""

    label: str
    points: Sequence[Tuple[float, float]] = field(default_factory=list)


def _finite(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]


def thin(points: List[Tuple[float, float]], limit: int = MAX_DRAWN_POINTS) -> List[Tuple[float, float]]:
    """At most about ``limit`` points: each bucket's lowest and highest (so a spike stays visible), the last kept."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    kept: List[Tuple[float, float]] = []
    for start in range(0, len(points), size):
        bucket = points[start:start + size]
        low = min(bucket, key=lambda p: p[1])
        high = max(bucket, key=lambda p: p[1])
        kept.extend(sorted({low, high}, key=lambda p: p[0]))
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def nice_step(low: float, high: float, count: int, *, whole: bool = False) -> float:
    """A round distance (1, 2, 2.5 or 5 times a power of ten) giving about ``count`` ticks over
    ``[low, high]``; inf when the span is beyond floats (``+-1e308``)."""
    half_span = high / 2 - low / 2
    raw = 2 * (half_span / max(count - 1, 1))
    if not (math.isfinite(raw) and raw > 0) or half_span >= 1e307:
        return math.inf
    power = 10 ** math.floor(math.log10(raw))
    step = next((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999), 10 * power)
    if whole:  # steps are whole numbers: no tick between them, no 2.5
        step = max(1.0, 2 * step if step % 1 else step)
    return step


def nice_ticks(low: float, high: float, count: int, *, whole: bool = False) -> List[float]:
    """Round values covering ``[low, high]``, about ``count`` of them (just the two ends for a span beyond
    floats); whole numbers only with ``whole``."""
    step = nice_step(low, high, count, whole=whole)
    if not math.isfinite(step):
        return [low, high] if high > low else [low]
    first = math.ceil(low / step - 1e-9) * step
    ticks: List[float] = []
    while len(ticks) < 60:
        value = first + step * len(ticks)
        if value > high + step * 1e-9:
            break
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
    return ticks or [low]


def tick_text(value: float, unit: str = "") -> str:
    """A short label: ``0.25``, ``12000``, ``1.2e+06`` (``unit`` after it)."""
    if value == 0:
        return "0" + unit
    magnitude = abs(value)
    text = f"{value:.6g}" if 1e-4 <= magnitude < 1e6 else f"{value:.3g}"
    if "e" not in text and "." in text and len(text) > 7:
        text = f"{value:.4g}"
    return text + unit


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    x_label: str = "step",
    unit: str = "",
    final: Optional[float] = None,
    width: int = 560,
    height: int = 220,
    empty: str = "no values yet",
) -> str:
    """An SVG line chart: tick labels on both axes, one coloured line per series (the first blue), a legend
    when there are several, and ``final`` as a red dashed line. ``title``, labels and units are escaped."""
    lines = [(s.label, thin(_finite(s.points))) for s in series]
    lines = [(label, pts) for label, pts in lines if pts]
    if final is not None and not math.isfinite(final):
        final = None
    pad_r, pad_t, pad_b = 16, 30, 34
    parts = [
        f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" data-series="{len(lines)}"><title>{html.escape(title)}</title>',
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" rx="6" fill="#ffffff" stroke="#e2e5ea"/>',
    ]
    shown_title = _cut(title, int((width * 0.55) / 7.2))
    if title:
        parts.append(f'<text class="chart-title" x="12" y="19" font-size="13" font-weight="600" fill="#1f2937" {_FONT}>'
                     f"{html.escape(shown_title)}</text>")
    if not lines and final is None:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" font-size="12" fill="#6b7280" text-anchor="middle" {_FONT}>'
                     f"{html.escape(empty)}</text></svg>")
        return "".join(parts)

    xs = [x for _, pts in lines for x, _ in pts] or [0.0]
    ys = [y for _, pts in lines for _, y in pts] + ([final] if final is not None else [])
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if y_high / 2 - y_low / 2 <= 0 or math.isclose(y_low, y_high):
        margin = abs(y_low) * 0.1 or 1.0
        y_low, y_high = y_low - margin, y_high + margin
    if x_high / 2 - x_low / 2 <= 0:
        x_low, x_high = x_low - 1, x_high + 1
    plot_h = height - pad_t - pad_b
    y_count = max(3, plot_h // 30)
    step = nice_step(y_low, y_high, y_count)
    if math.isfinite(step):  # widen to round ends, so the top and bottom lines carry labels
        y_low, y_high = math.floor(y_low / step + 1e-9) * step, math.ceil(y_high / step - 1e-9) * step
    y_ticks = [t for t in nice_ticks(y_low, y_high, y_count) if y_low - abs(y_low) * 1e-12 <= t <= y_high + abs(y_high) * 1e-12]
    pad_l = max(40, int(max(len(tick_text(t, unit)) for t in y_ticks) * CHAR_W) + 14)
    plot_w = width - pad_l - pad_r
    x_label_w = max(len(tick_text(v)) for v in (x_low, x_high)) * CHAR_W + 14
    whole = all(float(x).is_integer() for x in xs)
    x_ticks = [t for t in nice_ticks(x_low, x_high, max(2, int(plot_w // x_label_w)), whole=whole) if x_low <= t <= x_high]
    x_span, y_span = x_high / 2 - x_low / 2, y_high / 2 - y_low / 2

    def px(x: float) -> float:
        return pad_l + plot_w * ((x / 2 - x_low / 2) / x_span)

    def py(y: float) -> float:
        return pad_t + plot_h - plot_h * ((y / 2 - y_low / 2) / y_span)

    for t in y_ticks:
        parts.append(f'<line x1="{pad_l}" y1="{py(t):.1f}" x2="{width - pad_r}" y2="{py(t):.1f}" stroke="#eef0f3"/>')
        parts.append(f'<text class="tick tick-y" x="{pad_l - 6}" y="{py(t) + 4:.1f}" font-size="11" fill="#4b5563" '
                     f'text-anchor="end" {_FONT}>{html.escape(tick_text(t, unit))}</text>')
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{pad_t + plot_h}" x2="{px(t):.1f}" y2="{pad_t + plot_h + 4}" stroke="#9ca3af"/>')
        parts.append(f'<text class="tick tick-x" x="{px(t):.1f}" y="{pad_t + plot_h + 16}" font-size="11" fill="#4b5563" '
                     f'text-anchor="middle" {_FONT}>{html.escape(tick_text(t))}</text>')
    parts.append(f'<line class="axis axis-x" x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - pad_r}" y2="{pad_t + plot_h}" stroke="#9ca3af"/>')
    parts.append(f'<line class="axis axis-y" x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="#9ca3af"/>')
    parts.append(f'<text class="axis-label" x="{width - pad_r}" y="{height - 4}" font-size="10" fill="#6b7280" '
                 f'text-anchor="end" {_FONT}>{html.escape(x_label)}</text>')

    for i, (label, pts) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" data-label="{html.escape(label)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" stroke-linejoin="round" points="{coords}"/>')
        x, y = pts[-1]
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
    if final is not None:
        parts.append(f'<line class="final" x1="{pad_l}" y1="{py(final):.1f}" x2="{width - pad_r}" y2="{py(final):.1f}" '
                     f'stroke="{FINAL_COLOR}" stroke-dasharray="6 4" stroke-width="2"/>')
        above = py(final) - 6 if py(final) - 6 > pad_t + 10 else py(final) + 15
        parts.append(f'<text class="final-label" x="{pad_l + 8}" y="{above:.1f}" font-size="12" fill="{FINAL_COLOR}" '
                     f'font-weight="600" {_FONT}>final {final:.4g}</text>')
    if len(lines) > 1:
        parts.append(_legend([label for label, _ in lines], width - pad_r, title_w=len(shown_title) * 7.6 + 24 if title else 12))
    parts.append("</svg>")
    return "".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def _cut_middle(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters, cut in its middle: run names differ at their end."""
    if len(text) <= limit:
        return text
    head = max((limit - 1) // 3, 1)
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def legend_labels(labels: Sequence[str], limit: int = LEGEND_CHARS) -> List[str]:
    """The legend's texts: each label cut in its middle; where that leaves two alike, what follows the
    labels' common beginning (the part that tells them apart)."""
    texts = [_cut_middle(label, limit) for label in labels]
    if len(set(texts)) < len(set(labels)):
        common = len(os.path.commonprefix(list(labels)))
        texts = [label if len(label) <= limit else "…" + _cut_middle(label[common:], limit - 1) for label in labels]
    return texts


def _legend(labels: List[str], right: float, title_w: float) -> str:
    """Swatches and labels right-aligned on the title's line, the first labels first (the first line is the
    one the reader picked), as many as fit right of the title with "+N more" after them."""
    texts = legend_labels(labels)
    widths = [18 + len(text) * CHAR_W + 10 for text in texts]
    room = right - title_w
    shown = len(texts)
    while shown > 1 and sum(widths[:shown]) + (_more_width(len(texts) - shown) if shown < len(texts) else 0) > room:
        shown -= 1
    more = len(texts) - shown
    if widths[0] + (_more_width(more) if more else 0) > room:  # not even the first whole: cut it shorter
        chars = max(int((room - 28 - (_more_width(more) if more else 0)) / CHAR_W), 6)
        texts[0] = _cut_middle(labels[0], chars)
        widths[0] = 18 + len(texts[0]) * CHAR_W + 10
    x = right - sum(widths[:shown]) - (_more_width(more) if more else 0)
    parts = ['<g class="legend">']
    for i in range(shown):
        parts.append(f'<rect x="{x:.1f}" y="12" width="12" height="4" rx="2" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 16:.1f}" y="19" font-size="11" fill="#374151" {_FONT}>{html.escape(texts[i])}</text>')
        x += widths[i]
    if more:
        parts.append(f'<text class="legend-more" x="{right:.1f}" y="19" font-size="11" fill="#6b7280" text-anchor="end" {_FONT}>'
                     f"+{more} more</text>")
    parts.append("</g>")
    return "".join(parts)


def _more_width(count: int) -> float:
    return len(f"+{count} more") * CHAR_W + 4


__all__ = ["Series", "line_chart", "legend_labels", "nice_ticks", "thin", "tick_text", "PALETTE", "FINAL_COLOR"]
