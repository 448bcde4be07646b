"""The one rule shared by every framework adapter: which logged key is the objective, what is final.

An adapter hands :meth:`MetricSink.log` a mapping of what its framework logged and the step; the sink
keeps the numbers, reports the objective as the task's intermediate metric and every other number by its
own name, remembers the best and last objective value, and reports the final metric once at
:meth:`MetricSink.finish`. It only calls the in-process API (:mod:`reporter.api`): no journal, HTTP or
thread of its own.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from .. import api
from ..config import DEFAULT_OBJECTIVE_METRIC, ENV_OBJECTIVE_METRIC, ENV_RANK
from ..log import first_time, get_logger
from ..record import metric_number

FINAL_CHOICES = ("best", "last")
MODE_CHOICES = ("max", "min")
# Names that are errors to minimise although they contain neither "loss" nor "error" (whole words only).
_ERROR_WORDS = frozenset({"mse", "rmse", "mae", "mape", "rmsle", "l1", "l2", "huber", "perplexity", "ppl", "wer", "cer"})
# The latest objective value sent in this process: [the sink that sent it (None once another sink's echo of
# it was absorbed), the value, whether that sink is a tracker bridge].
_last_sent: list = [None, None, False]


class MissingFramework(ImportError):
    """The framework an integration needs is not installed; the message names the extra to install."""


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise :class:`MissingFramework` naming ``pip install anylearn-reporter[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingFramework(
            f"reporter.integrations.{extra} needs {module.split('.')[0]}: "
            f"pip install 'anylearn-reporter[{extra}]' ({exc})"
        ) from exc


def default_mode(name: str) -> str:
    """``min`` for names containing ``loss`` or ``error`` (or naming a usual error measure such as
    ``rmse`` or ``l2``), ``max`` otherwise."""
    lowered = name.lower()
    if "loss" in lowered or "error" in lowered:
        return "min"
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return "min" if words & _ERROR_WORDS else "max"


def env_rank_is_zero() -> bool:
    """True unless ``RANK`` names a global rank other than 0 (an unreadable value counts as rank 0)."""
    try:
        return int(os.environ.get(ENV_RANK, "0").strip() or 0) == 0
    except ValueError:
        return True


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def check_choices(final: str, mode: Optional[str]) -> None:
    """Raise ValueError for a ``final`` or ``mode`` the sink does not know (a programming error)."""
    if final not in FINAL_CHOICES:
        raise ValueError(f"final must be 'best' or 'last', not {final!r}")
    if mode is not None and mode not in MODE_CHOICES:
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")


class MetricSink:
    """Objective choice, best/last tracking and the translation of logs into report calls.

    ``natural`` is the framework's own choice of objective: a key, or a function of the logged keys (in
    their logged order) returning one, with ``natural_why`` saying where it comes from for the log line.
    ``mode_of`` may give the framework's own knowledge of a key's direction (LightGBM's
    ``is_higher_better``); without it (or when it answers None) :func:`default_mode` decides.
    ``is_rank_zero`` answers whether this process reports (default: ``RANK`` is 0 or unset, read at
    :meth:`reset`, i.e. when the sink is made and when a training run starts).
    """

    def __init__(
        self,
        framework: str,
        *,
        objective: Optional[str] = None,
        final: str = "best",
        mode: Optional[str] = None,
        natural: Any = None,
        natural_why: str = "",
        is_rank_zero: Optional[Callable[[], bool]] = None,
        tracker: bool = False,
    ) -> None:
        check_choices(final, mode)
        self.framework = framework
        self.requested = objective
        self.final = final
        self.requested_mode = mode
        self.natural = natural
        self.natural_why = natural_why
        self._rank_check = is_rank_zero  # None: RANK, read once per training run (at reset)
        self.tracker = tracker  # a tracker bridge: may be told what a trainer's hook was told too
        self.mode_hints: Dict[str, str] = {}
        self._troubled = False
        self.reset()

    def reset(self) -> None:
        """Forget what was logged (a new training run with the same callback)."""
        self._env_rank_zero = env_rank_is_zero() if self._rank_check is None else True
        self.objective: Optional[str] = None
        self.mode: Optional[str] = None
        self.best: Optional[float] = None
        self.last: Optional[float] = None
        self.seen_objective = False
        self.sent_objective = False
        self.finished = False
        self._last_at: Dict[str, Any] = {}  # key -> (step, value) last reported, to drop a repeat
        self._keys_seen: Dict[str, None] = {}
        self._keys_chosen_from = 0

    def is_rank_zero(self) -> bool:
        """Whether this process reports (the framework's answer, else ``RANK`` as read at :meth:`reset`)."""
        return self._rank_check() if self._rank_check is not None else self._env_rank_zero

    # --- choosing the objective ---------------------------------------------------------------

    def _choose(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if self.requested is not None:
            if self.requested in keys:
                self._settle(self.requested, "objective=")
            return
        configured = os.environ.get(ENV_OBJECTIVE_METRIC, "").strip()
        if configured and configured in keys:
            self._settle(configured, ENV_OBJECTIVE_METRIC)
            return
        natural = self.natural(keys) if callable(self.natural) else self.natural
        if natural is not None and natural in keys:
            self._settle(natural, self.natural_why or f"{self.framework}'s default")

    def _settle(self, key: str, why: str) -> None:
        self.objective = key
        self.mode = self.requested_mode or self.mode_hints.get(key) or default_mode(key)
        detail = f"final = {self.final}" + (f" ({self.mode})" if self.final == "best" else "")
        if self._say_once(("objective", key)):
            get_logger().info("%s: objective metric is %r (from %s); %s", self.framework, key, why, detail)
        if self.is_rank_zero():  # show/status/ui then call the right value "best"
            from ..runmeta import write_objective

            write_objective(api.run_directory(), key, self.mode, self.framework)

    def _say_once(self, what: Any) -> bool:
        """Whether to say ``what`` now: always for a trainer's sink (one per training run), once per process
        for a tracker bridge's (a loop of tracker runs, nested runs, say it once)."""
        return not self.tracker or first_time(("tracker", self.framework, what))

    def absorb(self, nested: "MetricSink") -> None:
        """Take in what a nested tracker run (an MLflow child run) logged: its objective values count toward
        this, its parent's, final; the nested run sends no final of its own."""
        self._keys_seen.update(nested._keys_seen)
        if not nested.seen_objective or nested.last is None:
            return
        if self.objective is None:
            self.objective, self.mode = nested.objective, nested.mode
        if nested.best is not None:
            self._track(nested.best)
        self._track(nested.last)
        self.sent_objective = self.sent_objective or nested.sent_objective

    # --- the hot path -------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """Report every number in ``metrics`` at ``step``: the objective as the task's intermediate
        metric, the rest by name. Non-numbers are skipped; a value already reported for the same key at
        the same step (a framework telling two hooks the same thing) is not reported again. Never raises:
        a log the sink cannot read is said once and training goes on."""
        try:
            self._log(metrics, step)
        except Exception as exc:  # a framework handing us something unforeseen: never into training
            self._trouble(exc)

    def _trouble(self, exc: Exception) -> None:
        if not self._troubled:
            self._troubled = True
            get_logger().warning("%s: a log could not be reported (%s: %s); said once, training goes on",
                                 self.framework, type(exc).__name__, exc)

    def _log(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        if not metrics or not self.is_rank_zero():
            return
        numbers: Dict[str, float] = {}
        for key, value in metrics.items():
            number = metric_number(value)
            if number is None or not isinstance(key, str):
                continue
            previous = self._last_at.get(key)
            if previous is not None and previous[0] == step and _same(previous[1], number):
                continue
            self._last_at[key] = (step, number)
            numbers[key] = number
            self._keys_seen[key] = None
        if not numbers:
            return
        if self.objective is None and len(self._keys_seen) != self._keys_chosen_from:
            self._keys_chosen_from = len(self._keys_seen)  # choose again only when a new key shows up
            self._choose(list(self._keys_seen))
        objective_value = numbers.pop(self.objective, None) if self.objective is not None else None
        if numbers:
            api.report_metrics(numbers, step=step)
        if objective_value is not None:
            if not self._echo(objective_value):
                api.report_metric(objective_value, step=step)
                _last_sent[:] = [self, objective_value, self.tracker]
                self.sent_objective = True
            self._track(objective_value)

    def _echo(self, value: float) -> bool:
        """True when another sink has just sent this very value and one of the two is a tracker bridge: a
        trainer logging to a tracker (Lightning's MLFlowLogger, transformers' WandbCallback) tells both the
        trainer's hook and the tracker's the same objective value, which goes to the backend once."""
        sender, sent, by_tracker = _last_sent
        if sender is None or sender is self or not (self.tracker or by_tracker) or not _same(sent, value):
            return False
        _last_sent[0] = None  # a value sent absorbs one echo: a later sink logging it again is not one
        return True

    def _track(self, value: float) -> None:
        self.seen_objective = True
        self.last = value
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if math.isfinite(value) and better:
            self.best = value

    def finish(self) -> Optional[float]:
        """Report the final metric once (the best or the last objective value); returns it, or None when
        no objective value was logged (said in one line naming the keys that were). Never raises."""
        try:
            return self._finish()
        except Exception as exc:
            self._trouble(exc)
            return None

    def _say_never_logged(self, logged: str) -> None:
        configured = os.environ.get(ENV_OBJECTIVE_METRIC, "").strip()
        if self.tracker:  # a tracker has no objective= of its own: ANYLEARN_OBJECTIVE_METRIC names it
            if not self._say_once("no objective"):
                return
            if configured:
                get_logger().warning(
                    "%s: no final metric: the objective %r (%s) was never logged (logged: %s); set %s=<key> "
                    "to one of those", self.framework, configured, ENV_OBJECTIVE_METRIC, logged, ENV_OBJECTIVE_METRIC)
            else:
                get_logger().warning(
                    "%s: no objective metric sent to AnyLearn: %s is not set and no key is named %r; logged: %s "
                    "(journalled by name); set %s=<key> to send one (said once)", self.framework,
                    ENV_OBJECTIVE_METRIC, DEFAULT_OBJECTIVE_METRIC, logged, ENV_OBJECTIVE_METRIC)
            return
        wanted = self.requested or configured or (self.natural if isinstance(self.natural, str) else None)
        get_logger().warning(
            "%s: no final metric: the objective %s was never logged (logged: %s); name one with objective= "
            "or %s", self.framework, repr(wanted) if wanted else "", logged, ENV_OBJECTIVE_METRIC,
        )

    def _finish(self) -> Optional[float]:
        if self.finished or not self.is_rank_zero():
            return None
        self.finished = True
        if not self.seen_objective:
            if self._keys_seen:
                self._say_never_logged(", ".join(list(self._keys_seen)[:20]))
            return None
        if not self.sent_objective:  # every value was an echo of another sink's: that sink sends the final
            return None
        value = self.best if self.final == "best" and self.best is not None else self.last
        assert value is not None
        api.report_metric(value, final=True)
        return value
