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
from .journal import (
    KIND_FINAL,
    KIND_INTERMEDIATE,
    KIND_STATE,
    JournalReader,
    count_lines,
    count_pending,
    load_cursor,
    lock_holder_pid,
    parse_line,
    read_host_counters,
    read_json,
)
from .log import counted
from .policy import SendRule, skip_reason
from .runstatus import read_status


@dataclass
class RunInfo:
    """A run directory's state: records, delivery, task state and metrics."""

    run_dir: str
    name: str
    task_id: Optional[str] = None
    journalled: int = 0
    pending: int = 0
    delivered: int = 0
    rejected: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    torn_lines: int = 0
    invalid: Dict[str, int] = field(default_factory=dict)  # journal lines that are not valid records, by reason
    counters: Dict[str, Dict[str, int]] = field(default_factory=dict)  # hosts' counters, e.g. "lost" records
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

    @property
    def state_name(self) -> str:
        return "unknown" if self.state is None else STATE_NAMES.get(self.state, str(self.state))

    @property
    def duration_s(self) -> Optional[float]:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started

    @property
    def lost(self) -> Dict[str, int]:
        """Records a writer could not journal, by reason."""
        return self.counters.get("lost", {})

    @property
    def last_metric(self) -> Optional[float]:
        return self.metrics[-1] if self.metrics else None

    @property
    def best_metric(self) -> Optional[float]:
        return max(self.metrics) if self.metrics else None

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data.update(state_name=self.state_name, duration_s=self.duration_s, last_metric=self.last_metric,
                    best_metric=self.best_metric, lost=self.lost)
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


def read_run(run_dir: str, rule: SendRule = SendRule(), *, with_metrics: bool = True) -> RunInfo:
    """Read what a run directory holds; unreadable parts become entries of ``problems``, never errors.

    The metrics are those ``rule`` sends (:func:`~reporter.policy.skip_reason`, the deliverer's own rule),
    so ``show`` and ``summary.json`` report the numbers that were sent.

    ``with_metrics=False`` (the ``status`` probe) counts lines instead of parsing every record, so a probe
    stays cheap on a long journal; the task state then comes from the journal's last state record.
    """
    run_dir = os.path.abspath(run_dir)
    info = RunInfo(run_dir=run_dir, name=os.path.basename(run_dir))
    if not os.path.isdir(run_dir):
        info.problems.append("not a directory")
        return info
    journal = os.path.join(run_dir, JOURNAL_FILE)
    if not os.path.exists(journal):
        info.problems.append(f"no {JOURNAL_FILE}")
    if with_metrics:
        _read_records(info, rule)
    else:
        info.journalled = count_lines(journal)
        info.pending = count_pending(run_dir)
        info.state = _last_state(journal)
    _read_status_files(info)
    return info


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
            record, _ = parse_line(line)
            if record is not None and record.kind == KIND_STATE and record.rank == 0:
                return int(record.value or 0)
    return None


def _read_records(info: RunInfo, rule: SendRule) -> None:
    run_dir = info.run_dir
    reader = JournalReader(run_dir)
    cursor = load_cursor(run_dir) if os.path.exists(os.path.join(run_dir, CURSOR_FILE)) else 0
    try:
        while True:
            entries = reader.read_available(max_records=10_000)
            if not entries:
                break
            for entry in entries:
                info.journalled += 1
                if entry.end_offset > cursor:
                    info.pending += 1
                record = entry.record
                if record is None:
                    continue
                if record.ts is not None:
                    info.started = record.ts if info.started is None else min(info.started, record.ts)
                if skip_reason(record, rule) is not None or record.value is None:
                    continue
                if record.kind == KIND_STATE:
                    info.state = int(record.value)
                elif record.kind == KIND_INTERMEDIATE:
                    info.metrics.append(float(record.value))
                elif record.kind == KIND_FINAL:
                    info.final_metric = float(record.value)
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
        final_metric = summary.get("final_metric")
        if (type(final_metric) is float or type(final_metric) is int) and math.isfinite(final_metric):
            info.final_metric = float(final_metric)
    elif os.path.exists(os.path.join(run_dir, SUMMARY_FILE)):
        info.problems.append(f"{SUMMARY_FILE} is not valid JSON")
    if info.task_id is None:
        info.task_id = task_of_run_name(info.name)


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
