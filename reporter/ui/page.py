"""The one HTML page of ``anylearn-reporter ui``: styles and script inline, nothing loaded from elsewhere.

The server embeds the first answers of its JSON endpoints in the page (so it draws at once, even for a
browser that runs no timers), then the script polls them every :data:`POLL_MS`. Text is put in with
``textContent``; the charts are SVG made and escaped by :mod:`reporter.charts`. After each draw the script
checks that no tick label overlaps its axis or its neighbour and writes the result to
``<body data-labels-ok>`` (read by the tests from Chromium's DOM).
"""

from __future__ import annotations

import json
from typing import Any

POLL_MS = 2000


def _embedded(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(initial: Any, nonce: str) -> str:
    """The page, with ``initial`` (``{"runs": ..., "run": ..., "compare": ...}``) embedded."""
    return _PAGE.replace("__NONCE__", nonce).replace("__INITIAL__", _embedded(initial)).replace("__POLL_MS__", str(POLL_MS))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AnyLearn reporter: runs</title>
<style nonce="__NONCE__">
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f6f7f9; --blue: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px; background: #111827; color: #f9fafb; }
header h1 { font-size: 17px; margin: 0; font-weight: 600; }
header .where { color: #9ca3af; font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; }
header .live { font-size: 12px; color: #86efac; }
header .live.down { color: #fca5a5; }
main { padding: 18px 24px 40px; max-width: 1240px; }
h2 { font-size: 15px; margin: 22px 0 10px; }
h2 small { color: var(--muted); font-weight: normal; margin-left: 8px; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { padding: 6px 12px; text-align: left; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #f9fafb; font-size: 12px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
#runs tbody tr { cursor: pointer; }
#runs tbody tr:hover { background: #f3f6ff; }
#runs tbody tr.selected { background: #e8efff; }
#runs td.name { max-width: 340px; overflow: hidden; text-overflow: ellipsis; font-weight: 500; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; background: #e5e7eb; color: #374151; }
.pill.running { background: #dbeafe; color: #1d4ed8; } .pill.success { background: #dcfce7; color: #15803d; }
.pill.fail, .pill.abort { background: #fee2e2; color: #b91c1c; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 560px); gap: 14px; }
.chart-box svg { display: block; }
.failure { background: #fff5f5; border: 1px solid #fecaca; border-left: 4px solid #dc2626; border-radius: 6px; padding: 10px 14px; margin: 10px 0; }
.failure pre { margin: 8px 0 0; font-size: 12px; white-space: pre-wrap; word-break: break-all; color: #7f1d1d; }
.empty { color: var(--muted); }
select { font: inherit; padding: 4px 8px; border-radius: 6px; border: 1px solid #d1d5db; background: #fff; }
#params td:first-child { color: var(--muted); }
#params td { white-space: normal; word-break: break-all; max-width: 560px; font-family: ui-monospace, monospace; font-size: 12px; }
</style></head>
<body data-labels-ok="unknown" data-charts="0">
<header><h1>AnyLearn reporter</h1><span class="where" id="where"></span><span class="live" id="live">live</span></header>
<main>
<table id="runs"><thead><tr><th>run</th><th>state</th><th>started</th><th>duration</th><th>objective</th>
<th>best</th><th>final</th><th>last</th><th>attempts</th><th>records</th></tr></thead><tbody></tbody></table>
<section id="run"></section>
<section id="compare"><h2>Compare runs <select id="metric" aria-label="metric"></select></h2><div id="compare-chart" class="chart-box"></div></section>
</main>
<script nonce="__NONCE__">
"use strict";
const INITIAL = __INITIAL__;
const POLL_MS = __POLL_MS__;
let selected = INITIAL.run ? INITIAL.run.id : null;
let metric = INITIAL.compare ? INITIAL.compare.metric : null;
const shown = new Map();  // element id -> the SVG text shown, to redraw only what changed

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function num(v) { return v === null || v === undefined ? "\\u2013" : Number(v).toPrecision(4).replace(/\\.?0+(e|$)/, "$1"); }
function dur(s) {
  if (s === null || s === undefined) return "\\u2013";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}
function when(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 16) : "\\u2013"; }
function pill(name) { return el("span", name, "pill " + String(name).replace(/[^a-z]/g, "")); }

function renderRuns(data) {
  document.getElementById("where").textContent = data.paths.join("  \\u00b7  ");
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  if (!data.runs.length) {
    const td = el("td", "no runs yet under these directories: they appear here as soon as a run journals", "empty");
    td.colSpan = 10;
    body.append(el("tr")); body.lastChild.append(td);
  }
  if (!selected && data.runs.length) selected = data.runs[0].id;
  for (const run of data.runs) {
    const tr = el("tr");
    tr.dataset.id = run.id;
    if (run.id === selected) tr.className = "selected";
    const name = el("td", run.name, "name"); name.title = run.dir;
    const state = el("td"); state.append(pill(run.state_name));
    tr.append(name, state, el("td", when(run.started)), el("td", dur(run.duration_s), "num"),
              el("td", run.objective + " (" + run.mode + ")"), el("td", num(run.best), "num"), el("td", num(run.final), "num"),
              el("td", num(run.last), "num"), el("td", run.attempts, "num"), el("td", run.records + (run.loading ? "\\u2026" : ""), "num"));
    tr.addEventListener("click", () => { selected = run.id; poll(); });
    body.append(tr);
  }
  const select = document.getElementById("metric");
  const names = data.metrics;
  if (!metric || !names.includes(metric)) metric = names.length ? names[0] : null;
  if (select.options.length !== names.length || [...select.options].some((o, i) => o.value !== names[i])) {
    select.replaceChildren(...names.map(n => { const o = el("option", n); o.value = n; return o; }));
  }
  if (metric) select.value = metric;
}

function chartBox(id, svg) {
  const box = el("div", null, "chart-box");
  box.id = id;
  box.innerHTML = svg;  // made and escaped by reporter.charts
  return box;
}

function renderRun(run) {
  const section = document.getElementById("run");
  if (!run) { section.replaceChildren(); return; }
  if (section.dataset.id !== run.id) { section.replaceChildren(); section.dataset.id = run.id; shown.clear(); }
  let head = section.querySelector("h2.run-title");
  if (!head) { head = el("h2", null, "run-title"); section.append(head); }
  head.replaceChildren(el("span", run.name), el("small", run.state_name + " \\u00b7 " + dur(run.duration_s) + " \\u00b7 " + run.dir));
  let failure = section.querySelector(".failure");
  if (run.failure) {
    if (!failure) { failure = el("div", null, "failure"); head.after(failure); }
    const pre = el("pre", run.stderr_tail.join("\\n"));
    failure.replaceChildren(el("strong", run.failure), ...(run.stderr_tail.length ? [pre] : []));
  } else if (failure) failure.remove();
  syncBlock(section, "attempts", run.attempt_rows.length > 1 ? "Attempts" : null, box => {
    const table = el("table");
    const head = el("tr");
    for (const h of ["attempt", "state", "started", "best", "final", "records", "failure"]) head.append(el("th", h));
    table.append(head);
    for (const a of run.attempt_rows) {
      const tr = el("tr"); const st = el("td"); st.append(pill(a.state_name));
      tr.append(el("td", "#" + a.number), st, el("td", when(a.started)), el("td", num(a.best), "num"), el("td", num(a.final), "num"),
                el("td", a.records, "num"), el("td", a.failure || ""));
      table.append(tr);
    }
    box.replaceChildren(table);
  });
  syncCharts(section, "metrics", "Metrics", run.charts, "no metrics journalled yet");
  syncCharts(section, "resources", "Resources", run.resources, "no resource samples (the sidecar writes resources.jsonl)");
  syncBlock(section, "params", "Hyper-parameters", box => {
    if (!run.params.length) { box.replaceChildren(el("p", "no params.json in this run", "empty")); return; }
    const table = el("table"); table.id = "params";
    for (const [k, v] of run.params) { const tr = el("tr"); tr.append(el("td", k), el("td", v)); table.append(tr); }
    box.replaceChildren(table);
  });
}

function syncBlock(section, key, title, fill) {
  let box = section.querySelector("div.block-" + key);
  let h = section.querySelector("h2.block-" + key);
  if (!title) { if (box) box.remove(); if (h) h.remove(); return; }
  if (!box) { h = el("h2", title, "block-" + key); box = el("div", null, "block-" + key); section.append(h, box); }
  fill(box);
}

function syncCharts(section, key, title, charts, empty) {
  syncBlock(section, key, title, box => {
    if (!charts.length) { box.replaceChildren(el("p", empty, "empty")); return; }
    let grid = box.querySelector(".grid");
    if (!grid) { grid = el("div", null, "grid"); box.replaceChildren(grid); }
    const ids = charts.map((c, i) => key + "-" + i);
    while (grid.children.length > charts.length) grid.lastChild.remove();
    charts.forEach((c, i) => {
      const id = ids[i];
      if (shown.get(id) === c.svg && grid.children[i]) return;
      shown.set(id, c.svg);
      const box2 = chartBox(id, c.svg);
      box2.dataset.metric = c.name;
      if (grid.children[i]) grid.children[i].replaceWith(box2); else grid.append(box2);
    });
  });
}

function renderCompare(cmp) {
  const box = document.getElementById("compare-chart");
  if (!cmp) { box.replaceChildren(el("p", "no metrics to compare yet", "empty")); return; }
  if (shown.get("compare") !== cmp.svg) { box.innerHTML = cmp.svg; shown.set("compare", cmp.svg); }
}

function overlaps(a, b) { return a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height; }

function checkLabels() {
  let ok = true, charts = 0;
  for (const svg of document.querySelectorAll("svg.chart")) {
    const xAxis = svg.querySelector(".axis-x"), yAxis = svg.querySelector(".axis-y");
    if (!xAxis || !yAxis) continue;
    charts++;
    const axisY = xAxis.y1.baseVal.value, axisX = yAxis.x1.baseVal.value;
    const ys = [...svg.querySelectorAll(".tick-y")].map(t => t.getBBox());
    const xs = [...svg.querySelectorAll(".tick-x")].map(t => t.getBBox());
    const titles = [...svg.querySelectorAll(".chart-title, .legend text")].map(t => t.getBBox());
    for (const b of ys) if (b.x + b.width > axisX - 1 || b.x < 0) ok = false;
    for (const b of xs) if (b.y < axisY + 1 || b.y + b.height > svg.height.baseVal.value) ok = false;
    for (const group of [ys, xs, titles]) for (let i = 1; i < group.length; i++) if (overlaps(group[i - 1], group[i])) ok = false;
    for (const t of titles) for (const b of ys.concat(xs)) if (overlaps(t, b)) ok = false;
  }
  document.body.dataset.labelsOk = String(ok);
  document.body.dataset.charts = String(charts);
}

function draw(runs, run, cmp) {
  renderRuns(runs); renderRun(run); renderCompare(cmp);
  checkLabels();
}

async function getJSON(path) {
  const answer = await fetch(path, {cache: "no-store"});
  if (!answer.ok) throw new Error(path + ": " + answer.status);
  return answer.json();
}

let timer = null;
async function poll() {
  clearTimeout(timer);
  const live = document.getElementById("live");
  try {
    const runs = await getJSON("/api/runs");
    if (selected && !runs.runs.some(r => r.id === selected)) selected = null;
    if (!selected && runs.runs.length) selected = runs.runs[0].id;
    const run = selected ? await getJSON("/api/run?id=" + encodeURIComponent(selected)) : null;
    const m = runs.metrics.includes(metric) ? metric : runs.metrics[0];
    const cmp = m ? await getJSON("/api/compare?metric=" + encodeURIComponent(m) + "&run=" + encodeURIComponent(selected || "")) : null;
    draw(runs, run, cmp);
    live.textContent = "live \\u00b7 " + new Date().toLocaleTimeString();
    live.className = "live";
  } catch (e) {
    live.textContent = "cannot reach the ui server (" + e.message + ")";
    live.className = "live down";
  }
  timer = setTimeout(poll, POLL_MS);
}

document.getElementById("metric").addEventListener("change", e => { metric = e.target.value; poll(); });
draw(INITIAL.runs, INITIAL.run, INITIAL.compare);
timer = setTimeout(poll, POLL_MS);
</script>
</body></html>
"""

__all__ = ["render_page", "POLL_MS"]
