"""The command's process tree: reap every orphan, stop what the command leaves behind, guard the key.

As PID 1 of a container every orphan of the container is re-parented to the wrapper; elsewhere the
wrapper makes itself the *child subreaper* of the command's tree (``PR_SET_CHILD_SUBREAPER``), so the
command's orphans come to it instead of to the system's init. Either way the wrapper reaps them the way
tini and dumb-init do, without stealing the command's own exit status: it peeks at a finished child with
``WNOWAIT`` and leaves the command's status for :class:`subprocess.Popen`.

Linux only through ``prctl`` over ``ctypes``; elsewhere each function says it could not and nothing breaks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Callable, Dict, Iterable, Optional, Set, Tuple

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where there is no such call or it fails."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return False
    prctl.restype = ctypes.c_int
    return prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (implicit for PID 1). True when it is."""
    return os.getpid() == 1 or _prctl(PR_SET_CHILD_SUBREAPER, 1)


def make_non_dumpable() -> bool:
    """Make this process non-dumpable: its ``/proc/<pid>/environ`` and memory become unreadable, and
    ``ptrace`` impossible, for every process of the same user that is not privileged. Children get their own
    dumpable flag back when they ``exec``. True on success."""
    return _prctl(PR_SET_DUMPABLE, 0)


def reap_orphans(keep_pid: Optional[int]) -> int:
    """Reap every finished child except ``keep_pid`` (the command: its status belongs to ``Popen``).

    Returns how many were reaped. Never blocks; never raises.
    """
    reaped = 0
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (ChildProcessError, OSError):
            return reaped
        if info is None or info.si_pid == 0 or info.si_pid == keep_pid:
            # The command first in line: the others wait for the next round, after Popen has it.
            return reaped
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
            reaped += 1
        except ChildProcessError:
            pass


def _stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, parent pid, process group) of ``pid`` from ``/proc``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name in parentheses may hold spaces and ')'
    try:
        return fields[0], int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _all_pids() -> Iterable[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(name) for name in names if name.isdigit()]


def leftovers(pgid: int, exclude: Set[int]) -> Set[int]:
    """Live processes in the process group ``pgid``, and live children of ours (re-parented orphans of the
    command), except ``exclude`` (children we had before the command started)."""
    me = os.getpid()
    found = set()
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is None or pid == me or pid in exclude:
            continue
        state, parent, group = stat
        if state in ("Z", "X"):
            continue
        if group == pgid or parent == me:
            found.add(pid)
    return found


def own_children() -> Set[int]:
    """Pids whose parent is this process."""
    me = os.getpid()
    return {pid for pid in _all_pids() if (_stat(pid) or ("", 0, 0))[1] == me}


def _signal_all(pids: Iterable[int], pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop_leftovers(
    pgid: int,
    grace_period_s: float,
    exclude: Set[int] = frozenset(),  # type: ignore[assignment]
    *,
    interval_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> Dict[str, int]:
    """Stop what the command left running: SIGTERM, up to ``grace_period_s``, then SIGKILL.

    Returns ``{"stopped": n, "killed": k}``: n processes were left, k of them needed SIGKILL.
    """
    left = leftovers(pgid, exclude)
    if not left:
        return {"stopped": 0, "killed": 0}
    _signal_all(left, pgid, signal.SIGTERM)
    deadline = clock() + grace_period_s
    alive = set(left)
    while alive:
        reap_orphans(None)
        alive = {pid for pid in alive if (_stat(pid) or ("Z",))[0] not in ("Z", "X")}
        if not alive or clock() >= deadline:
            break
        time.sleep(interval_s)
    killed = len(alive)
    if alive:
        _signal_all(alive, pgid, signal.SIGKILL)
        end = clock() + 5.0
        while alive and clock() < end:
            reap_orphans(None)
            alive = {pid for pid in alive if (_stat(pid) or ("Z",))[0] not in ("Z", "X")}
            time.sleep(interval_s)
    reap_orphans(None)
    return {"stopped": len(left), "killed": killed}
