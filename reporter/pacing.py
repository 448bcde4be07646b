"""The burst hold-back: training comes first, so the in-process delivery thread keeps out of its way.

Only the in-process host passes a :class:`BurstPacing` to its deliverer (its ``host_busy`` tells whether
training reported just now); the wrapper, the sidecar and ``sync`` pass none and never hold back.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Deque, Optional

from .config import BURST_GAP_S
from .policy import is_short_gap

BURST_HISTORY = 8  # records whose gaps decide whether the host reports in a burst


class BurstPacing:
    """Holds each request back while the host reports, and slows the cursor's pace during a burst.

    While the host reports in a burst (it reported within ``burst_gap_s`` just now, and at least half of
    the last records were journalled closer together than that) the next request is held back
    ``max_defer_s``: one wait, so one hand-over of the interpreter, per request. The history keeps a burst
    a burst when the delivery thread's own turns on the interpreter stretch a few of its gaps.

    Otherwise a request waits until the host has not reported for ``burst_gap_s`` (at most
    ``max_defer_s``): woken by the journal write itself, the delivery thread would else run its request
    while the training thread is still inside the report call, or about to make the next."""

    def __init__(self, host_busy: Callable[[], bool], *, burst_gap_s: float = BURST_GAP_S, max_defer_s: float = 0.1,
                 burst_ack_interval_s: float = 1.0) -> None:
        self.host_busy = host_busy
        self.burst_gap_s = burst_gap_s  # records journalled closer together than this are a burst
        self.max_defer_s = max_defer_s  # the longest a busy host can hold back one request
        self.burst_ack_interval_s = burst_ack_interval_s  # in a burst: the cursor's and status's pace
        self.held_back = 0  # requests held back because the host was reporting just now
        self.in_burst = False  # the last request was held back for a host reporting in a burst
        self._previous_ts: Optional[float] = None
        self._short_gaps: Deque[bool] = collections.deque(maxlen=BURST_HISTORY)  # recent gaps under burst_gap_s

    def hold(self, record: Any, stop: threading.Event) -> None:
        """Wait before ``record``'s request as the host's reporting asks (returns at once once ``stop`` is set)."""
        ts = record.ts
        previous, self._previous_ts = self._previous_ts, float(ts) if isinstance(ts, (int, float)) else None
        if self._previous_ts is not None and previous is not None:
            self._short_gaps.append(is_short_gap(self._previous_ts - previous, self.burst_gap_s))
        self.in_burst = False
        if not self.host_busy():
            return
        self.held_back += 1
        if 2 * sum(self._short_gaps) >= BURST_HISTORY:
            self.in_burst = True
            stop.wait(self.max_defer_s)
            return
        waited = 0.0
        while waited < self.max_defer_s and not stop.is_set():
            stop.wait(self.burst_gap_s)
            waited += self.burst_gap_s
            if not self.host_busy():
                return

    def ack_interval_s(self, normal_s: float) -> float:
        """The pace of the cursor and status.json: each file operation hands the interpreter back and forth
        with a training thread, so while the host reports in a burst they go at ``burst_ack_interval_s``."""
        return self.burst_ack_interval_s if self.in_burst else normal_s


__all__ = ["BURST_HISTORY", "BurstPacing"]
