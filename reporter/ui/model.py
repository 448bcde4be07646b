"""What ``anylearn-reporter ui`` shows, as JSON: run directories read directly and incrementally.

A :class:`RunView` keeps how far it has read a run's journal and ``resources.jsonl`` and what it found
there (every named metric per attempt, finals, states, resource samples), so a poll reads only what was
appended since the last one, at most :data:`RECORDS_PER_POLL` records (a huge journal comes in over
several polls). A replaced or truncated journal is read again from its start. Series keep at most
:data:`MAX_KEPT_POINTS` points (every other one is dropped as they grow). Only rank 0's metrics are drawn.

A :class:`Catalog` finds the runs under the directories it was given and answers the page's endpoints:
:meth:`Catalog.runs_json`, :meth:`Catalog.run_json`, :meth:`Catalog.compare_json`. Runs are named by an
id made from their path, so a request can only name a run the catalog found (no path comes from a URL).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..charts import Series, line_chart
from ..config import DEFAULT_OBJECTIVE_METRIC, JOURNAL_FILE, PARAMS_FILE, RESOURCES_FILE, STATE_NAMES, SUMMARY_FILE
from ..osutil import read_json
from ..reader import JournalReader
from ..record import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE
from ..runinfo import find_runs, is_run_dir
from ..runmeta import attempt_segments, attempt_summary_file, better, process_alive, read_objective

RECORDS_PER_POLL = 200_000
RESOURCE_BYTES_PER_POLL = 8 << 20
MAX_RESOURCE_LINE_BYTES = 64 << 10
MAX_KEPT_POINTS = 20_000
MAX_PARAMS = 300
GIB = 1 << 30


class Points:
    """A growing series that keeps at most about ``limit`` points: past it, every other point is dropped
    and only every ``stride``-th new point is kept (the newest is always known)."""

    def __init__(self, limit: int = MAX_KEPT_POINTS) -> None:
        self.points: List[Tuple[float, float]] = []
        self.limit = limit
        self.stride = 1
        self.seen = 0
        self.last: Optional[Tuple[float, float]] = None

    def add(self, x: float, y: float) -> None:
        if self.seen % self.stride == 0:
            self.points.append((x, y))
            if len(self.points) > self.limit:
                self.points = self.points[::2]
                self.stride *= 2
        self.seen += 1
        self.last = (x, y)

    def drawn(self) -> List[Tuple[float, float]]:
        if self.last is not None and (not self.points or self.points[-1] != self.last):
            return self.points + [self.last]
        return self.points


class Attempt:
    """What one attempt journalled: metrics by name (None: the objective), its final, its last state."""

    def __init__(self, number: int, offset: int) -> None:
        self.number = number
        self.offset = offset
        self.metrics: Dict[Optional[str], Points] = {}
        self.values: Dict[Optional[str], List[float]] = {}  # the objective's values, for best (bounded by Points)
        self.counts: Dict[Optional[str], int] = {}
        self.final: Optional[float] = None
        self.state: Optional[int] = None
        self.started: Optional[float] = None
        self.last_ts: Optional[float] = None
        self.best: Dict[Optional[str], Dict[str, Optional[float]]] = {}  # per name: the least and the greatest
        self.latest: Dict[Optional[str], int] = {}  # per name: the index of its latest record in the journal

    def objective_keys(self, objective: str) -> Tuple[Optional[str], ...]:
        """The names the objective's records carry: none, or the objective's own (SendRule's rule)."""
        return (None, objective)

    def objective_best(self, objective: str, mode: str) -> Optional[float]:
        """The best objective value of this attempt in direction ``mode``."""
        best: Optional[float] = None
        for key in self.objective_keys(objective):
            value = self.best.get(key, {}).get(mode)
            if value is not None and better(value, best, mode):
                best = value
        return best

    def objective_last(self, objective: str) -> Optional[float]:
        """The objective's latest value (of whichever of its names was journalled last)."""
        keys = [k for k in self.objective_keys(objective) if k in self.latest and self.metrics[k].last]
        if not keys:
            return None
        return self.metrics[max(keys, key=lambda k: self.latest[k])].last[1]  # type: ignore[index]

    def objective_points(self, objective: str) -> Optional[Points]:
        """The objective's series: its unnamed records and those named like it, merged in step order."""
        found = [self.metrics[k] for k in self.objective_keys(objective) if k in self.metrics]
        if len(found) < 2:
            return found[0] if found else None
        merged = Points()
        for x, y in sorted(found[0].drawn() + found[1].drawn(), key=lambda p: p[0]):
            merged.add(x, y)
        return merged


class RunView:
    """One run directory, read a little more at every :meth:`refresh`."""

    def __init__(self, run_dir: str, default_metric: str = DEFAULT_OBJECTIVE_METRIC) -> None:
        self.run_dir = run_dir
        self.default_metric = default_metric
        self.id = hashlib.sha1(run_dir.encode("utf-8", "surrogateescape")).hexdigest()[:12]
        self.name = os.path.basename(run_dir)
        self._reset()
        self.resource_offset = 0
        self.resources: Dict[str, Dict[str, Points]] = {}
        self.resource_t0: Optional[float] = None

    def _reset(self) -> None:
        self.offset = 0
        self.identity: Optional[Tuple[int, int]] = None
        self.attempts: List[Attempt] = []
        self.records = 0
        self.other_ranks = 0
        self.invalid = 0

    # --- reading ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read what was appended since the last call (bounded); never raises for a bad directory."""
        try:
            self._refresh_journal()
        except OSError:
            pass
        try:
            self._refresh_resources()
        except OSError:
            pass

    def _refresh_journal(self) -> None:
        path = os.path.join(self.run_dir, JOURNAL_FILE)
        try:
            st = os.stat(path)
        except OSError:
            return
        identity = (st.st_ino, st.st_dev)
        if self.identity is not None and (identity != self.identity or st.st_size < self.offset):
            self._reset()  # replaced or truncated: read the new file from its start
        self.identity = identity
        marks = attempt_segments(self.run_dir)
        for attempt, mark in zip(self.attempts, marks):
            if attempt.offset == mark.offset:
                attempt.number = mark.attempt  # a later mark at the same offset renumbers it
        while len(self.attempts) < len(marks):
            mark = marks[len(self.attempts)]
            attempt = Attempt(mark.attempt, mark.offset)
            attempt.started = mark.ts
            self.attempts.append(attempt)
        if st.st_size <= self.offset:
            return
        bounds = [a.offset for a in self.attempts]
        reader = JournalReader(self.run_dir, self.offset)
        index = max(i for i, b in enumerate(bounds) if b <= self.offset) if bounds else 0
        try:
            entries = reader.read_available(max_records=RECORDS_PER_POLL)
        finally:
            reader.close()
        for entry in entries:
            while index + 1 < len(bounds) and entry.end_offset > bounds[index + 1]:
                index += 1
            self.records += 1
            record = entry.record
            if record is None:
                self.invalid += 1
                continue
            attempt = self.attempts[index]
            if record.ts is not None:
                attempt.started = record.ts if attempt.started is None else min(attempt.started, record.ts)
                attempt.last_ts = record.ts if attempt.last_ts is None else max(attempt.last_ts, record.ts)
            if record.rank != 0:
                self.other_ranks += 1
                continue
            if record.kind == KIND_STATE:
                attempt.state = int(record.value or 0)
            elif record.value is None:
                continue
            elif record.kind == KIND_FINAL:
                attempt.final = float(record.value)
            elif record.kind == KIND_INTERMEDIATE:
                name = record.name
                count = attempt.counts.get(name, 0)
                attempt.counts[name] = count + 1
                series = attempt.metrics.get(name)
                if series is None:
                    series = attempt.metrics[name] = Points()
                value = float(record.value)
                series.add(float(record.step if record.step is not None else count), value)
                attempt.latest[name] = self.records
                best = attempt.best.setdefault(name, {"min": None, "max": None})
                for mode in ("min", "max"):
                    if value == value and better(value, best[mode], mode):
                        best[mode] = value
        self.offset = reader.offset

    def _refresh_resources(self) -> None:
        path = os.path.join(self.run_dir, RESOURCES_FILE)
        try:
            size = os.path.getsize(path)
        except OSError:
            return
        if size < self.resource_offset:
            self.resource_offset, self.resources, self.resource_t0 = 0, {}, None
        if size == self.resource_offset:
            return
        with open(path, "rb") as f:
            f.seek(self.resource_offset)
            data = f.read(RESOURCE_BYTES_PER_POLL)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= MAX_RESOURCE_LINE_BYTES:  # a line too long to be a sample: skip past it
                self.resource_offset += len(data)
            return
        self.resource_offset += end + 1
        for line in data[:end].split(b"\n"):
            if len(line) > MAX_RESOURCE_LINE_BYTES:
                continue
            try:
                sample = json.loads(line)
            except ValueError:
                continue
            if isinstance(sample, dict):
                self._add_sample(sample)

    def _add_sample(self, sample: Dict[str, Any]) -> None:
        ts = sample.get("ts")
        if type(ts) not in (int, float):
            return
        if self.resource_t0 is None:
            self.resource_t0 = ts
        x = ts - self.resource_t0

        def put(chart: str, label: str, value: Any, scale: float = 1.0) -> None:
            if type(value) in (int, float):
                self.resources.setdefault(chart, {}).setdefault(label, Points()).add(x, value / scale)

        system, process = sample.get("system"), sample.get("process")
        if isinstance(process, dict):
            put("CPU", "command", process.get("cpu_percent"))
            put("memory", "command RSS", process.get("rss_bytes"), GIB)
        if isinstance(system, dict):
            put("CPU", "system", system.get("cpu_percent"))
            put("memory", "system used", system.get("memory_used_bytes"), GIB)
        gpus = sample.get("gpus")
        for gpu in gpus if isinstance(gpus, list) else []:
            if isinstance(gpu, dict) and "error" not in gpu:
                label = f"GPU {gpu.get('index')}"
                put("GPU utilisation", label, gpu.get("utilization_percent"))
                put("GPU memory", label, gpu.get("memory_used_bytes"), GIB)

    # --- what the page shows ------------------------------------------------------------------

    def summary(self, default_mode: Optional[str]) -> Dict[str, Any]:
        """The run's row: state, duration, objective, best and final (of its last attempt)."""
        objective = read_objective(self.run_dir, default_mode)
        mode = objective.mode if objective else "max"
        name = self.objective_name()
        summary = read_json(os.path.join(self.run_dir, SUMMARY_FILE))
        summary = summary if isinstance(summary, dict) else {}
        last = self.attempts[-1] if self.attempts else None
        if last is not None and summary.get("attempt") not in (None, last.number):
            summary = {}  # the summary of an earlier attempt: this one has not ended
        state = summary.get("state") if type(summary.get("state")) is int else (last.state if last else None)
        started, ended = _number(summary.get("started")), _number(summary.get("ended"))
        started = started or (last.started if last else None)
        duration = None
        if started is not None:
            if ended is not None:
                duration = ended - started
            elif last is not None and self._live():
                duration = time.time() - started
            elif last is not None and last.last_ts is not None:
                duration = max(last.last_ts - started, 0.0)
        failure = summary.get("failure") if isinstance(summary.get("failure"), dict) else {}
        names = self.metric_names()
        return {
            "id": self.id,
            "name": self.name,
            "dir": self.run_dir,
            "state": state,
            "state_name": "unknown" if state is None else STATE_NAMES.get(state, str(state)),
            "started": started,
            "duration_s": duration,
            "objective": name,
            "mode": mode,
            "best": last.objective_best(name, mode) if last else None,
            "last": last.objective_last(name) if last else None,
            "final": last.final if last else None,
            "attempts": len(self.attempts),
            "records": self.records,
            "loading": self._loading(),
            "failure": _text(failure.get("reason")),
            "stderr_tail": [str(s)[:500] for s in failure.get("stderr_tail", [])[-20:]] if isinstance(failure.get("stderr_tail"), list) else [],
            "metrics": names,
        }

    def _live(self) -> bool:
        marks = attempt_segments(self.run_dir)
        return bool(marks) and process_alive(marks[-1])

    def _loading(self) -> bool:
        try:
            return os.path.getsize(os.path.join(self.run_dir, JOURNAL_FILE)) > self.offset + 4096
        except OSError:
            return False

    def objective_name(self) -> str:
        """The objective metric's name: ``objective.json``'s, else the one ``ui`` was started with
        (``ANYLEARN_OBJECTIVE_METRIC``), else ``metric``. Its records are the unnamed ones and those named
        like it, as the deliverer's :class:`~reporter.policy.SendRule` decides what is sent."""
        objective = read_objective(self.run_dir)
        return objective.name if objective and objective.name else self.default_metric

    def metric_names(self) -> List[str]:
        label = self.objective_name()
        names: Dict[str, None] = {}
        for attempt in self.attempts:
            for name in attempt.metrics:
                names[label if name is None else name] = None
        return list(names)

    def metric_series(self, metric: str) -> List[Tuple[Attempt, Points]]:
        """Each attempt's series of ``metric`` (the objective's: its unnamed records and those named like it)."""
        objective = self.objective_name()
        found = []
        for attempt in self.attempts:
            points = attempt.objective_points(objective) if metric == objective else attempt.metrics.get(metric)
            if points is not None:
                found.append((attempt, points))
        return found


def _number(value: Any) -> Optional[float]:
    return float(value) if type(value) in (int, float) else None


def _text(value: Any) -> Optional[str]:
    return value[:2000] if isinstance(value, str) else None


class Catalog:
    """The runs under the paths ``ui`` was given (run directories or reporter directories)."""

    def __init__(self, paths: Sequence[str], default_mode: Optional[str] = None,
                 default_metric: Optional[str] = None) -> None:
        self.paths = [os.path.abspath(p) for p in paths]
        self.default_mode = default_mode
        self.default_metric = default_metric or DEFAULT_OBJECTIVE_METRIC
        self.views: Dict[str, RunView] = {}

    def run_dirs(self) -> List[str]:
        found: Dict[str, None] = {}
        for path in self.paths:
            if is_run_dir(path):
                found[path] = None
            else:
                for run_dir in find_runs(path):
                    found[run_dir] = None
        return list(found)

    def refresh(self) -> List[RunView]:
        views = []
        for run_dir in self.run_dirs():
            view = self.views.get(run_dir)
            if view is None:
                view = self.views[run_dir] = RunView(run_dir, self.default_metric)
            view.refresh()
            views.append(view)
        return views

    def _view(self, run_id: str) -> Optional[RunView]:
        return next((v for v in self.views.values() if v.id == run_id), None)

    def runs_json(self) -> Dict[str, Any]:
        """``/api/runs``: every run's row, and the metric names any run has (for the comparison)."""
        runs = [view.summary(self.default_mode) for view in self.refresh()]
        metrics: Dict[str, None] = {}
        for run in runs:
            for name in run["metrics"]:
                metrics[name] = None
        return {"paths": self.paths, "runs": runs, "metrics": list(metrics), "now": time.time()}

    def run_json(self, run_id: str) -> Optional[Dict[str, Any]]:
        """``/api/run?id=``: one run's row, attempts, a chart per metric and per resource, its
        hyper-parameters; None for an id the catalog does not know."""
        view = self._view(run_id)
        if view is None:
            return None
        view.refresh()
        data = view.summary(self.default_mode)
        charts = []
        for name in data["metrics"]:
            found = view.metric_series(name)
            final = found[-1][0].final if found and name == data["objective"] else None
            series = [Series(f"#{a.number}" if len(found) > 1 else name, p.drawn()) for a, p in found]
            charts.append({"name": name, "svg": line_chart(series, title=name, final=final)})
        units = {"CPU": "%", "memory": " GiB", "GPU utilisation": "%", "GPU memory": " GiB"}
        resources = [
            {"name": chart, "svg": line_chart([Series(label, p.drawn()) for label, p in lines.items()],
                                             title=f"{chart} ({units.get(chart, '').strip()})", x_label="seconds", unit=units.get(chart, ""))}
            for chart, lines in view.resources.items()
        ]
        data.update(
            charts=charts,
            resources=resources,
            params=_params(view.run_dir),
            attempt_rows=[_attempt_row(view, a, data["mode"]) for a in view.attempts],
        )
        return data

    def compare_json(self, metric: str, selected: str = "") -> Dict[str, Any]:
        """``/api/compare?metric=&run=``: ``metric`` of every run that has it (each run's last attempt),
        overlaid; the run ``selected`` (an id) first, so its line is the blue one and first in the legend."""
        series = []
        views = self.refresh()
        for view in sorted(views, key=lambda v: v.id != selected):
            found = view.metric_series(metric)
            if found:
                series.append(Series(view.name, found[-1][1].drawn()))
        return {"metric": metric, "runs": len(series),
                "svg": line_chart(series, title=f"{metric}: runs compared", width=1140, height=300)}


def _attempt_row(view: RunView, attempt: Attempt, mode: str) -> Dict[str, Any]:
    summary = read_json(os.path.join(view.run_dir, attempt_summary_file(attempt.number)))
    summary = summary if isinstance(summary, dict) else {}
    state = summary.get("state") if type(summary.get("state")) is int else attempt.state
    failure = summary.get("failure") if isinstance(summary.get("failure"), dict) else {}
    return {
        "number": attempt.number,
        "state_name": "unknown" if state is None else STATE_NAMES.get(state, str(state)),
        "started": attempt.started,
        "best": attempt.objective_best(view.objective_name(), mode),
        "final": attempt.final,
        "records": sum(attempt.counts.values()),
        "failure": _text(failure.get("reason")),
    }


def _params(run_dir: str) -> List[Tuple[str, str]]:
    """``params.json`` flattened to (key, value text) pairs, at most :data:`MAX_PARAMS`."""
    data = read_json(os.path.join(run_dir, PARAMS_FILE))
    if not isinstance(data, dict):
        return []
    rows: List[Tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if len(rows) >= MAX_PARAMS:
            return
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            rows.append((prefix[:200], json.dumps(value)[:300]))

    walk("", data)
    return rows


__all__ = ["Catalog", "RunView", "Points"]
