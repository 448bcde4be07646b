"""Anyboard as a destination of the journal: a sink in the shape of issue 17's ``Sink`` door.

A lane of the engine (its own cursor ``cursor.anyboard`` and lock ``deliver.anyboard.lock``) follows the
journal and hands this sink batches of entries; the sink turns them into points, writes them with the
:class:`~reporter.anyboard.writer.AnyboardWriter`, and acknowledges the batch once IoTDB has it. An
unavailable IoTDB is retried with the engine's backoff (exponential with full jitter, from
:data:`~reporter.client.INITIAL_BACKOFF_S` up to :data:`~reporter.client.MAX_BACKOFF_S`), interrupted by
the host's stop; a refused login pauses the sink with one line naming Anyboard and the fix, and the
AnyLearn lane goes on untouched. Nothing here raises into a host.

Not in the training process (``in_training_process=False``): the in-process hook leaves Anyboard to the
wrapper, a sidecar or ``sync``, so training never imports the IoTDB client.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence

from ..client import INITIAL_BACKOFF_S, MAX_BACKOFF_S
from ..config import ConfigError
from ..log import get_logger
from ..reader import JournalEntry
from .config import AnyboardConfig, anyboard_config
from .points import to_points

SINK_NAME = "anyboard"
CURSOR_FILE = "cursor.anyboard"
LOCK_FILE = "deliver.anyboard.lock"
IN_TRAINING_PROCESS = False


class Handoff(Protocol):
    """What a lane gives its sink with each batch (issue 17's ``sink.Handoff``)."""

    stop: threading.Event

    def remaining_s(self) -> Optional[float]: ...

    def hold(self, record: Any) -> None: ...

    def acknowledge(self, end_offset: int) -> None: ...


class AnyboardSink:
    """Journal entries into Anyboard, in order, at least once, without duplicate points."""

    name = SINK_NAME
    cursor_file = CURSOR_FILE
    lock_file = LOCK_FILE

    def __init__(self, config: AnyboardConfig, *, writer: Any = None,
                 backoff_s: Sequence[float] = (INITIAL_BACKOFF_S, MAX_BACKOFF_S),
                 wait: Optional[Callable[[threading.Event, float], bool]] = None) -> None:
        if writer is None:
            from .writer import AnyboardWriter  # the IoTDB client's service: loaded by the host that delivers

            writer = AnyboardWriter(config)
        self.config = config
        self.writer = writer
        self._initial_s, self._max_s = backoff_s
        self._wait = wait or (lambda stop, seconds: stop.wait(seconds))
        self.delivered = 0  # points IoTDB acknowledged
        self.skipped: Dict[str, int] = {}
        self.paused_reason: Optional[str] = None
        self.last_error: Optional[str] = None
        self.last_error_ts: Optional[float] = None
        self.failing_since: Optional[float] = None
        self.last_delivery_ts: Optional[float] = None
        self.attempts_failed = 0

    def open(self, previous: Optional[Mapping[str, Any]] = None) -> None:
        """Carry on the counts of this sink's section of a previous ``status.json`` (``sinks.anyboard``)."""
        if not previous:
            return
        delivered = previous.get("delivered")
        if type(delivered) is int and delivered >= 0:
            self.delivered = delivered
        skipped = previous.get("skipped")
        if isinstance(skipped, dict):
            self.skipped = {str(k): v for k, v in skipped.items() if type(v) is int and v >= 0}

    def deliver(self, entries: Sequence[JournalEntry], handoff: Handoff) -> bool:
        """Write the points of ``entries`` and acknowledge them; False when paused or stopping (what is not
        acknowledged stays pending for the next lane). Never raises."""
        if self.paused_reason is not None or not entries:
            return self.paused_reason is None
        points, skipped = to_points(entries, self.config.device_prefix, report_all_ranks=self.config.report_all_ranks,
                                    unnamed=self.config.objective_metric)
        backoff = self._initial_s
        while True:
            if handoff.stop.is_set() and handoff.remaining_s() is not None and handoff.remaining_s() <= 0:
                return False
            try:
                self.writer.write(points, timeout_s=handoff.remaining_s())
            except Exception as exc:  # noqa: BLE001 - nothing reaches a host; the writer's errors are scrubbed
                if not self._failed(exc):
                    return False
                if self._wait(handoff.stop, random.uniform(0, backoff)):
                    return False  # stopping: the batch stays pending
                backoff = min(self._max_s, backoff * 2)
                continue
            break
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.delivered += len(points)
        if points:
            self.last_delivery_ts = time.time()
        if self.failing_since is not None:
            get_logger().info("Anyboard delivery resumed")
            self.failing_since = None
        handoff.acknowledge(entries[-1].end_offset)
        return True

    def _failed(self, exc: BaseException) -> bool:
        """Book a failed write; True when it is worth retrying."""
        from .writer import AnyboardLoginRefused, AnyboardUnavailable

        text = str(exc) if isinstance(exc, (AnyboardUnavailable, AnyboardLoginRefused)) else (
            f"Anyboard: unexpected {type(exc).__name__}")  # not its text: it may come from anywhere
        now = time.time()
        self.last_error, self.last_error_ts = text, now
        self.attempts_failed += 1
        if isinstance(exc, AnyboardLoginRefused):
            self.paused_reason = text
            get_logger().error("%s; Anyboard is paused (delivery to AnyLearn goes on)", text)
            return False
        if self.failing_since is None:
            self.failing_since = now
            get_logger().warning("%s; retrying with backoff", text)
        return True

    def status(self) -> Dict[str, Any]:
        """This sink's fields of ``status.json`` (``sinks.anyboard``)."""
        return {
            "delivered": self.delivered, "skipped": dict(self.skipped), "paused": self.paused_reason,
            "last_delivery_ts": self.last_delivery_ts, "last_error": self.last_error,
            "last_error_ts": self.last_error_ts, "failing_since": self.failing_since,
            "target": f"{self.config.host}:{self.config.port} {self.config.device_prefix}",
        }

    def close(self) -> None:
        """Close the IoTDB session (bounded by the writer's timeout)."""
        self.writer.close()


def anyboard_from_config(config: Any, run_dir: str, env: Optional[Mapping[str, str]] = None) -> Optional[AnyboardSink]:
    """The sink for this configuration, or None when Anyboard is off; a half configuration or a missing extra
    is said in one line and leaves Anyboard off (the AnyLearn lane is not affected). ``run_dir`` is unused:
    the lane keeps the cursor. For issue 17's registry: ``SinkEntry("anyboard", False, anyboard_from_config)``."""
    try:
        settings = anyboard_config(env, task_id=config.task_id, report_all_ranks=config.report_all_ranks,
                                   objective_metric=config.objective_metric)
        if settings is None:
            return None
        return AnyboardSink(settings)
    except ConfigError as exc:
        get_logger().warning("%s; Anyboard is off for this run", exc)
        return None


__all__ = ["AnyboardSink", "anyboard_from_config", "SINK_NAME", "CURSOR_FILE", "LOCK_FILE", "IN_TRAINING_PROCESS"]
