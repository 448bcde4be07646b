"""Ledgers: counts by category and reason, and a destination's own account (delivered, skipped, paused).

``ledger.Ledger`` is the one shape of a count (``record_lost(reason, n, category=...)``, True the first time a
reason is seen: what "say it once" hangs on). :class:`DeliveryLedger` is one sink's:
what it delivered and skipped (carried on from the previous ``status.json``), what this process did
itself, whether it is paused, and its last error.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Optional

from .ledger import COUNTER_LOST, Ledger

SKIPPED = "skipped"  # the category of records a sink did not send, by reason


class DeliveryLedger(Ledger):
    """One sink's account. ``delivered``/``skipped`` carry on from the previous ``status.json`` of the same
    destination; ``*_now`` is what this process did itself."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered = 0
        self.delivered_now = 0
        self.skipped_now: Dict[str, int] = {}
        self.rejected_now = 0
        self.last_delivery_ts: Optional[float] = None
        self.paused_reason: Optional[str] = None
        self.last_error: Optional[str] = None
        self.last_error_ts: Optional[float] = None
        self.failing_since: Optional[float] = None

    @property
    def skipped(self) -> Dict[str, int]:
        """Records not sent, by reason (the live dict)."""
        return self.category(SKIPPED)

    def record_lost(self, reason: str, n: int = 1, *, category: str = COUNTER_LOST) -> bool:
        if category == SKIPPED:
            self.skipped_now[reason] = self.skipped_now.get(reason, 0) + n
        return super().record_lost(reason, n, category=category)

    def record_skipped(self, reason: str) -> bool:
        """One record not sent, for ``reason``."""
        return self.record_lost(reason, category=SKIPPED)

    def record_delivered(self) -> None:
        """One record the destination took."""
        self.delivered += 1
        self.delivered_now += 1
        self.last_delivery_ts = time.time()

    def note_error(self, text: str) -> None:
        """The last error, as ``status`` shows it."""
        self.last_error = text
        self.last_error_ts = time.time()

    def failing(self) -> bool:
        """Note a failure being retried; True when it is the first of a run of failures (say it then)."""
        if self.failing_since is None:
            self.failing_since = time.time()
            return True
        return False

    def resumed(self) -> Optional[float]:
        """Delivery works again: the seconds it failed for, or None when it was not failing."""
        if self.failing_since is None:
            return None
        seconds, self.failing_since = time.time() - self.failing_since, None
        return seconds

    def pause(self, reason: str, error: str) -> None:
        """Paused for the rest of this process's delivery: records stay pending."""
        self.paused_reason = reason
        self.note_error(error)

    def carry_on(self, previous: Mapping[str, Any]) -> None:
        """Carry the counts of a previous account (a ``status.json`` section read field by field) on."""
        delivered = previous.get("delivered")
        if type(delivered) is int and delivered >= 0:
            self.delivered = delivered
        skipped = previous.get("skipped")
        if isinstance(skipped, dict):
            self.values[SKIPPED] = {str(k): v for k, v in skipped.items() if type(v) is int and v >= 0}


__all__ = ["DeliveryLedger", "Ledger", "SKIPPED"]
