"""The local backend's page at ``/``: its tasks, their state and a chart of each task's metrics.

Plain HTML with inline SVG and a meta refresh; no JavaScript.
"""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional

REFRESH_S = 3
_WIDTH, _HEIGHT, _PAD = 560, 200, 34


def _number(value: Optional[float]) -> str:
    return "&ndash;" if value is None else f"{value:.6g}"


def metric_chart(values: List[float], final: Optional[float]) -> str:
    """An SVG line chart of ``values`` (x: report index) with the final metric as a dashed line."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if final is not None and not math.isfinite(final):
        final = None
    if not values and final is None:
        return '<p class="empty">no metrics yet</p>'
    points = list(values) or [final]  # type: ignore[list-item]
    low = min(points + ([final] if final is not None else []))
    high = max(points + ([final] if final is not None else []))
    # Halved before subtracting: high - low overflows to inf for metrics of +-1e308 (NaN coordinates).
    half_span = high / 2 - low / 2
    flat = half_span <= 0 or math.isclose(low, high)
    span_x = max(len(points) - 1, 1)

    def x(i: int) -> float:
        return _PAD + (_WIDTH - 2 * _PAD) * i / span_x

    def y(v: float) -> float:
        if flat:  # one level: a line across the middle
            return _HEIGHT / 2
        return _HEIGHT - _PAD - (_HEIGHT - 2 * _PAD) * ((v / 2 - low / 2) / half_span)

    path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(points))
    parts = [
        f'<svg class="chart" role="img" width="{_WIDTH}" height="{_HEIGHT}" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
        'xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="0" y="0" width="{_WIDTH}" height="{_HEIGHT}" fill="#fbfbfd" stroke="#ddd"/>',
        f'<line x1="{_PAD}" y1="{_HEIGHT - _PAD}" x2="{_WIDTH - _PAD}" y2="{_HEIGHT - _PAD}" stroke="#999"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_HEIGHT - _PAD}" stroke="#999"/>',
        f'<text x="4" y="{_PAD + 4}" font-size="11" fill="#555">{high:.4g}</text>',
        f'<text x="4" y="{_HEIGHT - _PAD + 4}" font-size="11" fill="#555">{low:.4g}</text>',
        f'<text x="{_WIDTH - _PAD}" y="{_HEIGHT - 10}" font-size="11" fill="#555" text-anchor="end">'
        f"{len(values)} reports</text>",
    ]
    if values:
        parts.append(f'<polyline class="series" fill="none" stroke="#2563eb" stroke-width="2" points="{path}"/>')
        for i, v in enumerate(points[-1:], start=len(points) - 1):
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="#2563eb"/>')
    if final is not None:
        parts.append(
            f'<line class="final" x1="{_PAD}" y1="{y(final):.1f}" x2="{_WIDTH - _PAD}" y2="{y(final):.1f}" '
            'stroke="#dc2626" stroke-dasharray="6 4" stroke-width="2"/>'
        )
        parts.append(
            f'<text x="{_WIDTH - _PAD}" y="{y(final) - 6:.1f}" font-size="12" fill="#dc2626" text-anchor="end">'
            f"final {final:.4g}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def log_tail(lines: List[str]) -> str:
    """A local task's last shipped log lines, escaped; nothing when it shipped none."""
    if not lines:
        return ""
    return f'<h3>log <small>last {len(lines)} lines</small></h3><pre class="log">{html.escape(chr(10).join(lines))}</pre>'


def render_page(tasks: List[Dict[str, Any]]) -> str:
    """The whole page for the tasks the backend knows (``Backend.tasks()``)."""
    rows = []
    sections = []
    for task in tasks:
        task_id = html.escape(task["id"])
        values = task["intermediate_metrics"]
        rows.append(
            f"<tr><td><a href=\"#{task_id}\">{task_id}</a></td><td class=\"state s{task['state']}\">"
            f"{html.escape(task['state_name'])}</td><td>{len(values)}</td>"
            f"<td>{_number(values[-1] if values else None)}</td><td>{_number(task['final_metric'])}</td>"
            f"<td>{task['heartbeats']}</td></tr>"
        )
        sections.append(
            f'<section id="{task_id}"><h2>{task_id} <small>{html.escape(task["state_name"])}</small></h2>'
            f"{metric_chart(values, task['final_metric'])}{log_tail(task.get('log_tail') or [])}</section>"
        )
    table = (
        "<table><thead><tr><th>task</th><th>state</th><th>reports</th><th>last metric</th>"
        "<th>final metric</th><th>heartbeats</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="6">no tasks: start serve with --task ID:KEY</td></tr>')
        + "</tbody></table>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>AnyLearn local backend</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 24px; }}
td, th {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
.s1 {{ color: #2563eb; }} .s2 {{ color: #16a34a; }} .s-2, .s-3 {{ color: #dc2626; }}
small {{ color: #666; font-weight: normal; }}
pre.log {{ background: #f6f6f6; padding: 8px; max-height: 24em; overflow: auto; white-space: pre-wrap; }}
</style></head>
<body><h1>AnyLearn local backend</h1>
{table}
{''.join(sections)}
<p><small>refreshed every {REFRESH_S} s</small></p>
</body></html>
"""
