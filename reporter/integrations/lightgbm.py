"""LightGBM: :func:`anylearn_callback` returns a LightGBM callback.

Example::

    from reporter.integrations.lightgbm import anylearn_callback
    booster = lightgbm.train(params, train_set, valid_sets=[valid], callbacks=[anylearn_callback()])
    LGBMRegressor(n_estimators=100).fit(X, y, eval_set=[(Xv, yv)], callbacks=[anylearn_callback()])

Each entry of ``env.evaluation_result_list`` is reported at ``step=env.iteration``, named
``<data>-<metric>`` (``valid_0-l2``). The objective defaults to the last metric of the last data set, its
direction to LightGBM's own ``is_higher_better``. LightGBM tells a callback nothing when training ends,
so the final metric is reported at the last planned iteration; when training stops earlier (early
stopping, an exception) it is reported by :meth:`finish` (autolog calls it when ``train`` returns), else
at interpreter exit. Only the process with ``RANK`` 0 (or unset) reports.
"""

from __future__ import annotations

import atexit
from typing import Any, Optional

from ._objective import MetricSink, require

require("lightgbm", "lightgbm")

__all__ = ["anylearn_callback", "AnylearnLightGBMCallback"]

CALLBACK_ORDER = 25  # after LightGBM's own recorders (10, 20), before early stopping (30), which may raise


def _last_key(keys: list) -> Optional[str]:
    return keys[-1] if keys else None


class AnylearnLightGBMCallback:
    """The callable :func:`anylearn_callback` returns; see there."""

    def __init__(self, objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None) -> None:
        self.order = CALLBACK_ORDER  # an instance attribute: LightGBM reads cb.__dict__
        self.before_iteration = False
        self.sink = MetricSink(
            "lightgbm", objective=objective, final=final, mode=mode,
            natural=_last_key, natural_why="the last metric of the last validation set",
        )
        self._exit_hook = False

    def __call__(self, env: Any) -> None:
        if env.iteration == env.begin_iteration:
            self.sink.reset()
        latest = {}
        for entry in env.evaluation_result_list or ():
            data, metric, value, higher_better = entry[0], entry[1], entry[2], entry[3]
            key = f"{data}-{metric}"
            latest[key] = value
            if key not in self.sink.mode_hints and isinstance(higher_better, bool):
                self.sink.mode_hints[key] = "max" if higher_better else "min"
        self.sink.log(latest, env.iteration)
        if env.iteration >= env.end_iteration - 1:
            self.finish()
        elif not self._exit_hook and self.sink.seen_objective:
            self._exit_hook = True  # registered after the reporter's own exit flush, so it runs before it
            atexit.register(self.finish)

    def finish(self) -> Optional[float]:
        """Report the final metric now, if it was not yet; returns it (None when there was none)."""
        if self._exit_hook:
            self._exit_hook = False
            atexit.unregister(self.finish)
        if self.sink.finished or not self.sink.seen_objective:
            return None
        return self.sink.finish()


def anylearn_callback(objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None) -> AnylearnLightGBMCallback:
    """A LightGBM callback reporting every evaluation result to AnyLearn.

    ``objective``: the ``<data>-<metric>`` key sent as the task's metric (default:
    ``ANYLEARN_OBJECTIVE_METRIC`` when a key has that name, else the last metric of the last data set).
    ``final``: ``"best"`` or ``"last"`` objective value as the final metric; ``mode``: ``"max"``/``"min"``
    (default: LightGBM's ``is_higher_better``, else min for loss/error names, max otherwise).
    """
    return AnylearnLightGBMCallback(objective=objective, final=final, mode=mode)
