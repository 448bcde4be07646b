"""Acknowledgement of one lane: how far its sink is done with the journal, and when that is saved.

The cursor is replaced (an atomic rename) at most every ``ack_interval_s`` and whenever the lane goes idle,
pauses or stops, so a crash resends at most that window's records, with the same ``Idempotency-Key``s; it
is fsynced at most once a ``cursor_fsync_interval_s`` and at idle and close, which bounds what a power
loss can resend. ``save_cursor`` is called through this module's global (a test counts the saves).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Set

from .cursor import load_cursor, save_cursor


class Acknowledgement:
    """The acknowledged offset of one sink in one journal file, its mark, and the pace of its saves."""

    def __init__(self, run_dir: str, cursor_file: str, *, ack_interval_s: float, cursor_fsync_interval_s: float,
                 status_interval_s: float) -> None:
        self.run_dir = run_dir
        self.cursor_file = cursor_file
        self.ack_interval_s = ack_interval_s
        self.cursor_fsync_interval_s = cursor_fsync_interval_s
        self.status_interval_s = status_interval_s
        self.offset = 0
        self.ino: Optional[int] = None  # the inode of the journal file ``offset`` is an offset in
        self.head: Optional[int] = None  # that file's mark, saved with the cursor (journal_head)
        self.finished_inos: Set[int] = set()  # files delivered to their end, then left for a new one
        self._saved = -1
        self._last_write = 0.0
        self._last_fsync = 0.0
        self._last_status = 0.0

    def load(self) -> None:
        """Start from the saved cursor (0 when it is missing, stale or of another journal)."""
        self.offset, self.head = load_cursor(self.run_dir, self.cursor_file)
        self._saved = self.offset

    def saved_offset(self) -> int:
        """The offset in the cursor file (what another process's lane acknowledged)."""
        return load_cursor(self.run_dir, self.cursor_file).offset

    def advance(self, offset: int, interval_s: Optional[float] = None) -> bool:
        """Every byte before ``offset`` is done; True when a save is due (``interval_s``: the pace now)."""
        self.offset = offset
        return time.monotonic() - self._last_write >= (self.ack_interval_s if interval_s is None else interval_s)

    def truncated(self) -> None:
        """The journal was truncated in place: a new journal, acknowledged from 0."""
        self.offset, self.head = 0, None

    def restart(self, ino: Optional[int]) -> None:
        """The old file is done to its end; the new file ``ino`` starts at 0."""
        if self.ino is not None:
            self.finished_inos.add(self.ino)
        self.offset, self.ino, self.head = 0, ino, None
        self.finished_inos.discard(ino)  # an inode number freed by a delete and used again

    def checkpoint(self, *, force: bool, head_of: Callable[[], Optional[int]], status_interval_s: Optional[float] = None) -> bool:
        """Save the cursor when it moved (fsynced when due or forced); True when status.json is due too.
        Raises OSError (the lane books it)."""
        now = time.monotonic()
        fsync = force or now - self._last_fsync >= self.cursor_fsync_interval_s
        if self.offset != self._saved or fsync:
            if self.head is None and self.offset > 0:
                self.head = head_of()  # once per file: its first line is whole by now
            save_cursor(self.run_dir, self.offset, fsync=fsync, head=self.head, file_name=self.cursor_file)
            self._saved = self.offset
            self._last_write = now
            if fsync:
                self._last_fsync = now
        interval = self.status_interval_s if status_interval_s is None else status_interval_s
        if force or now - self._last_status >= interval:
            self._last_status = now
            return True
        return False

    def covers(self, files: Dict[int, int], path_ino: Optional[int], path_end: int) -> bool:
        """Whether every ``{inode: end}`` range is acknowledged here. An offset counts only in its own file;
        a file this lane followed a replacement away from was delivered to its end."""
        return all(ino in self.finished_inos or (ino == self.ino and (_counted(self.offset, path_end) if ino == path_ino else self.offset) >= end)
                   for ino, end in files.items())


def _counted(acked: int, path_end: int) -> int:
    """An offset past the journal's end: truncated in place, a new journal."""
    return 0 if acked > path_end else acked


def saved_covers(acked: int, files: Dict[int, int], path_ino: Optional[int], path_end: int) -> bool:
    """Whether a cursor file's offset ``acked`` (another process's lane) covers every range. The holder
    leaves an older file only once it is delivered, so a cursor into the path's file covers it."""
    acked = _counted(acked, path_end)
    return all(acked >= end if ino == path_ino else (path_ino is not None and acked > 0) for ino, end in files.items())


__all__ = ["Acknowledgement", "saved_covers"]
