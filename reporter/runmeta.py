"""Small files a run directory keeps about its run, beside the journal: the objective (``objective.json``)
and the attempts (``attempts.jsonl``).

``objective.json`` names the objective metric and which way it is better (``min``/``max``), so ``show``,
``status`` and ``ui`` call the right value "best". An integration writes it when it settles its objective;
the hook and the wrapper write it from ``ANYLEARN_OBJECTIVE_MODE`` when no integration did.

``attempts.jsonl`` splits one journal into attempts (the same task run again appends to its journal): one
line per attempt, ``{"attempt": n, "offset": journal bytes before it, "ts", "pid", "proc", "host"}``. The
wrapper appends one at every launch; the in-process hook of a run without the wrapper appends one at its
first report when the process of the last attempt has ended (a new process after the last one ended).
Readers give the records from one line's offset to the next line's to that attempt; records before the
first line (a journal older than this file) are an attempt of their own. Writing never raises: a run
without this file is read as one attempt.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import List, Optional

from .config import ATTEMPTS_FILE, JOURNAL_FILE, OBJECTIVE_FILE
from .osutil import atomic_write_json, read_json

MODES = ("min", "max")
HOST_RUN = "run"
HOST_HOOK = "hook"
_MAX_ATTEMPTS_BYTES = 1 << 20  # far above any real count of attempts; a bigger file is not read


# --- the objective ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """The objective metric's name (None when unknown) and direction (``min`` or ``max``)."""

    name: Optional[str]
    mode: str
    source: str = ""


def write_objective(run_dir: str, name: Optional[str], mode: str, source: str, *, replace: bool = True) -> bool:
    """Write ``objective.json``; with ``replace=False`` keep one already there. Never raises; True when written."""
    path = os.path.join(run_dir, OBJECTIVE_FILE)
    if mode not in MODES:
        return False
    if not replace and os.path.exists(path):
        return False
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(path, {"name": name, "mode": mode, "source": source})
        return True
    except OSError:
        return False


def read_objective(run_dir: str, default_mode: Optional[str] = None) -> Optional[Objective]:
    """The run's objective from ``objective.json``; else, with ``default_mode`` (the reader's own
    ``ANYLEARN_OBJECTIVE_MODE``), an unnamed objective of that direction; else None (best = maximum)."""
    data = read_json(os.path.join(run_dir, OBJECTIVE_FILE))
    if isinstance(data, dict) and data.get("mode") in MODES:
        name = data.get("name")
        source = data.get("source")
        return Objective(name[:250] if isinstance(name, str) else None, data["mode"], source if isinstance(source, str) else "")
    if default_mode in MODES:
        return Objective(None, default_mode, "ANYLEARN_OBJECTIVE_MODE")
    return None


def better(value: float, than: Optional[float], mode: str) -> bool:
    """Whether ``value`` beats ``than`` (None: anything does) for an objective of direction ``mode``."""
    return than is None or (value < than if mode == "min" else value > than)


# --- attempts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptMark:
    """Where one attempt starts in the journal (``offset``), when, and which process began it."""

    attempt: int
    offset: int
    ts: Optional[float] = None
    pid: Optional[int] = None
    proc: Optional[str] = None  # "<pid>:<start time>", so a reused pid is not taken for the same process
    host: str = ""


def process_identity(pid: int) -> Optional[str]:
    """``"<pid>:<start time in clock ticks>"`` from ``/proc``, or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
        fields = stat[stat.rindex(b")") + 2:].split()
        return f"{pid}:{int(fields[19])}"
    except (OSError, ValueError, IndexError):
        return None


def process_alive(mark: AttemptMark) -> bool:
    """Whether the process that began ``mark`` still runs (same pid and start time where known)."""
    if mark.pid is None:
        return False
    if mark.proc is not None:
        return process_identity(mark.pid) == mark.proc
    try:
        os.kill(mark.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process of that pid
    return mark.pid != os.getpid()


def read_marks(run_dir: str) -> List[AttemptMark]:
    """The attempts' marks, in order of offset; unreadable lines are skipped. Never raises."""
    try:
        with open(os.path.join(run_dir, ATTEMPTS_FILE), "rb") as f:
            data = f.read(_MAX_ATTEMPTS_BYTES)
    except OSError:
        return []
    marks: List[AttemptMark] = []
    for line in data.split(b"\n"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        offset = obj.get("offset")
        if type(offset) is not int or offset < 0:
            continue
        ts, pid, proc, host = obj.get("ts"), obj.get("pid"), obj.get("proc"), obj.get("host")
        marks.append(AttemptMark(
            attempt=len(marks) + 1,
            offset=offset,
            ts=float(ts) if type(ts) in (int, float) else None,
            pid=pid if type(pid) is int else None,
            proc=proc if isinstance(proc, str) else None,
            host=host if isinstance(host, str) else "",
        ))
    marks.sort(key=lambda m: m.offset)
    return marks


def attempt_segments(run_dir: str) -> List[AttemptMark]:
    """The attempts as marks in journal order, the first starting at offset 0: a run without marks is one
    attempt (number 1); of several marks at one offset the last counts (the earlier attempts journalled
    nothing)."""
    marks = read_marks(run_dir)
    segments: List[AttemptMark] = []
    for mark in marks:
        if segments and segments[-1].offset == mark.offset:
            segments[-1] = mark
        else:
            segments.append(mark)
    if not segments or segments[0].offset > 0:
        segments.insert(0, AttemptMark(attempt=1 if not segments else 0, offset=0))
    return segments


def mark_attempt(run_dir: str, host: str, *, only_if_ended: bool = False) -> Optional[int]:
    """Append the mark of a new attempt starting at the journal's current end; returns its number, or None
    when nothing was written (``only_if_ended`` and the last attempt's process still runs, or an error)."""
    try:
        marks = read_marks(run_dir)
        if only_if_ended and marks and process_alive(marks[-1]):
            return None
        try:
            offset = os.path.getsize(os.path.join(run_dir, JOURNAL_FILE))
        except OSError:
            offset = 0
        pid = os.getpid()
        lines = []
        if not marks and offset > 0:  # records journalled before this file existed: the first attempt
            lines.append({"attempt": 1, "offset": 0, "ts": None, "pid": None, "proc": None, "host": "earlier"})
        number = len(marks) + len(lines) + 1
        lines.append({"attempt": number, "offset": offset, "ts": time.time(), "pid": pid,
                      "proc": process_identity(pid), "host": host})
        fd = os.open(os.path.join(run_dir, ATTEMPTS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(json.dumps(line) + "\n" for line in lines).encode())
        finally:
            os.close(fd)
        return number
    except OSError:
        return None


def attempt_summary_file(attempt: int) -> str:
    """The name of an attempt's own copy of ``summary.json`` (``summary.json`` is the last attempt's)."""
    return f"summary.{attempt}.json"


__all__ = [
    "Objective", "AttemptMark", "write_objective", "read_objective", "better", "read_marks", "attempt_segments",
    "mark_attempt", "attempt_summary_file", "process_identity", "process_alive",
]
