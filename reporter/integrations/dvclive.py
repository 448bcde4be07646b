"""DVCLive bridge: what an unchanged script logs to DVCLive is reported to AnyLearn too.

:func:`reporter.autolog` (``run --autolog``) wraps ``dvclive.Live.log_metric`` (which DVCLive's own
framework callbacks call), ``Live.log_params`` (so ``log_param``) and ``Live.end``. DVCLive's call runs
first, unchanged; once it has returned, the metric is reported by name at ``Live.step``, parameters are
merged into ``params.json`` of the run directory, and ``end()`` reports the final metric.
``ANYLEARN_OBJECTIVE_METRIC`` names the objective.
"""

from __future__ import annotations

from typing import Any, Mapping

from ._objective import require
from ._tracker import TrackerBridge

require("dvclive", "dvclive")

__all__ = ["log_metric", "log_params", "end"]

BRIDGE = TrackerBridge("dvclive")


def log_metric(live: Any, name: str, val: Any, *args: Any, **kwargs: Any) -> None:
    """After ``Live.log_metric`` returned: report ``name`` at the live's step."""
    BRIDGE.log(id(live), {name: val}, live.step)


def log_params(live: Any, params: Any, *args: Any, **kwargs: Any) -> None:
    """After ``Live.log_params`` returned: merge them into ``params.json``."""
    if isinstance(params, Mapping):
        BRIDGE.params(params)


def end(live: Any, *args: Any, **kwargs: Any) -> None:
    """After ``Live.end`` returned: the live's final metric."""
    BRIDGE.end(id(live))
