"""The run directory on disk: the append-only journal, its cursor, the rejected file and the deliver lock.

Every record is one JSON line written with a single ``os.write`` on an ``O_APPEND`` descriptor, so
several processes can append at once without interleaving, and a record is in the kernel's hands the
moment the report call returns (it survives a ``kill -9`` of the writer).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from .config import CURSOR_FILE, JOURNAL_FILE, LOCK_FILE, REJECTED_FILE
from .log import get_logger

KIND_INTERMEDIATE = "intermediate"
KIND_FINAL = "final"
KIND_STATE = "state"
RECORD_KINDS = (KIND_INTERMEDIATE, KIND_FINAL, KIND_STATE)
_RECORD_START = b'{"kind"'
_READ_CHUNK_BYTES = 1 << 16


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
        self.lost: Dict[str, int] = {}
        self.last_append_ts = 0.0
        self._fd = -1
        self._names: Dict[Optional[str], str] = {None: "null"}
        self._pid = -1
        self._prefix = ""
        self._counter: Iterator[int] = itertools.count()
        self._open_lock = threading.Lock()
        self._reset_identity()
        register_fork_hook(self, JournalWriter._reset_identity)

    def _reset_identity(self) -> None:
        self._pid = os.getpid()
        self._prefix = f"{secrets.token_hex(6)}-{self._pid}-"
        self._counter = itertools.count(1)

    def _open(self) -> bool:
        with self._open_lock:
            if self._fd >= 0:
                return True
            try:
                os.makedirs(self.run_dir, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._count_lost(f"cannot open the journal ({exc.strerror})")
                return False
            self._fd = fd
            return True

    def _count_lost(self, reason: str) -> None:
        first = reason not in self.lost
        self.lost[reason] = self.lost.get(reason, 0) + 1
        if first:
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
        if self._fd < 0 and not self._open():
            return None
        name_json = self._names.get(name)
        if name_json is None:
            name_json = self._names[name] = json.dumps(name)
        if value is None or value - value != 0:  # NaN and +-inf fail x - x == 0
            value_text = "null"
            if value is not None and self.on_non_finite is not None:
                self.on_non_finite(name, value)
        else:
            value_text = repr(value)
        key = f"{self._prefix}{next(self._counter)}"
        self.last_append_ts = now = time.time()
        line = (
            f'{{"kind":"{kind}","value":{value_text},"name":{name_json},'
            f'"step":{"null" if step is None else step},"ts":{now if ts is None else ts!r},'
            f'"rank":{self.rank},"pid":{self._pid},"key":"{key}"}}\n'
        )
        data = line.encode()
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            self._count_lost(errno.errorcode.get(exc.errno or 0, "OSError") + f" ({exc.strerror})")
            return None
        if written != len(data):  # a full disk cut the line: readers skip the fragment as torn
            self._count_lost("short write (is the disk full?)")
            return None
        return key

    def close(self) -> None:
        """Close the descriptor; a later append reopens it."""
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


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class JournalEntry:
    """One line of the journal: its end offset and the record, or None for a line that was not valid."""

    end_offset: int
    record: Optional[Dict[str, Any]]


def parse_line(line: bytes) -> Tuple[Optional[Dict[str, Any]], bool]:
    """Parse a journal line into (record or None, torn).

    A writer killed mid-line leaves a fragment without a newline, and the next writer's record is glued
    to it. Every record starts with ``{"kind"`` and that text cannot occur inside one (JSON escapes the
    quotes of a string), so the last record of such a line is recovered and the fragment reported torn.
    """
    record = _parse_record(line)
    if record is not None:
        return record, False
    start = line.rfind(_RECORD_START)
    return (_parse_record(line[start:]) if start > 0 else None), True


def _parse_record(line: bytes) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if isinstance(record, dict) and record.get("kind") in RECORD_KINDS:
        return record
    return None


class JournalReader:
    """Reads whole records after a byte offset, following the file as it grows."""

    def __init__(self, run_dir: str, offset: int = 0) -> None:
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.offset = offset
        self.torn_lines = 0
        self._fd = -1

    def _ensure_open(self) -> bool:
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
        return True

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
        entries: List[JournalEntry] = []
        while len(entries) < max_records:
            chunk = os.pread(self._fd, _READ_CHUNK_BYTES, self.offset)
            if not chunk:
                break
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                if len(chunk) < _READ_CHUNK_BYTES:
                    break  # an unterminated tail
                long_line = self._read_long_line()
                if long_line is None:
                    break
                chunk, last_newline = long_line, len(long_line) - 1
            position = self.offset
            for line in chunk[: last_newline + 1].split(b"\n")[:-1]:
                position += len(line) + 1
                if len(entries) >= max_records:
                    break
                if not line.strip():
                    self.offset = position
                    continue
                record, torn = parse_line(line)
                if torn:
                    self.torn_lines += 1
                    get_logger().warning(
                        "skipping a torn or invalid line at byte %d of %s%s", position - len(line) - 1, self.path,
                        " (the record written after it is kept)" if record is not None else "",
                    )
                entries.append(JournalEntry(position, record))
                self.offset = position
        return entries

    def _read_long_line(self) -> Optional[bytes]:
        data = b""
        while True:
            more = os.pread(self._fd, _READ_CHUNK_BYTES, self.offset + len(data))
            if not more:
                return None
            data += more
            newline = data.find(b"\n")
            if newline >= 0:
                return data[: newline + 1]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def iter_records(run_dir: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Every whole, valid record of a run's journal with its end offset (for tools and tests)."""
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


def load_cursor(run_dir: str) -> int:
    """The acknowledged byte offset; a missing cursor is 0, a corrupt one restarts from 0 with a warning."""
    path = os.path.join(run_dir, CURSOR_FILE)
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        get_logger().warning("cannot read %s (%s); delivering again from the start", path, exc.strerror)
        return 0
    try:
        offset = int(text)
        if offset < 0:
            raise ValueError
    except ValueError:
        get_logger().warning("the cursor %s is corrupt; delivering again from the start (at least once)", path)
        return 0
    try:
        size = os.path.getsize(os.path.join(run_dir, JOURNAL_FILE))
    except OSError:
        size = 0
    if offset > size:
        get_logger().warning("the cursor %s points past the journal's end; delivering again from the start", path)
        return 0
    return offset


def save_cursor(run_dir: str, offset: int, *, fsync: bool = True) -> None:
    """Atomically record that every byte before ``offset`` is acknowledged."""
    atomic_write(os.path.join(run_dir, CURSOR_FILE), b"%d\n" % offset, fsync=fsync)


def append_rejected(run_dir: str, record: Dict[str, Any], status: int, reason: str) -> None:
    """Keep a record the backend refused for good, with the HTTP status and the backend's reason."""
    line = json.dumps({**record, "http_status": status, "reason": reason[:500]}) + "\n"
    fd = os.open(os.path.join(run_dir, REJECTED_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def count_lines(path: str) -> int:
    """Number of newline-terminated lines in a file (0 when missing)."""
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def whole_lines_end(path: str) -> int:
    """Byte offset just after the journal's last complete line (an unterminated tail is not counted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        end = os.fstat(fd).st_size
        position = end
        while position > 0:
            start = max(0, position - 4096)
            chunk = os.pread(fd, position - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            position = start
        return 0
    finally:
        os.close(fd)


def count_pending(run_dir: str, offset: Optional[int] = None) -> int:
    """Whole journal lines after ``offset`` (default: the saved cursor)."""
    path = os.path.join(run_dir, JOURNAL_FILE)
    start = load_cursor(run_dir) if offset is None else offset
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


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
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
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
