"""Lightning (``lightning`` or ``pytorch_lightning``): :class:`AnylearnLogger`, a Lightning ``Logger``.

Example::

    from reporter.integrations.lightning import AnylearnLogger
    trainer = lightning.Trainer(max_epochs=5, logger=[CSVLogger("logs"), AnylearnLogger()])

``log_metrics(metrics, step)`` reports every number at ``step``; ``log_hyperparams(params)`` writes
``params.json`` in the run directory; ``finalize(status)`` reports the final metric and flushes. The
objective defaults to ``val_loss``. Only the global rank zero reports (Lightning's ``rank_zero_only``).
When both packages are installed the logger is an instance of both ``Logger`` classes, so either
package's ``Trainer`` takes it.
"""

from __future__ import annotations

import importlib
import json
import os
from argparse import Namespace
from typing import Any, Dict, List, Mapping, Optional, Union

from .. import api
from ..config import PARAMS_FILE, env_task_id
from ..osutil import atomic_write_json
from ..paramsfile import masked_for_this_task
from ._objective import MetricSink, MissingFramework, env_rank_is_zero


__all__ = ["AnylearnLogger"]


def _logger_bases() -> tuple:
    bases: List[type] = []
    problems: List[str] = []
    for module in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        try:
            bases.append(importlib.import_module(module).Logger)
        except ImportError as exc:
            problems.append(f"{module.split('.')[0]}: {exc}")
    if not bases:
        raise MissingFramework(
            "reporter.integrations.lightning needs lightning (or pytorch_lightning): "
            f"pip install 'anylearn-reporter[lightning]' ({'; '.join(problems)})"
        )
    return tuple(dict.fromkeys(bases))  # one class when pytorch_lightning is an alias of lightning's


def _global_rank_is_zero() -> bool:
    """Lightning's own answer (``rank_zero_only.rank``, which its strategies set), else ``RANK``."""
    try:
        from lightning_utilities.core.rank_zero import rank_zero_only
    except ImportError:
        return env_rank_is_zero()
    rank = getattr(rank_zero_only, "rank", None)
    return env_rank_is_zero() if rank is None else rank == 0


def _plain(params: Any) -> Dict[str, Any]:
    if isinstance(params, Namespace):
        params = vars(params)
    if not isinstance(params, Mapping):
        return {"params": params}
    return {str(key): (_plain(value) if isinstance(value, (Namespace, Mapping)) else value) for key, value in params.items()}


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else repr(v)))


class AnylearnLogger(*_logger_bases()):  # type: ignore[misc]
    """Reports what Lightning logs to AnyLearn.

    ``objective``: the logged key sent as the task's metric (default: ``ANYLEARN_OBJECTIVE_METRIC`` when a
    logged key has that name, else ``val_loss``). ``final``: ``"best"`` or ``"last"`` objective value as
    the final metric; ``mode``: ``"max"``/``"min"`` (default min for loss/error names, max otherwise).
    """

    def __init__(self, objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None) -> None:
        super().__init__()
        self.sink = MetricSink(
            "lightning", objective=objective, final=final, mode=mode,
            natural="val_loss", natural_why="Lightning's usual val_loss", is_rank_zero=_global_rank_is_zero,
        )
        self.hyperparams: Dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "anylearn"

    @property
    def version(self) -> str:
        return env_task_id() or "offline"

    @property
    def save_dir(self) -> Optional[str]:
        return None

    @property
    def experiment(self) -> "AnylearnLogger":
        return self

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Report every number of ``metrics`` at ``step``."""
        self.sink.log(metrics, step)

    def log_hyperparams(self, params: Union[Dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        """Merge ``params`` into ``params.json`` in the run directory (rank zero only; never raises)."""
        if not _global_rank_is_zero():
            return
        try:
            self.hyperparams.update(_json_safe(_plain(params)))
            run_dir = api.run_directory()
            os.makedirs(run_dir, exist_ok=True)
            atomic_write_json(os.path.join(run_dir, PARAMS_FILE), masked_for_this_task(self.hyperparams))
        except Exception as exc:  # hyper-parameters are a courtesy: never into training
            from ..log import get_logger

            get_logger().warning("lightning: cannot write %s: %s", PARAMS_FILE, exc)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Not recorded."""

    def save(self) -> None:
        """Nothing to save: every report is journalled when it is made."""

    def finalize(self, status: str) -> None:
        """Report the final metric (once) and flush what is pending."""
        self.sink.finish()
        if _global_rank_is_zero():
            api.flush()
