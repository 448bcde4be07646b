"""Keras (Keras 3 on any backend, or ``tf.keras``): :class:`AnylearnCallback`.

Example::

    from reporter.integrations.keras import AnylearnCallback
    model.fit(x, y, validation_split=0.2, epochs=10, callbacks=[AnylearnCallback()])

``on_epoch_end`` reports every number of the epoch's logs at ``step=epoch`` (as Keras counts it, from
0); with ``log_every_n_batches=N`` every N-th training batch is reported too, its keys prefixed
``batch/`` and its step the count of training batches so far; ``on_train_end`` reports the final metric.
The objective defaults to ``val_loss``. Only the process with ``RANK`` 0 (or unset) reports.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Optional

from ._objective import MetricSink, MissingFramework

__all__ = ["AnylearnCallback"]

BATCH_PREFIX = "batch/"


def _callback_base() -> type:
    problems = []
    for module in ("keras", "tensorflow.keras"):
        try:
            return importlib.import_module(module).callbacks.Callback
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}: {exc}")
    raise MissingFramework(f"reporter.integrations.keras needs keras: pip install 'anylearn-reporter[keras]' ({'; '.join(problems)})")


class AnylearnCallback(_callback_base()):  # type: ignore[misc]
    """Reports what ``Model.fit`` logs to AnyLearn.

    ``objective``: the logged key sent as the task's metric (default: ``ANYLEARN_OBJECTIVE_METRIC`` when a
    logged key has that name, else ``val_loss``). ``final``: ``"best"`` or ``"last"`` objective value as
    the final metric; ``mode``: ``"max"``/``"min"`` (default min for loss/error names, max otherwise).
    ``log_every_n_batches``: also report every N-th training batch (default: epochs only).
    """

    def __init__(
        self, objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None,
        log_every_n_batches: Optional[int] = None,
    ) -> None:
        super().__init__()
        if log_every_n_batches is not None and (type(log_every_n_batches) is not int or log_every_n_batches < 1):
            raise ValueError(f"log_every_n_batches must be a whole number of at least 1, not {log_every_n_batches!r}")
        self.log_every_n_batches = log_every_n_batches
        self.sink = MetricSink(
            "keras", objective=objective, final=final, mode=mode, natural="val_loss", natural_why="Keras's val_loss",
        )
        self.batches_seen = 0

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Start afresh (the same callback may serve several ``fit`` calls)."""
        self.sink.reset()
        self.batches_seen = 0

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Every ``log_every_n_batches``-th batch: report its logs as ``batch/<key>``."""
        self.batches_seen += 1
        every = self.log_every_n_batches
        if every is None or self.batches_seen % every or not logs:
            return
        self.sink.log({BATCH_PREFIX + key: value for key, value in logs.items()}, self.batches_seen)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        """Report every number of the epoch's logs at ``step=epoch``."""
        if logs:
            self.sink.log(logs, epoch)

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        """Report the final metric."""
        self.sink.finish()
