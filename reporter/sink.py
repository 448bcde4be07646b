"""The door for destinations: what a lane hands a sink (:class:`Handoff`), what a sink is (:class:`Sink`),
and the registry of destinations besides AnyLearn (:data:`SINKS`, :func:`build_sinks`).

AnyLearn is the primary sink of every deliverer (``sink_anylearn``). Another destination is one module with
a sink class and one :class:`SinkEntry` line in :data:`SINKS`: every host already builds its deliverer with
``deliver.build_deliverer``, which asks :func:`build_sinks` and gives each sink a lane of its own (its own
cursor file, lock and thread). Entries with ``in_training_process=False`` are left by the in-process hook
to the wrapper, a sidecar or ``sync``, so training never imports their clients.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Sequence

from .log import get_logger

if TYPE_CHECKING:
    from .config import Config
    from .reader import JournalEntry
    from .record import Record


class Handoff(Protocol):
    """What a lane gives its sink with each batch."""

    stop: threading.Event  # set by close(): finish the record in hand, return False

    def remaining_s(self) -> Optional[float]:
        """What is left of close(timeout) for the wire; None while not closing (or closing without a limit)."""
        ...

    def hold(self, record: "Record") -> None:
        """The host's pacing before a request (the burst hold-back in the training process; nothing otherwise)."""
        ...

    def acknowledge(self, end_offset: int) -> None:
        """Every journal byte before ``end_offset`` is done for this sink (sent, skipped or refused for good)."""
        ...

    def checkpoint(self) -> None:
        """Save the cursor and status.json when due (call it after booking an error while retrying)."""
        ...


class Sink(Protocol):
    """One destination of the journal, fed in order by its own lane."""

    name: str  # "anylearn", "anyboard": its section of status.json
    cursor_file: str  # "cursor" for AnyLearn (the file on disk does not change), "cursor.<name>" otherwise
    lock_file: str  # "deliver.lock" for AnyLearn, "deliver.<name>.lock" otherwise

    def open(self, previous: Optional[Mapping[str, Any]]) -> None:
        """Once, holding its lock: carry counts on from its section of the previous status.json."""
        ...

    def deliver(self, entries: Sequence["JournalEntry"], handoff: Handoff) -> bool:
        """Deliver ``entries`` in order, acknowledging each once done (a batching sink: once per batch).
        False: paused or stopping; what is not acknowledged stays pending. Never raises for runtime trouble."""
        ...

    def status(self) -> Dict[str, Any]:
        """Its fields of status.json."""
        ...

    def close(self) -> None:
        """Let its connections go."""
        ...


class SinkEntry(NamedTuple):
    """A destination besides AnyLearn."""

    name: str
    in_training_process: bool  # False: the in-process hook leaves it to the wrapper, a sidecar, sync
    build: Callable[["Config", str], Optional[Sink]]  # None: off for this configuration; imports its client lazily


def _anyboard(config: "Config", run_dir: str) -> Optional[Sink]:
    from .anyboard.sink import anyboard_from_config  # its client is loaded only when Anyboard is configured

    return anyboard_from_config(config, run_dir)


SINKS: List[SinkEntry] = [
    SinkEntry("anyboard", False, _anyboard),  # issue 18: every named metric into the platform's curves store
]


def build_sinks(config: "Config", run_dir: str, *, in_training_process: bool) -> List[Sink]:
    """The destinations besides AnyLearn (the primary lane) that are on for this configuration and this host.
    A destination that cannot be built is said in one line and left off; the others go on."""
    sinks: List[Sink] = []
    for entry in SINKS:
        if in_training_process and not entry.in_training_process:
            continue
        try:
            sink = entry.build(config, run_dir)
        except Exception as exc:  # noqa: BLE001 - a destination's trouble never reaches the host
            get_logger().warning("cannot set up the %s destination (%s); it is off for this run", entry.name,
                                 type(exc).__name__)
            continue
        if sink is not None:
            sinks.append(sink)
    return sinks


__all__ = ["Handoff", "SINKS", "Sink", "SinkEntry", "build_sinks"]
