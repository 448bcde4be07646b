"""What a run directory says about its run, read without taking it over (``status``, ``show``)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .config import (
    CURSOR_FILE,
    JOURNAL_FILE,
    REJECTED_FILE,
    STATE_NAMES,
    SUMMARY_FILE,
    task_of_run_name,
)
from .cursor import count_pending, load_cursor
from .ledger import COUNTER_LOST, read_host_counters
from .osutil import count_lines, read_json
from .reader import JournalReader, iter_entries
from .record import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE, Record, read_line
from .runlock import lock_holder_pid
from .log import counted
from .policy import SendRule, skip_reason
from .runmeta import AttemptMark, Objective, attempt_segments, attempt_summary_file, better, process_alive, read_objective
from .runstatus import read_status


class _Derived:
    """What a run and each of its attempts derive from their fields (state, started, ended, last_ts, live,
    metrics, objective_mode) the same way."""

    state: Optional[int]
    started: Optional[float]
    ended: Optional[float]
    last_ts: Optional[float]
    live: bool
    metrics: List[float]
    objective_mode: str

    @property
    def state_name(self) -> str:
        return "unknown" if self.state is None else STATE_NAMES.get(self.state, str(self.state))

    @property
    def duration_s(self) -> Optional[float]:
        return _duration_s(self.started, self.ended, self.last_ts, self.live)

    @property
    def last_metric(self) -> Optional[float]:
        return self.metrics[-1] if self.metrics else None

    @property
    def best_metric(self) -> Optional[float]:
        return _best(self.metrics, self.objective_mode)

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data.update(state_name=self.state_name, duration_s=self.duration_s, last_metric=self.last_metric,
                    best_metric=self.best_metric)
        return data


@dataclass
class AttemptInfo(_Derived):
    """One attempt of a run (the same task run again appends to its journal): its records and its end."""

    number: int
    started: Optional[float] = None
    last_ts: Optional[float] = None  # the time of its last record
    ended: Optional[float] = None  # from its summary (the wrapper's), else None
    state: Optional[int] = None
    metrics: List[float] = field(default_factory=list)
    final_metric: Optional[float] = None
    exit_code: Optional[int] = None
    failure_reason: Optional[str] = None
    stderr_tail: List[str] = field(default_factory=list)
    live: bool = False  # the process that began it still runs
    objective_mode: str = "max"


def _duration_s(started: Optional[float], ended: Optional[float], last_ts: Optional[float], live: bool) -> Optional[float]:
    """Start to end when the end is known; to now while the run's process lives; else to its last record."""
    if started is None:
        return None
    if ended is not None:
        return ended - started
    if live or last_ts is None:
        return time.time() - started
    return max(last_ts - started, 0.0)


def _best(values: List[float], mode: str) -> Optional[float]:
    best: Optional[float] = None
    for value in values:
        if better(value, best, mode):
            best = value
    return best


@dataclass
class RunInfo(_Derived):
    """A run directory's state: records, delivery, task state and metrics."""

    run_dir: str
    name: str
    task_id: Optional[str] = None
    backend_url: Optional[str] = None  # where status.json says the run was delivered to
    journalled: int = 0
    pending: int = 0
    delivered: int = 0
    rejected: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    torn_lines: int = 0
    invalid: Dict[str, int] = field(default_factory=dict)  # journal lines that are not valid records, by reason
    counters: Dict[str, Dict[str, int]] = field(default_factory=dict)  # hosts' counters, e.g. COUNTER_LOST records
    paused: Optional[str] = None
    last_delivery_ts: Optional[float] = None
    last_error: Optional[str] = None
    failing_since: Optional[float] = None
    deliverer_pid: Optional[int] = None
    state: Optional[int] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    metrics: List[float] = field(default_factory=list)
    final_metric: Optional[float] = None
    exit_code: Optional[int] = None
    problems: List[str] = field(default_factory=list)
    last_ts: Optional[float] = None  # the time of the journal's last record
    live: bool = False  # the process that began the last attempt still runs
    objective_name: Optional[str] = None
    objective_mode: str = "max"  # which way the objective is better: objective.json, else ANYLEARN_OBJECTIVE_MODE
    failure_reason: Optional[str] = None  # summary.json's failure
    stderr_tail: List[str] = field(default_factory=list)
    attempts: List[AttemptInfo] = field(default_factory=list)  # read with the metrics only

    @property
    def lost(self) -> Dict[str, int]:
        """Records a writer could not journal, by reason."""
        return self.counters.get(COUNTER_LOST, {})

    def as_dict(self) -> Dict[str, Any]:
        data = super().as_dict()
        data.update(lost=self.lost, attempts=[a.as_dict() for a in self.attempts])
        return data


def is_run_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, JOURNAL_FILE)) or os.path.isfile(os.path.join(path, SUMMARY_FILE))


def recorded_task_id(run_dir: str) -> Optional[str]:
    """The task a run directory's own files say it belongs to (``status.json``, else ``summary.json``),
    whatever the directory is called; None when neither records one. Never raises."""
    status, _ = read_status(run_dir)
    if status is not None and status.task_id:
        return status.task_id
    summary = read_json(os.path.join(run_dir, SUMMARY_FILE))
    task_id = summary.get("task_id") if isinstance(summary, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def find_runs(reporter_dir: str) -> List[str]:
    """Run directories under ``reporter_dir``, newest first."""
    try:
        names = os.listdir(reporter_dir)
    except OSError:
        return []
    runs = [os.path.join(reporter_dir, n) for n in names if is_run_dir(os.path.join(reporter_dir, n))]
    return sorted(runs, key=_newest_mtime, reverse=True)


def _newest_mtime(run_dir: str) -> float:
    times = []
    for name in (JOURNAL_FILE, SUMMARY_FILE):
        try:
            times.append(os.path.getmtime(os.path.join(run_dir, name)))
        except OSError:
            pass
    return max(times, default=0.0)


def read_run(run_dir: str, rule: SendRule = SendRule(), *, with_metrics: bool = True,
             default_mode: Optional[str] = None) -> RunInfo:
    """Read what a run directory holds; unreadable parts become entries of ``problems``, never errors.

    The metrics are those ``rule`` sends (:func:`~reporter.policy.skip_reason`, the deliverer's own rule),
    so ``show`` and ``summary.json`` report the numbers that were sent.

    ``with_metrics=False`` (the ``status`` probe) counts lines instead of parsing every record, so a probe
    stays cheap on a long journal; the task state then comes from the journal's last state record.
    "Best" follows the objective's direction (``objective.json``, else ``default_mode``, else max).
    """
    run_dir = os.path.abspath(run_dir)
    info = RunInfo(run_dir=run_dir, name=os.path.basename(run_dir))
    if not os.path.isdir(run_dir):
        info.problems.append("not a directory")
        return info
    _read_objective(info, default_mode)
    journal = os.path.join(run_dir, JOURNAL_FILE)
    if not os.path.exists(journal):
        info.problems.append(f"no {JOURNAL_FILE}")
    segments = attempt_segments(run_dir)
    if with_metrics:
        _read_records(info, rule)
        _split_attempts(info, rule, segments)
    else:
        info.journalled = count_lines(journal)
        info.pending = count_pending(run_dir)
        info.state = _last_state(journal)
    _read_status_files(info)
    _read_attempt_ends(info, segments)
    return info


def _read_objective(info: RunInfo, default_mode: Optional[str]) -> None:
    objective: Optional[Objective] = read_objective(info.run_dir, default_mode)
    if objective is not None:
        info.objective_name, info.objective_mode = objective.name, objective.mode


def _read_attempt_ends(info: RunInfo, segments: List[AttemptMark]) -> None:
    """Each attempt's end from its own summary (``summary.<n>.json``; the last one's is ``summary.json``),
    and whether the process that began the last attempt still runs."""
    if segments:
        info.live = info.ended is None and process_alive(segments[-1])
    for attempt, mark in zip(info.attempts, segments):
        attempt.live = attempt is info.attempts[-1] and info.live
        summary = read_json(os.path.join(info.run_dir, attempt_summary_file(attempt.number)))
        if not isinstance(summary, dict) and attempt is info.attempts[-1]:
            summary = read_json(os.path.join(info.run_dir, SUMMARY_FILE))
            if isinstance(summary, dict) and summary.get("attempt") not in (None, attempt.number):
                summary = None
        if not isinstance(summary, dict):
            continue
        state = _typed(summary, "state", int)
        attempt.state = attempt.state if state is None else state
        attempt.started = _typed(summary, "started", float) or attempt.started
        attempt.ended = _typed(summary, "ended", float)
        attempt.exit_code = _typed(summary, "exit_code", int)
        attempt.failure_reason, attempt.stderr_tail = _failure(summary)

def _last_state(journal: str, max_bytes: int = 1 << 20) -> Optional[int]:
    """The value of the last state record within the journal's last ``max_bytes``."""
    try:
        with open(journal, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read(max_bytes)  # bounded: a device (/dev/full) would give zeros forever
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b'{"kind":"state"'):
            record = read_line(line)[0]
            if record is not None and record.kind == KIND_STATE and record.rank == 0:
                return int(record.value or 0)
    return None


def _read_records(info: RunInfo, rule: SendRule) -> None:
    run_dir = info.run_dir
    reader = JournalReader(run_dir)
    cursor = load_cursor(run_dir).offset if os.path.exists(os.path.join(run_dir, CURSOR_FILE)) else 0
    try:
        for entry in reader.entries():
            info.journalled += 1
            if entry.end_offset > cursor:
                info.pending += 1
            if entry.record is not None:
                _add_record(info, entry.record, rule)
    except OSError as exc:
        info.problems.append(f"cannot read {JOURNAL_FILE}: {exc.strerror}")
    finally:
        info.torn_lines = reader.torn_lines
        info.invalid = dict(reader.invalid)
        reader.close()
    if info.torn_lines:
        info.problems.append(f"{info.torn_lines} torn or invalid journal lines")
    if info.invalid:
        info.problems.append(counted(info.invalid, "invalid journal records skipped"))


def _read_status_files(info: RunInfo) -> None:
    run_dir = info.run_dir
    status, problem = read_status(run_dir)  # every field type-checked: a hand-edited file cannot break show
    if status is not None:
        info.task_id = status.task_id
        info.backend_url = status.backend_url
        info.delivered = status.delivered
        info.skipped = dict(status.skipped)
        info.paused = status.paused
        info.last_delivery_ts = status.last_delivery_ts
        info.last_error = status.last_error
        info.failing_since = status.failing_since
    if problem:
        info.problems.append(problem)
    info.rejected = count_lines(os.path.join(run_dir, REJECTED_FILE))
    info.deliverer_pid = lock_holder_pid(run_dir)
    info.counters = read_host_counters(run_dir)
    if info.lost:
        info.problems.append(counted(info.lost, "records could not be journalled"))

    summary = read_json(os.path.join(run_dir, SUMMARY_FILE))
    if isinstance(summary, dict):
        info.task_id = info.task_id or _typed(summary, "task_id", str)
        state = _typed(summary, "state", int)
        info.state = info.state if state is None else state
        started = _typed(summary, "started", float)
        info.started = info.started if started is None else started
        info.ended = _typed(summary, "ended", float)
        info.exit_code = _typed(summary, "exit_code", int)
        info.failure_reason, info.stderr_tail = _failure(summary)
        final_metric = summary.get("final_metric")
        if (type(final_metric) is float or type(final_metric) is int) and math.isfinite(final_metric):
            info.final_metric = float(final_metric)
    elif os.path.exists(os.path.join(run_dir, SUMMARY_FILE)):
        info.problems.append(f"{SUMMARY_FILE} is not valid JSON")
    if info.task_id is None:
        info.task_id = task_of_run_name(info.name)


def _split_attempts(info: RunInfo, rule: SendRule, segments: List[AttemptMark]) -> None:
    """The records of each attempt, split at the offsets of ``attempts.jsonl`` (one attempt without it)."""
    attempts = [AttemptInfo(number=mark.attempt, started=mark.ts, objective_mode=info.objective_mode) for mark in segments]
    info.attempts = attempts
    if len(segments) == 1:  # the common case: the whole run is the attempt, already read
        only = attempts[0]
        only.started, only.last_ts, only.metrics, only.final_metric = info.started, info.last_ts, list(info.metrics), info.final_metric
        only.state = info.state
        return
    bounds = [mark.offset for mark in segments[1:]]
    index = 0
    try:
        for entry in iter_entries(info.run_dir):
            while index < len(bounds) and entry.end_offset > bounds[index]:
                index += 1
            if entry.record is not None:
                _add_record(attempts[index], entry.record, rule)
    except OSError:
        pass  # said by the first pass


def _add_record(into: "RunInfo | AttemptInfo", record: Record, rule: SendRule) -> None:
    """Count one valid record into a run's or an attempt's times, state and metrics (what would be sent)."""
    if record.ts is not None:
        into.started = record.ts if into.started is None else min(into.started, record.ts)
        into.last_ts = record.ts if into.last_ts is None else max(into.last_ts, record.ts)
    if skip_reason(record, rule) is not None or record.value is None:
        return
    if record.kind == KIND_STATE:
        into.state = int(record.value)
    elif record.kind == KIND_INTERMEDIATE:
        into.metrics.append(float(record.value))
    elif record.kind == KIND_FINAL:
        into.final_metric = float(record.value)


def _failure(summary: Dict[str, Any]) -> "tuple[Optional[str], List[str]]":
    """The failure reason and the stderr tail a summary holds (None and [] when it ended well)."""
    failure = summary.get("failure")
    if not isinstance(failure, dict):
        return None, []
    reason = failure.get("reason")
    tail = failure.get("stderr_tail")
    lines = [str(line)[:1000] for line in tail[-20:]] if isinstance(tail, list) else []
    return (reason[:1000] if isinstance(reason, str) else None), lines


def _typed(data: Dict[str, Any], key: str, kind: type) -> Any:
    """``data[key]`` when it is a ``kind`` (an int counts as a float; a bool as neither), else None."""
    value = data.get(key)
    if type(value) is bool:
        return None
    if kind is float and type(value) is int:
        return float(value) if abs(value) < 1e15 else None
    if kind is float:
        return value if type(value) is float and -1e15 < value < 1e15 else None
    return value if isinstance(value, kind) else None
