"""The one delivery engine: journal records -> backend, in order, with retries, acknowledged by a cursor.

The same :class:`Deliverer` runs in the training process, inside the wrapper and in the sidecar. Hosts
use its door only: ``start()``, ``wait_for_lock(timeout_s)``, ``flush(timeout_s)``,
``drain(timeout_s, on_progress)`` and ``close(timeout_s)``. Its worker thread takes the run directory's
deliver lock first (waiting for it while another deliverer holds it, so delivery is never orphaned), then
follows the journal after the cursor, woken by the writer's own ``write`` through inotify where the
system has it.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import struct
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional

from .client import (
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    BackendClient,
    Outcome,
    SendResult,
    TransientError,
    delivery_retrying,
)
from .config import BURST_GAP_S, JOURNAL_FILE, Config
from .cursor import count_pending, load_cursor, save_cursor
from .journal import append_rejected
from .ledger import read_host_counters
from .log import get_logger, stay_pending, sync_hint
from .policy import SKIP_STATE_OFF, SendRule, is_short_gap, line_skip_reason, skip_reason
from .reader import JournalEntry, JournalReader, journal_end
from .record import Record
from .runlock import RunLock
from .runstatus import DeliveryStatus, read_status, write_status

PROGRESS_INTERVAL_S = 0.5
BURST_HISTORY = 8  # records whose gaps decide whether the host reports in a burst


class DeliveryOptions:
    """How a deliverer behaves; every duration in seconds. (A plain class: a dataclass would cost the
    delivery thread of a training process an ``exec`` at import.)"""

    def __init__(
        self,
        rule: SendRule = SendRule(),  # which records are sent
        poll_interval_s: float = 0.2,  # how often the journal is looked at where inotify is missing
        watch_interval_s: float = 1.0,  # with inotify: the longest wait for an event (a safety net)
        lock_poll_interval_s: float = 1.0,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        ack_interval_s: float = 0.05,  # the cursor is replaced at most this often, and when idle or stopping
        cursor_fsync_interval_s: float = 1.0,
        status_interval_s: float = 0.5,
        burst_gap_s: float = BURST_GAP_S,  # records journalled closer together than this are a burst
        max_defer_s: float = 0.1,  # the longest a busy host can hold back one request
        burst_ack_interval_s: float = 1.0,  # while the host reports in a burst: the cursor's and status's pace
    ) -> None:
        self.rule = rule
        self.poll_interval_s = poll_interval_s
        self.watch_interval_s = watch_interval_s
        self.lock_poll_interval_s = lock_poll_interval_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.ack_interval_s = ack_interval_s
        self.cursor_fsync_interval_s = cursor_fsync_interval_s
        self.status_interval_s = status_interval_s
        self.burst_gap_s = burst_gap_s
        self.max_defer_s = max_defer_s
        self.burst_ack_interval_s = burst_ack_interval_s

    def __repr__(self) -> str:
        return f"DeliveryOptions({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


# --- the wake-up ------------------------------------------------------------------------------------

_IN_MODIFY, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x100, 0x80
_IN_ATTRIB, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x4, 0x400, 0x800  # an unlink of a file held open is an IN_ATTRIB
_FILE_EVENTS = _IN_MODIFY | _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_inotify: Any = None  # (init1, add_watch, rm_watch) from libc, False when the system has none


def _inotify_calls() -> Any:
    global _inotify
    if _inotify is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            init1, add_watch, rm_watch = libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch
            init1.argtypes, init1.restype = [ctypes.c_int], ctypes.c_int
            add_watch.argtypes, add_watch.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32], ctypes.c_int
            rm_watch.argtypes, rm_watch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _inotify = (init1, add_watch, rm_watch)
        except (ImportError, OSError, AttributeError):
            _inotify = False
    return _inotify


class JournalWatch:
    """Waits until the journal grows, ``interrupt()`` is called, or a timeout passes.

    On Linux it blocks on inotify for the journal file (the directory until the file exists): the
    writer's own ``os.write`` is the wake-up, so the hot path makes no extra call. When the file is
    deleted or renamed away, it watches the directory again, then the new file. Elsewhere, or when
    inotify is out of watches, it sleeps ``poll_interval_s`` and the caller looks again.
    """

    def __init__(self, run_dir: str, poll_interval_s: float, watch_interval_s: float) -> None:
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.run_dir = run_dir
        self.poll_interval_s = poll_interval_s
        self.watch_interval_s = watch_interval_s
        self._fds_lock = threading.Lock()  # interrupt() never writes to a descriptor close() gave back
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ifd = -1
        self._dir_wd = -1
        self._file_wd = -1
        self._file_ino: Optional[int] = None  # the inode the file watch is on
        self._watching_file = False
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        calls = _inotify_calls()
        if calls:
            fd = calls[0](_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._ifd = fd
                self._poller.register(fd, select.POLLIN)
                self._arm()

    @property
    def uses_inotify(self) -> bool:
        return self._ifd >= 0

    def _arm(self) -> None:
        _, add_watch, rm_watch = _inotify_calls()
        wd = add_watch(self._ifd, os.fsencode(self.path), _FILE_EVENTS)
        if wd < 0 and self._file_wd >= 0:  # out of watches (ENOSPC): the replaced file's watch frees one
            rm_watch(self._ifd, self._file_wd)
            self._file_wd = -1
            wd = add_watch(self._ifd, os.fsencode(self.path), _FILE_EVENTS)
        if wd >= 0:
            if self._file_wd >= 0 and self._file_wd != wd:
                rm_watch(self._ifd, self._file_wd)  # the replaced file's
            self._file_wd = wd
            self._watching_file = True
            try:
                self._file_ino = os.stat(self.path).st_ino
            except OSError:
                self._file_ino = None
            if self._dir_wd >= 0:
                rm_watch(self._ifd, self._dir_wd)
                self._dir_wd = -1
        elif self._dir_wd < 0:
            self._dir_wd = add_watch(self._ifd, os.fsencode(self.run_dir), _IN_CREATE | _IN_MOVED_TO)
            if self._dir_wd < 0:
                self._stop_watching()  # no watch at all (ENOSPC: out of watches): poll instead

    def _stop_watching(self) -> None:
        """Give inotify up for timed polling. The descriptor leaves the poller before it is closed: a closed
        descriptor still registered reads as ready (POLLNVAL) at once, for ever, and the wait would spin."""
        fd, self._ifd = self._ifd, -1
        self._file_wd = self._dir_wd = -1
        self._watching_file = False
        try:
            self._poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass
        get_logger().info("no inotify watch is left for %s; looking at the journal every %g s instead",
                          self.path, self.poll_interval_s)

    def wait(self) -> None:
        """Block until the journal may have grown (or the safety timeout passes)."""
        timeout_s = self.watch_interval_s if self._ifd >= 0 else self.poll_interval_s
        try:
            ready = self._poller.poll(timeout_s * 1000)
        except InterruptedError:
            return
        events = 0
        for fd, revents in ready:
            if revents & select.POLLNVAL:  # a descriptor closed under the poller: never poll it again
                self._poller.unregister(fd)
                continue
            data = _drain(fd)
            if fd == self._ifd:
                events |= _event_masks(data)
        if self._ifd >= 0 and self._watching_file and events & ~_IN_MODIFY:
            self._follow_replacement()
        if self._ifd >= 0 and not self._watching_file and os.path.exists(self.path):
            self._arm()  # the journal appeared: watch the file itself from now on

    def _follow_replacement(self) -> None:
        """After an event other than a write on the file: when the path now names another file or none,
        watch the directory (until the file appears again) and the file the path names."""
        try:
            ino: Optional[int] = os.stat(self.path).st_ino
        except OSError:
            ino = None
        if ino is not None and ino == self._file_ino:
            return
        self._watching_file = False
        if self._dir_wd < 0:
            self._dir_wd = _inotify_calls()[1](self._ifd, os.fsencode(self.run_dir), _IN_CREATE | _IN_MOVED_TO)

    def interrupt(self) -> None:
        """Make a current or the next :meth:`wait` return at once (from any thread)."""
        with self._fds_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"!")
                except OSError:
                    pass

    def close(self) -> None:
        with self._fds_lock:
            fds, self._ifd, self._wake_r, self._wake_w = (self._ifd, self._wake_r, self._wake_w), -1, -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or exc.errno == errno.EBADF:
                return data
            raise
        if not chunk:
            return data
        data += chunk


def _event_masks(data: bytes) -> int:
    """The masks of the inotify events in ``data``, or-ed together."""
    masks = 0
    position = 0
    while position + _EVENT_HEADER.size <= len(data):
        _, mask, _, name_len = _EVENT_HEADER.unpack_from(data, position)
        masks |= mask
        position += _EVENT_HEADER.size + name_len
    return masks


# --- the engine --------------------------------------------------------------------------------------


class Deliverer:
    """Delivers one run directory's journal to one task.

    The door for hosts: :meth:`start`, :meth:`wait_for_lock`, :meth:`flush`, :meth:`drain`, :meth:`close`.
    Never raises into its host: transient failures are retried with backoff while the deliverer runs,
    401/403 and any 3xx (never followed) pause delivery (records stay pending for ``sync``), other 4xx go
    to ``rejected.jsonl``. Every record it does not send is counted with its reason in :attr:`skipped`.
    """

    def __init__(
        self,
        run_dir: str,
        client: BackendClient,
        options: DeliveryOptions = DeliveryOptions(),
        *,
        retry_sleep: Optional[Callable[[float], Any]] = None,
        host_busy: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.run_dir = run_dir
        self.client = client
        self.options = options
        self.delivered = 0
        self.skipped: Dict[str, int] = {}
        # What this deliverer did itself (``delivered``/``skipped`` carry on from an earlier status.json).
        self.delivered_now = 0
        self.skipped_now: Dict[str, int] = {}
        self.rejected_now = 0
        self.paused_reason: Optional[str] = None
        self.last_error: Optional[str] = None
        self.last_error_ts: Optional[float] = None
        self.last_delivery_ts: Optional[float] = None
        self.started_ts = time.time()
        self.state_reporting = True
        self._host_busy = host_busy
        self._retry_sleep = retry_sleep
        self._lock = RunLock(run_dir)
        self._holding = False
        self._lock_known = threading.Event()  # set once the worker knows whether it holds the lock
        self._stop = threading.Event()
        self._running = threading.Event()
        self._idle = False
        self._progress = threading.Condition()
        self._acked = 0
        self._acked_ino: Optional[int] = None  # the inode of the journal file ``_acked`` is an offset in
        self._finished_inos: set = set()  # inodes of journal files delivered to their end, then left for a new one
        self._acked_head: Optional[int] = None  # that file's mark, saved with the cursor (journal_head)
        self._acked_saved = -1
        self._reader: Optional[JournalReader] = None
        self._watch: Optional[JournalWatch] = None
        self._thread: Optional[threading.Thread] = None
        self._failing_since: Optional[float] = None
        self._deadline: Optional[float] = None
        self._last_ack_write = 0.0
        self._last_fsync = 0.0
        self._last_status = 0.0
        self._retrying: Any = None
        self._previous_ts: Optional[float] = None
        self._short_gaps: Deque[bool] = collections.deque(maxlen=BURST_HISTORY)  # recent gaps under burst_gap_s
        self._in_burst = False  # the last request was held back for a host reporting in a burst
        self.held_back = 0  # requests held back because the host was reporting just now
        self._said_odd_answer = False  # a 2xx without a JSON object was said
        self._lock_error: Optional[str] = None  # why the last try at the deliver lock failed (not a conflict)
        self._log = get_logger()

    # --- the door -----------------------------------------------------------------------------------

    def start(self) -> "Deliverer":
        """Start the delivery thread (a daemon); it first waits for the deliver lock."""
        if self._thread is None:
            self._running.set()
            self._thread = threading.Thread(target=self._work, name="anylearn-reporter-delivery", daemon=True)
            self._thread.start()
        return self

    def wait_for_lock(self, timeout_s: Optional[float]) -> bool:
        """Wait up to ``timeout_s`` for the worker's first try at the deliver lock; True when this deliverer
        holds it (it then delivers), False when another process does (this one waits in the background
        and takes over when that one exits) or the time ran out."""
        self._lock_known.wait(timeout_s)
        return self._holding

    def flush(self, timeout_s: Optional[float] = None, files: Optional[Dict[int, int]] = None) -> bool:
        """Wait until every record journalled so far is acknowledged; True if so before the timeout.

        ``files`` narrows "every record" to byte ranges, ``{inode: end offset}`` (what one writer journalled,
        see :meth:`JournalWriter.written_files`); by default, the journal the path names up to its end.
        Returns False at once when delivery is paused (a rejected key, a redirect).
        """
        path = os.path.join(self.run_dir, JOURNAL_FILE)
        if files is None:
            target_ino, target = journal_end(path)
            files = {} if target_ino is None else {target_ino: target}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._progress:
            while True:
                if self._acknowledged(files, path):
                    return True
                if self.paused_reason or self._stop.is_set() or not self._running.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Another deliverer's progress is seen only in the cursor file: poll it.
                wait_s = 1.0 if self._holding else self.options.poll_interval_s
                self._progress.wait(wait_s if remaining is None else min(wait_s, remaining))

    def _acknowledged(self, files: Dict[int, int], path: str) -> bool:
        """Whether every ``{inode: end}`` range is acknowledged. An offset counts only in the file it was
        acknowledged in; a file this deliverer followed a replacement away from was delivered to its end.
        Without the lock, the cursor file tells (checked against the journal there by load_cursor): the
        holder leaves an older file only once it is delivered, so a cursor into the path's file covers it."""
        files = {ino: end for ino, end in files.items() if end > 0}
        if not files:
            return True
        path_ino, path_end = journal_end(path)

        def counted(acked: int) -> int:  # an offset past the journal's end: truncated in place, a new journal
            return 0 if acked > path_end else acked

        if self._holding:
            return all(ino in self._finished_inos or (ino == self._acked_ino and (counted(self._acked) if ino == path_ino else self._acked) >= end)
                       for ino, end in files.items())
        acked = counted(load_cursor(self.run_dir).offset)
        return all(acked >= end if ino == path_ino else (path_ino is not None and acked > 0) for ino, end in files.items())

    def drain(self, timeout_s: Optional[float], on_progress: Optional[Callable[[int, bool], None]] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s`` (None: until done), calling ``on_progress(pending,
        drained)`` about twice a second; then stop. True when nothing stayed pending. Returns early when
        delivery pauses."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        drained = False
        interrupted = True  # until the loop returns: a KeyboardInterrupt stops at once, nothing more is sent
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                drained = self.flush(PROGRESS_INTERVAL_S if remaining is None else max(0.0, min(PROGRESS_INTERVAL_S, remaining)))
                if on_progress is not None:
                    on_progress(count_pending(self.run_dir, self._acked_offset()), drained)
                if drained or self.paused_reason or not self._running.is_set() or (remaining is not None and remaining <= 0):
                    interrupted = False
                    return drained
        finally:
            self.close(0 if interrupted else 0.5 if deadline is None else max(0.5, deadline - time.monotonic()))

    def close(self, timeout_s: Optional[float] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s`` (when this deliverer holds the lock), then stop;
        True if nothing stayed pending. Whatever is left stays in the journal for the next deliverer
        (wrapper, sidecar, ``sync``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._deadline = deadline
        if self._running.is_set():
            self._lock_known.wait(timeout_s)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        drained = self.flush(remaining) if self._running.is_set() and self._holding else False
        self._stop.set()
        if self._watch is not None:
            self._watch.interrupt()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0 if deadline is None else max(0.1, deadline - time.monotonic()))
        if self._lock_error is not None:  # nobody delivered: say so at the end too, not only when it began
            left = count_pending(self.run_dir)
            self._log.warning(
                "nothing was delivered: the deliver lock in %s could not be taken (%s); %s, deliver %s with `%s`",
                self.run_dir, self._lock_error, stay_pending(left), "it" if left == 1 else "them", sync_hint(self.run_dir),
            )
        return drained

    # --- what the engine says about itself (status.json, the hosts' messages) -------------------------

    @property
    def alive(self) -> bool:
        """True from :meth:`start` until the worker has stopped."""
        return self._running.is_set()

    def status(self) -> DeliveryStatus:
        """What ``status.json`` holds: counters, last delivery, last error, deliverer pid."""
        return DeliveryStatus(
            task_id=self.client.task_id,
            backend_url=self.client.base_url,
            deliverer_pid=os.getpid(),
            deliverer_started=self.started_ts,
            cursor=self._acked,
            delivered=self.delivered,
            skipped=dict(self.skipped),
            counters=read_host_counters(self.run_dir),
            paused=self.paused_reason,
            state_reporting=self.state_reporting,
            last_delivery_ts=self.last_delivery_ts,
            last_error=self.last_error,
            last_error_ts=self.last_error_ts,
            failing_since=self._failing_since,
            updated=time.time(),
            running=not self._stop.is_set(),
        )

    # --- the worker ---------------------------------------------------------------------------------

    def _acked_offset(self) -> int:
        """Byte offset acknowledged so far, by this deliverer or (when it does not hold the lock) another."""
        return self._acked if self._holding else load_cursor(self.run_dir).offset

    def _work(self) -> None:
        try:
            if self._take_lock():
                self._deliver_until_stopped()
        except Exception:  # never raise into the host; say what happened once
            self._log.exception("the delivery thread stopped on an unexpected error; records stay in the journal")
        finally:
            self._lock_known.set()
            self._finish()

    def _take_lock(self) -> bool:
        said: Optional[str] = None
        while not self._stop.is_set():
            try:
                if self._lock.try_acquire():
                    self._holding = True
                    self._lock_error = None
                    self._lock_known.set()
                    return True
                self._lock_error = None  # another process holds it: that one delivers
            except (OSError, ValueError) as exc:  # said once per cause, not once per attempt; tried again later
                why = self._lock_error = getattr(exc, "strerror", None) or str(exc)
                if why != said:
                    said = why
                    self._note_error(f"cannot take the deliver lock: {why}")
                    kept = "records stay in the journal" if os.path.exists(os.path.join(self.run_dir, JOURNAL_FILE)) else "and there is no journal there"
                    self._log.warning("cannot take the deliver lock in %s: %s; %s (said once)", self.run_dir, why, kept)
            self._lock_known.set()
            self._stop.wait(self.options.lock_poll_interval_s)
        return False

    def _deliver_until_stopped(self) -> None:
        self._load_state()
        reader = self._reader = JournalReader(self.run_dir, self._acked)
        watch: Optional[JournalWatch] = None
        truncations = 0
        while not self._stop.is_set():
            entries = reader.read_available(max_records=256)
            if self._acked_ino is None:
                self._acked_ino = reader.ino
            if reader.truncations != truncations:  # truncated in place: a new journal, acknowledged from 0
                truncations = reader.truncations
                self._acked, self._acked_head = 0, None
                self._checkpoint(force=True)
            if not entries and watch is not None and reader.replaced():
                entries = reader.read_available(max_records=256)  # the old file to its end first
                if not entries:
                    self._follow_new_journal(reader)
                    continue
            if not entries:
                if watch is None:
                    # Made at the first idle moment (a host reporting in a burst never pays for ctypes
                    # and inotify), then one more look: a record written before the watch woke nobody.
                    watch = self._watch = JournalWatch(self.run_dir, self.options.poll_interval_s, self.options.watch_interval_s)
                    continue
                if not self._idle:
                    self._idle = True
                    self._checkpoint(force=True)
                    self._notify_progress()
                watch.wait()
                continue
            self._idle = False
            for entry in entries:
                if not self._deliver_entry(entry):
                    return

    def _follow_new_journal(self, reader: JournalReader) -> None:
        """The journal was replaced and the old file is delivered to its end: start the new one at 0."""
        if self._acked_ino is not None:
            self._finished_inos.add(self._acked_ino)
        reader.follow_replacement()
        self._acked, self._acked_ino, self._acked_head = 0, reader.ino, None
        self._finished_inos.discard(self._acked_ino)  # an inode number freed by a delete and used again
        self._checkpoint(force=True)
        self._notify_progress()

    def _load_state(self) -> None:
        self._acked, self._acked_head = load_cursor(self.run_dir)
        self._acked_saved = self._acked
        previous, _ = read_status(self.run_dir)  # field by field: a hand-edited file cannot stop delivery
        if previous is not None and previous.task_id == self.client.task_id:
            self.delivered = previous.delivered
            self.skipped = dict(previous.skipped)

    def _deliver_entry(self, entry: JournalEntry) -> bool:
        record = entry.record
        skip: Optional[str]
        if record is None:
            skip = line_skip_reason(entry.problem)
        else:
            skip = skip_reason(record, self.options.rule, state_reporting=self.state_reporting)
        if skip is not None:
            self._count_skip(skip)
        elif record is not None:
            self._defer_while_host_busy(record)
            try:
                result = self._send_with_retries(record)
            except TransientError:
                return False  # stopped while retrying: the record stays pending
            if not self._apply(record, result):
                return False
        self._acknowledge(entry.end_offset)
        return True

    def _count_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_now[reason] = self.skipped_now.get(reason, 0) + 1

    def _defer_while_host_busy(self, record: Record) -> None:
        """Training comes first: the delivery thread keeps out of the training thread's way.

        While the host reports in a burst (it reported within ``burst_gap_s`` just now, and at least half
        of the last records were journalled closer together than that) the next request is held back
        ``max_defer_s``: one wait, so one hand-over of the interpreter, per request. The history keeps a
        burst a burst when this thread's own turns on the interpreter stretch a few of its gaps.

        Otherwise a request waits until the host has not reported for ``burst_gap_s`` (at most
        ``max_defer_s``): woken by the journal write itself, this thread would else run its request
        while the training thread is still inside the report call, or about to make the next."""
        ts = record.ts
        previous, self._previous_ts = self._previous_ts, float(ts) if isinstance(ts, (int, float)) else None
        if self._previous_ts is not None and previous is not None:
            self._short_gaps.append(is_short_gap(self._previous_ts - previous, self.options.burst_gap_s))
        self._in_burst = False
        if self._host_busy is None or not self._host_busy():
            return
        self.held_back += 1
        if 2 * sum(self._short_gaps) >= BURST_HISTORY:
            self._in_burst = True
            self._stop.wait(self.options.max_defer_s)
            return
        waited = 0.0
        while waited < self.options.max_defer_s and not self._stop.is_set():
            self._stop.wait(self.options.burst_gap_s)
            waited += self.options.burst_gap_s
            if not self._host_busy():
                return

    def _send(self, record: Record) -> SendResult:
        timeout_s = None if self._deadline is None else self._deadline - time.monotonic()
        return self.client.send(record, timeout_s)

    def _send_with_retries(self, record: Record) -> SendResult:
        """One try; after a transient failure, the retry policy takes over (its first attempt is that
        failure, so the backoff and any ``Retry-After`` apply before the second request)."""
        try:
            return self._send(record)
        except TransientError as exc:
            failed = [exc]
        if self._retrying is None:
            self._retrying = delivery_retrying(
                self._stop, initial_backoff_s=self.options.initial_backoff_s, max_backoff_s=self.options.max_backoff_s,
                sleep=self._retry_sleep, before_sleep=self._before_retry,
            )

        def attempt(rec: Record) -> SendResult:
            if failed:
                raise failed.pop()
            return self._send(rec)

        return self._retrying(attempt, record)

    def _apply(self, record: Record, result: SendResult) -> bool:
        """Book an answer; False when delivery must pause (the record is then not acknowledged)."""
        if self._failing_since is not None:
            self._log.info("delivery resumed after %.0f s", time.time() - self._failing_since)
            self._failing_since = None
        if result.outcome is Outcome.DELIVERED:
            if result.reason and not self._said_odd_answer:  # a 2xx is delivered whatever its body
                self._said_odd_answer = True
                self._log.warning("the backend took a %s record with an odd answer (%s); counted as delivered (said once)",
                                  record.kind, result.reason)
            self.delivered += 1
            self.delivered_now += 1
            self.last_delivery_ts = time.time()
        elif result.outcome is Outcome.REJECTED:
            self.rejected_now += 1
            append_rejected(self.run_dir, record, result.status, result.reason)
            self._note_error(f"HTTP {result.status}: {result.reason}")
            self._log.warning(
                "the backend refused a %s record for good (HTTP %d: %s); kept in %s/rejected.jsonl",
                record.kind, result.status, result.reason, self.run_dir,
            )
        elif result.outcome is Outcome.UNSUPPORTED:
            self.state_reporting = False
            self._count_skip(SKIP_STATE_OFF)
            self._log.info("the backend has no state endpoint (HTTP %d); task state reporting is off", result.status)
        elif result.outcome is Outcome.AUTH:
            refused = ("the backend refused the secret key" if self.client.has_secret_key else
                       "no secret key is set (ANYLEARN_SECRET_KEY or secret_key) and the backend requires one")
            self._pause(
                f"auth: HTTP {result.status}", f"HTTP {result.status}: {result.reason}",
                f"{refused} for task {self.client.task_id} (HTTP {result.status}: "
                f"{result.reason}); delivery is paused and records stay pending in {self.run_dir}: set "
                f"ANYLEARN_SECRET_KEY (or secret_key) to the task's key, then run "
                f"`{sync_hint(self.run_dir, self.client.base_url, new_key=True)}`",
            )
            return False
        elif result.outcome is Outcome.SETUP:
            self._pause(
                f"setup: {result.reason}", result.reason,
                f"cannot reach the backend as configured ({result.reason}); delivery is paused and records stay "
                f"pending in {self.run_dir}; once that is fixed, run `{sync_hint(self.run_dir)}`",
            )
            return False
        elif result.outcome is Outcome.REDIRECT:
            # Never followed: the Secret-Key header (and the body) would go to whatever host Location names.
            self._pause(
                f"redirect: HTTP {result.status}, {result.reason}", f"HTTP {result.status}: {result.reason}",
                f"the backend answered HTTP {result.status} ({result.reason}); redirects are never followed "
                f"(the secret key would go along), so delivery is paused and records stay pending in "
                f"{self.run_dir}: set ANYLEARN_BACKEND_URL to the address that answers itself, then run "
                f"`{sync_hint(self.run_dir)}`",
            )
            return False
        return True

    def _pause(self, reason: str, error: str, message: str) -> None:
        """Pause delivery for the rest of this deliverer's life: one message, records stay pending."""
        self.paused_reason = reason
        self._note_error(error)
        self._log.error("%s", message)
        self._checkpoint(force=True)
        self._notify_progress()

    def _note_error(self, text: str) -> None:
        self.last_error = text
        self.last_error_ts = time.time()

    def _before_retry(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        reason = getattr(exc, "reason", repr(exc))
        self._note_error(reason)
        if self._failing_since is None:
            self._failing_since = time.time()
            self._log.warning(
                "delivery to %s failed (%s); retrying with backoff, records stay in %s",
                self.client.base_url, reason, self.run_dir,
            )
        self._checkpoint()

    def _acknowledge(self, offset: int) -> None:
        self._acked = offset
        # Each file operation hands the interpreter back and forth with a training thread: while the
        # host reports in a burst (a request every max_defer_s at most), the cursor goes at a slower pace.
        interval = self.options.burst_ack_interval_s if self._in_burst else self.options.ack_interval_s
        if time.monotonic() - self._last_ack_write >= interval:
            self._checkpoint()
        self._notify_progress()

    def _notify_progress(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def _checkpoint(self, force: bool = False) -> None:
        """Persist the cursor: replaced (an atomic rename) at most every ``ack_interval_s`` (while the host
        reports in a burst, ``burst_ack_interval_s``: a request every ``max_defer_s`` at most, so about ten
        records) and whenever the deliverer goes idle, pauses or stops, so a crash of this process resends
        at most that window's records, with the same ``Idempotency-Key``s; fsynced at most once a ``cursor_fsync_interval_s``
        and at idle and close, which bounds what a power loss can resend."""
        now = time.monotonic()
        fsync = force or now - self._last_fsync >= self.options.cursor_fsync_interval_s
        try:
            if self._acked != self._acked_saved or fsync:
                if self._acked_head is None and self._acked > 0 and self._reader is not None:
                    self._acked_head = self._reader.head()  # once per file: its first line is whole by now
                save_cursor(self.run_dir, self._acked, fsync=fsync, head=self._acked_head)
                self._acked_saved = self._acked
                self._last_ack_write = now
                if fsync:
                    self._last_fsync = now
            status_interval = self.options.burst_ack_interval_s if self._in_burst else self.options.status_interval_s
            if force or now - self._last_status >= status_interval:
                self._last_status = now
                write_status(self.run_dir, self.status())
        except OSError as exc:
            self._note_error(f"cannot save the cursor: {exc.strerror}")

    def _finish(self) -> None:
        if self._holding:
            self._stop.set()
            self._checkpoint(force=True)
            self._lock.release()
            self._holding = False
        if self._reader is not None:
            self._reader.close()
        if self._watch is not None:
            self._watch.close()
        self.client.close()
        self._running.clear()
        self._notify_progress()


def build_deliverer(
    config: Config, *, run_dir: Optional[str] = None, host_busy: Optional[Callable[[], bool]] = None, **option_overrides: Any
) -> Deliverer:
    """A deliverer for ``config``'s task and run directory (the configuration must not be offline)."""
    if config.offline:
        raise ValueError("no backend or task id configured: offline runs are only journalled")
    client = BackendClient.from_config(config)
    options = DeliveryOptions(
        rule=SendRule.of(config),
        **option_overrides,
    )
    return Deliverer(run_dir or config.run_dir, client, options, host_busy=host_busy)


__all__ = ["Deliverer", "DeliveryOptions", "JournalWatch", "build_deliverer"]
