"""``status.json``: the deliverer's account of a run, one dataclass as its schema.

Written by the delivery engine (:class:`~reporter.deliver.Deliverer`), read by the next deliverer of the
run, by ``status``, ``show`` and the wrapper's ``summary.json``. Reading checks every field's type: a
hand-edited or half-written file gives defaults for what does not read, never an exception.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from .config import STATUS_FILE
from .osutil import atomic_write_json, read_json


@dataclass
class DeliveryStatus:
    """What ``status.json`` holds; every time is seconds since the epoch."""

    task_id: Optional[str] = None
    backend_url: Optional[str] = None
    deliverer_pid: Optional[int] = None
    deliverer_started: Optional[float] = None
    cursor: int = 0  # bytes of the journal acknowledged
    delivered: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)  # records not sent, by reason
    counters: Dict[str, Dict[str, int]] = field(default_factory=dict)  # hosts' counters, e.g. "lost" records
    paused: Optional[str] = None  # why delivery is paused (a rejected key, a redirect)
    state_reporting: bool = True
    last_delivery_ts: Optional[float] = None
    last_error: Optional[str] = None
    last_error_ts: Optional[float] = None
    failing_since: Optional[float] = None
    updated: Optional[float] = None
    running: bool = False
    sinks: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # other destinations' sections, by name

    def to_json(self) -> Dict[str, Any]:
        """The JSON object written to ``status.json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "DeliveryStatus":
        """Read a ``status.json`` object field by field; a field of the wrong type keeps its default."""
        status = cls()
        if not isinstance(data, dict):
            return status
        for f in fields(cls):
            if f.name in data:
                value = _CHECKS[f.name](data[f.name])
                if value is not _BAD:
                    setattr(status, f.name, value)
        return status


_BAD = object()


def _text(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else _BAD


def _pid(value: Any) -> Any:
    return value if value is None or (type(value) is int and value > 0) else _BAD


def _count(value: Any) -> Any:
    return value if type(value) is int and value >= 0 else _BAD


def _time(value: Any) -> Any:
    if value is None:
        return None
    if (type(value) is float or type(value) is int) and math.isfinite(value) and abs(value) < 1e11:
        return float(value)
    return _BAD


def _flag(value: Any) -> Any:
    return value if type(value) is bool else _BAD


def _counts(value: Any) -> Any:
    if not isinstance(value, dict):
        return _BAD
    return {k: n for k, n in value.items() if isinstance(k, str) and type(n) is int and n >= 0}


def _categories(value: Any) -> Any:
    if not isinstance(value, dict):
        return _BAD
    return {k: _counts(v) for k, v in value.items() if isinstance(k, str) and isinstance(v, dict)}


def _sections(value: Any) -> Any:
    if not isinstance(value, dict):
        return _BAD
    return {k: dict(v) for k, v in value.items() if isinstance(k, str) and isinstance(v, dict)}


_CHECKS = {
    "task_id": _text, "backend_url": _text, "deliverer_pid": _pid, "deliverer_started": _time, "cursor": _count,
    "delivered": _count, "skipped": _counts, "counters": _categories, "paused": _text, "state_reporting": _flag,
    "last_delivery_ts": _time, "last_error": _text, "last_error_ts": _time, "failing_since": _time,
    "updated": _time, "running": _flag, "sinks": _sections,
}


def read_status(run_dir: str) -> Tuple[Optional[DeliveryStatus], Optional[str]]:
    """The run's ``status.json``: (status, None), (None, None) when there is none yet, or (None, problem)."""
    path = os.path.join(run_dir, STATUS_FILE)
    data = read_json(path)
    if data is None:
        return None, (f"{STATUS_FILE} is not valid JSON" if os.path.exists(path) else None)
    if not isinstance(data, dict):
        return None, f"{STATUS_FILE} is not a JSON object"
    return DeliveryStatus.from_json(data), None


def write_status(run_dir: str, status: DeliveryStatus) -> None:
    """Replace the run's ``status.json`` atomically (raises OSError; the engine counts it)."""
    atomic_write_json(os.path.join(run_dir, STATUS_FILE), status.to_json())


__all__ = ["DeliveryStatus", "read_status", "write_status"]
