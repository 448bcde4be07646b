"""Small OS helpers: atomic files, JSON files, regular files, line counting, the fork hook."""

from __future__ import annotations

import json
import os
import stat
import threading
import weakref
from typing import Any, Optional


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


def register_fork_hook(obj: Any, method: Any) -> None:
    """Run ``method(obj)`` in every forked child while ``obj`` lives (a weak reference: no leak)."""
    ref = weakref.WeakMethod(getattr(obj, method.__name__))

    def _after_fork() -> None:
        bound = ref()
        if bound is not None:
            bound()

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)


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
