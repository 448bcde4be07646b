"""The journal's record: its schema, and the one way back from a journal line to a :class:`Record`.

A leaf: it imports nothing from the package, so the client can speak records without the journal.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

KIND_INTERMEDIATE = "intermediate"
KIND_FINAL = "final"
KIND_STATE = "state"
RECORD_KINDS = (KIND_INTERMEDIATE, KIND_FINAL, KIND_STATE)
_RECORD_START = b'{"kind"'
MAX_KEY_CHARS = 200
MAX_TS = 1e11  # seconds since the epoch (year 5138): beyond it a time stamp is not a time
MAX_STEP = (1 << 63) - 1  # a step beyond a signed 64-bit int is journalled as null (said once), whoever reports it
MAX_NAME_CHARS = 250  # MLflow's limit on a metric key; a longer name is journalled cut to this length (said once)
INVALID_NOT_JSON = "torn or invalid line"


def clean_name(name: str) -> str:
    """A metric name as it is journalled: encodable as UTF-8 (a lone surrogate becomes its ``\\udXXX``
    escape) and at most :data:`MAX_NAME_CHARS` characters. Never raises."""
    if not name.isascii():
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name[:MAX_NAME_CHARS]


def step_in_range(step: int) -> bool:
    """Whether ``step`` fits a signed 64-bit integer, the one rule for every source of records."""
    return -MAX_STEP - 1 <= step <= MAX_STEP


def metric_number(value: Any) -> Optional[float]:
    """``value`` as one float, or None when it is not a single number: the one rule for every source.

    An int, a float or anything with ``__float__`` (numpy scalars, 0-d tensors) is a number; an int too
    large for a float is an infinity. A bool, a string, None, an array or a ``__float__`` that raises is not.
    """
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if kind is bool or isinstance(value, (str, bytes, bytearray)) or kind.__name__ in ("bool", "bool_"):
        return None
    if not hasattr(value, "__float__"):
        return None
    try:
        return float(value)
    except Exception:  # a multi-element array or tensor, or a __float__ that raises
        return None


@dataclass(frozen=True)
class Record:
    """One journal record: what a report call journalled, as read back and validated.

    The writer makes the same line by hand (see :meth:`JournalWriter.append`: an f-string is the hot
    path's cost), in the order of these fields; :func:`check_record` is the only way back from JSON.
    ``value`` is a finite float or None for a metric (a NaN or infinity is journalled as None), an int
    for a task state.
    """

    kind: str
    value: Optional[Union[float, int]]
    name: Optional[str] = None
    step: Optional[int] = None
    ts: Optional[float] = None
    rank: int = 0
    pid: Optional[int] = None
    key: str = ""

    def as_json(self) -> Dict[str, Any]:
        """The record as the journal's JSON object (for ``rejected.jsonl`` and ``show --metrics --json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

RECORD_FIELDS = tuple(f.name for f in fields(Record))


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def check_record(obj: Any) -> Tuple[Optional[Record], Optional[str]]:
    """Validate one parsed journal value: (the :class:`Record`, None) or (None, why it is not one).

    A record has a known ``kind``; ``value`` a finite number or null (a state: an int); ``step`` an int
    or null; ``name`` a string or null; ``ts`` a time or null; ``rank`` and ``pid`` ints; ``key`` a
    string an HTTP header can carry. Unknown fields are dropped. Never raises.
    """
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    kind = obj.get("kind")
    if kind not in RECORD_KINDS:
        return None, "unknown kind"
    value = obj.get("value")
    if kind == KIND_STATE:
        if type(value) is not int or not -(1 << 31) <= value < (1 << 31):
            return None, "state value is not an integer"
    elif value is not None:
        if not _is_number(value):
            return None, "value is not a number"
        try:
            value = float(value)
        except OverflowError:
            return None, "value is not a finite number"
        if not math.isfinite(value):
            return None, "value is not a finite number"
    step = obj.get("step")
    if step is not None and not _is_int(step):
        return None, "step is not an integer"
    if step is not None and not step_in_range(step):
        return None, "step is beyond a 64-bit integer"
    name = obj.get("name")
    if name is not None:
        if not isinstance(name, str):
            return None, "name is not a string"
        name = clean_name(name)
    ts = obj.get("ts")
    if ts is not None:
        if not _is_number(ts) or not -MAX_TS <= ts <= MAX_TS:
            return None, "ts is not a time"
        ts = float(ts)
    rank = obj.get("rank", 0)
    if not _is_int(rank):
        return None, "rank is not an integer"
    pid = obj.get("pid")
    if pid is not None and not _is_int(pid):
        return None, "pid is not an integer"
    key = obj.get("key", "")
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not (key.isascii() and key.isprintable() and " " not in key):
        return None, "key is not a header-safe string"
    return Record(kind, value, name, step, ts, rank, pid, key), None


_INT = rb"-?(?:0|[1-9][0-9]*)"
_NUMBER = _INT + rb"(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_PLAIN = rb'[ !#-\[\]-~]'  # printable ASCII but the quote and the backslash: a JSON string without escapes
# The exact line JournalWriter.append makes (its fields in order, a name without escapes): every group is
# then checked below by the rules of check_record, so a line this matches reads as json.loads + check_record
# would read it, for about a third of the cost. Any other line takes that slow road.
_WRITER_LINE = re.compile(
    rb'\{"kind":"(intermediate|final|state)","value":(null|' + _NUMBER + rb'),"name":(null|"' + _PLAIN + rb'*"),'
    rb'"step":(null|' + _INT + rb'),"ts":(null|' + _NUMBER + rb'),"rank":(' + _INT + rb'),"pid":(null|' + _INT + rb'),'
    rb'"key":"([!#-\[\]-~]{0,' + str(MAX_KEY_CHARS).encode() + rb'})"\}')


_KINDS = {kind.encode(): kind for kind in RECORD_KINDS}
_names: Dict[bytes, str] = {}  # a name's JSON text -> the name: a run has few names, each read many times


def _writer_line(line: bytes) -> Optional[Record]:
    """The record of a line in the writer's own shape that :func:`check_record` would take, else None."""
    match = _WRITER_LINE.fullmatch(line)
    if match is None:
        return None
    kind_b, value_b, name_b, step_b, ts_b, rank_b, pid_b, key_b = match.groups()
    kind = _KINDS[kind_b]
    value: Optional[Union[float, int]]
    if kind is KIND_STATE:
        if value_b == b"null" or b"." in value_b or b"e" in value_b or b"E" in value_b:
            return None
        value = int(value_b)
        if not -(1 << 31) <= value < (1 << 31):
            return None
    elif value_b == b"null":
        value = None
    else:
        value = float(value_b)
        if value - value != 0:  # NaN and +-inf fail x - x == 0 (an exponent beyond a float's range)
            return None
        if value == 0:
            value = float(json.loads(value_b))  # JSON reads "-0" as the int 0: a zero keeps the sign JSON gives it
    step = None if step_b == b"null" else int(step_b)
    if step is not None and len(step_b) > 18 and not step_in_range(step):
        return None
    ts = None if ts_b == b"null" else float(ts_b)
    if ts is not None:
        if not -MAX_TS <= ts <= MAX_TS:
            return None
        if ts == 0:
            ts = float(json.loads(ts_b))
    name = _names.get(name_b)
    if name is None:
        if len(_names) >= 4096:
            _names.clear()
        name = _names[name_b] = None if name_b == b"null" else clean_name(name_b[1:-1].decode("ascii"))  # type: ignore[assignment]
    return Record(kind, value, name, step, ts, int(rank_b), None if pid_b == b"null" else int(pid_b), key_b.decode("ascii"))


def read_line(line: bytes) -> Tuple[Optional[Record], Optional[str], bool]:
    """Parse and validate a journal line: (record or None, why it is not valid or None, torn). Never raises.

    A line in the writer's own shape takes a fast road (:func:`_writer_line`); any other is parsed as JSON.
    A writer killed mid-line leaves a fragment without a newline, and the next writer's record is glued
    to it. Every record starts with ``{"kind"`` and that text cannot occur inside one (JSON escapes the
    quotes of a string), so the last record of such a line is recovered and the fragment reported torn.
    """
    if line[:8] == b'{"kind":':
        record = _writer_line(line)
        if record is not None:
            return record, None, False
    obj = _loads(line)
    if obj is not _NOT_JSON:
        record, problem = check_record(obj)
        return record, problem, False
    start = line.rfind(_RECORD_START)
    if start > 0:
        obj = _loads(line[start:])
        if obj is not _NOT_JSON:
            record, problem = check_record(obj)
            return record, problem, True
    return None, INVALID_NOT_JSON, True


_NOT_JSON = object()


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers
        return _NOT_JSON
