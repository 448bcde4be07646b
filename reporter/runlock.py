"""flock roles in a run directory: one holder per role (the deliverer, the TensorBoard reader...)."""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from .config import LOCK_FILE
from .osutil import register_fork_hook


class RunLock:
    """``flock`` on a file of the run directory: one holder of a role per run at a time. ``deliver.lock``
    (the default) is the deliverer's; another file name is another role (the TensorBoard reader's).

    The holder writes its pid into the file. A forked child inherits the descriptor but never the role:
    it closes its copy after fork, and only the process that took the lock releases it.
    """

    def __init__(self, run_dir: str, file_name: str = LOCK_FILE) -> None:
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, file_name)
        self._fd = -1
        self._owner_pid = -1
        self._opening = -1  # a descriptor being locked: recorded before flock, so a fork's child closes it too
        register_fork_hook(self, RunLock._forget_after_fork)

    @property
    def held(self) -> bool:
        """True when this process holds the lock."""
        return self._fd >= 0 and self._owner_pid == os.getpid()

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        if self.held:
            return True
        os.makedirs(self.run_dir, exist_ok=True)
        fd = self._opening = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._opening = -1
            os.close(fd)
            return False
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except BaseException:  # a full disk: give the lock back (closing the descriptor releases it), or it
            self._opening = -1  # would stay taken by this very process, which could then never take it again
            os.close(fd)
            raise
        self._fd, self._owner_pid = fd, os.getpid()
        self._opening = -1
        return True

    def release(self) -> None:
        """Give the lock up (only the process that took it can)."""
        if self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd, self._owner_pid = -1, -1

    def _forget_after_fork(self) -> None:
        # A fork that landed while another thread was taking the lock: the child's copy of that descriptor
        # would hold the parent's lock for as long as the child lives (the role never free again).
        if self._opening >= 0 and self._opening != self._fd:
            try:
                os.close(self._opening)
            except OSError:
                pass
            self._opening = -1
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
