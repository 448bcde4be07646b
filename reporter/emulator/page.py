"""The local backend's page at ``/``: its tasks, their state and a chart of each task's metrics.

Plain HTML with inline SVG and a meta refresh; no JavaScript.
"""

from __future__ import annotations

import html
from typing import Any, Dict, List, Optional

from ..charts import Series, line_chart

REFRESH_S = 3
_WIDTH, _HEIGHT = 560, 200


def _number(value: Optional[float]) -> str:
    return "&ndash;" if value is None else f"{value:.6g}"


def metric_chart(values: List[float], final: Optional[float]) -> str:
    """An SVG line chart of ``values`` (x: report index) with the final metric as a dashed line (the chart
    code ``ui`` draws with, :mod:`reporter.charts`)."""
    series = [Series("metric", [(i, v) for i, v in enumerate(values) if v is not None])]
    return line_chart(series, final=final, width=_WIDTH, height=_HEIGHT, x_label="report", empty="no metrics yet")


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
