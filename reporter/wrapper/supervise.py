"""Supervision: the command as a child process, the signals passed to it, and the one failure ladder.

:class:`Child` starts the command in its own process group with its output pumped (logs opened before
``Popen``), passes stop signals to the group (SIGKILL after the grace period), reaps the orphans of its tree
while it runs (:mod:`.reaper`), samples its peak RSS, and stops what it leaves behind. Once the command
runs, nothing the wrapper's own bookkeeping does can leave it unsupervised. :func:`outcome_of` maps every
ending to (task state, exit code, failure reason).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set

from ..config import (
    CHILD_PID_FILE,
    STATE_ABORT,
    STATE_FAIL,
    STATE_SUCCESS,
    STDERR_LOG,
    STDOUT_LOG,
)
from ..journal import atomic_write
from ..log import get_logger
from ..resources import PeakRss
from .output import OutputPump, open_log
from .reaper import own_children, reap_orphans, stop_leftovers

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAIT_INTERVAL_S = 0.2  # how often the wait loop reaps orphans and checks the kill deadline
PUMP_JOIN_TIMEOUT_S = 5.0  # a process outside the group that keeps a pipe open must not hold the run


# --- the failure ladder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEnding:
    """How the command ended: the task state to report, the wrapper's exit code, and why it failed (None when
    it succeeded). Not :class:`reporter.client.Outcome`, which is what became of one record's delivery."""

    state: int
    exit_code: int
    failure: Optional[str]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome_of(
    returncode: Optional[int], stop_signal: Optional[int], start_error: Optional[Exception] = None, program: str = ""
) -> RunEnding:
    """The one failure ladder: (task state, wrapper exit code, failure reason) for every way a run ends.

    ``start_error`` is the error of a command that could not be started (127 when it was not found, 126
    otherwise); else ``returncode`` is the command's (negative: killed by that signal) and ``stop_signal`` the
    signal that told the wrapper to stop, if any. Problems found before launch never get here: they exit 2
    and report nothing.
    """
    if start_error is not None or returncode is None:
        code = 127 if isinstance(start_error, FileNotFoundError) else 126
        why = (getattr(start_error, "strerror", None) or str(start_error)) if start_error is not None else "no exit status"
        return RunEnding(STATE_FAIL, code, f"cannot start {program!r}: {why}")
    exit_code = 128 - returncode if returncode < 0 else returncode
    if stop_signal is not None:
        return RunEnding(STATE_ABORT, exit_code, f"stopped: the wrapper received {signal_name(stop_signal)}")
    if returncode == 0:
        return RunEnding(STATE_SUCCESS, 0, None)
    if returncode < 0:
        return RunEnding(STATE_FAIL, exit_code, f"the command was killed by {signal_name(-returncode)}")
    return RunEnding(STATE_FAIL, exit_code, f"the command exited with code {returncode}")

# --- the child --------------------------------------------------------------------------------------


class Child:
    """The command under the wrapper's care, from :meth:`supervise` to its :class:`RunEnding`."""

    def __init__(
        self, argv: List[str], run_dir: str, grace_period_s: float, on_line: Callable[[bytes], Any],
        on_log_failure: Optional[Callable[[str], Any]] = None,
    ) -> None:
        self.argv = argv
        self.run_dir = run_dir
        self.grace_period_s = grace_period_s
        self.on_line = on_line
        self.on_log_failure = on_log_failure
        self.popen: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self.pumps: List[OutputPump] = []
        self.peak_rss_bytes = 0
        self.leftovers: Dict[str, int] = {"stopped": 0, "killed": 0}
        self.orphans_reaped = 0
        self._kill_deadline: Optional[float] = None
        self._children_before: Set[int] = set()
        self._reap_warned = False
        self._log = get_logger()

    # -- signals --

    def handle_signal(self, signum: int, _frame: Any) -> None:
        """A stop signal to the wrapper: pass it to the command's group; SIGKILL after the grace period."""
        if self.popen is not None and self.popen.returncode is not None:
            self._log.info("received %s after the command ended: nothing to pass on", signal_name(signum))
            return
        if self.stop_signal is None:
            self.stop_signal = signum
            self._kill_deadline = time.monotonic() + self.grace_period_s
            self._log.info("received %s: passing it to the command; it is killed after %gs", signal_name(signum), self.grace_period_s)
        self._signal_group(signum)

    def _signal_group(self, signum: int) -> None:
        if self.popen is not None and self.popen.returncode is None:
            try:
                os.killpg(self.popen.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    # -- the steps --

    def supervise(self, env: Mapping[str, str]) -> RunEnding:
        """Start the command, supervise it to its end, stop what it left; the ending's :class:`RunEnding`."""
        try:
            self.start(env)
        except (OSError, ValueError, TypeError) as exc:  # ValueError/TypeError: what check_launchable did not foresee
            outcome = outcome_of(None, self.stop_signal, exc, self.argv[0])
            self._log.error("%s", outcome.failure)
            return outcome
        assert self.popen is not None
        rss = PeakRss(self.popen.pid)
        try:
            rss.start()
        except Exception as exc:  # noqa: BLE001 - no sampler: no peak, the run goes on
            self._log.debug("no peak RSS sampler: %s", exc)
        returncode = self.wait()
        rss.stop()
        self.peak_rss_bytes = rss.peak_bytes
        self.stop_leftovers()
        for pump in self.pumps:
            pump.join(PUMP_JOIN_TIMEOUT_S)
        return outcome_of(returncode, self.stop_signal)

    def start(self, env: Mapping[str, str]) -> None:
        """Start the command; raises only when it could not be started. The logs are opened before."""
        logs = [os.path.join(self.run_dir, name) for name in (STDOUT_LOG, STDERR_LOG)]
        log_fds = [open_log(path) for path in logs]
        self._children_before = own_children()  # not the command's: never stopped as its leftovers
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        try:
            popen = self.popen = subprocess.Popen(self.argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **group)
        except BaseException:
            for fd in log_fds:
                if fd is not None:
                    os.close(fd)
            raise
        # From here on the command runs: nothing below may leave it unsupervised.
        if self.stop_signal is not None:  # told to stop while the command was being started
            self._signal_group(self.stop_signal)
        assert popen.stdout is not None and popen.stderr is not None
        sinks = (sys.stdout.buffer, sys.stderr.buffer)
        for path, fd, source, sink, tail in zip(logs, log_fds, (popen.stdout, popen.stderr), sinks, (False, True)):
            name = os.path.basename(path)
            on_failure = (lambda name=name: self.on_log_failure(name)) if self.on_log_failure is not None else None  # type: ignore[misc]
            pump = OutputPump(source, sink, fd, path, self.on_line, keep_tail=tail, on_log_failure=on_failure)
            try:
                pump.start()
                self.pumps.append(pump)
            except Exception as exc:  # noqa: BLE001 - no thread: close the pipe so the command is not blocked on it
                self._log.error("cannot read the command's %s (%s): it is no longer passed through", name, exc)
                source.close()
        try:
            atomic_write(os.path.join(self.run_dir, CHILD_PID_FILE), b"%d\n" % popen.pid, fsync=False)  # for a sidecar
        except OSError as exc:
            self._log.warning("cannot write %s (%s): a sidecar cannot find the command", CHILD_PID_FILE, exc.strerror)

    def wait(self) -> int:
        """Wait for the command, reaping orphans meanwhile; its return code."""
        assert self.popen is not None
        while True:
            self._reap()
            try:
                return self.popen.wait(timeout=WAIT_INTERVAL_S)
            except subprocess.TimeoutExpired:
                if self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
                    self._log.warning("the command did not stop within the %gs grace period: killing it", self.grace_period_s)
                    self._signal_group(signal.SIGKILL)
                    self._kill_deadline = None

    def stop_leftovers(self) -> None:
        """Stop what the command left in its process group, and its orphans, before the summary."""
        assert self.popen is not None
        try:
            self.leftovers = stop_leftovers(self.popen.pid, self.grace_period_s, self._children_before)
        except Exception as exc:  # noqa: BLE001
            self._log.warning("cannot stop what the command left running: %s", exc)
            return
        self._reap()
        if self.leftovers["stopped"]:
            self._log.info(
                "stopped %d process(es) the command left running (%d needed SIGKILL after the %gs grace period)",
                self.leftovers["stopped"], self.leftovers["killed"], self.grace_period_s,
            )

    def _reap(self) -> None:
        try:
            running = self.popen is not None and self.popen.returncode is None
            self.orphans_reaped += reap_orphans(self.popen.pid if running else None)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            if not self._reap_warned:
                self._reap_warned = True
                self._log.warning("cannot reap orphaned processes: %s", exc)

    # -- what the summary shows --

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode if self.popen is not None else None

    @property
    def stderr_tail(self) -> List[str]:
        return next((pump.tail for pump in self.pumps if pump.tail is not None), [])

    @property
    def log_write_failures(self) -> Dict[str, int]:
        return {os.path.basename(pump.log_path): pump.log_write_failures for pump in self.pumps}


@contextmanager
def signals_passed_to(child: Child) -> Iterator[None]:
    """Pass SIGTERM, SIGINT and SIGHUP to ``child`` inside the block; the previous handlers come back after it,
    whatever happens."""
    previous = {sig: signal.signal(sig, child.handle_signal) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
