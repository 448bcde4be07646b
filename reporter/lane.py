"""A lane: one sink's worker thread over the journal.

It takes the sink's lock (waiting while another process holds it, so delivery is never orphaned), follows
the journal after the sink's cursor, woken by the writer's own ``write`` through :mod:`.watch`, and hands
the sink batches of at most 256 entries. It is the sink's :class:`~reporter.sink.Handoff`: the sink
acknowledges through it, and the lane saves the cursor (:mod:`.ack`) and asks the deliverer for a
status.json when due.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

from .ack import Acknowledgement, saved_covers
from .config import JOURNAL_FILE
from .log import get_logger
from .pacing import BurstPacing
from .reader import JournalReader
from .runlock import RunLock
from .sink import Sink
from .watch import JournalWatch

BATCH = 256  # entries handed to a sink at once


class Lane:
    """Feeds one sink from the journal in its own thread (see the module's docstring)."""

    def __init__(self, run_dir: str, sink: Sink, options: Any, *, progress: threading.Condition,
                 write_status: Callable[[], None], note_error: Callable[[str], None],
                 previous: Callable[[], Optional[Mapping[str, Any]]], pacing: Optional[BurstPacing] = None,
                 thread_name: str = "anylearn-reporter-delivery") -> None:
        self.run_dir = run_dir
        self.sink = sink
        self.options = options
        self.stop = threading.Event()  # the Handoff's: set by close()
        self.running = threading.Event()
        self.lock_known = threading.Event()  # set once the worker knows whether it holds the lock
        self.holding = False
        self.lock_error: Optional[str] = None  # why the last try at the lock failed (not a conflict)
        self.deadline: Optional[float] = None  # close(timeout)'s, on time.monotonic()
        self.ack = Acknowledgement(run_dir, sink.cursor_file, ack_interval_s=options.ack_interval_s,
                                   cursor_fsync_interval_s=options.cursor_fsync_interval_s,
                                   status_interval_s=options.status_interval_s)
        self.watch: Optional[JournalWatch] = None
        self._progress = progress
        self._write_status = write_status
        self._note_error = note_error
        self._previous = previous
        self._pacing = pacing
        self._thread_name = thread_name
        self._lock = RunLock(run_dir, sink.lock_file)
        self._reader: Optional[JournalReader] = None
        self._thread: Optional[threading.Thread] = None
        self._idle = False
        self._log = get_logger()

    # --- for the deliverer -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (a daemon); it first waits for the sink's lock."""
        if self._thread is None:
            self.running.set()
            self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
            self._thread.start()

    def caught_up(self, files: Dict[int, int], path_ino: Optional[int], path_end: int) -> bool:
        """Whether every ``{inode: end}`` range is acknowledged, by this lane or (without the lock) another
        process's lane of the same sink, seen in the cursor file."""
        if self.holding:
            return self.ack.covers(files, path_ino, path_end)
        return saved_covers(self.ack.saved_offset(), files, path_ino, path_end)

    def acked_offset(self) -> int:
        """Byte offset acknowledged so far, by this lane or (when it does not hold the lock) another."""
        return self.ack.offset if self.holding else self.ack.saved_offset()

    def interrupt(self) -> None:
        """Stop: finish the record in hand, then let the lock go."""
        self.stop.set()
        if self.watch is not None:
            self.watch.interrupt()

    def join(self, timeout_s: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # --- the Handoff --------------------------------------------------------------------------------------

    def remaining_s(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def hold(self, record: Any) -> None:
        if self._pacing is not None:
            self._pacing.hold(record, self.stop)

    def acknowledge(self, end_offset: int) -> None:
        pace = None if self._pacing is None else self._pacing.ack_interval_s(self.options.ack_interval_s)
        if self.ack.advance(end_offset, pace):
            self.checkpoint()
        self.notify_progress()

    def checkpoint(self, force: bool = False) -> None:
        """Persist the cursor (see :mod:`.ack`) and, when due, status.json."""
        pace = None if self._pacing is None else self._pacing.ack_interval_s(self.options.status_interval_s)
        try:
            if self.ack.checkpoint(force=force, head_of=self._head, status_interval_s=pace):
                self._write_status()
        except OSError as exc:
            self._note_error(f"cannot save the cursor: {exc.strerror}")

    def notify_progress(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # --- the worker -----------------------------------------------------------------------------------

    def _head(self) -> Optional[int]:
        return None if self._reader is None else self._reader.head()

    def _work(self) -> None:
        try:
            if self._take_lock():
                self.sink.open(self._previous())
                self._deliver_until_stopped()
        except Exception:  # never raise into the host; say what happened once
            self._log.exception("the delivery thread stopped on an unexpected error; records stay in the journal")
        finally:
            self.lock_known.set()
            self._finish()

    def _take_lock(self) -> bool:
        said: Optional[str] = None
        while not self.stop.is_set():
            try:
                if self._lock.try_acquire():
                    self.holding = True
                    self.lock_error = None
                    self.lock_known.set()
                    return True
                self.lock_error = None  # another process holds it: that one delivers
            except (OSError, ValueError) as exc:  # said once per cause, not once per attempt; tried again later
                why = self.lock_error = getattr(exc, "strerror", None) or str(exc)
                if why != said:
                    said = why
                    self._note_error(f"cannot take the deliver lock: {why}")
                    kept = "records stay in the journal" if os.path.exists(os.path.join(self.run_dir, JOURNAL_FILE)) else "and there is no journal there"
                    self._log.warning("cannot take the deliver lock in %s: %s; %s (said once)", self.run_dir, why, kept)
            self.lock_known.set()
            self.stop.wait(self.options.lock_poll_interval_s)
        return False

    def _deliver_until_stopped(self) -> None:
        self.ack.load()
        reader = self._reader = JournalReader(self.run_dir, self.ack.offset)
        watch: Optional[JournalWatch] = None
        truncations = 0
        while not self.stop.is_set():
            entries = reader.read_available(max_records=BATCH)
            if self.ack.ino is None:
                self.ack.ino = reader.ino
            if reader.truncations != truncations:  # truncated in place: a new journal, acknowledged from 0
                truncations = reader.truncations
                self.ack.truncated()
                self.checkpoint(force=True)
            if not entries and watch is not None and reader.replaced():
                entries = reader.read_available(max_records=BATCH)  # the old file to its end first
                if not entries:
                    self._follow_new_journal(reader)
                    continue
            if not entries:
                if watch is None:
                    # Made at the first idle moment (a host reporting in a burst never pays for ctypes
                    # and inotify), then one more look: a record written before the watch woke nobody.
                    watch = self.watch = JournalWatch(self.run_dir, self.options.poll_interval_s, self.options.watch_interval_s)
                    continue
                if not self._idle:
                    self._idle = True
                    self.checkpoint(force=True)
                    self.notify_progress()
                watch.wait()
                continue
            self._idle = False
            if not self.sink.deliver(entries, self):
                self.checkpoint(force=True)  # paused or stopping: what is acknowledged is saved now
                self.notify_progress()
                return

    def _follow_new_journal(self, reader: JournalReader) -> None:
        """The journal was replaced and the old file is delivered to its end: start the new one at 0."""
        reader.follow_replacement()
        self.ack.restart(reader.ino)
        self.checkpoint(force=True)
        self.notify_progress()

    def _finish(self) -> None:
        if self.holding:
            self.stop.set()
            self.checkpoint(force=True)
            self._lock.release()
            self.holding = False
        if self._reader is not None:
            self._reader.close()
        if self.watch is not None:
            self.watch.close()
        self.sink.close()
        self.running.clear()
        self.notify_progress()


__all__ = ["BATCH", "Lane"]
