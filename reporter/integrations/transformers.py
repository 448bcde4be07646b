"""Hugging Face ``transformers``: :class:`AnylearnCallback`, a ``TrainerCallback``.

Example::

    from reporter.integrations.transformers import AnylearnCallback
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val, callbacks=[AnylearnCallback()])

Every number the trainer logs (``on_log``) or evaluates (``on_evaluate``) is reported at
``state.global_step``; the objective defaults to the trainer's ``metric_for_best_model``, else
``eval_loss``; the final metric is reported at ``on_train_end``. Only the world process zero reports.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ._objective import MetricSink, require

_transformers = require("transformers", "transformers")
TrainerCallback = _transformers.TrainerCallback

__all__ = ["AnylearnCallback"]


def _eval_key(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"  # as the Trainer itself prefixes it


class AnylearnCallback(TrainerCallback):  # type: ignore[misc, valid-type]
    """Reports what a ``transformers.Trainer`` logs to AnyLearn.

    ``objective``: the logged key sent as the task's metric (default: ``ANYLEARN_OBJECTIVE_METRIC`` when a
    logged key has that name, else ``args.metric_for_best_model``, else ``eval_loss``). ``final``:
    ``"best"`` or ``"last"`` objective value as the final metric; ``mode``: ``"max"``/``"min"`` (default:
    ``args.greater_is_better`` for ``metric_for_best_model``, else min for loss/error names, max otherwise).
    """

    def __init__(self, objective: Optional[str] = None, final: str = "best", mode: Optional[str] = None) -> None:
        self._rank_zero = True
        self.sink = MetricSink(
            "transformers", objective=objective, final=final, mode=mode,
            natural="eval_loss", natural_why="the default eval_loss", is_rank_zero=self._is_world_process_zero,
        )

    def _is_world_process_zero(self) -> bool:
        return self._rank_zero

    def _state(self, state: Any) -> Optional[int]:
        self._rank_zero = bool(getattr(state, "is_world_process_zero", True))
        step = getattr(state, "global_step", None)
        return step if isinstance(step, int) else None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start afresh; take the trainer's ``metric_for_best_model`` as the natural objective."""
        self._state(state)
        self.sink.reset()
        best = getattr(args, "metric_for_best_model", None)
        if isinstance(best, str) and best:
            key = _eval_key(best)
            self.sink.natural, self.sink.natural_why = key, "the trainer's metric_for_best_model"
            greater = getattr(args, "greater_is_better", None)
            if isinstance(greater, bool):
                self.sink.mode_hints[key] = "max" if greater else "min"

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        """Report every number of ``logs`` at ``state.global_step``."""
        step = self._state(state)
        if logs:
            self.sink.log(logs, step)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        """Report the evaluation metrics at ``state.global_step`` (a repeat of what ``on_log`` said is dropped)."""
        step = self._state(state)
        if metrics:
            self.sink.log(metrics, step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Report the final metric."""
        self._state(state)
        self.sink.finish()
