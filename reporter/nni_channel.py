"""NNI 3's trial command channel for AnyLearn: ``NNI_TRIAL_COMMAND_CHANNEL=import://reporter.nni_channel.AnyLearnTrialChannel``.

NNI imports this module inside an unchanged trial (``import reporter`` never imports it, so ``nni`` stays
an optional package). The trial's ``nni.get_next_parameter()`` gets the task's hyper-parameters at once;
``nni.report_intermediate_result()`` / ``report_final_result()`` journal through the in-process API (see
:mod:`reporter.nni_trial` for how a result becomes records). Nothing here blocks or raises into the trial.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from nni.runtime.trial_command_channel.base import TrialCommandChannel  # type: ignore[import-untyped]

from . import api
from .config import ENV_NNI_PARAMETERS
from .log import get_logger
from .nni_trial import parameter_record, result_records
from .record import KIND_FINAL


class AnyLearnTrialChannel(TrialCommandChannel):
    """Hands the trial its hyper-parameters (once, as NNI's own channel does) and journals its results."""

    def __init__(self) -> None:
        self.parameters_given = False
        self.dropped: Dict[str, int] = {}  # reason -> how many results (or parts of results) were not journalled

    def receive_parameter(self) -> Optional[Dict[str, Any]]:  # type: ignore[override]
        if self.parameters_given:
            return None  # NNI's own channel has no second parameter set for a trial either
        self.parameters_given = True
        record, problem = parameter_record(os.environ.get(ENV_NNI_PARAMETERS))
        if problem:
            get_logger().warning("NNI trial: %s; get_next_parameter() returns {}", problem)
        return record  # type: ignore[return-value]

    def send_metric(self, type: Any, parameter_id: Any, trial_job_id: Any, sequence: Any, value: Any) -> None:  # noqa: A002 - NNI's name
        records, problems = result_records(type, sequence, value)
        for problem in problems:
            self._drop(problem)
        for record in records:
            try:
                api.report_metric(record.value, step=record.step, name=record.name, final=record.kind == KIND_FINAL)
            except Exception as exc:  # report_metric only raises for a non-number, which result_records excluded
                self._drop(f"cannot journal the result ({exc})")

    def _drop(self, reason: str) -> None:
        first = reason not in self.dropped
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if first:
            get_logger().warning("NNI trial: %s (said once)", reason)
