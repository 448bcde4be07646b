"""The one delivery engine: journal records -> destinations, in order, with retries, acknowledged by cursors.

The same :class:`Deliverer` runs in the training process, inside the wrapper and in the sidecar. Hosts
use its door only: ``start()``, ``wait_for_lock(timeout_s)``, ``flush(timeout_s)``,
``drain(timeout_s, on_progress)`` and ``close(timeout_s)``. Behind the door each destination (a
:class:`~reporter.sink.Sink`: AnyLearn first, then those :func:`~reporter.sink.build_sinks` turns on) has
its own :class:`~reporter.lane.Lane`: a worker thread that takes the destination's lock (waiting for it
while another deliverer holds it, so delivery is never orphaned), then follows the journal after the
destination's cursor, woken by the writer's own ``write`` through inotify where the system has it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .client import INITIAL_BACKOFF_S, MAX_BACKOFF_S, BackendClient, RecordClient
from .config import JOURNAL_FILE, Config
from .cursor import count_pending
from .lane import Lane
from .ledger import read_host_counters
from .log import get_logger, stay_pending, sync_hint
from .pacing import BurstPacing
from .policy import SendRule
from .reader import journal_end
from .runstatus import DeliveryStatus, read_status, write_status
from .sink import Sink, build_sinks
from .sink_anylearn import AnyLearnSink

PROGRESS_INTERVAL_S = 0.5
THREAD_NAME = "anylearn-reporter-delivery"


class DeliveryOptions:
    """How a deliverer behaves; every duration in seconds. (A plain class: a frozen dataclass's generated
    methods would add about 0.4 ms to loading the delivery side in the training process.)"""

    def __init__(
        self,
        rule: SendRule = SendRule(),  # which records are sent
        poll_interval_s: float = 0.2,  # how often the journal is looked at where inotify is missing
        watch_interval_s: float = 1.0,  # with inotify: the longest wait for an event (a safety net)
        lock_poll_interval_s: float = 1.0,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        ack_interval_s: float = 0.05,  # the cursor is replaced at most this often, and when idle or stopping
        cursor_fsync_interval_s: float = 1.0,
        status_interval_s: float = 0.5,
    ) -> None:
        self.rule = rule
        self.poll_interval_s = poll_interval_s
        self.watch_interval_s = watch_interval_s
        self.lock_poll_interval_s = lock_poll_interval_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.ack_interval_s = ack_interval_s
        self.cursor_fsync_interval_s = cursor_fsync_interval_s
        self.status_interval_s = status_interval_s

    def __repr__(self) -> str:
        return f"DeliveryOptions({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def _ledger_view(name: str, doc: str) -> Any:
    """A read-only attribute of the deliverer that reads the AnyLearn sink's ledger."""
    return property(lambda self: getattr(self._sink.ledger, name), doc=doc)


class Deliverer:
    """Delivers one run directory's journal to one task (and to the other destinations it is given).

    The door for hosts: :meth:`start`, :meth:`wait_for_lock`, :meth:`flush`, :meth:`drain`, :meth:`close`.
    Never raises into its host: transient failures are retried with backoff while the deliverer runs,
    401/403 and any 3xx (never followed) pause delivery (records stay pending for ``sync``), other 4xx go
    to ``rejected.jsonl``. Every record it does not send is counted with its reason in :attr:`skipped`.
    The observations (``delivered``, ``paused_reason``, ...) are AnyLearn's; other destinations report in
    ``status.json`` under ``sinks.<name>``.
    """

    def __init__(
        self,
        run_dir: str,
        client: RecordClient,
        options: DeliveryOptions = DeliveryOptions(),
        *,
        retry_sleep: Optional[Callable[[float], Any]] = None,
        pacing: Optional[BurstPacing] = None,
        more_sinks: Sequence[Sink] = (),
    ) -> None:
        self.run_dir = run_dir
        self.client = client
        self.options = options
        self.started_ts = time.time()
        self._pacing = pacing
        self._progress = threading.Condition()  # every lane notifies it; flush() waits on it
        self._status_lock = threading.Lock()  # status.json is composed from every lane, written by one at a time
        self._sink = AnyLearnSink(client, options.rule, run_dir, initial_backoff_s=options.initial_backoff_s,
                                  max_backoff_s=options.max_backoff_s, retry_sleep=retry_sleep)
        self._primary = self._lane(self._sink, self._sink.ledger.note_error, pacing, THREAD_NAME)
        self._lane_errors: Dict[str, Tuple[str, float]] = {}  # other lanes' own troubles (lock, cursor)
        self._lanes: List[Lane] = [self._primary] + [
            self._lane(sink, self._other_error(sink.name), None, f"{THREAD_NAME}-{sink.name}") for sink in more_sinks]
        self._log = get_logger()

    def _lane(self, sink: Sink, note_error: Callable[[str], None], pacing: Optional[BurstPacing], name: str) -> Lane:
        return Lane(self.run_dir, sink, self.options, progress=self._progress, write_status=self._write_status,
                    note_error=note_error, previous=lambda: self._previous_section(sink.name), pacing=pacing,
                    thread_name=name)

    def _other_error(self, name: str) -> Callable[[str], None]:
        def note(text: str) -> None:
            self._lane_errors[name] = (text, time.time())
        return note

    # --- the door -----------------------------------------------------------------------------------

    def start(self) -> "Deliverer":
        """Start every lane's thread (daemons); each first waits for its destination's lock."""
        for lane in self._lanes:
            lane.start()
        return self

    def wait_for_lock(self, timeout_s: Optional[float]) -> bool:
        """Wait up to ``timeout_s`` for every lane's first try at its lock; True when this deliverer holds
        AnyLearn's (it then delivers), False when another process does (this one waits in the background
        and takes over when that one exits) or the time ran out."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for lane in self._lanes:
            lane.lock_known.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._primary.holding

    def flush(self, timeout_s: Optional[float] = None, files: Optional[Dict[int, int]] = None) -> bool:
        """Wait until every record journalled so far is acknowledged by every running lane; True if so
        before the timeout.

        ``files`` narrows "every record" to byte ranges, ``{inode: end offset}`` (what one writer journalled,
        see :meth:`JournalWriter.written_files`); by default, the journal the path names up to its end.
        Returns False at once when AnyLearn's delivery is paused (a rejected key, a redirect); another
        destination that paused or stopped is not waited for.
        """
        path = os.path.join(self.run_dir, JOURNAL_FILE)
        if files is None:
            target_ino, target = journal_end(path)
            files = {} if target_ino is None else {target_ino: target}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        primary = self._primary
        with self._progress:
            while True:
                if self._acknowledged(files, path):
                    return True
                if self.paused_reason or primary.stop.is_set() or not primary.running.is_set():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # Another deliverer's progress is seen only in the cursor file: poll it.
                wait_s = 1.0 if all(lane.holding for lane in self._lanes) else self.options.poll_interval_s
                self._progress.wait(wait_s if remaining is None else min(wait_s, remaining))

    def _acknowledged(self, files: Dict[int, int], path: str) -> bool:
        """Whether every ``{inode: end}`` range is acknowledged by AnyLearn's lane and every other running lane."""
        files = {ino: end for ino, end in files.items() if end > 0}
        if not files:
            return True
        lanes = [lane for lane in self._lanes if lane is self._primary or lane.running.is_set()]
        # While a lane of this process is still short of the ends (every wake-up of a drain), say so without
        # reading the journal's end: that read (a truncated journal) is for the check that can say yes.
        if any(lane.holding and not lane.ack.covers(files, None, 0) for lane in lanes):
            return False
        path_ino, path_end = journal_end(path)
        return all(lane.caught_up(files, path_ino, path_end) for lane in lanes)

    def drain(self, timeout_s: Optional[float], on_progress: Optional[Callable[[int, bool], None]] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s`` (None: until done), calling ``on_progress(pending,
        drained)`` about twice a second; then stop. True when nothing stayed pending. Returns early when
        delivery pauses."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        drained = False
        interrupted = True  # until the loop returns: a KeyboardInterrupt stops at once, nothing more is sent
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                drained = self.flush(PROGRESS_INTERVAL_S if remaining is None else max(0.0, min(PROGRESS_INTERVAL_S, remaining)))
                if on_progress is not None:
                    on_progress(count_pending(self.run_dir, self._primary.acked_offset()), drained)
                if drained or self.paused_reason or not self._primary.running.is_set() or (remaining is not None and remaining <= 0):
                    interrupted = False
                    return drained
        finally:
            self.close(0 if interrupted else 0.5 if deadline is None else max(0.5, deadline - time.monotonic()))

    def close(self, timeout_s: Optional[float] = None) -> bool:
        """Deliver what is pending for up to ``timeout_s`` (when this deliverer holds the lock), then stop;
        True if nothing stayed pending. Whatever is left stays in the journal for the next deliverer
        (wrapper, sidecar, ``sync``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        primary = self._primary
        for lane in self._lanes:
            lane.deadline = deadline
        if primary.running.is_set():
            self.wait_for_lock(timeout_s)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        drained = self.flush(remaining) if primary.running.is_set() and primary.holding else False
        for lane in self._lanes:
            lane.interrupt()
        for lane in self._lanes:
            lane.join(1.0 if deadline is None else max(0.1, deadline - time.monotonic()))
        if primary.lock_error is not None:  # nobody delivered: say so at the end too, not only when it began
            left = count_pending(self.run_dir)
            self._log.warning(
                "nothing was delivered: the deliver lock in %s could not be taken (%s); %s, deliver %s with `%s`",
                self.run_dir, primary.lock_error, stay_pending(left), "it" if left == 1 else "them", sync_hint(self.run_dir),
            )
        return drained

    # --- what the engine says about itself (status.json, the hosts' messages) -------------------------

    @property
    def alive(self) -> bool:
        """True from :meth:`start` until AnyLearn's lane has stopped."""
        return self._primary.running.is_set()

    # AnyLearn's account (what hosts print and status.json's top level), read from its sink's ledger.
    delivered = _ledger_view("delivered", "Records delivered to the task (carried on from status.json).")
    skipped = _ledger_view("skipped", "Records not sent, by reason (carried on from status.json).")
    delivered_now = _ledger_view("delivered_now", "Records this deliverer delivered itself.")
    skipped_now = _ledger_view("skipped_now", "Records this deliverer did not send, by reason.")
    rejected_now = _ledger_view("rejected_now", "Records the backend refused for good (kept in rejected.jsonl).")
    paused_reason = _ledger_view("paused_reason", "Why delivery is paused (a refused key, a redirect), else None.")
    last_error = _ledger_view("last_error", "The last error, as status shows it.")
    last_error_ts = _ledger_view("last_error_ts", "When the last error happened (seconds since the epoch).")
    last_delivery_ts = _ledger_view("last_delivery_ts", "When a record was last delivered.")

    @property
    def state_reporting(self) -> bool:
        return self._sink.state_reporting

    @property
    def held_back(self) -> int:
        """Requests held back because the host was reporting just now (0 without pacing)."""
        return 0 if self._pacing is None else self._pacing.held_back

    def status(self) -> DeliveryStatus:
        """What ``status.json`` holds: AnyLearn's counters, last delivery and last error at the top level,
        the deliverer's pid, and every other destination's section under ``sinks``."""
        return DeliveryStatus(
            **self._sink.status(),
            deliverer_pid=os.getpid(),
            deliverer_started=self.started_ts,
            cursor=self._primary.ack.offset,
            counters=read_host_counters(self.run_dir),
            updated=time.time(),
            running=not self._primary.stop.is_set(),
            sinks={lane.sink.name: self._section(lane) for lane in self._lanes[1:] if lane.holding},
        )

    def _section(self, lane: Lane) -> Dict[str, Any]:
        section = dict(lane.sink.status())
        section["cursor"] = lane.ack.offset
        error = self._lane_errors.get(lane.sink.name)
        if error is not None and (section.get("last_error_ts") or 0) < error[1]:
            section["last_error"], section["last_error_ts"] = error
        return section

    def _write_status(self) -> None:
        """Replace status.json with what this deliverer knows; a section of a lane that does not hold its
        lock (another process delivers that destination) is kept as it is on disk. Raises OSError."""
        with self._status_lock:
            on_disk, _ = read_status(self.run_dir)
            if self._primary.holding:
                status = self.status()
                kept = {} if on_disk is None else on_disk.sinks
                status.sinks = {**{name: s for name, s in kept.items() if name != self._sink.name}, **status.sinks}
            else:
                status = on_disk or DeliveryStatus()
                status.sinks = {**status.sinks, **{lane.sink.name: self._section(lane) for lane in self._lanes[1:] if lane.holding}}
            write_status(self.run_dir, status)

    def _previous_section(self, name: str) -> Optional[Mapping[str, Any]]:
        """A destination's section of the previous status.json (AnyLearn's is the top level)."""
        previous, _ = read_status(self.run_dir)  # field by field: a hand-edited file cannot stop delivery
        if previous is None:
            return None
        return previous.to_json() if name == self._sink.name else previous.sinks.get(name)


def build_deliverer(
    config: Config, *, run_dir: Optional[str] = None, pacing: Optional[BurstPacing] = None,
    in_training_process: bool = False, **option_overrides: Any
) -> Deliverer:
    """A deliverer for ``config``'s task and run directory (the configuration must not be offline), with a
    lane for every other destination :func:`~reporter.sink.build_sinks` turns on for this host."""
    if config.offline:
        raise ValueError("no backend or task id configured: offline runs are only journalled")
    run_dir = run_dir or config.run_dir
    client = BackendClient.from_config(config)
    options = DeliveryOptions(rule=SendRule.of(config), **option_overrides)
    return Deliverer(run_dir, client, options, pacing=pacing,
                     more_sinks=build_sinks(config, run_dir, in_training_process=in_training_process))


__all__ = ["Deliverer", "DeliveryOptions", "build_deliverer"]
