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


def _table() -> Dict[int, Tuple[str, int, int]]:
    """Every live process as ``pid -> (state, parent, group)``; zombies and the dead left out."""
    table = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None and stat[0] not in ("Z", "X"):
            table[pid] = stat
    return table


def leftovers(pgid: int, exclude: Set[int]) -> Set[int]:
    """Live processes the command left: those in its process group ``pgid``, our children (the command's
    orphans, re-parented to us as subreaper), every descendant of those, and every member of their process
    groups (a process that left the command's group with ``setsid`` takes its own children with it).
    ``exclude`` (children we had before the command started) and their descendants are never included,
    nor this process or its own group."""
    me = os.getpid()
    my_group = os.getpgrp()
    table = _table()
    children: Dict[int, Set[int]] = {}
    for pid, (_, parent, _) in table.items():
        children.setdefault(parent, set()).add(pid)
    found: Set[int] = set()
    todo = [pid for pid, (_, parent, group) in table.items()
            if pid != me and pid not in exclude and (group == pgid or parent == me)]
    groups = {pgid}
    while todo:
        pid = todo.pop()
        if pid in found or pid == me or pid in exclude or pid not in table:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
        group = table[pid][2]
        if group not in groups and group != my_group:
            groups.add(group)
            todo.extend(other for other, (_, _, g) in table.items() if g == group)
    return found


def own_children() -> Set[int]:
    """Pids whose parent is this process."""
    me = os.getpid()
    return {pid for pid in _all_pids() if (_stat(pid) or ("", 0, 0))[1] == me}


def _signal_all(pids: Iterable[int], signum: int) -> None:
    """``signum`` to each of ``pids`` and to each of their process groups except our own."""
    my_group = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except (ProcessLookupError, PermissionError):
            pass
    for group in groups - {my_group, 0}:
        try:
            os.killpg(group, signum)
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
    kill_wait_s: float = 5.0,
) -> Dict[str, int]:
    """Stop what the command left running: SIGTERM, up to ``grace_period_s``, then SIGKILL.

    The set is scanned again on every round, so what a stopped process leaves behind (its children,
    re-parented to us) is stopped too. Returns ``{"stopped": n, "killed": k}``: n distinct processes were
    left, k of them were still alive at the end of the grace period and got SIGKILL.
    """
    seen: Set[int] = set()
    termed: Set[int] = set()
    deadline = clock() + grace_period_s
    while True:
        reap_orphans(None)
        alive = leftovers(pgid, exclude)
        fresh = alive - termed
        if fresh:
            _signal_all(fresh, signal.SIGTERM)
            termed |= fresh
        seen |= alive
        if not alive or clock() >= deadline:
            break
        time.sleep(interval_s)
    killed: Set[int] = set()
    end = clock() + kill_wait_s
    while alive and clock() < end:
        killed |= alive
        seen |= alive
        _signal_all(alive, signal.SIGKILL)
        time.sleep(interval_s)
        reap_orphans(None)
        alive = leftovers(pgid, exclude)
    reap_orphans(None)
    return {"stopped": len(seen), "killed": len(killed)}
