"""Which journal records are sent: one rule, used by the deliverer to send and by ``show``/``summary.json``
to report what was sent, so the two can never disagree.

Pure functions of a record and the options; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .config import DEFAULT_OBJECTIVE_METRIC
from .record import INVALID_NOT_JSON, KIND_STATE, Record

SKIP_OTHER_RANK = "from a rank other than 0"
SKIP_NOT_OBJECTIVE = "not the objective metric"
SKIP_NOT_A_NUMBER = "not a finite number"
SKIP_STATE_OFF = "state reporting is off"
SKIP_TORN = INVALID_NOT_JSON
SKIP_INVALID = "invalid record"  # followed by the reason, e.g. "invalid record (value is not a number)"


@dataclass(frozen=True)
class SendRule:
    """What decides whether a record is sent: the objective metric's name and whether every rank reports."""

    objective_metric: str = DEFAULT_OBJECTIVE_METRIC
    report_all_ranks: bool = False

    @classmethod
    def of(cls, config: Any) -> "SendRule":
        """The rule of a :class:`~reporter.config.Config` (or of anything with the same two attributes)."""
        return cls(config.objective_metric, config.report_all_ranks)


def line_skip_reason(problem: Optional[str]) -> str:
    """The skip reason of a journal line that holds no valid record (``problem`` from the reader)."""
    return SKIP_TORN if problem in (None, SKIP_TORN) else f"{SKIP_INVALID} ({problem})"


def skip_reason(record: Record, rule: SendRule, *, state_reporting: bool = True) -> Optional[str]:
    """Why ``record`` is not sent under ``rule``, or None when it is sent.

    Only rank 0 reports the task's state (the wrapper of node 0), and only while the backend has a state
    endpoint (``state_reporting``). A metric is sent from rank 0, or from every rank with
    ``ANYLEARN_REPORT_RANKS=all``, when it is a finite number named like the objective metric (or unnamed).
    """
    if record.kind == KIND_STATE:
        if record.rank != 0:
            return SKIP_OTHER_RANK
        return None if state_reporting else SKIP_STATE_OFF
    if record.rank != 0 and not rule.report_all_ranks:
        return SKIP_OTHER_RANK
    if record.value is None:
        return SKIP_NOT_A_NUMBER
    if record.name is not None and record.name != rule.objective_metric:
        return SKIP_NOT_OBJECTIVE
    return None


def is_short_gap(gap_s: float, burst_gap_s: float) -> bool:
    """Whether two reports ``gap_s`` apart are part of a burst (the pacing rule of in-process delivery).

    A negative gap is never short: it comes from a wall clock that was set back (or records journalled with
    times ahead of it), and reading it as a burst would hold delivery back for as long as the clock was ahead.
    """
    return 0.0 <= gap_s < burst_gap_s


__all__ = [
    "is_short_gap", "SendRule", "skip_reason", "line_skip_reason",
    "SKIP_OTHER_RANK", "SKIP_NOT_OBJECTIVE", "SKIP_NOT_A_NUMBER", "SKIP_STATE_OFF", "SKIP_TORN", "SKIP_INVALID",
]
