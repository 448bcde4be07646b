"""Unchanged NNI trials: the environment the wrapper gives one, and NNI results -> journal records.

NNI 3 lets a training service name the trial's command channel: ``NNI_TRIAL_COMMAND_CHANNEL=
import://module.Class`` makes ``nni.get_next_parameter()`` and ``nni.report_*_result()`` call that class
in the trial's own process. The wrapper points it at :class:`reporter.nni_channel.AnyLearnTrialChannel`,
which hands the trial the task's hyper-parameters (no file, no waiting) and journals each result through
the in-process API, so the usual deliverer sends it. ``NNI_PLATFORM`` is left unset: NNI's legacy file
channel, which waits for a ``parameter.cfg`` nobody writes, is never chosen, and NNI's logging stays as
in standalone mode.

This module imports no NNI code: the functions here are pure and never raise, whatever NNI hands them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .config import ENV_NNI, ENV_NNI_PARAMETERS, ConfigError
from .record import KIND_FINAL, KIND_INTERMEDIATE, metric_number

CHANNEL_URL = "import://reporter.nni_channel.AnyLearnTrialChannel"
STANDALONE = "STANDALONE"  # NNI's own id when a trial runs outside an experiment
OBJECTIVE_KEY = "default"  # NNI's key of the objective in a dict result
NNI_INTERMEDIATE = "PERIODICAL"
NNI_FINAL = "FINAL"


def nni_enabled(flag: bool, env: Mapping[str, str]) -> bool:
    """``--nni`` given, or ``ANYLEARN_NNI`` set to 1/true/yes (0/false/no/empty: off); ConfigError otherwise."""
    if flag:
        return True
    text = env.get(ENV_NNI, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{ENV_NNI}={env.get(ENV_NNI)!r} must be 1 (run an NNI trial) or 0")


def nni_environment(
    params: Mapping[str, Any], *, task_id: Optional[str], experiment_id: Optional[str], output_dir: str
) -> Dict[str, str]:
    """The variables NNI 3 reads in a trial: the channel, the trial and experiment ids, the output
    directory, and the hyper-parameters the channel hands to ``get_next_parameter()``."""
    env = {
        "NNI_TRIAL_COMMAND_CHANNEL": CHANNEL_URL,
        "NNI_EXP_ID": experiment_id or STANDALONE,
        "NNI_OUTPUT_DIR": output_dir,
        ENV_NNI_PARAMETERS: json.dumps(dict(params), separators=(",", ":")),
    }
    if task_id:
        env["NNI_TRIAL_JOB_ID"] = task_id
    return env


def nni_version_problem() -> Optional[str]:
    """Why the NNI installed beside the wrapper cannot use the import channel (None when it can, or when
    NNI is not installed here: the trial may run in another Python). Reads the package metadata only."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        text = version("nni")
    except PackageNotFoundError:
        return None
    major = text.split(".", 1)[0]
    if major.isdigit() and int(major) < 3:
        return (f"nni {text} is installed, which has no import:// trial channel: the trial would run in NNI's "
                "standalone mode and report nothing; install nni>=3.0")
    return None


def parameter_record(text: Optional[str]) -> Tuple[Dict[str, Any], Optional[str]]:
    """NNI's parameter record for the hyper-parameters JSON the wrapper passed, and a problem (or None).
    Missing or unreadable parameters give ``{}``, as NNI's standalone mode does."""
    problem = None
    parameters: Any = {}
    if text is None:
        problem = f"{ENV_NNI_PARAMETERS} is not set (is the trial running under 'anylearn-reporter run --nni'?)"
    else:
        try:
            parameters = json.loads(text)
        except ValueError as exc:
            problem = f"{ENV_NNI_PARAMETERS} is not valid JSON ({exc})"
            parameters = {}
        if not isinstance(parameters, dict):
            problem = f"{ENV_NNI_PARAMETERS} must hold a JSON object, not a JSON {type(parameters).__name__}"
            parameters = {}
    record = {"parameter_id": 0, "parameter_source": "customized", "parameters": parameters, "parameter_index": 0}
    return record, problem


@dataclass(frozen=True)
class ResultRecord:
    """One journal record made from an NNI result."""

    kind: str
    value: float
    name: Optional[str]  # None: the objective (sent); otherwise journalled by name
    step: Optional[int]


def result_records(metric_type: Any, sequence: Any, value: Any) -> Tuple[List[ResultRecord], List[str]]:
    """Turn one NNI result into journal records; returns them and the reasons for what was dropped.

    ``metric_type`` is ``PERIODICAL`` (an intermediate result, ``sequence`` its step) or ``FINAL``. A number
    is the objective. In a dict, ``default`` is the objective and every other numeric key is journalled
    by its name; a value that is not a number is dropped with a reason. Never raises.
    """
    try:
        return _result_records(metric_type, sequence, value)
    except Exception as exc:  # a dict whose keys or items misbehave
        return [], [f"an NNI result that cannot be read ({type(exc).__name__})"]


def _result_records(metric_type: Any, sequence: Any, value: Any) -> Tuple[List[ResultRecord], List[str]]:
    if metric_type == NNI_INTERMEDIATE:
        kind = KIND_INTERMEDIATE
        step = sequence if type(sequence) is int else None
    elif metric_type == NNI_FINAL:
        kind, step = KIND_FINAL, None
    else:
        return [], [f"an NNI result of unknown type {str(metric_type)[:40]!r}"]
    records: List[ResultRecord] = []
    problems: List[str] = []
    if isinstance(value, Mapping):
        items = list(value.items())
        if not any(key == OBJECTIVE_KEY for key, _ in items):
            problems.append("a dict result without a 'default' key: its values are journalled by name, none is sent")
        for key, item in items:
            number = metric_number(item)
            if number is None:
                problems.append(f"a result value that is not a number ({type(item).__name__})")
                continue
            name = None if key == OBJECTIVE_KEY else str(key)
            records.append(ResultRecord(kind, number, name, step))
        return records, problems
    number = metric_number(value)
    if number is None:
        return [], [f"a result that is neither a number nor a dict ({type(value).__name__})"]
    return [ResultRecord(kind, number, None, step)], []
