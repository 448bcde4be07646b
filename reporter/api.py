"""The in-process hook: what training code calls.

A report call type-checks the value, appends one line to the run's journal and returns; it never waits
on the network and never raises for runtime trouble. Delivery runs in a daemon thread started on the
first report (unless another deliverer, the wrapper or a sidecar, holds the run's lock: the thread then
waits for the lock, so delivery is never orphaned). At interpreter exit pending records get a bounded
flush.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

from .config import (
    BURST_GAP_S,
    ENV_FLUSH_TIMEOUT,
    ENV_RANK,
    ENV_REPORT_RANKS,
    ENV_REQUEST_TIMEOUT,
    ENV_RUN_DIR,
    ENV_SUPERVISOR_PID,
    Config,
    load_config,
    offline_reason,
)
from .journal import (
    KIND_FINAL,
    KIND_INTERMEDIATE,
    JournalWriter,
    count_pending,
    lock_holder_pid,
    metric_number,
    register_fork_hook,
)
from .log import counted, get_logger, say_offline, warn_pending

if TYPE_CHECKING:  # the delivery side (requests, tenacity) is imported by the delivery thread only
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
_DEFAULTED = (ENV_RUN_DIR, ENV_REPORT_RANKS, ENV_FLUSH_TIMEOUT, ENV_REQUEST_TIMEOUT)  # a bad value: the default


def _consequence(problem: str) -> str:
    """What the hook does about a configuration problem, when the problem's own text does not say it."""
    if problem.startswith(_DEFAULTED):
        return " (using the default)"
    if "journalled" in problem or problem.startswith(ENV_RANK + " "):
        return ""
    return "; records are only journalled until it is fixed"  # a task id or backend URL it cannot use


class _Hook:
    """The process's reporting state: configuration, journal writer and (maybe) a delivery thread."""

    def __init__(self, config: Config, problems: List[str]) -> None:
        self.config = config
        self.writer = JournalWriter(config.run_dir, rank=config.rank, on_non_finite=self._warn_non_finite)
        self.deliverer: Optional["Deliverer"] = None
        self.delivery_started = False
        self._deliverer_ready = threading.Event()
        self._warned_non_finite: set = set()
        for problem in problems:
            get_logger().warning("configuration: %s%s", problem, _consequence(problem))
        register_fork_hook(self, _Hook._after_fork)

    def emit(self, kind: str, value: float, name: Optional[str], step: Optional[int]) -> None:
        try:
            self.writer.append(kind, value, name, step)
            if not self.delivery_started:
                self._start_delivery()
        except Exception as exc:  # training comes first: an internal error is counted, never raised
            self.writer.count_lost(f"internal error ({type(exc).__name__}: {exc})"[:200])
        # No wake-up call here: the journal write itself wakes the deliverer (inotify), or it finds new
        # records by itself within its poll interval where inotify is missing.

    def _warn_non_finite(self, name: Optional[str], value: float) -> None:
        if name not in self._warned_non_finite:
            self._warned_non_finite.add(name)
            get_logger().warning(
                "the metric %r is %r: journalled as null and not sent (said once per metric name)",
                name or self.config.objective_metric, value,
            )

    def _start_delivery(self) -> None:
        with _hook_lock:
            if self.delivery_started:
                return
            self.delivery_started = True
        supervised = bool(os.environ.get(ENV_SUPERVISOR_PID))
        if self.config.offline or supervised:
            # Under the wrapper the command only journals: the wrapper is the run's one deliverer (and has
            # said offline mode already), even once its delivery paused or ended.
            self._deliverer_ready.set()
            if not supervised and lock_holder_pid(self.config.run_dir) is None:
                say_offline(self.config.run_dir, offline_reason())
            return
        threading.Thread(target=self._delivery_main, name="anylearn-reporter-delivery", daemon=True).start()

    def _delivery_main(self) -> None:
        try:
            from .deliver import (
                build_deliverer,  # the HTTP side loads here, off the caller's path
            )

            self.deliverer = build_deliverer(self.config, host_busy=self._reporting_in_a_burst).start()
        except Exception as exc:  # never into training code
            get_logger().warning("cannot start delivery (%s); records stay in %s", exc, self.config.run_dir)
        finally:
            self._deliverer_ready.set()

    def _reporting_in_a_burst(self) -> bool:
        return time.time() - self.writer.last_append_ts < BURST_GAP_S

    def flush(self, timeout_s: Optional[float]) -> bool:
        if not self.delivery_started:
            return True  # nothing was reported by this process
        if timeout_s is None:
            timeout_s = self.config.flush_timeout_s
        timeout_s = min(max(timeout_s, 0.0), MAX_FLUSH_TIMEOUT_S) if timeout_s == timeout_s else 0.0  # NaN: 0
        deadline = time.monotonic() + timeout_s
        self._deliverer_ready.wait(timeout_s)
        if self.deliverer is None:
            if self.config.offline:
                return count_pending(self.config.run_dir) == 0
            while count_pending(self.config.run_dir):  # the wrapper delivers: wait for its cursor
                if time.monotonic() >= deadline:
                    return False
                time.sleep(SUPERVISED_FLUSH_POLL_S)
            return True
        return self.deliverer.flush(max(0.0, deadline - time.monotonic()))

    def close_at_exit(self) -> None:
        self.writer.counters.save()
        if self.writer.lost:
            get_logger().warning("%s", counted(self.writer.lost, "records could not be journalled"))
        if not self.delivery_started or self.config.offline:
            return
        deadline = time.monotonic() + self.config.flush_timeout_s
        self._deliverer_ready.wait(self.config.flush_timeout_s)
        deliverer = self.deliverer
        if deliverer is None:
            return
        if not deliverer.wait_for_lock(max(0.0, deadline - time.monotonic())):
            deliverer.close(0)  # another deliverer (wrapper, sidecar) owns the journal
            return
        if not deliverer.close(max(0.0, deadline - time.monotonic())):
            pending = count_pending(self.config.run_dir)
            if pending:
                warn_pending(pending, self.config.run_dir, self.config.backend_url)

    def _after_fork(self) -> None:
        # The parent's delivery thread did not survive the fork, and its lock stays the parent's:
        # a child of a delivering parent only journals; the parent delivers its records.
        self.deliverer = None
        self._deliverer_ready = threading.Event()
        if self.delivery_started:
            self._deliverer_ready.set()


_hook: Optional[_Hook] = None
_hook_lock = threading.Lock()


def _get_hook() -> _Hook:
    global _hook
    with _hook_lock:
        if _hook is None:
            try:
                config, problems = load_config()
            except Exception as exc:  # e.g. the working directory was deleted: journal under a temp dir
                import tempfile

                config, problems = load_config({"ANYLEARN_REPORTER_DIR": tempfile.gettempdir()})
                problems.append(f"cannot read the configuration ({type(exc).__name__}: {exc})")
            _hook = _Hook(config, problems)
            atexit.register(_close_at_exit)
        return _hook


def _close_at_exit() -> None:
    hook = _hook
    if hook is not None:  # in a forked child the hook has no deliverer: nothing to flush
        try:
            hook.close_at_exit()
        except Exception as exc:  # interpreter shutdown: say it, never raise
            get_logger().warning("flush at exit failed: %s", exc)


def _reset_for_tests() -> None:
    """Forget the process's hook so the next report reads the environment again (tests only)."""
    global _hook
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
    hook = _hook or _get_hook()
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
    hook = _hook or _get_hook()
    for key, number in checked.items():
        hook.emit(KIND_INTERMEDIATE, number, key, step)


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
