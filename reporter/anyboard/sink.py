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

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence

from ..client import INITIAL_BACKOFF_S, MAX_BACKOFF_S, Retrier
from ..config import ConfigError
from ..delivery_ledger import SKIPPED, DeliveryLedger
from ..log import get_logger, say_once
from ..reader import JournalEntry
from ..transport import TransientError
from .config import AnyboardConfig, anyboard_config
from .points import to_points

if TYPE_CHECKING:
    from ..sink import Handoff  # reporter.sink registers this module lazily: no import back at run time

SINK_NAME = "anyboard"
CURSOR_FILE = "cursor.anyboard"
LOCK_FILE = "deliver.anyboard.lock"
IN_TRAINING_PROCESS = False


class AnyboardSink:
    """Journal entries into Anyboard, in order, at least once, without duplicate points."""

    name = SINK_NAME
    cursor_file = CURSOR_FILE
    lock_file = LOCK_FILE

    def __init__(self, config: AnyboardConfig, *, writer: Any = None, initial_backoff_s: float = INITIAL_BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S, retry_sleep: Optional[Callable[[float], Any]] = None) -> None:
        if writer is None:
            from .writer import AnyboardWriter  # the IoTDB client's service: loaded by the host that delivers

            writer = AnyboardWriter(config)
        self.config = config
        self.writer = writer
        self.ledger = DeliveryLedger()  # delivered counts points IoTDB acknowledged
        self.attempts_failed = 0  # writes that failed (and were retried) in this process
        self._backoff = (initial_backoff_s, max_backoff_s)
        self._retry_sleep = retry_sleep
        self._retrier: Optional[Retrier] = None

    @property
    def delivered(self) -> int:
        """Points IoTDB acknowledged, carried on from the previous ``status.json``."""
        return self.ledger.delivered

    @property
    def skipped(self) -> Dict[str, int]:
        """Journal entries that are no point (NaN, a final metric, another rank...), by reason."""
        return self.ledger.skipped

    @property
    def paused_reason(self) -> Optional[str]:
        return self.ledger.paused_reason

    def open(self, previous: Optional[Mapping[str, Any]] = None) -> None:
        """Carry on the counts of this sink's section of a previous ``status.json`` (``sinks.anyboard``)."""
        if previous:
            self.ledger.carry_on(previous)
            failed = previous.get("failed")
            if type(failed) is int and failed >= 0:
                self.attempts_failed = failed

    def deliver(self, entries: Sequence[JournalEntry], handoff: "Handoff") -> bool:
        """Write the points of ``entries`` and acknowledge them; False when paused or stopping (what is not
        acknowledged stays pending for the next lane). Never raises."""
        if self.ledger.paused_reason is not None or not entries:
            return self.ledger.paused_reason is None
        points, skipped = to_points(entries, self.config.device_prefix, report_all_ranks=self.config.report_all_ranks,
                                    unnamed=self.config.objective_metric)
        if points:
            if self._retrier is None:
                self._retrier = Retrier(handoff.stop, initial_backoff_s=self._backoff[0],
                                        max_backoff_s=self._backoff[1], sleep=self._retry_sleep)
            try:
                self._retrier.call(lambda: self._write(points, handoff), lambda exc: self._before_retry(exc, handoff))
            except TransientError:
                return False  # stopped while retrying: the batch stays pending
            except Exception as exc:  # noqa: BLE001 - a refused login (the writer's text is scrubbed)
                self._pause(exc)
                return False
        for reason, count in skipped.items():
            self.ledger.record_lost(reason, count, category=SKIPPED)
        if points:
            self.ledger.delivered += len(points)
            self.ledger.delivered_now += len(points)
            self.ledger.last_delivery_ts = time.time()
        resumed = self.ledger.resumed()
        if resumed is not None:
            get_logger().info("Anyboard: delivery resumed after %.0f s", resumed)
        handoff.acknowledge(entries[-1].end_offset)
        return True

    def _write(self, points: Sequence[Any], handoff: "Handoff") -> None:
        """One try: IoTDB unavailable (or anything unexpected) is a :class:`TransientError` for the retrier."""
        from .writer import AnyboardLoginRefused, AnyboardUnavailable

        try:
            self.writer.write(points, timeout_s=handoff.remaining_s())
        except AnyboardLoginRefused:
            raise
        except AnyboardUnavailable as exc:
            raise TransientError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - not its text: it may come from anywhere
            raise TransientError(f"Anyboard: unexpected {type(exc).__name__}") from None

    def _before_retry(self, exc: TransientError, handoff: "Handoff") -> None:
        self.attempts_failed += 1
        self.ledger.note_error(exc.reason)
        if self.ledger.failing():
            get_logger().warning("%s; retrying with backoff", exc.reason)
        handoff.checkpoint()

    def _pause(self, exc: BaseException) -> None:
        from .writer import AnyboardLoginRefused

        text = str(exc) if isinstance(exc, AnyboardLoginRefused) else f"Anyboard: unexpected {type(exc).__name__}"
        self.attempts_failed += 1
        self.ledger.pause(text, text)
        get_logger().error("%s; Anyboard is paused (delivery to AnyLearn goes on)", text)

    def status(self) -> Dict[str, Any]:
        """This sink's fields of ``status.json`` (``sinks.anyboard``)."""
        ledger = self.ledger
        return {
            "delivered": ledger.delivered, "skipped": dict(ledger.skipped), "failed": self.attempts_failed,
            "paused": ledger.paused_reason, "last_delivery_ts": ledger.last_delivery_ts,
            "last_error": ledger.last_error, "last_error_ts": ledger.last_error_ts,
            "failing_since": ledger.failing_since, "report_all_ranks": self.config.report_all_ranks,
            "objective_metric": self.config.objective_metric,
            "target": f"{self.config.host}:{self.config.port} {self.config.device_prefix}",
        }

    def close(self) -> None:
        """Close the IoTDB session (bounded by the writer's timeout)."""
        self.writer.close()


def anyboard_from_config(config: Any, run_dir: str, env: Optional[Mapping[str, str]] = None) -> Optional[AnyboardSink]:
    """The sink for this configuration, or None when Anyboard is off; a half configuration or a missing extra
    is said in one line (once per process) and leaves Anyboard off (the AnyLearn lane is not affected).
    ``run_dir`` is unused: the lane keeps the cursor. Registered in :data:`reporter.sink.SINKS`."""
    try:
        settings = anyboard_config(env, task_id=config.task_id, report_all_ranks=config.report_all_ranks,
                                   objective_metric=config.objective_metric)
        if settings is None:
            return None
        from .writer import check_client_installed

        check_client_installed()
        return AnyboardSink(settings)
    except ConfigError as exc:
        say_once(("anyboard-off", str(exc)), "%s; Anyboard is off for this run", exc)
        return None


__all__ = ["AnyboardSink", "anyboard_from_config", "SINK_NAME", "CURSOR_FILE", "LOCK_FILE", "IN_TRAINING_PROCESS"]
