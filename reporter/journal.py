"""The run directory on disk: the append-only journal, its cursor, the rejected file and the deliver lock.

Every record is one JSON line written with a single ``os.write`` on an ``O_APPEND`` descriptor, so
several processes can append at once without interleaving, and a record is in the kernel's hands the
moment the report call returns (it survives a ``kill -9`` of the writer).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import glob
import itertools
import json
import math
import os
import stat
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple, Union

from .config import CURSOR_FILE, JOURNAL_FILE, LOCK_FILE, REJECTED_FILE
from .log import get_logger

KIND_INTERMEDIATE = "intermediate"
KIND_FINAL = "final"
KIND_STATE = "state"
RECORD_KINDS = (KIND_INTERMEDIATE, KIND_FINAL, KIND_STATE)
_RECORD_START = b'{"kind"'
_READ_CHUNK_BYTES = 1 << 16
MAX_LINE_BYTES = 1 << 20  # far above any line a writer makes (a name is cut to 250 characters): a longer one is skipped
INVALID_TOO_LONG = f"line longer than {MAX_LINE_BYTES} bytes"
INVALID_NOT_REGULAR = "the journal is not a regular file"
MAX_KEY_CHARS = 200
MAX_TS = 1e11  # seconds since the epoch (year 5138): beyond it a time stamp is not a time
COUNTERS_FILE_GLOB = "counters.*.json"
COUNTERS_SAVE_INTERVAL_S = 1.0
COUNTER_LOST = "lost"  # records a writer could not journal, by reason
COUNTER_UNREADABLE = "unreadable"  # output lines a host could not read a metric from, by kind of line
COUNTER_LOG_WRITE_FAILED = "log_write_failed"  # writes of the wrapper's stdout.log/stderr.log that failed, by file
MAX_STEP = (1 << 63) - 1  # a step beyond a signed 64-bit int is journalled as null (said once), whoever reports it
MAX_NAME_CHARS = 250  # MLflow's limit on a metric key; a longer name is journalled cut to this length (said once)


def clean_name(name: str) -> str:
    """A metric name as it is journalled: encodable as UTF-8 (a lone surrogate becomes its ``\\udXXX``
    escape) and at most :data:`MAX_NAME_CHARS` characters. Never raises."""
    if not name.isascii():
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name[:MAX_NAME_CHARS]


MAX_CACHED_NAMES = 4096  # the writer keeps this many names' JSON text at most
JOURNAL_CHECK_INTERVAL_S = 0.25  # how often a writer looks whether its path still names its file (not per report)


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


_said: set = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        get_logger().warning("%s (said once)", message)


def atomic_write(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``: write a temporary file beside it, fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str) -> Optional[Any]:
    """Return the JSON in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


class JournalWriter:
    """Appends records to ``metrics.jsonl``; the hot path of every report call.

    Never raises for disk trouble: a record that cannot be written is counted in :attr:`lost` with its
    reason and warned about once. Safe across ``fork``: a child gets its own pid and idempotency-key
    prefix, so keys stay unique.
    """

    def __init__(
        self, run_dir: str, *, rank: int = 0, on_non_finite: Optional[Callable[[Optional[str], Any], None]] = None
    ) -> None:
        self.run_dir = run_dir
        self.on_non_finite = on_non_finite
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.rank = rank
        self.counters = HostCounters(run_dir)
        self.lost: Dict[str, int] = self.counters.category(COUNTER_LOST)
        self.last_append_ts = 0.0
        self._fd = -1
        self._retry_open_at = 0.0  # after a failed open, retry at most once a second (not on every call)
        self._names: Dict[Optional[str], str] = {None: "null"}
        self._pid = -1
        self._prefix = ""
        self._counter: Iterator[int] = itertools.count()
        # An RLock and a busy flag, not a plain lock: a report from a signal handler runs in the thread
        # that may be inside _open already; it must find out and defer its record, never wait on itself.
        self._open_lock = threading.RLock()
        self._opening = False
        self._deferred: Deque[Tuple[str, Any, Optional[str], Optional[int], float]] = collections.deque()
        self._checked_at = 0.0  # when the path was last compared with the open file (wall time of a report)
        self.earlier_files: Dict[int, int] = {}  # inode -> size: journal files this process wrote before they were replaced
        self._reset_identity()
        register_fork_hook(self, JournalWriter._reset_identity)

    def _reset_identity(self) -> None:
        self._pid = os.getpid()
        self._prefix = f"{os.urandom(6).hex()}-{self._pid}-"  # os.urandom: `secrets` costs the import 4 ms
        self._counter = itertools.count(1)
        self.earlier_files = {}  # a forked child has written nothing yet

    def _open(self) -> Optional[bool]:
        """Open the journal: True when open, False when it cannot be, None when this thread is opening it
        already (re-entered from a signal handler)."""
        with self._open_lock:
            if self._opening:
                return None
            self._opening = True
            try:
                if self._fd >= 0:
                    return True
                now = time.monotonic()
                if now < self._retry_open_at:
                    self.count_lost(self._open_failure)
                    return False
                try:
                    os.makedirs(self.run_dir, exist_ok=True)
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
                    self._retry_open_at = now + 1.0
                    self._open_failure = f"cannot open the journal ({getattr(exc, 'strerror', None) or exc})"
                    self.count_lost(self._open_failure)
                    return False
                self._fd = fd
                return True
            finally:
                self._opening = False

    def _follow_path(self, now: float) -> None:
        """Reopen the journal when its path no longer names the open file (renamed by log rotation, or
        deleted): later records go to the file the path names (made anew). The descriptor number stays
        (``dup2``), so a thread writing at this moment writes whole lines into one file or the other."""
        self._checked_at = now
        with self._open_lock:
            if self._opening or self._fd < 0:
                return
            self._opening = True
            try:
                try:
                    named: Optional[os.stat_result] = os.stat(self.path)
                except OSError:
                    named = None
                own = os.fstat(self._fd)
                if named is not None and (named.st_ino, named.st_dev) == (own.st_ino, own.st_dev):
                    return
                os.makedirs(self.run_dir, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                old = os.dup(self._fd)
                try:
                    os.dup2(fd, self._fd, inheritable=False)
                    self.earlier_files[own.st_ino] = os.fstat(old).st_size
                finally:
                    os.close(old)
                    os.close(fd)
                get_logger().warning(
                    "the journal %s was renamed or deleted under this process; journalling into a new file there "
                    "(a deliverer that has the old file open delivers it to its end first)", self.path,
                )
            except (OSError, ValueError):
                pass  # keep writing the open file; looked at again later
            finally:
                self._opening = False
        self._drain_deferred()

    def _drain_deferred(self) -> None:
        while self._deferred:
            try:
                record = self._deferred.popleft()
            except IndexError:  # another report took it
                return
            self.append(*record)

    def written_files(self) -> Dict[int, int]:
        """Every journal file this process appended to, by inode, with the byte offset its records end
        before (the end of the last whole line there now): what :func:`reporter.flush` waits for."""
        files = dict(self.earlier_files)
        fd = self._fd
        if fd >= 0:
            try:
                info = os.fstat(fd)
                files[info.st_ino] = info.st_size
                # The descriptor is write-only: read the same file (even a deleted one) through /proc.
                reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    files[info.st_ino] = whole_lines_end(reader)
                finally:
                    os.close(reader)
            except OSError:
                pass
        return files

    _open_failure = "cannot open the journal"

    def count_lost(self, reason: str) -> None:
        """Count one record that could not be journalled (warned about once per reason)."""
        if self.counters.count(COUNTER_LOST, reason):
            get_logger().warning("a record could not be journalled in %s: %s", self.run_dir, reason)

    def append(
        self, kind: str, value: Any, name: Optional[str], step: Optional[int], ts: Optional[float] = None
    ) -> Optional[str]:
        """Journal one record and return its idempotency key (None when it could not be written).

        ``value`` is a float (NaN and infinities are written as null), an int for state records, or None.
        ``ts`` is the record's wall time when it is not now (a scalar read from a TensorBoard event file).
        """
        if self._pid != os.getpid():
            self._reset_identity()
        if self._fd < 0:
            opened = self._open()
            if opened is None:  # a signal handler's report while this thread opens the journal: written after
                self._deferred.append((kind, value, name, step, time.time() if ts is None else ts))
                return None
            if not opened:
                return None
            key = self.append(kind, value, name, step, ts)
            self._drain_deferred()
            return key
        name_json = self._names.get(name)
        if name_json is None:
            cleaned = name if name is None else clean_name(name)
            if cleaned is not None and len(cleaned) < len(name):  # type: ignore[arg-type]
                _say_once(f"a metric name longer than {MAX_NAME_CHARS} characters was journalled cut to its first {MAX_NAME_CHARS}")
            if len(self._names) >= MAX_CACHED_NAMES:  # a name per step must not grow the process for ever
                self._names.clear()
            name_json = self._names[name] = json.dumps(cleaned)
        if step is not None and not step_in_range(step):
            _say_once("a step beyond a 64-bit integer was journalled as null")
            step = None
        if value is None or value - value != 0:  # NaN and +-inf fail x - x == 0
            value_text = "null"
            if value is not None and self.on_non_finite is not None:
                self.on_non_finite(name, value)
        else:
            value_text = repr(value)
        key = f"{self._prefix}{next(self._counter)}"
        self.last_append_ts = now = time.time()
        if not self._checked_at <= now < self._checked_at + JOURNAL_CHECK_INTERVAL_S:  # a float compare per report
            self._follow_path(now)
        line = (  # a Record's fields in order, made by hand: the hot path's cost (read back by check_record)
            f'{{"kind":"{kind}","value":{value_text},"name":{name_json},'
            f'"step":{"null" if step is None else step},"ts":{now if ts is None else ts!r},'
            f'"rank":{self.rank},"pid":{self._pid},"key":"{key}"}}\n'
        )
        data = line.encode()
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self.count_lost(errno.errorcode.get(exc.errno or 0, "OSError") + f" ({exc.strerror})")
            return None
        if written != len(data):  # a full disk cut the line: readers skip the fragment as torn
            self.count_lost("short write (is the disk full?)")
            return None
        return key

    def close(self) -> None:
        """Close the descriptor (a later append reopens it) and save the loss counters."""
        self.counters.save()
        with self._open_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def register_fork_hook(obj: Any, method: Any) -> None:
    """Run ``method(obj)`` in every forked child while ``obj`` lives (a weak reference: no leak)."""
    ref = weakref.WeakMethod(getattr(obj, method.__name__))

    def _after_fork() -> None:
        bound = ref()
        if bound is not None:
            bound()

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)


class HostCounters:
    """Counters a host process keeps for its run: ``{category: {reason: count}}`` (e.g. ``lost``).

    Saved to ``counters.<pid>.json`` in the run directory when a reason first appears, then at most
    once a second while counting and on :meth:`save`; the deliverer (whichever process it runs in)
    folds every process's file into ``status.json``, and ``status``/``summary.json`` show them. Saving
    never raises: a run directory that cannot be written keeps the counts in memory (and in the exit log).
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.values: Dict[str, Dict[str, int]] = {}
        self._saved_at = 0.0
        self._dirty = False

    def category(self, name: str) -> Dict[str, int]:
        """The live ``{reason: count}`` dict of one category."""
        return self.values.setdefault(name, {})

    def count(self, category: str, reason: str, n: int = 1) -> bool:
        """Add ``n`` to ``category``/``reason``; True when that reason is new (say it once)."""
        counts = self.category(category)
        first = reason not in counts
        counts[reason] = counts.get(reason, 0) + n
        self._dirty = True
        now = time.monotonic()
        if first or now - self._saved_at >= COUNTERS_SAVE_INTERVAL_S:
            self._saved_at = now
            self.save()
        return first

    def save(self) -> None:
        """Write the counters file now (if anything was counted); never raises."""
        if not self._dirty:
            return
        path = os.path.join(self.run_dir, f"counters.{os.getpid()}.json")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write(path, json.dumps(self.values).encode(), fsync=False)
            self._dirty = False
        except (OSError, ValueError):
            pass


def read_host_counters(run_dir: str) -> Dict[str, Dict[str, int]]:
    """Every host process's counters of a run, summed: ``{category: {reason: count}}``; never raises."""
    total: Dict[str, Dict[str, int]] = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), COUNTERS_FILE_GLOB)):
        data = read_json(path)
        if not isinstance(data, dict):
            continue
        for category, counts in data.items():
            if not isinstance(category, str) or not isinstance(counts, dict):
                continue
            into = total.setdefault(category, {})
            for reason, n in counts.items():
                if isinstance(reason, str) and type(n) is int and n > 0:
                    into[reason] = into.get(reason, 0) + n
    return total


# --- reading ---------------------------------------------------------------------------------------

INVALID_NOT_JSON = "torn or invalid line"


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


@dataclass
class JournalEntry:
    """One line of the journal: its end offset and the record, or None and why the line was not valid."""

    end_offset: int
    record: Optional[Record]
    problem: Optional[str] = None


def read_line(line: bytes) -> Tuple[Optional[Record], Optional[str], bool]:
    """Parse and validate a journal line: (record or None, why it is not valid or None, torn). Never raises.

    A writer killed mid-line leaves a fragment without a newline, and the next writer's record is glued
    to it. Every record starts with ``{"kind"`` and that text cannot occur inside one (JSON escapes the
    quotes of a string), so the last record of such a line is recovered and the fragment reported torn.
    """
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


def parse_line(line: bytes) -> Tuple[Optional[Record], bool]:
    """Parse a journal line into (a valid record or None, torn); see :func:`read_line`."""
    record, problem, torn = read_line(line)
    return record, torn or (problem is not None)


_NOT_JSON = object()


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and over-long integers
        return _NOT_JSON


class JournalReader:
    """Reads whole records after a byte offset, following the file as it grows."""

    def __init__(self, run_dir: str, offset: int = 0) -> None:
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.offset = offset
        self.torn_lines = 0
        self.truncations = 0  # times the file was found truncated in place and read again from its start
        self.invalid: Dict[str, int] = {}  # whole lines that are not valid records, by reason
        self.not_regular = False  # a device, a FIFO...: never followed (/dev/full would be read forever)
        self._fd = -1
        self._scanned_to = -1  # how far a long line after :attr:`offset` was searched for its newline
        self._head: Optional[int] = None  # the file's mark (journal_head) once its first line was read
        self._at_end = False  # the last read reached the end of the file

    def _ensure_open(self) -> bool:
        if self.not_regular:
            return False
        if self._fd < 0:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                self.not_regular = True
                self.invalid[INVALID_NOT_REGULAR] = 1
                get_logger().warning("%s is not a regular file: it is not read (nothing in it can be delivered)", self.path)
                return False
            self._fd = fd
        return True

    def head(self) -> Optional[int]:
        """The mark of the file being read (see :func:`journal_head`; None before it is opened)."""
        return journal_head(self._fd) if self._fd >= 0 else None

    @property
    def ino(self) -> Optional[int]:
        """The inode number of the file being read (None before it is opened)."""
        return os.fstat(self._fd).st_ino if self._fd >= 0 else None

    def replaced(self) -> bool:
        """Whether the journal's path now names another file than the one being read (deleted and made
        again, or renamed away by log rotation). Two ``stat`` calls: look only when idle at the end."""
        if self._fd < 0:
            return False
        try:
            named = os.stat(self.path)
        except OSError:  # gone: keep the open file; a new one is taken when it appears
            return False
        own = os.fstat(self._fd)
        return (named.st_ino, named.st_dev) != (own.st_ino, own.st_dev)

    def follow_replacement(self) -> None:
        """Leave the file being read (call once it is read to its end) for the one the path names now,
        from its start."""
        left = os.fstat(self._fd).st_size - self.offset if self._fd >= 0 else 0
        get_logger().warning(
            "the journal %s was replaced (deleted or renamed); following the new file from its start%s",
            self.path, f" ({left} unterminated bytes at the end of the old one are skipped)" if left > 0 else "",
        )
        self.close()
        self.offset = 0
        self._scanned_to = -1
        self._head = None
        self._ensure_open()

    def size(self) -> int:
        """Current size of the journal in bytes (0 when it does not exist yet)."""
        if not self._ensure_open():
            return 0
        return os.fstat(self._fd).st_size

    def read_available(self, max_records: int = 1000) -> List[JournalEntry]:
        """Return the whole lines after :attr:`offset` (advancing it), at most ``max_records``.

        An unterminated last line is left for later: it is either being written or torn; a later writer
        starts on a new line, and the torn text is then skipped with a warning.
        """
        if not self._ensure_open():
            return []
        if self._at_end and self._head is not None and self.offset > 0 and journal_head(self._fd) != self._head:
            # Read to its end before, and now another first line: truncated and written again past the offset
            # (a line end there by chance). Looked at once per call after the end, not per record.
            self._restart_truncated()
        self._at_end = False
        entries: List[JournalEntry] = []
        while len(entries) < max_records:
            if self.offset > 0:
                # The byte before the offset comes along in the same read: it is the newline of the last
                # line read, unless the journal was truncated in place (and written again) since.
                chunk = os.pread(self._fd, _READ_CHUNK_BYTES + 1, self.offset - 1)
                if chunk[:1] != b"\n":
                    if entries:
                        break  # hand over what was read; the next call starts the new journal
                    self._restart_truncated()
                    continue
                chunk = chunk[1:]
            else:
                chunk = os.pread(self._fd, _READ_CHUNK_BYTES, 0)
            if not chunk:
                self._at_end = True
                break
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                if len(chunk) < _READ_CHUNK_BYTES:
                    self._at_end = True
                    break  # an unterminated tail
                long_line = self._read_long_line()
                if long_line is None:
                    break
                if isinstance(long_line, int):  # too long to hold: skipped unread, up to its newline
                    start, self.offset = self.offset, long_line
                    if INVALID_TOO_LONG not in self.invalid:
                        get_logger().warning("skipping a %s at byte %d of %s (said once)", INVALID_TOO_LONG, start, self.path)
                    self.invalid[INVALID_TOO_LONG] = self.invalid.get(INVALID_TOO_LONG, 0) + 1
                    entries.append(JournalEntry(long_line, None, INVALID_TOO_LONG))
                    continue
                chunk, last_newline = long_line, len(long_line) - 1
            position = self.offset
            for line in chunk[: last_newline + 1].split(b"\n")[:-1]:
                position += len(line) + 1
                if len(entries) >= max_records:
                    break
                if not line.strip():
                    self.offset = position
                    continue
                record, problem, torn = read_line(line)
                if torn:
                    self.torn_lines += 1
                    get_logger().warning(
                        "skipping a torn or invalid line at byte %d of %s%s", position - len(line) - 1, self.path,
                        " (the record written after it is kept)" if record is not None else "",
                    )
                elif problem is not None:
                    if problem not in self.invalid:
                        get_logger().warning(
                            "skipping an invalid record at byte %d of %s: %s (said once per reason)",
                            position - len(line) - 1, self.path, problem,
                        )
                    self.invalid[problem] = self.invalid.get(problem, 0) + 1
                entries.append(JournalEntry(position, record, problem))
                self.offset = position
        if self._head is None and self.offset > 0:
            self._head = journal_head(self._fd)  # once per file: its first line is whole now
        return entries

    def _restart_truncated(self) -> None:
        """The journal is shorter than the offset, or no longer has a line end there: it was truncated in
        place (logrotate's ``copytruncate``), so it is a new journal, read from its start."""
        self.truncations += 1
        get_logger().warning(
            "the journal %s was truncated in place (by logrotate's copytruncate?) after %d bytes of it were read; "
            "it is a new journal now, read from its start", self.path, self.offset,
        )
        self.offset = 0
        self._scanned_to = -1
        self._head = None

    def _read_long_line(self) -> "Optional[bytes | int]":
        """The line at :attr:`offset` (with its newline) when it spans more than one chunk; the offset just
        past it when it is longer than :data:`MAX_LINE_BYTES` (its bytes are never held); None when its
        newline is not written yet. Linear: chunks are joined once, and a search resumes where it stopped."""
        position = max(self.offset, self._scanned_to)
        while True:
            more = os.pread(self._fd, _READ_CHUNK_BYTES, position)
            if not more:
                self._scanned_to = position
                return None
            newline = more.find(b"\n")
            if newline >= 0:
                end = position + newline + 1
                self._scanned_to = -1
                if end - self.offset > MAX_LINE_BYTES:
                    return end
                return os.pread(self._fd, end - self.offset, self.offset)
            position += len(more)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def iter_records(run_dir: str) -> Iterator[Tuple[int, Record]]:
    """Every whole, valid record of a run's journal with its end offset (for tools and tests); invalid
    lines are left out."""
    reader = JournalReader(run_dir)
    try:
        while True:
            entries = reader.read_available()
            if not entries:
                return
            for entry in entries:
                if entry.record is not None:
                    yield entry.end_offset, entry.record
    finally:
        reader.close()


# --- the cursor and the rejected file ---------------------------------------------------------------


HEAD_BYTES = 4096


def journal_head(fd: int) -> int:
    """A mark of which file a journal is: the CRC-32 of its first line (at most :data:`HEAD_BYTES`). The
    first record holds its time and a random key, so another journal's differs, even one that got the
    same inode number after a delete; a copy of the run directory keeps it."""
    head = os.pread(fd, HEAD_BYTES, 0)
    newline = head.find(b"\n")
    return zlib.crc32(head if newline < 0 else head[: newline + 1])


_said_stale_cursor: set = set()


def load_cursor_state(run_dir: str, file_name: str = CURSOR_FILE) -> Tuple[int, Optional[int]]:
    """The acknowledged byte offset and the mark of the journal it belongs to (:func:`journal_head`; None
    for a cursor of an older version, a plain offset). A missing cursor is 0; a corrupt one, one past the
    journal's end or one of another file (the journal was replaced since) restarts from 0, with a warning.
    ``file_name`` names a destination's cursor (``cursor`` is AnyLearn's)."""
    path = os.path.join(run_dir, file_name)
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0, None
    except OSError as exc:
        get_logger().warning("cannot read %s (%s); delivering again from the start", path, exc.strerror)
        return 0, None
    try:
        parts = text.split()
        if not 1 <= len(parts) <= 2:
            raise ValueError
        offset = int(parts[0])
        head = int(parts[1]) if len(parts) == 2 else None
        if offset < 0 or (head is not None and head < 0):
            raise ValueError
    except ValueError:
        get_logger().warning("the cursor %s is corrupt; delivering again from the start (at least once)", path)
        return 0, None
    if offset == 0:
        return 0, head
    size, journal_mark = 0, None
    try:
        fd = os.open(os.path.join(run_dir, JOURNAL_FILE), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        pass
    else:
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                size = info.st_size
                journal_mark = journal_head(fd) if head is not None else None
        except OSError:
            pass
        finally:
            os.close(fd)
    if offset > size:
        if (path, offset, "past") not in _said_stale_cursor:  # flush() of a deliverer without the lock polls this
            _said_stale_cursor.add((path, offset, "past"))
            get_logger().warning("the cursor %s points past the journal's end (the journal was truncated: a new "
                                 "journal); delivering it from its start", path)
        return 0, None
    if head is not None and head != journal_mark:
        if (path, head) not in _said_stale_cursor:  # flush() of a deliverer without the lock polls this
            _said_stale_cursor.add((path, head))
            get_logger().warning("the cursor %s belongs to an earlier journal (it was replaced); delivering the journal from its start", path)
        return 0, None
    return offset, head


def load_cursor(run_dir: str, file_name: str = CURSOR_FILE) -> int:
    """The acknowledged byte offset of the journal there now; see :func:`load_cursor_state`."""
    return load_cursor_state(run_dir, file_name)[0]


def save_cursor(run_dir: str, offset: int, *, fsync: bool = True, head: Optional[int] = None,
                file_name: str = CURSOR_FILE) -> None:
    """Atomically record that every byte before ``offset`` of the journal marked ``head`` is acknowledged."""
    data = b"%d\n" % offset if head is None else b"%d %d\n" % (offset, head)
    atomic_write(os.path.join(run_dir, file_name), data, fsync=fsync)


def append_rejected(run_dir: str, record: Record, status: int, reason: str) -> None:
    """Keep a record the backend refused for good, with the HTTP status and the backend's reason."""
    line = json.dumps({**record.as_json(), "http_status": status, "reason": reason[:500]}) + "\n"
    fd = os.open(os.path.join(run_dir, REJECTED_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def is_regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file (following symbolic links); False when it is missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def count_lines(path: str, start: int = 0) -> int:
    """Number of newline-terminated lines in a file after byte ``start`` (0 when missing or not a regular file)."""
    if not is_regular_file(path):
        return 0
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def journal_end(path: str) -> Tuple[Optional[int], int]:
    """The journal's inode (None when missing) and the byte offset just after its last complete line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, 0
    try:
        return os.fstat(fd).st_ino, whole_lines_end(fd)
    finally:
        os.close(fd)


def whole_lines_end(fd: int) -> int:
    """The byte offset just after the last complete line of the open file ``fd``."""
    position = os.fstat(fd).st_size
    while position > 0:
        start = max(0, position - 4096)
        chunk = os.pread(fd, position - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def count_pending(run_dir: str, offset: Optional[int] = None) -> int:
    """Whole journal lines after ``offset`` (default: the saved cursor)."""
    start = load_cursor(run_dir) if offset is None else offset
    return count_lines(os.path.join(run_dir, JOURNAL_FILE), start)


# --- the deliver lock -------------------------------------------------------------------------------


class DeliverLock:
    """``flock`` on ``deliver.lock``: at most one deliverer per run directory at a time (another file name
    gives another role one holder per run, e.g. the reader of TensorBoard event files).

    The holder writes its pid into the file. A forked child inherits the descriptor but never the role:
    it closes its copy after fork, and only the process that took the lock releases it.
    """

    def __init__(self, run_dir: str, file_name: str = LOCK_FILE) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, file_name)
        self._fd = -1
        self._owner_pid = -1
        register_fork_hook(self, DeliverLock._forget_after_fork)

    @property
    def held(self) -> bool:
        """True when this process holds the lock."""
        return self._fd >= 0 and self._owner_pid == os.getpid()

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        if self.held:
            return True
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except BaseException:  # a full disk: give the lock back (closing the descriptor releases it), or it
            os.close(fd)  # would stay taken by this very process, which could then never take it again
            raise
        self._fd, self._owner_pid = fd, os.getpid()
        return True

    def release(self) -> None:
        """Give the lock up (only the process that took it can)."""
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd, self._owner_pid = -1, -1

    def _forget_after_fork(self) -> None:
        if self._fd >= 0 and self._owner_pid != os.getpid():
            try:
                os.close(self._fd)  # the parent's lock stays: it lives on the parent's open file description
            except OSError:
                pass
            self._fd, self._owner_pid = -1, -1


def lock_holder_pid(run_dir: str) -> Optional[int]:
    """The pid of the live deliverer of ``run_dir``, or None when nobody holds the lock."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return int(os.pread(fd, 32, 0).strip() or b"0") or None
            except ValueError:
                return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
