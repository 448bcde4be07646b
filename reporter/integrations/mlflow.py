"""MLflow bridge: what an unchanged script logs to MLflow is reported to AnyLearn too.

:func:`reporter.autolog` (``run --autolog``) wraps ``MlflowClient.log_metric``, ``log_batch``,
``log_param`` and ``set_terminated``, where ``mlflow.log_metric``, ``mlflow.log_metrics``,
``mlflow.log_params``, MLflow's own autologging and the frameworks' MLflow loggers all end. MLflow's call
runs first, unchanged; once it has returned, each metric is reported by name at its step (MLflow's: 0
when none is given), parameters are merged into ``params.json`` of the run directory, and the end of an
MLflow run reports its final metric. ``ANYLEARN_OBJECTIVE_METRIC`` names the objective.

Only a top-level run's end reports a final: a nested run (tagged ``mlflow.parentRunId``, asked of the
store once, when the run first logs) adds its values to its parent's. Each top-level run's end (a loop of
runs) reports its own final, and the backend keeps the last one reported.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional

from ._objective import require
from ._tracker import TrackerBridge

require("mlflow", "mlflow")

__all__ = ["log_metric", "log_batch", "log_param", "set_terminated"]

PARENT_TAG = "mlflow.parentRunId"
_client: list = [None]  # the client of the latest call, to ask the store for a run's parent


def _parent_of(run_id: Hashable) -> Optional[str]:
    client = _client[0]
    if client is None:
        return None
    parent = client.get_run(run_id).data.tags.get(PARENT_TAG)
    return parent or None


BRIDGE = TrackerBridge("mlflow", parent_of=_parent_of)


def log_metric(client: Any, run_id: str, key: str, value: Any, timestamp: Any = None, step: Optional[int] = None,
               *args: Any, **kwargs: Any) -> None:
    """After ``MlflowClient.log_metric`` returned: report ``key`` at ``step``."""
    _client[0] = client
    BRIDGE.log(run_id, {key: value}, step or 0)


def log_batch(client: Any, run_id: str, metrics: Any = (), params: Any = (), *args: Any, **kwargs: Any) -> None:
    """After ``MlflowClient.log_batch`` returned: report its metrics step by step, in order; keep its params."""
    _client[0] = client
    at: Optional[int] = None
    batch: Dict[str, Any] = {}
    for metric in metrics or ():
        step = metric.step or 0
        if batch and (step != at or metric.key in batch):
            BRIDGE.log(run_id, batch, at)
            batch = {}
        at = step
        batch[metric.key] = metric.value
    if batch:
        BRIDGE.log(run_id, batch, at)
    if params:
        BRIDGE.params({param.key: param.value for param in params})


def log_param(client: Any, run_id: str, key: str, value: Any, *args: Any, **kwargs: Any) -> None:
    """After ``MlflowClient.log_param`` returned: merge it into ``params.json``."""
    BRIDGE.params({key: value})


def set_terminated(client: Any, run_id: str, *args: Any, **kwargs: Any) -> None:
    """After ``MlflowClient.set_terminated`` (``mlflow.end_run``) returned: the run's final metric."""
    BRIDGE.end(run_id)
