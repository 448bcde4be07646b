"""``anylearn-reporter status`` (a run's delivery health, for probes) and ``show`` (a table of runs)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

from .config import ENV_RUN_DIR, HEARTBEAT_FILE, JOURNAL_FILE, ConfigError, load_config
from .cursor import load_cursor
from .log import counted, records, stay_pending, sync_hint
from .osutil import is_regular_file
from .policy import SendRule
from .record import read_line
from .runinfo import RunInfo, find_runs, is_run_dir, read_run

DEFAULT_STALE_AFTER_S = 300.0
STDERR_LINES_SHOWN = 5  # of a failed run's stderr tail, by status and show
SPARK_BARS = "▁▂▃▄▅▆▇█"


def config_mode() -> Optional[str]:
    """The reader's own ``ANYLEARN_OBJECTIVE_MODE``, for runs whose directory does not record a direction."""
    return load_config()[0].objective_mode


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "never"
    ago = time.time() - ts
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) + f" ({ago:.0f} s ago)"


def oldest_pending_ts(run_dir: str) -> Optional[float]:
    """When the first record not yet acknowledged was journalled (its ``ts``), or None when nothing is
    pending or that record has no readable time. Read from the journal and the cursor only, so it holds
    whether or not a deliverer is alive to write ``status.json``."""
    offset = load_cursor(run_dir).offset
    try:
        with open(os.path.join(run_dir, JOURNAL_FILE), "rb") as f:
            f.seek(offset)
            line = f.readline(1 << 20)
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    record = read_line(line.rstrip(b"\n"))[0]
    return record.ts if record is not None else None  # a validated record's ts is a finite time or None


def health(info: RunInfo, stale_after_s: float, probe: bool = True) -> Tuple[bool, str]:
    """Whether delivery is healthy, and why not: paused (a rejected key, a redirect), failing (at once, or
    with ``probe`` for longer than ``stale_after_s``: a live deliverer retries through a short outage), or
    records pending with no delivery for longer than ``stale_after_s`` whatever the cause (failing, a
    request stuck in flight, no deliverer running)."""
    now = time.time()
    journal = os.path.join(info.run_dir, JOURNAL_FILE)
    if os.path.lexists(journal) and not is_regular_file(journal):
        return False, f"{JOURNAL_FILE} in {info.run_dir} is not a regular file: nothing in it can be read or delivered"
    if info.paused:
        hint = sync_hint(info.run_dir, info.backend_url, new_key=info.paused.startswith("auth"))
        return False, f"paused ({info.paused}): fix it, then `{hint}`"
    if info.failing_since is not None and now - info.failing_since > stale_after_s:
        return False, f"delivery has failed for {now - info.failing_since:.0f} s: {info.last_error}"
    if info.pending:
        since = oldest_pending_ts(info.run_dir)
        if since is not None:
            quiet = now - max(since, info.last_delivery_ts or 0.0)
            if quiet > stale_after_s:
                who = f"deliverer pid {info.deliverer_pid}" if info.deliverer_pid else "no deliverer running"
                return False, (f"{records(info.pending)} pending and nothing delivered for {quiet:.0f} s ({who}; "
                               f"last error: {info.last_error or 'none'})")
    if info.pending and info.deliverer_pid is None:
        return False, (f"{stay_pending(info.pending)} and no deliverer is running (last error: {info.last_error or 'none'}); "
                       f"deliver them with `{sync_hint(info.run_dir, info.backend_url)}`")
    if info.failing_since is not None and probe:  # a live deliverer retrying: healthy for a probe until stale_after_s
        return True, (f"retrying: delivery has failed for {now - info.failing_since:.0f} s ({info.last_error}); "
                      f"unhealthy after {stale_after_s:g} s")
    if info.failing_since is not None:  # the last attempt failed and nothing was delivered since
        who = f"deliverer pid {info.deliverer_pid} retrying" if info.deliverer_pid else "no deliverer running"
        return False, (f"failing: delivery has failed for {now - info.failing_since:.0f} s ({info.last_error}; {who}); "
                       "a probe that should allow a short outage gives --stale-after S")
    return True, "ok"


def status_command(run_dir: Optional[str], *, as_json: bool = False, stale_after_s: Optional[float] = None) -> int:
    """Print a run's delivery state; 0 while delivery is healthy, 1 when it is paused, failing or stuck.
    ``stale_after_s`` given (a probe): failing is healthy that long; else failing is unhealthy at once and
    records stall after :data:`DEFAULT_STALE_AFTER_S`."""
    if run_dir is None:
        config, _ = load_config()
        if not config.task_id and not os.environ.get(ENV_RUN_DIR):
            raise ConfigError("which run? give RUN_DIR, or set ANYLEARN_TASK_ID (or task_id)")
        run_dir = config.run_dir
    if not is_run_dir(run_dir):
        print(f"anylearn-reporter: no run at {run_dir} (no metrics.jsonl yet)", file=sys.stderr)
        return 1
    probe = stale_after_s is not None  # a probe, every minute: no read of the whole journal for the metrics
    info = read_run(run_dir, with_metrics=not probe, default_mode=config_mode())
    ok, why = health(info, DEFAULT_STALE_AFTER_S if stale_after_s is None else stale_after_s, probe)
    beats = heartbeat_state(run_dir)
    if as_json:
        print(json.dumps({**info.as_dict(), "healthy": ok, "health": why, "heartbeats": beats}, indent=2))
        return 0 if ok else 1
    rows = [
        ("run", info.run_dir),
        ("task", info.task_id or "offline"),
        ("state", info.state_name),
        ("records", f"{info.journalled} journalled, {info.delivered} delivered, {info.pending} pending, {info.rejected} rejected"),
        ("skipped", _reasons(info.skipped)),
        ("lost", _reasons(info.lost)),
        *([] if probe else [("objective", f"{_objective(info)}: last {_fmt(info.last_metric)}, "
                                          f"best {_fmt(info.best_metric)}, final {_fmt(info.final_metric)}")]),
        ("last delivery", _when(info.last_delivery_ts)),
        ("last error", info.last_error or "none"),
        ("deliverer", f"pid {info.deliverer_pid}" if info.deliverer_pid else "none running"),
        ("health", why),
    ]
    if beats is not None:
        rows.insert(-1, ("heartbeats", beats["heartbeats"] + (f" ({beats['reason']})" if beats.get("reason") else "")))
    if info.failure_reason:
        rows.insert(3, ("failure", info.failure_reason))
        rows[4:4] = [("stderr tail" if i == 0 else "", line) for i, line in enumerate(info.stderr_tail[-STDERR_LINES_SHOWN:])]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")
    return 0 if ok else 1


def heartbeat_state(run_dir: str) -> Optional[Dict[str, Any]]:
    """What a sidecar wrote about its heartbeats (``{"heartbeats": "on"|"off", "reason": ...}``), or None."""
    try:
        with open(os.path.join(run_dir, HEARTBEAT_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("heartbeats") in ("on", "off") else None


def _reasons(counts: Dict[str, int]) -> str:
    return counted(counts) if counts else "none"


# --- show -------------------------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 20) -> str:
    """The values as a row of block characters (the last ``width`` buckets, each its bucket's mean)."""
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [
            sum(v / len(chunk) for v in chunk)  # divided first: a sum of values near 1e308 would overflow
            for chunk in (values[int(i * size): max(int((i + 1) * size), int(i * size) + 1)] for i in range(width))
        ]
    low, high = min(values), max(values)
    span = high / 2 - low / 2  # halved: high - low overflows for values of +-1e308
    if span <= 0:
        return SPARK_BARS[len(SPARK_BARS) // 2] * len(values)
    return "".join(SPARK_BARS[round((v / 2 - low / 2) / span * (len(SPARK_BARS) - 1))] for v in values)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def show_command(run_dirs: List[str], *, as_json: bool = False, metrics: bool = False) -> int:
    """Print a table of runs (default: every run under the reporter directory, newest first)."""
    config, _ = load_config()
    missing = [d for d in run_dirs if not os.path.isdir(d)]
    if missing:
        raise ConfigError(f"no run directory at {', '.join(missing)}; `anylearn-reporter show` lists the runs under {config.reporter_dir}")
    if not run_dirs:
        run_dirs = find_runs(config.reporter_dir)
        if not run_dirs:
            print(f"no runs under {config.reporter_dir}", file=sys.stderr if as_json else sys.stdout)
            if as_json:
                print("[]")
            return 0
    if metrics:
        return _show_metrics(run_dirs, as_json)
    infos = [read_run(d, SendRule.of(config), default_mode=config.objective_mode) for d in run_dirs]
    if as_json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    header = ["run", "state", "start", "duration", "delivered", "pending", "rejected", "objective", "last", "best", "final", "metric"]
    rows = [row for info in infos for row in _show_rows(info)]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for info in infos:
        for problem in info.problems:
            print(f"(!) {info.name}: {problem}")
        for attempt in info.attempts if len(info.attempts) > 1 else []:
            if attempt.failure_reason and attempt is not info.attempts[-1]:
                print(f"(x) {info.name} #{attempt.number}: {attempt.failure_reason}")
        if info.failure_reason:
            print(f"(x) {info.name}: {info.failure_reason}")
            for line in info.stderr_tail[-STDERR_LINES_SHOWN:]:
                print(f"    | {line}")
    return 0


def _show_rows(info: RunInfo) -> List[List[str]]:
    """A run's rows of the table: one, or with several attempts one per attempt, the newest first (the
    delivery columns, counted over the whole journal, on the first)."""
    name = info.task_id or info.name
    if info.task_id and info.task_id != info.name:  # a synced offline run beside the task's own directory
        name = f"{info.task_id} ({info.name})"
    objective = _objective(info)
    delivery = [str(info.delivered), str(info.pending), str(info.rejected)]
    problem = " (!)" if info.problems else ""
    if len(info.attempts) <= 1:
        return [[name, info.state_name + problem, _start(info.started), _duration(info.duration_s), *delivery, objective,
                 _fmt(info.last_metric), _fmt(info.best_metric), _fmt(info.final_metric), sparkline(info.metrics)]]
    rows = []
    for attempt in reversed(info.attempts):
        first = not rows
        rows.append([f"{name} #{attempt.number}" if first else f"  #{attempt.number}",
                     attempt.state_name + (problem if first else ""), _start(attempt.started), _duration(attempt.duration_s),
                     *(delivery if first else ["", "", ""]), objective if first else "",
                     _fmt(attempt.last_metric), _fmt(attempt.best_metric), _fmt(attempt.final_metric), sparkline(attempt.metrics)])
    return rows


def _objective(info: RunInfo) -> str:
    """``metric (max)``: the objective's name and which way is better, as ``ui`` shows it."""
    return f"{info.objective_name or 'metric'} ({info.objective_mode})"


def _start(ts: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _show_metrics(run_dirs: List[str], as_json: bool) -> int:
    """Each record written out as it is read: memory stays flat however long the journal is."""
    from .reader import iter_records

    out = sys.stdout
    for run_dir in run_dirs:
        records = (r for _, r in iter_records(run_dir)) if os.path.isdir(run_dir) else iter(())
        if as_json:
            _write_json_list((r.as_json() for r in records), out)
            continue
        out.write(f"# {run_dir}\n")
        out.write(f"{'time (UTC)':<19}  {'kind':<12}  {'name':<10}  {'step':>6}  {'rank':>4}  value\n")
        for r in records:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.ts or 0))
            step = "" if r.step is None else str(r.step)
            out.write(f"{stamp:<19}  {r.kind:<12}  {r.name or '-':<10}  {step:>6}  {r.rank:>4}  {r.value}\n")
    out.flush()
    return 0


def _write_json_list(items: Iterator[Dict[str, Any]], out: TextIO) -> None:
    """Write ``items`` as ``json.dumps(list(items), indent=2)`` would, one item at a time."""
    separator = "[\n  "
    for item in items:
        if item and not any(isinstance(v, (dict, list)) for v in item.values()):
            # a flat object (every record): the C encoder with indent-like separators, ~3x the speed of indent=2
            text = "{\n    " + json.dumps(item, separators=(",\n    ", ": "))[1:-1] + "\n  }"
        else:
            text = json.dumps(item, indent=2).replace("\n", "\n  ")
        out.write(separator + text)
        separator = ",\n  "
    out.write("[]\n" if separator == "[\n  " else "\n]\n")


__all__ = ["status_command", "show_command", "sparkline", "health", "oldest_pending_ts"]
