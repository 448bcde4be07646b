"""Wake-up of a delivery lane: inotify over ctypes, so the journal writer's own ``write`` wakes the lane.

:class:`JournalWatch` blocks until the journal grows, is replaced, ``interrupt()`` is called or a safety
timeout passes. Where the system has no inotify (or is out of watches) it sleeps a poll interval instead.
The libc calls are looked up once, at the first watch, through the module global ``_inotify`` (tests set
it to ``False`` to force polling, so it is read at call time).
"""

from __future__ import annotations

import errno
import os
import select
import struct
import threading
from typing import Any, Optional

from .config import JOURNAL_FILE
from .log import get_logger

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

    @property
    def watched_ino(self) -> Optional[int]:
        """The inode of the journal file the watch is on; None while it watches the directory (or polls)."""
        return self._file_ino if self._watching_file else None

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
            data = _read_all(fd)
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


def _read_all(fd: int) -> bytes:
    """Everything a non-blocking descriptor has to read now (the wake-up pipe, the inotify events)."""
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


__all__ = ["JournalWatch"]
