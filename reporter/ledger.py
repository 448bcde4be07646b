"""Counts a host process keeps for its run, by category and reason, saved beside the journal."""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Dict

from .osutil import atomic_write, read_json

COUNTERS_FILE_GLOB = "counters.*.json"
COUNTERS_SAVE_INTERVAL_S = 1.0
COUNTER_LOST = "lost"  # records a writer could not journal, by reason
COUNTER_UNREADABLE = "unreadable"  # output lines a host could not read a metric from, by kind of line
COUNTER_LOG_WRITE_FAILED = "log_write_failed"  # writes of the wrapper's stdout.log/stderr.log that failed, by file


class Ledger:
    """Counts by category, then by reason: ``{category: {reason: count}}``, the one shape of a count.

    ``record_lost(reason, n, category=...)`` returns True the first time a reason is seen, which is what
    "say it once" hangs on. A host's :class:`HostCounters` and a sink's ``DeliveryLedger`` are ledgers.
    """

    def __init__(self) -> None:
        self.values: Dict[str, Dict[str, int]] = {}

    def category(self, name: str) -> Dict[str, int]:
        """The live ``{reason: count}`` dict of one category (made empty when new)."""
        return self.values.setdefault(name, {})

    def record_lost(self, reason: str, n: int = 1, *, category: str = COUNTER_LOST) -> bool:
        """Add ``n`` to ``category``/``reason``; True when that reason is new (say it once)."""
        counts = self.category(category)
        first = reason not in counts
        counts[reason] = counts.get(reason, 0) + n
        return first

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        """A copy of every non-empty category."""
        return {name: dict(counts) for name, counts in self.values.items() if counts}


class HostCounters(Ledger):
    """Counters a host process keeps for its run (e.g. ``lost``), a :class:`Ledger` saved to disk.

    Saved to ``counters.<pid>.json`` in the run directory when a reason first appears, then at most
    once a second while counting and on :meth:`save`; the deliverer (whichever process it runs in)
    folds every process's file into ``status.json``, and ``status``/``summary.json`` show them. Saving
    never raises: a run directory that cannot be written keeps the counts in memory (and in the exit log).
    """

    def __init__(self, run_dir: str) -> None:
        super().__init__()
        self.run_dir = run_dir
        self._saved_at = 0.0
        self._dirty = False

    def record_lost(self, reason: str, n: int = 1, *, category: str = COUNTER_LOST) -> bool:
        first = super().record_lost(reason, n, category=category)
        self._dirty = True
        now = time.monotonic()
        if first or now - self._saved_at >= COUNTERS_SAVE_INTERVAL_S:
            self._saved_at = now
            self.save()
        return first

    def save(self) -> None:
        """Write the counters file now (if anything was counted); never raises."""
        if not self._dirty:
            return
        path = os.path.join(self.run_dir, f"counters.{os.getpid()}.json")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write(path, json.dumps(self.values).encode(), fsync=False)
            self._dirty = False
        except (OSError, ValueError):
            pass


def read_host_counters(run_dir: str) -> Dict[str, Dict[str, int]]:
    """Every host process's counters of a run, summed: ``{category: {reason: count}}``; never raises."""
    total: Dict[str, Dict[str, int]] = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), COUNTERS_FILE_GLOB)):
        data = read_json(path)
        if not isinstance(data, dict):
            continue
        for category, counts in data.items():
            if not isinstance(category, str) or not isinstance(counts, dict):
                continue
            into = total.setdefault(category, {})
            for reason, n in counts.items():
                if isinstance(reason, str) and type(n) is int and n > 0:
                    into[reason] = into.get(reason, 0) + n
    return total
