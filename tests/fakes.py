"""An in-memory backend client for the deliverer's policy tests: no HTTP, answers scripted per record.

The deliverer only needs ``task_id``, ``base_url``, ``send(record, timeout_s)`` and ``close()`` of its
client; the wire itself (status codes, headers, redirects, deadlines) is tested against real servers.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional

from reporter.client import Outcome, SendResult, TransientError
from reporter.record import Record

Answer = Callable[[Record], SendResult]


def delivered(_record: Record) -> SendResult:
    return SendResult(Outcome.DELIVERED, 200, "ok")


class FakeClient:
    """Records every record it is asked to send (``sent``) and answers with ``answer(record)``.

    ``transient_failures`` first answers raise :class:`TransientError`, as a 503 or a refused connection
    would, so the deliverer's retry runs.
    """

    def __init__(self, answer: Answer = delivered, *, transient_failures: int = 0, task_id: str = "TRAIfake") -> None:
        self.task_id = task_id
        self.base_url = "fake://backend/api"
        self.has_secret_key = True
        self.answer = answer
        self.transient_failures = transient_failures
        self.attempts: List[Record] = []
        self.sent: List[Record] = []  # records that got a final answer, in order
        self.closed = False
        self._lock = threading.Lock()

    def send(self, record: Record, timeout_s: Optional[float] = None) -> SendResult:
        with self._lock:
            self.attempts.append(record)
            if self.transient_failures > 0:
                self.transient_failures -= 1
                raise TransientError("HTTP 503 (fake)", status=503)
            result = self.answer(record)
            self.sent.append(record)
            return result

    def values(self) -> List[object]:
        """The values of the records that got a final answer, in order."""
        with self._lock:
            return [r.value for r in self.sent]

    def close(self) -> None:
        self.closed = True


def answer_by_value(outcomes: dict) -> Answer:
    """Answer a record whose value is a key of ``outcomes`` with that ``(Outcome, status)``; others 200."""

    def answer(record: Record) -> SendResult:
        if record.value in outcomes:
            outcome, status = outcomes[record.value]
            return SendResult(outcome, status, f"{outcome.value} (fake)")
        return delivered(record)

    return answer
