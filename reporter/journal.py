"""The journal writer: appends records to ``metrics.jsonl``, the hot path of every report call.

Every record is one JSON line written with a single ``os.write`` on an ``O_APPEND`` descriptor, so
several processes can append at once without interleaving, and a record is in the kernel's hands the
moment the report call returns (it survives a ``kill -9`` of the writer). The record schema is in
:mod:`reporter.record`, reading in :mod:`reporter.reader`, the cursor in :mod:`reporter.cursor` and the
run's lock in :mod:`reporter.runlock`.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import os
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Tuple

from .config import JOURNAL_FILE
from .ledger import COUNTER_LOST, HostCounters
from .log import get_logger, say_once
from .osutil import register_fork_hook, whole_lines_end
from .record import MAX_NAME_CHARS, clean_name, step_in_range

MAX_CACHED_NAMES = 4096  # the writer keeps this many names' JSON text at most
JOURNAL_CHECK_INTERVAL_S = 0.25  # how often a writer looks whether its path still names its file (not per report)


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
        if self.counters.record_lost(reason):
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
                say_once("name cut", "a metric name longer than %d characters was journalled cut to its first %d (said once)",
                         MAX_NAME_CHARS, MAX_NAME_CHARS)
            if len(self._names) >= MAX_CACHED_NAMES:  # a name per step must not grow the process for ever
                self._names.clear()
            name_json = self._names[name] = json.dumps(cleaned)
        if step is not None and not step_in_range(step):
            say_once("step null", "a step beyond a 64-bit integer was journalled as null (said once)")
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
