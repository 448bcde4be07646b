"""TensorBoard event files -> journal records: a tailer over :mod:`reporter.tbformat`.

:class:`EventFileTailer` follows every event file under a directory, journals each scalar once, and
remembers in the run directory how far it read, so a restarted wrapper or sidecar goes on where it left off.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .config import JOURNAL_FILE, TENSORBOARD_LOCK_FILE, TENSORBOARD_POSITION_FILE
from .ledger import COUNTER_UNREADABLE
from .log import get_logger
from .osutil import atomic_write, read_json
from .reader import iter_entries
from .record import KIND_INTERMEDIATE
from .runlock import RunLock
from .tbformat import HEADER_BYTES, RecordScanner, Scalar, parse_event

EVENT_FILE_PREFIX = "events.out.tfevents."
READ_CHUNK_BYTES = 1 << 20
DEFAULT_POLL_INTERVAL_S = 0.25  # a flushed scalar reaches the journal within this (plus the read) time


def tensorboard_directory(text: Optional[str], output_dir: str) -> Optional[str]:
    """The directory to follow: ``text`` as given when absolute, else under the output directory."""
    if text is None or not text.strip():
        return None
    return os.path.abspath(os.path.join(output_dir, text))


def is_event_file(name: str) -> bool:
    """True for a file name TensorBoard writers use for event files."""
    return name.startswith(EVENT_FILE_PREFIX)


# --- the tailer --------------------------------------------------------------------------------------


@dataclass
class _FileState:
    path: str
    offset: int = 0
    corrupt: int = 0
    ignored: bool = False
    scanner: RecordScanner = field(default_factory=RecordScanner)
    size_seen: int = 0

    def as_json(self) -> Dict[str, Any]:
        return {"offset": self.offset, "corrupt": self.corrupt, "ignored": self.ignored}


def _saved_files(files: Any, directory: str) -> Dict[str, "_FileState"]:
    """The per-file positions saved in ``tensorboard.json``; entries that do not make sense are dropped."""
    states: Dict[str, _FileState] = {}
    if not isinstance(files, dict):
        return states
    for rel, entry in files.items():
        if not isinstance(rel, str) or not isinstance(entry, dict):
            continue
        offset = entry.get("offset")
        if type(offset) is not int or offset < 0:
            continue
        corrupt = entry.get("corrupt")
        states[rel] = _FileState(
            os.path.join(directory, rel), offset=offset,
            corrupt=corrupt if type(corrupt) is int else 0, ignored=entry.get("ignored") is True,
            scanner=RecordScanner(at_file_start=offset == 0),
        )
    return states


def _journalled_after_last_save(run_dir: str, mark: Any) -> Dict[Tuple[Any, Any, Any], int]:
    """What the previous reader journalled after its last save of the positions: a reader killed
    between journalling a batch and saving where it was left those records; its successor reads the
    batch again and must not journal it twice. They are the previous reader's records (its pid) after
    the journal size it saved, identified by (name, step, wall time)."""
    if not isinstance(mark, dict) or type(mark.get("pid")) is not int or type(mark.get("end")) is not int:
        return {}
    found: Dict[Tuple[Any, Any, Any], int] = {}
    for entry in iter_entries(run_dir, max(0, mark["end"])):
        record = entry.record
        if record is not None and record.pid == mark["pid"] and record.kind == KIND_INTERMEDIATE:
            signature = (record.name, record.step, record.ts)
            found[signature] = found.get(signature, 0) + 1
    return found


class EventFileTailer:
    """Follows every ``events.out.tfevents.*`` file under ``directory`` (sub-directories and files created
    later included) and journals each scalar once, in file order: named by its tag, or as the objective
    (name None, which the deliverer sends) when its tag is ``objective_tag``.

    One reader per run: it holds ``tensorboard.lock`` in the run directory while it reads, so a wrapper
    and a sidecar on the same run never both read the files; the other waits and takes over when the
    holder exits. How far each file was read is kept in ``tensorboard.json`` beside the journal and
    replaced after every pass that journalled something, so a restarted reader goes on where it left off.
    """

    def __init__(
        self,
        directory: str,
        run_dir: str,
        writer: Any,
        *,
        objective_tag: Optional[str] = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.run_dir = run_dir
        self.writer = writer  # anything with append(kind, value, name, step, ts=...): the host's JournalWriter
        self.objective_tag = objective_tag or None
        self.poll_interval_s = poll_interval_s
        self.position_path = os.path.join(run_dir, TENSORBOARD_POSITION_FILE)
        self.scalars_journalled = 0
        self.duplicates_skipped = 0  # scalars a killed predecessor had journalled without saving its position
        self.files: Dict[str, _FileState] = {}
        self._already_journalled: Dict[Tuple[Any, Any, Any], int] = {}
        self._lock = RunLock(run_dir, TENSORBOARD_LOCK_FILE)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._said_waiting = False
        self._said_unreadable: set = set()
        self._mutex = threading.Lock()  # one pass at a time (the thread's, or the final one in stop)

    # -- counters --

    @property
    def corrupt_records(self) -> int:
        """Records skipped in all files because a CRC did not match."""
        return sum(state.corrupt for state in self.files.values())

    @property
    def ignored_files(self) -> List[str]:
        """Files named like event files that are not."""
        return sorted(rel for rel, state in self.files.items() if state.ignored)

    # -- the role --

    def acquire(self) -> bool:
        """Take the reader's lock (never blocks); load the saved positions the first time it is held."""
        if self._lock.held:
            return True
        os.makedirs(self.run_dir, exist_ok=True)
        if not self._lock.try_acquire():
            return False
        self._load_positions()
        return True

    def release(self) -> None:
        """Let the reader's role go without a last pass (another reader may take it over); :meth:`stop`
        is the orderly end."""
        self._lock.release()

    def _load_positions(self) -> None:
        saved = read_json(self.position_path)
        saved = saved if isinstance(saved, dict) else {}
        self.files = _saved_files(saved.get("files"), self.directory)
        self._already_journalled = _journalled_after_last_save(self.run_dir, saved.get("journal"))

    def _save_positions(self) -> None:
        try:
            journal_end = os.path.getsize(os.path.join(self.run_dir, JOURNAL_FILE))
        except OSError:
            journal_end = 0
        data = {
            "directory": self.directory,
            "journal": {"pid": os.getpid(), "end": journal_end},  # everything this reader journalled is before "end"
            "files": {rel: s.as_json() for rel, s in sorted(self.files.items())},
        }
        try:
            atomic_write(self.position_path, (json.dumps(data, indent=1) + "\n").encode(), fsync=False)
        except OSError as exc:
            get_logger().warning("cannot save how far the event files were read in %s: %s", self.position_path, exc.strerror)

    # -- reading --

    def _discover(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for root, dirs, names in os.walk(self.directory):
            dirs.sort()
            for name in sorted(names):
                if not is_event_file(name):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.directory)
                if rel not in self.files:
                    self.files[rel] = _FileState(path)

    def poll_once(self) -> int:
        """One pass over every event file (reading each to its end) when this reader holds the lock;
        returns how many scalars it journalled."""
        with self._mutex:
            if not self.acquire():
                if not self._said_waiting:
                    self._said_waiting = True
                    get_logger().info("another reader follows this run's event files; waiting to take over")
                return 0
            self._discover()
            journalled = 0
            changed = False
            for rel in sorted(self.files):
                state = self.files[rel]
                if state.ignored:
                    continue
                count, moved = self._read_file(rel, state)
                journalled += count
                changed = changed or moved
            if changed:
                self._save_positions()
            self._already_journalled = {}  # the first pass after taking the role has read past them
            return journalled

    def _read_file(self, rel: str, state: _FileState) -> Tuple[int, bool]:
        try:
            fd = os.open(state.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, False
        except OSError as exc:
            self._say_unreadable(rel, state.path, exc)
            return 0, False
        journalled = 0
        moved = False
        try:
            size = os.fstat(fd).st_size
            if size < state.offset:
                get_logger().warning("the event file %s is shorter than what was read of it: reading it again from the start", state.path)
                state.offset, state.scanner = 0, RecordScanner()
                moved = True
            state.size_seen = size
            need = HEADER_BYTES
            while size - state.offset >= need:
                chunk = os.pread(fd, max(READ_CHUNK_BYTES, need), state.offset)
                if not chunk:
                    break
                result = state.scanner.scan(chunk, size - state.offset)
                if result.not_event_file:
                    state.ignored = True
                    get_logger().warning("%s is named like an event file but is not one: ignoring it", state.path)
                    return journalled, True
                for payload in result.payloads:
                    for scalar in parse_event(payload) or ():
                        journalled += self._journal(scalar)
                if result.corrupt:
                    get_logger().warning(
                        "skipped %d damaged record(s) (CRC mismatch) in %s near byte %d",
                        result.corrupt, state.path, state.offset,
                    )
                    state.corrupt += result.corrupt
                    counters = getattr(self.writer, "counters", None)  # the run's counters: status.json, summary.json
                    if counters is not None:
                        counters.record_lost("tensorboard record", result.corrupt, category=COUNTER_UNREADABLE)
                if result.consumed:
                    state.offset += result.consumed
                    moved = True
                elif result.need <= len(chunk):
                    break  # no progress possible with what is there
                need = result.need
        except OSError as exc:
            self._say_unreadable(rel, state.path, exc)
        finally:
            os.close(fd)
        return journalled, moved

    def _say_unreadable(self, rel: str, path: str, exc: OSError) -> None:
        if rel not in self._said_unreadable:  # once per file and tailer
            self._said_unreadable.add(rel)
            get_logger().warning("cannot read the event file %s: %s", path, exc.strerror)

    def _journal(self, scalar: Scalar) -> bool:
        name = None if scalar.tag == self.objective_tag else scalar.tag
        wall_time = scalar.wall_time if math.isfinite(scalar.wall_time) and scalar.wall_time > 0 else None
        if self._already_journalled:
            signature = (name, scalar.step, wall_time)
            if self._already_journalled.get(signature):
                self._already_journalled[signature] -= 1
                self.duplicates_skipped += 1
                return False
        self.writer.append(KIND_INTERMEDIATE, scalar.value, name, scalar.step, ts=wall_time)
        self.scalars_journalled += 1
        return True

    # -- the thread --

    def start(self) -> "EventFileTailer":
        """Follow the files in a daemon thread until :meth:`stop`."""
        get_logger().info(
            "following TensorBoard event files under %s%s", self.directory,
            f" (objective tag {self.objective_tag!r})" if self.objective_tag else "",
        )
        self._thread = threading.Thread(target=self._run, name="anylearn-reporter-tensorboard", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # never let one bad pass end the reader
                get_logger().warning("reading the event files failed (%s); trying again", exc)
            self._stop.wait(self.poll_interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following: one last pass (when this reader holds the lock), then let the lock go."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self.poll_once()  # takes the role over if the other reader has gone
            if self._lock.held:
                for state in self.files.values():
                    if not state.ignored and state.size_seen > state.offset:
                        get_logger().warning(
                            "the last %d byte(s) of %s are an unfinished record; they stay unread",
                            state.size_seen - state.offset, state.path,
                        )
        except Exception as exc:
            get_logger().warning("the last read of the event files failed: %s", exc)
        finally:
            self._lock.release()
