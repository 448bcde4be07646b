"""Weights & Biases bridge: what an unchanged script logs to W&B is reported to AnyLearn too.

:func:`reporter.autolog` (``run --autolog``) wraps ``wandb.sdk.wandb_run.Run.log``, which ``wandb.log``,
``run.log`` and the transformers and Lightning W&B loggers all call, and ``Run.finish``. W&B's call runs
first, unchanged; once it has returned, every number in the logged dict is reported by key (nested dicts
flattened with ``/``) at W&B's step for that row (the ``step=`` given, else the run's step counter), and
the end of a run reports its final metric. ``ANYLEARN_OBJECTIVE_METRIC`` names the objective.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ._objective import require
from ._tracker import TrackerBridge, flatten

require("wandb", "wandb")

__all__ = ["log", "finish"]

BRIDGE = TrackerBridge("wandb")


def log(run: Any, data: Any, step: Optional[int] = None, commit: Optional[bool] = None, *args: Any, **kwargs: Any) -> None:
    """After ``Run.log`` returned: report the numbers of ``data`` at the step W&B filed them under."""
    if not isinstance(data, Mapping):
        return
    if step is None:
        # Run.log moves the counter past the row it filed unless told commit=False (or given a step).
        after = run._local_step
        step = after - 1 if commit is None or commit else after
    BRIDGE.log(id(run), flatten(data), step)


def finish(run: Any, *args: Any, **kwargs: Any) -> None:
    """After ``Run.finish`` returned: the run's final metric."""
    BRIDGE.end(id(run))
