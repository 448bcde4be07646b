"""Journal entries as Anyboard points: which records go, under which name, at which IoTDB time.

Pure functions, no I/O, no IoTDB import.

**The point's time.** The SDK inserts with no time (the server's clock), so a re-sent point would be a
second point. Ours is a function of the journal line alone::

    time = ts_ms * 1_000_000 + end_offset % 1_000_000

``ts_ms`` is the record's report time in whole milliseconds and ``end_offset`` the byte offset where its
journal line ends, which is unique and stable within one journal file. So a point re-sent after an outage,
a restart or a kill -9 gets the same time and overwrites itself (IoTDB keeps one value per device and time),
and two lines of one journal land on the same time only if they were reported in the same millisecond
*and* lie a multiple of 1 MB apart in the journal: the journal would have to grow by a megabyte within one
millisecond (about 10,000 records; the writer appends one in a few microseconds). Points keep the order of
their report times; within one millisecond they follow the journal. The value fits a signed 64-bit time
until the year 2262. It is an ordering key, not a clock: the report time is the ``walltime`` measurement,
as in the SDK. A record without a time (none is written so, but the schema allows it) takes its end offset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..policy import SKIP_NOT_A_NUMBER, SKIP_OTHER_RANK, line_skip_reason
from ..reader import JournalEntry
from ..record import KIND_INTERMEDIATE

OFFSET_SLOTS = 1_000_000  # time slots per millisecond: the journal may grow this many bytes in 1 ms
SKIP_NOT_A_CURVE = "not an intermediate metric (a final metric or a state)"
_INVALID_NAME_CHARACTERS = re.compile(r"[^-/\w.]")  # the SDK's rule (TensorBoard's tag rule)


@dataclass(frozen=True)
class Point:
    """One scalar of a task in IoTDB: its device, time and the three measurements the SDK writes."""

    device: str
    time: int
    walltime: int  # ms since the epoch, when it was reported
    step: Optional[int]  # None: the report had no step, and the point has no step measurement
    value: float


def clean_metric_name(name: str) -> str:
    """A metric name as the SDK cleans it: every character outside ``[-/\\w.]`` becomes ``_`` and leading
    ``/`` are dropped. A name left empty becomes ``_`` (the SDK would write an invalid path)."""
    return _INVALID_NAME_CHARACTERS.sub("_", name).lstrip("/") or "_"


def series_name(name: str, rank: int) -> str:
    """The cleaned name of one rank's curve: rank 0 keeps the name, rank n writes ``{name}/rank{n}``.

    With ``ANYLEARN_REPORT_RANKS=all`` every rank has its own device, so ranks never overwrite each other,
    and ``loss/rank1`` sits beside ``loss`` in the platform's views that group names by ``/``.
    """
    cleaned = clean_metric_name(name)
    return cleaned if rank == 0 else f"{cleaned}/rank{rank}"


def device_path(device_prefix: str, name: str) -> str:
    """``{prefix}.scalar.`{name}``` for a cleaned name (a cleaned name holds no backquote)."""
    return f"{device_prefix}.scalar.`{name}`"


def point_time(ts: Optional[float], end_offset: int) -> int:
    """The IoTDB time of a journal line (see the module's docstring): deterministic, unique per journal."""
    if ts is None:
        return end_offset
    return int(ts * 1000) * OFFSET_SLOTS + end_offset % OFFSET_SLOTS


def to_points(entries: Sequence[JournalEntry], device_prefix: str, *, report_all_ranks: bool = False,
              unnamed: str = "metric") -> Tuple[List[Point], Dict[str, int]]:
    """The points of ``entries`` in journal order, and how many entries were skipped, by reason.

    Every intermediate metric goes, whatever its name (rank 0 only unless ``report_all_ranks``); an unnamed
    one goes under ``unnamed`` (the objective metric's name). NaN and infinities (journalled as null), final
    metrics, states and invalid lines are skipped and counted.
    """
    points: List[Point] = []
    skipped: Dict[str, int] = {}
    devices: Dict[Tuple[Optional[str], int], str] = {}
    for entry in entries:
        record = entry.record
        reason = None
        if record is None:
            reason = line_skip_reason(entry.problem)
        elif record.kind != KIND_INTERMEDIATE:
            reason = SKIP_NOT_A_CURVE
        elif record.rank != 0 and not report_all_ranks:
            reason = SKIP_OTHER_RANK
        elif record.value is None or not math.isfinite(record.value):
            reason = SKIP_NOT_A_NUMBER
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        key = (record.name, record.rank)
        device = devices.get(key)
        if device is None:
            device = devices[key] = device_path(device_prefix, series_name(
                unnamed if record.name is None else record.name, record.rank))
        walltime = int(record.ts * 1000) if record.ts is not None else 0
        points.append(Point(device, point_time(record.ts, entry.end_offset), walltime, record.step,
                            float(record.value)))
    return points, skipped


__all__ = ["Point", "clean_metric_name", "series_name", "device_path", "point_time", "to_points",
           "OFFSET_SLOTS", "SKIP_NOT_A_CURVE"]
