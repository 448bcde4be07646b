"""The in-process hook: what training code calls.

A report call type-checks the value, appends one line to the run's journal and returns; it never waits
on the network and never raises for runtime trouble. Delivery runs in a daemon thread started on the
first report (unless another deliverer, the wrapper or a sidecar, holds the run's lock: the thread then
waits for the lock, so delivery is never orphaned). At interpreter exit pending records get a bounded
flush.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Mapping, Optional, Tuple

from .advice import offline_reason
from .config import (
    BURST_GAP_S,
    ENV_FLUSH_TIMEOUT,
    ENV_OBJECTIVE_MODE,
    ENV_RANK,
    ENV_REPORTER_DIR,
    ENV_REPORT_RANKS,
    ENV_REQUEST_TIMEOUT,
    ENV_RUN_DIR,
    ENV_SUPERVISOR_PID,
    Config,
    load_config,
)
from .journal import JournalWriter
from .log import counted, forget_said, get_logger, say_offline, warn_pending
from .osutil import register_fork_hook
from .policy import is_short_gap
from .record import KIND_FINAL, KIND_INTERMEDIATE, metric_number
from .runmeta import HOST_HOOK, mark_attempt, write_objective

if TYPE_CHECKING:  # the delivery side (http.client, tenacity on the first failure) is imported by the delivery thread only
    from .deliver import Deliverer

__all__ = [
    "report_metric",
    "report_intermediate_metric",
    "report_final_metric",
    "report_metrics",
    "flush",
]


MAX_FLUSH_TIMEOUT_S = 1e9
SUPERVISED_FLUSH_POLL_S = 0.05
FORK_IMPORT_WAIT_S = 5.0  # longest a fork waits for an import by one of our threads to finish
FORK_IMPORT_POLL_S = 0.002
THREAD_NAME_PREFIX = "anylearn-reporter"  # every thread of the package is named so
# a bad value: the default
_DEFAULTED = (ENV_RUN_DIR, ENV_REPORT_RANKS, ENV_FLUSH_TIMEOUT, ENV_REQUEST_TIMEOUT, ENV_OBJECTIVE_MODE)


def _consequence(problem: str) -> str:
    """What the hook does about a configuration problem, when the problem's own text does not say it."""
    if problem.startswith(_DEFAULTED):
        return " (using the default)"
    if "until it is fixed" in problem or problem.startswith(ENV_RANK + " "):
        return ""
    return "; records are only journalled until it is fixed"  # a task id or backend URL it cannot use


class _Hook:
    """The process's reporting state: configuration, journal writer and (maybe) a delivery thread."""

    def __init__(self, config: Config, problems: List[str]) -> None:
        self.config = config
        self.writer = JournalWriter(config.run_dir, rank=config.rank, on_non_finite=self._warn_non_finite)
        self.deliverer: Optional["Deliverer"] = None
        self.delivery_started = False
        self.attempt_begun = False
        self._start_once = threading.Lock()  # taken once, never released: a check-and-set a signal handler cannot tear
        self._deliverer_ready = threading.Event()
        self._warned_non_finite: set = set()
        self._exit_delivered = False  # the exit flush ran and left nothing of this process pending
        self._lost_said = 0  # records lost that the caller was told of already (try_report_metric)
        self._flush_at_handler_end = False  # a late report's flush waits for its atexit handler to return
        for problem in problems:
            get_logger().warning("configuration: %s%s", problem, _consequence(problem))
        register_fork_hook(self, _Hook._after_fork)

    def emit(self, kind: str, value: float, name: Optional[str], step: Optional[int], ts: Optional[float] = None) -> None:
        try:
            if not self.attempt_begun:
                self._begin_attempt()
            self.writer.append(kind, value, name, step, ts)
            if not self.delivery_started:
                self._start_delivery()
        except Exception as exc:  # training comes first: an internal error is counted, never raised
            self.writer.count_lost(f"internal error ({type(exc).__name__}: {exc})"[:200])
        # No wake-up call here: the journal write itself wakes the deliverer (inotify), or it finds new
        # records by itself within its poll interval where inotify is missing.

    def _begin_attempt(self) -> None:
        """Before this process's first record: mark a new attempt when the last one's process has ended
        (a run without the wrapper run again), and record ``ANYLEARN_OBJECTIVE_MODE``. The wrapper does
        both itself for its command; other ranks leave it to rank 0."""
        self.attempt_begun = True
        if os.environ.get(ENV_SUPERVISOR_PID) or self.config.rank != 0:
            return
        try:
            os.makedirs(self.config.run_dir, exist_ok=True)
        except OSError:
            return  # the writer counts the record as lost
        mark_attempt(self.config.run_dir, HOST_HOOK, only_if_ended=True)
        if self.config.objective_mode:
            write_objective(self.config.run_dir, self.config.objective_metric, self.config.objective_mode,
                            "ANYLEARN_OBJECTIVE_MODE", replace=False)

    def _warn_non_finite(self, name: Optional[str], value: float) -> None:
        if name not in self._warned_non_finite:
            self._warned_non_finite.add(name)
            get_logger().warning(
                "the metric %r is %r: journalled as null and not sent (said once per metric name)",
                name or self.config.objective_metric, value,
            )

    def _emit_after_exit_flush(self, kind: str, value: float, name: Optional[str], step: Optional[int], ts: Optional[float] = None) -> None:
        """``emit`` once the exit flush has run: a report from a user's ``atexit`` handler that runs after
        ours (registered before ``import reporter``). Journalled, then flushed again once, when that handler
        returns (each report of it journalled at a report's cost), unless the exit flush left records pending
        (said then, with the command that delivers them): a backend that is down must not cost each late
        report a flush timeout."""
        _Hook.emit(self, kind, value, name, step, ts)
        if self._exit_delivered and not self._flush_at_handler_end and not _flush_when_handler_returns(self):
            _close_at_exit()  # a report from another thread, or a profiler is set: flushed here

    def _start_delivery(self) -> None:
        if not self._start_once.acquire(blocking=False):  # never blocks, even re-entered from a signal handler
            return
        self.delivery_started = True
        supervised = bool(os.environ.get(ENV_SUPERVISOR_PID))
        if self.config.offline or supervised:
            # Under the wrapper the command only journals: the wrapper is the run's one deliverer (and has
            # said offline mode already), even once its delivery paused or ended.
            self._deliverer_ready.set()
            from .runlock import lock_holder_pid  # here, not at import: `import reporter` stays small

            if not supervised and lock_holder_pid(self.config.run_dir) is None:
                say_offline(self.config.run_dir, offline_reason())
            return
        threading.Thread(target=self._delivery_main, name="anylearn-reporter-delivery", daemon=True).start()

    def _delivery_main(self) -> None:
        try:
            from .deliver import build_deliverer  # the HTTP side loads here, off the caller's path
            from .pacing import BurstPacing

            self.deliverer = build_deliverer(self.config, pacing=BurstPacing(self._reporting_in_a_burst),
                                             in_training_process=True).start()
        except Exception as exc:  # never into training code
            get_logger().warning("cannot start delivery (%s); records stay in %s", exc, self.config.run_dir)
        finally:
            self._deliverer_ready.set()

    def _reporting_in_a_burst(self) -> bool:
        return is_short_gap(time.time() - self.writer.last_append_ts, BURST_GAP_S)

    def flush(self, timeout_s: Optional[float]) -> bool:
        if not self.delivery_started:
            return True  # nothing was reported by this process
        if timeout_s is None:
            timeout_s = self.config.flush_timeout_s
        timeout_s = min(max(timeout_s, 0.0), MAX_FLUSH_TIMEOUT_S) if timeout_s == timeout_s else 0.0  # NaN: 0
        deadline = time.monotonic() + timeout_s
        self._deliverer_ready.wait(timeout_s)
        if self.deliverer is None:
            from .cursor import count_pending  # here, not at import: `import reporter` stays small

            if self.config.offline:
                return count_pending(self.config.run_dir) == 0
            while count_pending(self.config.run_dir):  # the wrapper delivers: wait for its cursor
                if time.monotonic() >= deadline:
                    return False
                time.sleep(SUPERVISED_FLUSH_POLL_S)
            return True
        # What this process journalled, file by file (the journal may have been renamed or deleted since).
        return self.deliverer.flush(max(0.0, deadline - time.monotonic()), self.writer.written_files())

    def close_at_exit(self) -> None:
        self.emit = self._emit_after_exit_flush  # type: ignore[method-assign]  # no cost on the hot path before
        self._exit_delivered = False
        self.writer.counters.save()
        if sum(self.writer.lost.values()) > self._lost_said:
            get_logger().warning("%s", counted(self.writer.lost, "records could not be journalled"))
        if not self.delivery_started or self.config.offline:
            self._exit_delivered = not self.delivery_started
            return
        deadline = time.monotonic() + self.config.flush_timeout_s
        self._deliverer_ready.wait(self.config.flush_timeout_s)
        deliverer = self.deliverer
        if deliverer is None:  # under the wrapper (it drains the journal after this process exits), or none started
            return
        # The next report (from a later atexit handler) starts a deliverer of its own and flushes again.
        self.deliverer, self.delivery_started = None, False
        self._start_once, self._deliverer_ready = threading.Lock(), threading.Event()
        deliverer.wait_for_lock(max(0.0, deadline - time.monotonic()))  # the worker's first try at the lock
        # What this process journalled first, file by file (the journal may have been renamed since). When
        # another process delivers (a sidecar, another rank, the parent of a forked child), this waits for
        # it, and the worker takes the lock over should that process exit first.
        delivered = deliverer.flush(max(0.0, deadline - time.monotonic()), self.writer.written_files())
        if deliverer.wait_for_lock(0):
            delivered = deliverer.close(max(0.0, deadline - time.monotonic())) and delivered
        else:
            deliverer.close(0)
        self._exit_delivered = delivered
        if not delivered:
            from .cursor import count_pending

            pending = count_pending(self.config.run_dir)
            if pending:
                warn_pending(pending, self.config.run_dir, self.config.backend_url)
            elif self.writer.earlier_files and not deliverer.paused_reason:
                get_logger().warning(
                    "records this process journalled into %s before it was renamed or deleted were not delivered "
                    "(no deliverer had that file open); a renamed file can be delivered by moving it back into a "
                    "run directory and running `anylearn-reporter sync` there", self.writer.path,
                )

    def _after_fork(self) -> None:
        # The parent's delivery thread did not survive the fork, and its lock stays the parent's. The
        # child's first report starts a deliverer of its own: it waits for the lock, and takes delivery
        # over should the parent exit first (at the latest in the child's exit flush).
        self.deliverer = None
        self.delivery_started = False
        self._start_once = threading.Lock()
        self._deliverer_ready = threading.Event()
        self.__dict__.pop("emit", None)


_hook: Optional[_Hook] = None
# An RLock and a flag: a report from a signal handler while this thread builds the hook must not wait
# for itself; its record waits in _early (a deque: appends and pops are atomic) and is journalled next.
_hook_lock = threading.RLock()
_building = False
_early: Deque[Tuple[str, float, Optional[str], Optional[int], float]] = collections.deque()
_exit_flushed = False  # the exit flush has run (a report after it flushes again)


def _reporting_hook() -> Optional[_Hook]:
    """The process's hook, made on first use; None while this very thread is making it (a report from a
    signal handler that interrupted the first report)."""
    global _hook, _building
    with _hook_lock:
        if _hook is None:
            if _building:
                return None
            _building = True
            try:
                if _hook is None:
                    try:
                        config, problems = load_config()
                    except Exception as exc:  # e.g. the working directory was deleted: journal under a temp dir
                        import tempfile

                        config, problems = load_config({ENV_REPORTER_DIR: tempfile.gettempdir()})
                        problems.append(f"cannot read the configuration ({type(exc).__name__}: {exc})")
                    _hook = _Hook(config, problems)
                    if _exit_flushed:  # the first report comes from an atexit handler that runs after ours
                        _hook._exit_delivered = True
                        _hook.emit = _hook._emit_after_exit_flush  # type: ignore[method-assign]
            finally:
                _building = False
        hook = _hook
    while _early:
        try:
            hook.emit(*_early.popleft())
        except IndexError:  # a report from a signal handler took it
            break
    return hook


def _get_hook() -> _Hook:
    hook = _reporting_hook()
    if hook is None:
        raise RuntimeError("the reporter is being set up by this thread (called from a signal handler)")
    return hook


def _emit(kind: str, number: float, name: Optional[str], step: Optional[int]) -> None:
    hook = _hook or _reporting_hook()
    if hook is None:
        _early.append((kind, number, name, step, time.time()))
    else:
        hook.emit(kind, number, name, step)


def _close_at_exit() -> None:
    global _exit_flushed
    _exit_flushed = True
    hook = _hook
    if hook is not None:
        try:
            hook.close_at_exit()
        except Exception as exc:  # interpreter shutdown: say it, never raise
            get_logger().warning("flush at exit failed: %s", exc)


def _our_import_under_way() -> bool:
    """Whether one of this package's threads is importing a module (it holds the module's import lock).
    Reads CPython's import bookkeeping; False where that is not there to read."""
    locks = getattr(sys.modules.get("_frozen_importlib"), "_module_locks", None)
    if not locks:
        return False
    ours = {t.ident for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX)}
    try:
        held = [ref() for ref in list(locks.values())]
    except Exception:  # another thread changed the table under us: look again
        return True
    return any(getattr(lock, "owner", None) in ours for lock in held if lock is not None)


def _before_fork() -> None:
    """Let an import by one of our threads (the delivery side, loaded by the delivery thread after the first
    report) finish before the process forks: the child would inherit the module half-initialised, its import
    lock held by a thread the child does not have, and neither its own delivery nor the user's code could
    import it again. Costs a fork nothing when no such import is under way; bounded should that import
    wait for a module the forking thread is importing."""
    deadline = time.monotonic() + FORK_IMPORT_WAIT_S
    while _our_import_under_way() and time.monotonic() < deadline:
        time.sleep(FORK_IMPORT_POLL_S)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)

def _flush_when_handler_returns(hook: _Hook) -> bool:
    """Flush once when the ``atexit`` handler making this late report returns, not once per report. No
    handler registered while atexit runs its handlers is ever run (CPython 3.9 to 3.13), so the handler's
    return is caught with a profile function: its frame is the bottom of the main thread's stack. False
    where that cannot be arranged (another thread, a profiler already set): the caller flushes at once."""
    if threading.current_thread() is not threading.main_thread() or sys.getprofile() is not None:
        return False

    def on_return(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_back is None:
            sys.setprofile(None)
            hook._flush_at_handler_end = False
            _close_at_exit()

    hook._flush_at_handler_end = True
    sys.setprofile(on_return)
    return True


# Registered at import, not at the first report: atexit runs handlers last-registered-first, so ours runs
# after every handler registered once reporter is imported (a "report the best at exit" among them).
atexit.register(_close_at_exit)


def _reset_for_tests() -> None:
    """Forget the process's hook so the next report reads the environment again (tests only)."""
    global _hook
    forget_said()  # the say-once memory, so each test sees its own first warning
    with _hook_lock:
        if _hook is not None:
            if _hook.deliverer is not None:
                _hook.deliverer.close(0.5)
            _hook.writer.close()
        _hook = None


def _as_float(value: Any) -> float:
    number = metric_number(value)
    if number is None:  # a programming error: the one exception training code may see
        raise TypeError(f"a metric must be a single number (int, float or a numeric scalar), not {type(value).__name__}: {value!r:.60}")
    return number


def _as_step(step: Any) -> Optional[int]:
    if step is None:
        return None
    if type(step) is not int:
        if type(step) is bool or not hasattr(step, "__index__"):
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        try:
            step = int(step.__index__())
        except Exception as exc:
            raise TypeError(f"step must be an int or None; int() of this {type(step).__name__} failed: {exc}") from None
    return step  # the journal writer keeps the one rule for a step beyond 64 bits


def _as_flag(flag: Any) -> bool:
    try:
        return bool(flag)
    except Exception as exc:  # e.g. a numpy array of several values
        raise TypeError(f"final must be a bool, not {type(flag).__name__}: {exc}") from None


def _as_name(name: Any) -> Optional[str]:
    if name is None or type(name) is str:
        return name
    raise TypeError(f"name must be a str or None, not {type(name).__name__}")


def report_metric(value: Any, *, step: Optional[int] = None, name: Optional[str] = None, final: bool = False) -> None:
    """Record a metric for the current task; returns in microseconds and never blocks on the network.

    ``value`` is an int, a float or anything with ``__float__`` (numpy scalars, 0-d tensors); a bool, a
    string or anything else raises :class:`TypeError`. NaN and infinities are journalled as null and not
    sent. ``final=True`` reports the task's final metric. Records named other than the objective metric
    (``ANYLEARN_OBJECTIVE_METRIC``, default ``metric``) are journalled but not sent.

    Example::

        for epoch in range(epochs):
            reporter.report_metric(accuracy, step=epoch)
        reporter.report_metric(best_accuracy, final=True)
    """
    number = _as_float(value)
    if step is not None and type(step) is not int:
        step = _as_step(step)
    if name is not None and type(name) is not str:
        name = _as_name(name)
    if final is not False and final is not True:
        final = _as_flag(final)
    hook = _hook
    if hook is None:
        _emit(KIND_FINAL if final else KIND_INTERMEDIATE, number, name, step)
    else:
        hook.emit(KIND_FINAL if final else KIND_INTERMEDIATE, number, name, step)


def report_intermediate_metric(metric: Any) -> None:
    """AnyLearn's name: report one intermediate value of the objective metric."""
    report_metric(metric)


def report_final_metric(metric: Any) -> None:
    """AnyLearn's name: report the task's final metric."""
    report_metric(metric, final=True)


def report_metrics(metrics: Mapping[str, Any], *, step: Optional[int] = None) -> None:
    """Record several named metrics at one step, e.g. ``{"metric": acc, "loss": loss}``.

    All are journalled; the one named by ``ANYLEARN_OBJECTIVE_METRIC`` (default ``metric``) is sent.
    Every value is checked before any is written, so a wrong type journals nothing.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"report_metrics takes a mapping of name to number, not {type(metrics).__name__}")
    checked: Dict[str, float] = {}
    try:
        items = list(metrics.items())
    except Exception as exc:
        raise TypeError(f"cannot read the mapping's items: {type(exc).__name__}: {exc}") from None
    for key, value in items:
        checked[_as_name(key) or ""] = _as_float(value)
    step = _as_step(step)
    for key, number in checked.items():
        _emit(KIND_INTERMEDIATE, number, key, step)


def run_directory() -> str:
    """The run directory this process journals into (made on first use), for host-side files such as
    ``params.json``; loads the configuration like the first report would, never raises."""
    return _get_hook().config.run_dir


def flush(timeout: Optional[float] = None) -> bool:
    """Wait up to ``timeout`` seconds (default ``ANYLEARN_FLUSH_TIMEOUT``) for pending records to be
    delivered; True when nothing this run journalled is still pending. Never raises for delivery trouble."""
    hook = _hook
    if hook is None:
        return True
    try:
        return hook.flush(timeout)
    except Exception as exc:
        get_logger().warning("flush failed: %s", exc)
        return False


def try_report_metric(value: Any, *, step: Optional[int] = None, name: Optional[str] = None, final: bool = False) -> bool:
    """:func:`report_metric`, and whether the record was journalled: False when the writer could not write
    it (it said why, once; the exit summary does not say it again, and the run's counters keep it). For the
    ``report`` command, which exits 1 then; :class:`TypeError` for a value that is not a number."""
    hook = _get_hook()
    lost_before = sum(hook.writer.lost.values())
    report_metric(value, step=step, name=name, final=final)
    lost = sum(hook.writer.lost.values())
    if lost == lost_before:
        return True
    hook._lost_said = lost
    return False
