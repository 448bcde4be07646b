"""The cursor: the acknowledged byte offset of the journal, and what is pending after it."""

from __future__ import annotations

import os
import stat
from typing import NamedTuple, Optional

from .config import CURSOR_FILE, JOURNAL_FILE
from .log import get_logger, say_once
from .osutil import atomic_write, count_lines
from .reader import journal_head


class Cursor(NamedTuple):
    """A destination's acknowledged byte offset, and the mark of the journal it belongs to."""

    offset: int
    head: Optional[int]  # journal_head of that journal; None for a cursor of an older version (a plain offset)


def load_cursor(run_dir: str, file_name: str = CURSOR_FILE) -> Cursor:
    """The acknowledged byte offset of the journal there now, with the journal's mark (:func:`journal_head`).

    A missing cursor is 0; a corrupt one, one past the journal's end or one of another file (the journal
    was replaced since) restarts from 0, with a warning."""
    path = os.path.join(run_dir, file_name)
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return Cursor(0, None)
    except OSError as exc:
        get_logger().warning("cannot read %s (%s); delivering again from the start", path, exc.strerror)
        return Cursor(0, None)
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
        return Cursor(0, None)
    if offset == 0:
        return Cursor(0, head)
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
        say_once((path, offset, "past"), "the cursor %s points past the journal's end (the journal was truncated: "
                 "a new journal); delivering it from its start", path)  # flush() without the lock polls this
        return Cursor(0, None)
    if head is not None and head != journal_mark:
        say_once((path, head), "the cursor %s belongs to an earlier journal (it was replaced); delivering the "
                 "journal from its start", path)  # flush() of a deliverer without the lock polls this
        return Cursor(0, None)
    return Cursor(offset, head)


def save_cursor(
    run_dir: str, offset: int, *, fsync: bool = True, head: Optional[int] = None, file_name: str = CURSOR_FILE
) -> None:
    """Atomically record that every byte before ``offset`` of the journal marked ``head`` is acknowledged."""
    data = b"%d\n" % offset if head is None else b"%d %d\n" % (offset, head)
    atomic_write(os.path.join(run_dir, file_name), data, fsync=fsync)


def count_pending(run_dir: str, offset: Optional[int] = None) -> int:
    """Whole journal lines after ``offset`` (default: the saved cursor)."""
    start = load_cursor(run_dir).offset if offset is None else offset
    return count_lines(os.path.join(run_dir, JOURNAL_FILE), start)
