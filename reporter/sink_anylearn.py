"""AnyLearn, the primary sink: each record to the task's endpoints, in order, retried, booked.

It decides what is sent (``policy.skip_reason`` and whether the backend has a state endpoint), holds each
record through the lane's pacing, sends it with the client's :class:`~reporter.client.Retrier`, and books
each answer: delivered, refused for good (kept in ``rejected.jsonl``), or a pause for a refused key, a
redirect or a setup problem (records stay pending for ``sync``). Never raises into its host.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .client import INITIAL_BACKOFF_S, MAX_BACKOFF_S, Outcome, RecordClient, Retrier, SendResult, TransientError
from .advice import refusal
from .config import CURSOR_FILE, LOCK_FILE, REJECTED_FILE
from .delivery_ledger import DeliveryLedger
from .log import get_logger, sync_hint
from .policy import SKIP_STATE_OFF, SendRule, line_skip_reason, skip_reason
from .reader import JournalEntry
from .record import Record
from .sink import Handoff

SINK_NAME = "anylearn"


class AnyLearnSink:
    """Journal records to one AnyLearn task."""

    name = SINK_NAME
    cursor_file = CURSOR_FILE
    lock_file = LOCK_FILE

    def __init__(self, client: RecordClient, rule: SendRule, run_dir: str, *,
                 initial_backoff_s: float = INITIAL_BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 retry_sleep: Optional[Callable[[float], Any]] = None) -> None:
        self.client = client
        self.rule = rule
        self.run_dir = run_dir
        self.ledger = DeliveryLedger()
        self.state_reporting = True
        self._backoff = (initial_backoff_s, max_backoff_s)
        self._retry_sleep = retry_sleep
        self._retrier: Optional[Retrier] = None
        self._said_odd_answer = False  # a 2xx without a JSON object was said
        self._log = get_logger()

    def open(self, previous: Optional[Mapping[str, Any]]) -> None:
        """Carry the counts of the previous status.json on when it was this task's."""
        if previous is not None and previous.get("task_id") == self.client.task_id:
            self.ledger.carry_on(previous)

    def deliver(self, entries: Sequence[JournalEntry], handoff: Handoff) -> bool:
        """Each entry in order: skipped (counted) or sent, then acknowledged. False when paused or stopping."""
        for entry in entries:
            if not self._deliver_entry(entry, handoff):
                return False
        return True

    def _deliver_entry(self, entry: JournalEntry, handoff: Handoff) -> bool:
        record = entry.record
        skip: Optional[str]
        if record is None:
            skip = line_skip_reason(entry.problem)
        else:
            skip = skip_reason(record, self.rule, state_reporting=self.state_reporting)
        if skip is not None:
            self.ledger.record_skipped(skip)
        elif record is not None:
            handoff.hold(record)
            if self._retrier is None:
                self._retrier = Retrier(handoff.stop, initial_backoff_s=self._backoff[0], max_backoff_s=self._backoff[1],
                                        sleep=self._retry_sleep)
            try:
                result = self._retrier.call(lambda: self.client.send(record, handoff.remaining_s()),
                                            lambda exc: self._before_retry(exc, handoff))
            except TransientError:
                return False  # stopped while retrying: the record stays pending
            if not self._apply(record, result):
                return False
        handoff.acknowledge(entry.end_offset)
        return True

    def _before_retry(self, exc: TransientError, handoff: Handoff) -> None:
        reason = getattr(exc, "reason", repr(exc))
        self.ledger.note_error(reason)
        if self.ledger.failing():
            self._log.warning(
                "delivery to %s failed (%s); retrying with backoff, records stay in %s",
                self.client.base_url, reason, self.run_dir,
            )
        handoff.checkpoint()

    def _apply(self, record: Record, result: SendResult) -> bool:
        """Book an answer; False when delivery must pause (the record is then not acknowledged)."""
        resumed = self.ledger.resumed()
        if resumed is not None:
            self._log.info("delivery resumed after %.0f s", resumed)
        if result.outcome is Outcome.DELIVERED:
            if result.reason and not self._said_odd_answer:  # a 2xx is delivered whatever its body
                self._said_odd_answer = True
                self._log.warning("the backend took a %s record with an odd answer (%s); counted as delivered (said once)",
                                  record.kind, result.reason)
            self.ledger.record_delivered()
        elif result.outcome is Outcome.REJECTED:
            self.ledger.rejected_now += 1
            append_rejected(self.run_dir, record, result.status, result.reason)
            self.ledger.note_error(f"HTTP {result.status}: {result.reason}")
            self._log.warning(
                "the backend refused a %s record for good (HTTP %d: %s); kept in %s/rejected.jsonl",
                record.kind, result.status, result.reason, self.run_dir,
            )
        elif result.outcome is Outcome.UNSUPPORTED:
            self.state_reporting = False
            self.ledger.record_skipped(SKIP_STATE_OFF)
            self._log.info("the backend has no state endpoint (HTTP %d); task state reporting is off", result.status)
        elif result.outcome is Outcome.AUTH:
            self._pause(
                f"auth: HTTP {result.status}", f"HTTP {result.status}: {result.reason}",
                f"{refusal(self.client.task_id, self.client.has_secret_key)} (HTTP {result.status}: {result.reason}); "
                f"delivery is paused and records stay pending in {self.run_dir}; once that is fixed, run "
                f"`{sync_hint(self.run_dir, self.client.base_url, new_key=True)}`",
            )
            return False
        elif result.outcome is Outcome.SETUP:
            self._pause(
                f"setup: {result.reason}", result.reason,
                f"cannot reach the backend as configured ({result.reason}); delivery is paused and records stay "
                f"pending in {self.run_dir}; once that is fixed, run `{sync_hint(self.run_dir)}`",
            )
            return False
        elif result.outcome is Outcome.REDIRECT:
            # Never followed: the Secret-Key header (and the body) would go to whatever host Location names.
            self._pause(
                f"redirect: HTTP {result.status}, {result.reason}", f"HTTP {result.status}: {result.reason}",
                f"the backend answered HTTP {result.status} ({result.reason}); redirects are never followed "
                f"(the secret key would go along), so delivery is paused and records stay pending in "
                f"{self.run_dir}: set ANYLEARN_BACKEND_URL to the address that answers itself, then run "
                f"`{sync_hint(self.run_dir)}`",
            )
            return False
        return True

    def _pause(self, reason: str, error: str, message: str) -> None:
        """Pause delivery for the rest of this deliverer's life: one message, records stay pending."""
        self.ledger.pause(reason, error)
        self._log.error("%s", message)

    def status(self) -> Dict[str, Any]:
        """The AnyLearn fields of status.json (the top level of the file)."""
        ledger = self.ledger
        return {
            "task_id": self.client.task_id, "backend_url": self.client.base_url, "delivered": ledger.delivered,
            "skipped": dict(ledger.skipped), "paused": ledger.paused_reason, "state_reporting": self.state_reporting,
            "last_delivery_ts": ledger.last_delivery_ts, "last_error": ledger.last_error,
            "last_error_ts": ledger.last_error_ts, "failing_since": ledger.failing_since,
        }

    def close(self) -> None:
        """Let the client's connection go."""
        self.client.close()


def append_rejected(run_dir: str, record: Record, status: int, reason: str) -> None:
    """Keep a record the backend refused for good, with the HTTP status and the backend's reason."""
    line = json.dumps({**record.as_json(), "http_status": status, "reason": reason[:500]}) + "\n"
    fd = os.open(os.path.join(run_dir, REJECTED_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


__all__ = ["AnyLearnSink", "append_rejected", "SINK_NAME"]
