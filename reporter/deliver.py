"""The one delivery engine: journal records -> backend, in order, with retries, acknowledged by a cursor.

The same :class:`Deliverer` runs as a thread in the training process, inside the wrapper and in the
sidecar. It takes the run directory's deliver lock first (waiting for it while another deliverer holds
it, so delivery is never orphaned), then follows the journal after the cursor.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .client import (
    BackendClient,
    Outcome,
    SendResult,
    TransientError,
    delivery_retrying,
)
from .config import JOURNAL_FILE, Config
from .journal import (
    DeliverLock,
    JournalEntry,
    JournalReader,
    Record,
    append_rejected,
    count_pending,
    load_cursor,
    read_host_counters,
    save_cursor,
    whole_lines_end,
)
from .log import get_logger
from .policy import SKIP_STATE_OFF, SendRule, line_skip_reason, skip_reason
from .runstatus import DeliveryStatus, read_status, write_status

PROGRESS_INTERVAL_S = 0.5


@dataclass(frozen=True)
class DeliveryOptions:
    """How a deliverer behaves; every duration in seconds."""

    rule: SendRule = SendRule()  # which records are sent
    poll_interval_s: float = 0.2
    lock_poll_interval_s: float = 1.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    cursor_fsync_interval_s: float = 1.0
    status_interval_s: float = 0.5
    max_defer_s: float = 0.1  # the longest a busy host can hold back one request
    defer_step_s: float = 0.005


class Deliverer:
    """Delivers one run directory's journal to one task. ``start`` / ``flush(timeout)`` / ``close(timeout)``.

    Never raises into its host: transient failures are retried with backoff while the deliverer runs,
    401/403 and any 3xx (never followed) pause delivery (records stay pending for ``sync``), other 4xx go
    to ``rejected.jsonl``.
    Every record it does not send is counted with its reason in :attr:`skipped`.
    """

    def __init__(
        self,
        run_dir: str,
        client: BackendClient,
        options: DeliveryOptions = DeliveryOptions(),
        *,
        retry_sleep: Optional[Callable[[float], Any]] = None,
        host_busy: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.run_dir = run_dir
        self.host_busy = host_busy
        self.client = client
        self.options = options
        self.lock = DeliverLock(run_dir)
        self.delivered = 0
        self.skipped: Dict[str, int] = {}
        # What this deliverer did itself (``delivered``/``skipped`` carry on from an earlier status.json).
        self.delivered_now = 0
        self.skipped_now: Dict[str, int] = {}
        self.rejected_now = 0
        self.paused_reason: Optional[str] = None
        self.last_error: Optional[str] = None
        self.last_error_ts: Optional[float] = None
        self.last_delivery_ts: Optional[float] = None
        self.started_ts = time.time()
        self.state_reporting = True
        self.holding = threading.Event()
        self.first_lock_attempt = threading.Event()  # set once the worker knows whether it holds the lock
        self.idle = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._finished = threading.Event()
        self._worker_ident: Optional[int] = None
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._acked = 0
        self._reader: Optional[JournalReader] = None
        self._thread: Optional[threading.Thread] = None
        self._failing_since: Optional[float] = None
        self._deadline: Optional[float] = None
        self._last_fsync = 0.0
        self._last_status = 0.0
        self._retrying = delivery_retrying(
            self._stop,
            initial_backoff_s=options.initial_backoff_s,
            max_backoff_s=options.max_backoff_s,
            sleep=retry_sleep,
            before_sleep=self._before_retry,
        )
        self._log = get_logger()

    # --- host-facing --------------------------------------------------------------------------------

    def start(self) -> "Deliverer":
        """Start the delivery thread (a daemon); it first waits for the deliver lock."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="anylearn-reporter-delivery", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """True while :meth:`run` runs (in the thread ``start`` made, or in a host's own thread)."""
        return self._running.is_set()

    def wake(self) -> None:
        """Tell the worker that the journal grew (it polls anyway; this only cuts latency)."""
        if not self._wake.is_set():
            self._wake.set()

    def acked_offset(self) -> int:
        """Byte offset acknowledged so far, by this deliverer or (when it does not hold the lock) another."""
        if self.holding.is_set():
            return self._acked
        return load_cursor(self.run_dir)

    def pending(self) -> int:
        """Records journalled but not yet acknowledged."""
        return count_pending(self.run_dir, self.acked_offset())

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until every record journalled so far is acknowledged; True if so before the timeout.

        Returns False at once when delivery is paused (a rejected key).
        """
        target = whole_lines_end(os.path.join(self.run_dir, JOURNAL_FILE))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.wake()
        with self._progress:
            while True:
                if self.acked_offset() >= target:
                    return True
                if self.paused_reason or self._stop.is_set() or not self.alive:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Another deliverer's progress is seen only in the cursor file: poll it.
                wait_s = self.options.poll_interval_s if not self.holding.is_set() else 1.0
                self._progress.wait(wait_s if remaining is None else min(wait_s, remaining))

    def close(self, timeout_s: Optional[float] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s``, then stop; True if nothing stayed pending.

        Whatever is left stays in the journal for the next deliverer (wrapper, sidecar, ``sync``).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._deadline = deadline
        drained = self.flush(timeout_s) if self.alive else False
        self._stop.set()
        self._wake.set()
        if self.alive and threading.get_ident() != self._worker_ident:
            remaining = 1.0 if deadline is None else max(0.1, deadline - time.monotonic())
            self._finished.wait(remaining)
        return drained

    def drain(self, timeout_s: Optional[float], on_progress: Optional[Callable[[int, bool], None]] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s`` (None: until done), calling ``on_progress(pending,
        drained)`` about twice a second; then stop. True when nothing stayed pending. Returns early when
        delivery pauses (a rejected key)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        drained = False
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                drained = self.flush(PROGRESS_INTERVAL_S if remaining is None else max(0.0, min(PROGRESS_INTERVAL_S, remaining)))
                if on_progress is not None:
                    on_progress(self.pending(), drained)
                if drained or self.paused_reason or not self.alive or (remaining is not None and remaining <= 0):
                    return drained
        finally:
            self.close(0.5 if deadline is None else max(0.5, deadline - time.monotonic()))

    def stop(self) -> None:
        """Ask the worker to stop without draining."""
        self._stop.set()
        self._wake.set()

    def status(self) -> DeliveryStatus:
        """What ``status.json`` holds: counters, last delivery, last error, deliverer pid."""
        return DeliveryStatus(
            task_id=self.client.task_id,
            backend_url=self.client.base_url,
            deliverer_pid=os.getpid(),
            deliverer_started=self.started_ts,
            cursor=self._acked,
            delivered=self.delivered,
            skipped=dict(self.skipped),
            counters=read_host_counters(self.run_dir),
            paused=self.paused_reason,
            state_reporting=self.state_reporting,
            last_delivery_ts=self.last_delivery_ts,
            last_error=self.last_error,
            last_error_ts=self.last_error_ts,
            failing_since=self._failing_since,
            updated=time.time(),
            running=not self._stop.is_set(),
        )

    # --- the worker ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Take the lock, then deliver until stopped. Runs in the caller's thread (``start`` threads it)."""
        self._worker_ident = threading.get_ident()
        self._running.set()
        try:
            if not self._wait_for_lock():
                return
            self._deliver_until_stopped()
        except Exception:  # never raise into the host; say what happened once
            self._log.exception("the delivery thread stopped on an unexpected error; records stay in the journal")
        finally:
            self.first_lock_attempt.set()
            self._finish()

    def _wait_for_lock(self) -> bool:
        said: Optional[str] = None
        while not self._stop.is_set():
            try:
                if self.lock.try_acquire():
                    self.holding.set()
                    self.first_lock_attempt.set()
                    return True
            except (OSError, ValueError) as exc:  # said once per cause, not once per attempt
                why = getattr(exc, "strerror", None) or str(exc)
                if why != said:
                    said = why
                    self._note_error(f"cannot take the deliver lock: {why}")
                    self._log.warning(
                        "cannot take the deliver lock in %s: %s; records stay in the journal (said once)", self.run_dir, why,
                    )
            self.first_lock_attempt.set()
            self._stop.wait(self.options.lock_poll_interval_s)
        return False

    def _deliver_until_stopped(self) -> None:
        self._load_state()
        reader = self._reader = JournalReader(self.run_dir, self._acked)
        while not self._stop.is_set():
            entries = reader.read_available(max_records=256)
            if not entries:
                if not self.idle.is_set():
                    self.idle.set()
                    self._checkpoint(force=True)
                self._wake.wait(self.options.poll_interval_s)
                self._wake.clear()
                continue
            self.idle.clear()
            for entry in entries:
                if not self._deliver_entry(entry):
                    return

    def _load_state(self) -> None:
        self._acked = load_cursor(self.run_dir)
        previous, _ = read_status(self.run_dir)  # field by field: a hand-edited file cannot stop delivery
        if previous is not None and previous.task_id == self.client.task_id:
            self.delivered = previous.delivered
            self.skipped = dict(previous.skipped)

    def _deliver_entry(self, entry: JournalEntry) -> bool:
        record = entry.record
        skip: Optional[str]
        if record is None:
            skip = line_skip_reason(entry.problem)
        else:
            skip = skip_reason(record, self.options.rule, state_reporting=self.state_reporting)
        if skip is not None:
            self._count_skip(skip)
        elif record is not None:
            self._defer_while_host_busy()
            try:
                result: SendResult = self._retrying(self._send, record)
            except TransientError:
                return False  # stopped while retrying: the record stays pending
            if not self._apply(record, result):
                return False
        self._acknowledge(entry.end_offset)
        return True

    def _count_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_now[reason] = self.skipped_now.get(reason, 0) + 1

    def _defer_while_host_busy(self) -> None:
        """Training comes first: while the host process is reporting in a burst (a tight loop), hold the
        next request back a little, at most ``max_defer_s``, so this thread does not compete with the
        training thread for the interpreter. Gaps in the burst get full delivery speed."""
        if self.host_busy is None:
            return
        waited = 0.0
        while waited < self.options.max_defer_s and self.host_busy() and not self._stop.is_set():
            self._stop.wait(self.options.defer_step_s)
            waited += self.options.defer_step_s

    def _send(self, record: Record) -> SendResult:
        timeout_s = None if self._deadline is None else self._deadline - time.monotonic()
        return self.client.send(record, timeout_s)

    def _apply(self, record: Record, result: SendResult) -> bool:
        """Book an answer; False when delivery must pause (the record is then not acknowledged)."""
        if self._failing_since is not None:
            self._log.info("delivery resumed after %.0f s", time.time() - self._failing_since)
            self._failing_since = None
        if result.outcome is Outcome.DELIVERED:
            self.delivered += 1
            self.delivered_now += 1
            self.last_delivery_ts = time.time()
        elif result.outcome is Outcome.REJECTED:
            self.rejected_now += 1
            append_rejected(self.run_dir, record, result.status, result.reason)
            self._note_error(f"HTTP {result.status}: {result.reason}")
            self._log.warning(
                "the backend refused a %s record for good (HTTP %d: %s); kept in %s/rejected.jsonl",
                record.kind, result.status, result.reason, self.run_dir,
            )
        elif result.outcome is Outcome.UNSUPPORTED:
            self.state_reporting = False
            self._count_skip(SKIP_STATE_OFF)
            self._log.info("the backend has no state endpoint (HTTP %d); task state reporting is off", result.status)
        elif result.outcome is Outcome.AUTH:
            self._pause(
                f"auth: HTTP {result.status}", f"HTTP {result.status}: {result.reason}",
                f"the backend refused the secret key for task {self.client.task_id} (HTTP {result.status}: "
                f"{result.reason}); delivery is paused and records stay pending in {self.run_dir}: check "
                f"ANYLEARN_SECRET_KEY (or secret_key), then run `anylearn-reporter sync {self.run_dir}`",
            )
            return False
        elif result.outcome is Outcome.REDIRECT:
            # Never followed: the Secret-Key header (and the body) would go to whatever host Location names.
            self._pause(
                f"redirect: HTTP {result.status}, {result.reason}", f"HTTP {result.status}: {result.reason}",
                f"the backend answered HTTP {result.status} ({result.reason}); redirects are never followed "
                f"(the secret key would go along), so delivery is paused and records stay pending in "
                f"{self.run_dir}: set ANYLEARN_BACKEND_URL to the address that answers itself, then run "
                f"`anylearn-reporter sync {self.run_dir}`",
            )
            return False
        return True

    def _pause(self, reason: str, error: str, message: str) -> None:
        """Pause delivery for the rest of this deliverer's life: one message, records stay pending."""
        self.paused_reason = reason
        self._note_error(error)
        self._log.error("%s", message)
        self._checkpoint(force=True)
        with self._progress:
            self._progress.notify_all()

    def _note_error(self, text: str) -> None:
        self.last_error = text
        self.last_error_ts = time.time()

    def _before_retry(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        reason = getattr(exc, "reason", repr(exc))
        self._note_error(reason)
        if self._failing_since is None:
            self._failing_since = time.time()
            self._log.warning(
                "delivery to %s failed (%s); retrying with backoff, records stay in %s",
                self.client.base_url, reason, self.run_dir,
            )
        self._checkpoint()

    def _acknowledge(self, offset: int) -> None:
        self._acked = offset
        self._checkpoint()
        with self._progress:
            self._progress.notify_all()

    def _checkpoint(self, force: bool = False) -> None:
        """Persist the cursor after every record (an atomic rename survives a crash of this process);
        fsync it at most once a ``cursor_fsync_interval_s`` and at idle and close, which bounds what a
        power loss can resend (the idempotency keys make a resend harmless)."""
        now = time.monotonic()
        fsync = force or now - self._last_fsync >= self.options.cursor_fsync_interval_s
        try:
            save_cursor(self.run_dir, self._acked, fsync=fsync)
            if fsync:
                self._last_fsync = now
            if force or now - self._last_status >= self.options.status_interval_s:
                self._last_status = now
                write_status(self.run_dir, self.status())
        except OSError as exc:
            self._note_error(f"cannot save the cursor: {exc.strerror}")

    def _finish(self) -> None:
        if self.holding.is_set():
            self._stop.set()
            self._checkpoint(force=True)
            self.lock.release()
            self.holding.clear()
        if self._reader is not None:
            self._reader.close()
        self.client.close()
        self._running.clear()
        self._finished.set()
        with self._progress:
            self._progress.notify_all()


def build_deliverer(
    config: Config, *, run_dir: Optional[str] = None, host_busy: Optional[Callable[[], bool]] = None, **option_overrides: Any
) -> Deliverer:
    """A deliverer for ``config``'s task and run directory (the configuration must not be offline)."""
    if config.offline:
        raise ValueError("no backend or task id configured: offline runs are only journalled")
    client = BackendClient(config.backend_url or "", config.task_id or "", config.secret_key,
                           request_timeout_s=config.request_timeout_s)
    options = DeliveryOptions(
        rule=SendRule.of(config),
        **option_overrides,
    )
    return Deliverer(run_dir or config.run_dir, client, options, host_busy=host_busy)


__all__ = ["Deliverer", "DeliveryOptions", "build_deliverer"]
