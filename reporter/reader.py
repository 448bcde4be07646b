"""Reading the journal: whole records after a byte offset, and which file a journal is."""

from __future__ import annotations

import os
import stat
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from .config import JOURNAL_FILE
from .log import get_logger
from .osutil import whole_lines_end
from .record import Record, read_line

_READ_CHUNK_BYTES = 1 << 16
MAX_LINE_BYTES = 1 << 20  # far above any line a writer makes (a name is cut to 250 characters): a longer one is skipped
INVALID_TOO_LONG = f"line longer than {MAX_LINE_BYTES} bytes"
INVALID_NOT_REGULAR = "the journal is not a regular file"
HEAD_BYTES = 4096
DEFAULT_BATCH = 10_000  # lines per read of iter_entries: one list of this many entries at most in memory


@dataclass
class JournalEntry:
    """One line of the journal: its end offset and the record, or None and why the line was not valid."""

    end_offset: int
    record: Optional[Record]
    problem: Optional[str] = None


class JournalReader:
    """Reads whole records after a byte offset, following the file as it grows."""

    def __init__(self, run_dir: str, offset: int = 0) -> None:
        self.path = os.path.join(run_dir, JOURNAL_FILE)
        self.offset = offset
        self.torn_lines = 0
        self.truncations = 0  # times the file was found truncated in place and read again from its start
        self.invalid: Dict[str, int] = {}  # whole lines that are not valid records, by reason
        self.not_regular = False  # a device, a FIFO...: never followed (/dev/full would be read forever)
        self._fd = -1
        self._scanned_to = -1  # how far a long line after :attr:`offset` was searched for its newline
        self._head: Optional[int] = None  # the file's mark (journal_head) once its first line was read
        self._at_end = False  # the last read reached the end of the file

    def _ensure_open(self) -> bool:
        if self.not_regular:
            return False
        if self._fd < 0:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                self.not_regular = True
                self.invalid[INVALID_NOT_REGULAR] = 1
                get_logger().warning("%s is not a regular file: it is not read (nothing in it can be delivered)", self.path)
                return False
            self._fd = fd
        return True

    def head(self) -> Optional[int]:
        """The mark of the file being read (see :func:`journal_head`; None before it is opened)."""
        return journal_head(self._fd) if self._fd >= 0 else None

    @property
    def ino(self) -> Optional[int]:
        """The inode number of the file being read (None before it is opened)."""
        return os.fstat(self._fd).st_ino if self._fd >= 0 else None

    def replaced(self) -> bool:
        """Whether the journal's path now names another file than the one being read (deleted and made
        again, or renamed away by log rotation). Two ``stat`` calls: look only when idle at the end."""
        if self._fd < 0:
            return False
        try:
            named = os.stat(self.path)
        except OSError:  # gone: keep the open file; a new one is taken when it appears
            return False
        own = os.fstat(self._fd)
        return (named.st_ino, named.st_dev) != (own.st_ino, own.st_dev)

    def follow_replacement(self) -> None:
        """Leave the file being read (call once it is read to its end) for the one the path names now,
        from its start."""
        left = os.fstat(self._fd).st_size - self.offset if self._fd >= 0 else 0
        get_logger().warning(
            "the journal %s was replaced (deleted or renamed); following the new file from its start%s",
            self.path, f" ({left} unterminated bytes at the end of the old one are skipped)" if left > 0 else "",
        )
        self.close()
        self.offset = 0
        self._scanned_to = -1
        self._head = None
        self._ensure_open()

    def read_available(self, max_records: int = 1000) -> List[JournalEntry]:
        """Return the whole lines after :attr:`offset` (advancing it), at most ``max_records``.

        An unterminated last line is left for later: it is either being written or torn; a later writer
        starts on a new line, and the torn text is then skipped with a warning.
        """
        if not self._ensure_open():
            return []
        if self._at_end and self._head is not None and self.offset > 0 and journal_head(self._fd) != self._head:
            # Read to its end before, and now another first line: truncated and written again past the offset
            # (a line end there by chance). Looked at once per call after the end, not per record.
            self._restart_truncated()
        self._at_end = False
        entries: List[JournalEntry] = []
        while len(entries) < max_records:
            if self.offset > 0:
                # The byte before the offset comes along in the same read: it is the newline of the last
                # line read, unless the journal was truncated in place (and written again) since.
                chunk = os.pread(self._fd, _READ_CHUNK_BYTES + 1, self.offset - 1)
                if chunk[:1] != b"\n":
                    if entries:
                        break  # hand over what was read; the next call starts the new journal
                    self._restart_truncated()
                    continue
                chunk = chunk[1:]
            else:
                chunk = os.pread(self._fd, _READ_CHUNK_BYTES, 0)
            if not chunk:
                self._at_end = True
                break
            last_newline = chunk.rfind(b"\n")
            if last_newline < 0:
                if len(chunk) < _READ_CHUNK_BYTES:
                    self._at_end = True
                    break  # an unterminated tail
                long_line = self._read_long_line()
                if long_line is None:
                    break
                if isinstance(long_line, int):  # too long to hold: skipped unread, up to its newline
                    start, self.offset = self.offset, long_line
                    if INVALID_TOO_LONG not in self.invalid:
                        get_logger().warning("skipping a %s at byte %d of %s (said once)", INVALID_TOO_LONG, start, self.path)
                    self.invalid[INVALID_TOO_LONG] = self.invalid.get(INVALID_TOO_LONG, 0) + 1
                    entries.append(JournalEntry(long_line, None, INVALID_TOO_LONG))
                    continue
                chunk, last_newline = long_line, len(long_line) - 1
            position = self.offset
            for line in chunk[: last_newline + 1].split(b"\n")[:-1]:
                position += len(line) + 1
                if len(entries) >= max_records:
                    break
                if not line.strip():
                    self.offset = position
                    continue
                record, problem, torn = read_line(line)
                if torn:
                    self.torn_lines += 1
                    get_logger().warning(
                        "skipping a torn or invalid line at byte %d of %s%s", position - len(line) - 1, self.path,
                        " (the record written after it is kept)" if record is not None else "",
                    )
                elif problem is not None:
                    if problem not in self.invalid:
                        get_logger().warning(
                            "skipping an invalid record at byte %d of %s: %s (said once per reason)",
                            position - len(line) - 1, self.path, problem,
                        )
                    self.invalid[problem] = self.invalid.get(problem, 0) + 1
                entries.append(JournalEntry(position, record, problem))
                self.offset = position
        if self._head is None and self.offset > 0:
            self._head = journal_head(self._fd)  # once per file: its first line is whole now
        return entries

    def entries(self, batch: int = DEFAULT_BATCH) -> Iterator[JournalEntry]:
        """Every whole line after :attr:`offset` up to the end there is now, ``batch`` lines a read: the one
        read-until-empty loop (a deliverer that follows the file as it grows has its own)."""
        while True:
            entries = self.read_available(batch)
            if not entries:
                return
            yield from entries

    def _restart_truncated(self) -> None:
        """The journal is shorter than the offset, or no longer has a line end there: it was truncated in
        place (logrotate's ``copytruncate``), so it is a new journal, read from its start."""
        self.truncations += 1
        get_logger().warning(
            "the journal %s was truncated in place (by logrotate's copytruncate?) after %d bytes of it were read; "
            "it is a new journal now, read from its start", self.path, self.offset,
        )
        self.offset = 0
        self._scanned_to = -1
        self._head = None

    def _read_long_line(self) -> "Optional[bytes | int]":
        """The line at :attr:`offset` (with its newline) when it spans more than one chunk; the offset just
        past it when it is longer than :data:`MAX_LINE_BYTES` (its bytes are never held); None when its
        newline is not written yet. Linear: chunks are joined once, and a search resumes where it stopped."""
        position = max(self.offset, self._scanned_to)
        while True:
            more = os.pread(self._fd, _READ_CHUNK_BYTES, position)
            if not more:
                self._scanned_to = position
                return None
            newline = more.find(b"\n")
            if newline >= 0:
                end = position + newline + 1
                self._scanned_to = -1
                if end - self.offset > MAX_LINE_BYTES:
                    return end
                return os.pread(self._fd, end - self.offset, self.offset)
            position += len(more)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def iter_entries(run_dir: str, offset: int = 0, batch: int = DEFAULT_BATCH) -> Iterator[JournalEntry]:
    """Every whole line of a run's journal after ``offset``, invalid ones included (their ``record`` is
    None); the reader is closed when the iteration ends or is abandoned."""
    reader = JournalReader(run_dir, offset)
    try:
        yield from reader.entries(batch)
    finally:
        reader.close()


def iter_records(run_dir: str) -> Iterator[Tuple[int, Record]]:
    """Every whole, valid record of a run's journal with its end offset (for tools and tests); invalid
    lines are left out."""
    for entry in iter_entries(run_dir):
        if entry.record is not None:
            yield entry.end_offset, entry.record


def journal_head(fd: int) -> int:
    """A mark of which file a journal is: the CRC-32 of its first line (at most :data:`HEAD_BYTES`). The
    first record holds its time and a random key, so another journal's differs, even one that got the
    same inode number after a delete; a copy of the run directory keeps it."""
    head = os.pread(fd, HEAD_BYTES, 0)
    newline = head.find(b"\n")
    return zlib.crc32(head if newline < 0 else head[: newline + 1])


def journal_end(path: str) -> Tuple[Optional[int], int]:
    """The journal's inode (None when missing) and the byte offset just after its last complete line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, 0
    try:
        return os.fstat(fd).st_ino, whole_lines_end(fd)
    finally:
        os.close(fd)
