"""What the tracker bridges (MLflow, W&B, DVCLive) share: one :class:`MetricSink` per tracker run, its
final metric when the run ends (or when the process exits, for a run never ended), and parameters merged
into ``params.json`` of the run directory.

A tracker has no objective of its own: ``ANYLEARN_OBJECTIVE_METRIC`` names it; without it a key named
``metric`` is the objective, as the deliverer's :class:`~reporter.policy.SendRule` sends a record of that
name; every other number is journalled by name. A nested run (``parent_of`` answers its parent) sends no
final: its values count toward its top-level run's. Like the sink, nothing here raises into training.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from typing import Any, Callable, Dict, Hashable, Iterable, Mapping, Optional

from .. import api
from ..config import DEFAULT_OBJECTIVE_METRIC, ENV_OBJECTIVE_METRIC, PARAMS_FILE
from ..log import get_logger
from ..osutil import atomic_write_json, read_json
from ..paramsfile import masked_for_this_task
from ._objective import MetricSink



def default_objective(keys: Iterable[str]) -> Optional[str]:
    """A tracker's objective when ``ANYLEARN_OBJECTIVE_METRIC`` names none: the key named ``metric``, the
    name the deliverer sends as the objective (the sink takes it only when it was logged)."""
    return None if os.environ.get(ENV_OBJECTIVE_METRIC, "").strip() else DEFAULT_OBJECTIVE_METRIC


class TrackerBridge:
    """The sinks of one tracker's runs in this process, keyed by the tracker's run (an id or object).

    ``parent_of(run)`` may answer the run a run is nested in (None for a top-level run); it is asked once,
    when the run first logs."""

    def __init__(self, tracker: str, parent_of: Optional[Callable[[Hashable], Optional[Hashable]]] = None) -> None:
        self.tracker = tracker
        self.parent_of = parent_of
        self._sinks: Dict[Hashable, MetricSink] = {}
        self._parents: Dict[Hashable, Hashable] = {}
        self._lock = threading.Lock()
        self._exit_hook = False
        self._params_said = False

    def log(self, run: Hashable, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """Report every number of ``metrics`` at ``step`` for the tracker run ``run``."""
        sink = self._sinks.get(run)
        if sink is None:
            sink = self._new_sink(run)
        sink.log(metrics, step)

    def _new_sink(self, run: Hashable) -> MetricSink:
        parent = self._parent(run)
        with self._lock:
            sink = self._sinks.get(run)
            if sink is None:
                sink = self._sinks[run] = MetricSink(self.tracker, tracker=True, natural=default_objective,
                                                     natural_why=f"the default name; {ENV_OBJECTIVE_METRIC} is not set")
                if parent is not None:
                    self._parents[run] = parent
                if not self._exit_hook:
                    # After the reporter's own exit flush (made by run_directory() if not yet), so that it runs
                    # before that flush: a tracker's own exit hook ending its runs was registered earlier, and
                    # runs after the flush, too late.
                    api.run_directory()
                    self._exit_hook = True
                    atexit.register(self.end_all)
            return sink

    def _parent(self, run: Hashable) -> Optional[Hashable]:
        if self.parent_of is None:
            return None
        try:
            return self.parent_of(run)
        except Exception:  # a store that cannot say: a top-level run
            return None

    def end(self, run: Hashable) -> None:
        """The tracker run ended: report its final metric; a nested run's values go to its parent's instead."""
        with self._lock:
            sink = self._sinks.pop(run, None)
            parent = self._parents.pop(run, None)
        if sink is None:
            return
        if parent is not None:
            target = self._sinks.get(parent)
            (target if target is not None else self._new_sink(parent)).absorb(sink)
        else:
            sink.finish()

    def end_all(self) -> None:
        """Report the final metric of every run not ended (at interpreter exit), nested runs first."""

        def depth(run: Hashable) -> int:
            seen = 0
            while run in self._parents and seen < 100:
                run, seen = self._parents[run], seen + 1
            return seen

        while self._sinks:
            self.end(max(list(self._sinks), key=depth))

    def params(self, params: Mapping[str, Any]) -> None:
        """Merge ``params`` into ``params.json`` in the run directory; never raises."""
        try:
            run_dir = api.run_directory()
            os.makedirs(run_dir, exist_ok=True)
            path = os.path.join(run_dir, PARAMS_FILE)
            with self._lock:
                kept = read_json(path)
                merged = dict(kept) if isinstance(kept, dict) else {}
                merged.update(json.loads(json.dumps({str(k): v for k, v in params.items()}, default=str)))
                atomic_write_json(path, masked_for_this_task(merged))
        except Exception as exc:  # parameters are a courtesy: never into training
            if not self._params_said:
                self._params_said = True
                get_logger().warning("%s: cannot write %s: %s", self.tracker, PARAMS_FILE, exc)


def flatten(data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a/b": 1}`` (W&B's nested dicts); keys that are not strings are left out."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat
