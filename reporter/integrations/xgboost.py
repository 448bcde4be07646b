"""XGBoost: :class:`AnylearnCallback`, an ``xgboost.callback.TrainingCallback``.

Example::

    from reporter.integrations.xgboost import AnylearnCallback
    booster = xgboost.train(params, dtrain, evals=[(dval, "validation")], callbacks=[AnylearnCallback()])
    XGBClassifier(eval_metric="logloss", callbacks=[AnylearnCallback()]).fit(X, y, eval_set=[(Xv, yv)])

``after_iteration`` reports the latest value of every evaluation metric at ``step=epoch``, named
``<data>-<metric>`` as XGBoost prints them (``validation_0-logloss``); it never asks training to stop.
``after_training`` reports the final metric. The objective defaults to the last metric of the last data
set (the one XGBoost's early stopping watches), and its direction to XGBoost's own (``auc``, ``map``,
``ndcg``, ``pre`` are maximised). Only the process with ``RANK`` 0 (or unset) reports.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from ._objective import MetricSink, require

_xgboost = require("xgboost", "xgboost")

__all__ = ["AnylearnCallback"]

_MAXIMISED = ("auc", "aucpr", "pre", "map", "ndcg")  # XGBoost's EarlyStopping's list, with their @k forms


def _xgboost_mode(key: str) -> Optional[str]:
    metric = key.rsplit("-", 1)[-1].split("@", 1)[0]
    return "max" if metric in _MAXIMISED else None


def _last_key(keys: List[str]) -> Optional[str]:
    return keys[-1] if keys else None


class AnylearnCallback(_xgboost.callback.TrainingCallback):  # type: ignore[misc, name-defined]
    """Reports XGBoost's evaluation results to AnyLearn.

    ``objective``: the ``<data>-<metric>`` key sent as the task's metric (default:
    ``ANYLEARN_OBJECTIVE_METRIC`` when a key has that name, else the last metric of the last data set).
    ``final``: ``"best"`` or ``"last"`` objective value as the final metric; ``mode``: ``"max"``/``"min"``
    (default: XGBoost's direction for the metric, else min for loss/error names, max otherwise).
    """

    def __init__(self, objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None) -> None:
        super().__init__()
        self.sink = MetricSink(
            "xgboost", objective=objective, final=final, mode=mode,
            natural=_last_key, natural_why="the last metric of the last evaluation set",
        )

    def before_training(self, model: Any) -> Any:
        """Start afresh (XGBoost may reuse a callback across ``train`` calls)."""
        self.sink.reset()
        return model

    def after_iteration(self, model: Any, epoch: int, evals_log: Mapping[str, Mapping[str, Any]]) -> bool:
        """Report the latest value of each evaluation metric; always False (never stops training)."""
        latest = {}
        for data, metrics in evals_log.items():
            for metric, history in metrics.items():
                if history:
                    value = history[-1]
                    key = f"{data}-{metric}"
                    latest[key] = value[0] if isinstance(value, tuple) else value  # cv: (mean, std)
                    if key not in self.sink.mode_hints and _xgboost_mode(key):
                        self.sink.mode_hints[key] = "max"
        self.sink.log(latest, epoch)
        return False

    def after_training(self, model: Any) -> Any:
        """Report the final metric."""
        self.sink.finish()
        return model
