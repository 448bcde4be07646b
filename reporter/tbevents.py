"""TensorBoard event files -> journal records: a standard-library reader and a tailer.

An event file (``events.out.tfevents.*``, written by PyTorch's ``SummaryWriter``, tensorboardX, Keras'
TensorBoard callback or TensorFlow summaries) is a sequence of records::

    uint64 length | uint32 masked CRC-32C of length | payload (an ``Event`` protobuf) | uint32 masked CRC-32C of payload

This module reads that framing and the few protobuf fields of ``Event``, ``Summary``, ``Value`` and
``TensorProto`` it needs, with no TensorFlow, tensorboard or protobuf package. :class:`RecordScanner` and
:func:`parse_event` are pure (bytes in, records out, never raising); :class:`EventFileTailer` follows
every event file under a directory, journals each scalar once, and remembers in the run directory how
far it read, so a restarted wrapper or sidecar goes on where it left off.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .config import JOURNAL_FILE, TENSORBOARD_LOCK_FILE, TENSORBOARD_POSITION_FILE
from .ledger import COUNTER_UNREADABLE
from .log import get_logger
from .osutil import atomic_write, read_json
from .reader import JournalReader
from .record import KIND_INTERMEDIATE
from .runlock import RunLock

EVENT_FILE_PREFIX = "events.out.tfevents."
HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length
FOOTER_BYTES = 4  # uint32 masked CRC of the payload
MAX_SCALAR_RECORD_BYTES = 1 << 20  # a longer record (a graph, an image) is skipped unread: it holds no scalar
READ_CHUNK_BYTES = 1 << 20
DEFAULT_POLL_INTERVAL_S = 0.25  # a flushed scalar reaches the journal within this (plus the read) time

# --- CRC-32C (Castagnoli), table driven, slicing by 8 ------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # reflected
_MASK_DELTA = 0xA282EAD8


def _crc_tables() -> List[List[int]]:
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        first.append(crc)
    tables = [first]
    for _ in range(7):
        previous = tables[-1]
        tables.append([(previous[i] >> 8) ^ first[previous[i] & 0xFF] for i in range(256)])
    return tables


_T = _crc_tables()
_LITTLE_ENDIAN = sys.byteorder == "little"


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (continuing ``crc``); ``crc32c(b"123456789") == 0xE3069283``."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc ^= 0xFFFFFFFF
    view = memoryview(data)
    whole = len(view) - len(view) % 8 if _LITTLE_ENDIAN else 0
    if whole:
        for word in view[:whole].cast("Q"):  # eight bytes per step: ~1.5x the byte loop in CPython
            x = crc ^ word
            crc = (
                t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[(x >> 24) & 0xFF]
                ^ t3[(x >> 32) & 0xFF] ^ t2[(x >> 40) & 0xFF] ^ t1[(x >> 48) & 0xFF] ^ t0[x >> 56]
            )
    for byte in view[whole:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC: the CRC rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One record as a TensorFlow record writer frames it (for tests and the benchmark)."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


# --- record framing ----------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """What one :meth:`RecordScanner.scan` found in a buffer."""

    payloads: List[bytes] = field(default_factory=list)
    consumed: int = 0  # bytes of the buffer fully dealt with; the rest is an incomplete record
    corrupt: int = 0  # records skipped because a CRC did not match
    skipped_large: int = 0  # whole records longer than MAX_SCALAR_RECORD_BYTES, skipped unread
    need: int = HEADER_BYTES  # bytes after ``consumed`` needed before the next record can be read
    not_event_file: bool = False


class RecordScanner:
    """Splits a byte stream into record payloads, checking both CRCs.

    A payload whose CRC does not match is skipped and counted. A length whose CRC does not match means
    the framing is lost: the scanner looks for the next position holding a valid header (a false match
    has odds of 2**-32), counting the damage once. A header that is not valid at the very start of a
    file means the file is not an event file. A record cut short at the end of the buffer is left for
    the next scan.
    """

    def __init__(self, at_file_start: bool = True) -> None:
        self.at_file_start = at_file_start
        self.resyncing = False

    def scan(self, buf: bytes, total_available: Optional[int] = None) -> ScanResult:
        """Read the whole records at the start of ``buf``; ``total_available`` (default ``len(buf)``) is how
        many bytes the file holds from the buffer's start, so a record too long to be worth reading can be
        skipped once it is all there."""
        result = ScanResult()
        end_of_data = len(buf) if total_available is None else max(total_available, len(buf))
        pos = 0
        size = len(buf)
        unpack_from = struct.unpack_from
        while size - pos >= HEADER_BYTES:
            (length,) = unpack_from("<Q", buf, pos)
            (length_crc,) = unpack_from("<I", buf, pos + 8)
            if masked_crc32c(buf[pos:pos + 8]) != length_crc:
                if self.at_file_start and pos == 0:
                    result.not_event_file = True
                    return result
                if not self.resyncing:
                    self.resyncing = True
                    result.corrupt += 1
                found = self._next_header(buf, pos + 1)
                if found < 0:
                    pos = max(pos + 1, size - HEADER_BYTES + 1)  # the last bytes may start a header
                    break
                pos = found
                continue
            self.resyncing = False
            self.at_file_start = False
            record_end = pos + HEADER_BYTES + length + FOOTER_BYTES
            if length > MAX_SCALAR_RECORD_BYTES:
                if record_end > end_of_data:
                    result.need = record_end - pos
                    break
                result.skipped_large += 1
                pos = record_end
                if pos > size:  # skipped past the buffer: the caller goes on from there
                    result.consumed = pos
                    result.need = HEADER_BYTES
                    return result
                continue
            if record_end > size:
                result.need = record_end - pos
                break
            payload = buf[pos + HEADER_BYTES:pos + HEADER_BYTES + length]
            (payload_crc,) = unpack_from("<I", buf, record_end - FOOTER_BYTES)
            if masked_crc32c(payload) == payload_crc:
                result.payloads.append(payload)
            else:
                result.corrupt += 1
            pos = record_end
        result.consumed = pos
        return result

    @staticmethod
    def _next_header(buf: bytes, start: int) -> int:
        unpack_from = struct.unpack_from
        for pos in range(start, len(buf) - HEADER_BYTES + 1):
            if masked_crc32c(buf[pos:pos + 8]) == unpack_from("<I", buf, pos + 8)[0]:
                return pos
        return -1


# --- protobuf: the few fields of Event, Summary, Value and TensorProto ---------------------------------


class _Malformed(Exception):
    pass


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, bytes for the rest (fixed ones little-endian)."""
    pos = 0
    size = len(buf)
    while pos < size:
        key = buf[pos]
        if key < 0x80:  # one-byte keys and lengths are the rule here: skip the call
            pos += 1
        else:
            key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length = buf[pos] if pos < size else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise _Malformed  # groups (3, 4) are not used by these messages
        if pos > size:
            raise _Malformed
        yield number, wire, value


def _float32(value: float) -> float:
    """A float32 as the shortest decimal that reads back as the same float32 (0.1, not 0.10000000149011612)."""
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in (6, 7, 8):
        shorter = float("%.*g" % (digits, value))
        if struct.pack("<f", shorter) == packed:
            return shorter
    return value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# TensorProto dtypes (tensorflow/core/framework/types.proto) read as numbers
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8 = 1, 2, 3, 4, 5, 6
DT_INT64, DT_BFLOAT16, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 14, 17, 19, 22, 23
_CONTENT_FORMATS = {
    DT_FLOAT: "<f", DT_DOUBLE: "<d", DT_INT32: "<i", DT_UINT8: "<B", DT_INT16: "<h", DT_INT8: "<b",
    DT_INT64: "<q", DT_UINT16: "<H", DT_HALF: "<e", DT_UINT32: "<I", DT_UINT64: "<Q", DT_BFLOAT16: "<H",
}
# the repeated field holding a dtype's values: (field number, packed element format or None for varints)
_VALUE_FIELDS = {
    DT_FLOAT: (5, "<f"), DT_DOUBLE: (6, "<d"), DT_INT32: (7, None), DT_UINT8: (7, None), DT_INT16: (7, None),
    DT_INT8: (7, None), DT_UINT16: (7, None), DT_INT64: (10, None), DT_HALF: (13, None), DT_BFLOAT16: (13, None),
    DT_UINT32: (16, None), DT_UINT64: (17, None),
}
_SIGNED_VARINT_TYPES = (DT_INT32, DT_INT16, DT_INT8, DT_INT64)


def _half_bits(dtype: int, bits: int) -> float:
    bits &= 0xFFFF
    if dtype == DT_BFLOAT16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def _tensor_scalar(buf: bytes) -> Optional[float]:
    """The value of a one-element numeric tensor, else None (strings, bools, histograms, images...)."""
    dtype = 0
    elements = 1
    content = b""
    values: Dict[int, List[Any]] = {}
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:  # TensorShapeProto: dim (2) { size (1) }
            for dim_number, dim_wire, dim in _fields(value):
                if dim_number == 2 and dim_wire == 2:
                    size = 1
                    for size_number, size_wire, size_value in _fields(dim):
                        if size_number == 1 and size_wire == 0:
                            size = _signed64(size_value)
                    elements *= size
        elif number == 4 and wire == 2:
            content = value
        else:
            values.setdefault(number, []).append((wire, value))
    if elements != 1 or dtype not in _VALUE_FIELDS:
        return None
    if content:
        fmt = _CONTENT_FORMATS[dtype]
        if len(content) != struct.calcsize(fmt):
            return None
        (raw,) = struct.unpack(fmt, content)
        if dtype == DT_BFLOAT16:
            return _half_bits(dtype, raw)
        return _float32(raw) if dtype == DT_FLOAT else float(raw)
    number, packed_format = _VALUE_FIELDS[dtype]
    items: List[Any] = []
    for wire, value in values.get(number, []):
        if packed_format is not None:
            width = struct.calcsize(packed_format)
            if wire == 2:
                if len(value) % width:
                    raise _Malformed
                items.extend(x for (x,) in struct.iter_unpack(packed_format, value))
            elif wire in (1, 5) and len(value) == width:
                items.append(struct.unpack(packed_format, value)[0])
        elif wire == 2:
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                items.append(item)
        elif wire == 0:
            items.append(value)
    if len(items) != 1:  # TensorFlow may store one value for a filled tensor; a scalar holds exactly one
        return None
    item = items[0]
    if dtype == DT_FLOAT:
        return _float32(item)
    if dtype in (DT_HALF, DT_BFLOAT16):
        return _half_bits(dtype, item)
    if dtype in _SIGNED_VARINT_TYPES:
        return float(_signed64(item))
    return float(item)


_SCALAR_PLUGINS = ("", "scalars")
_DATA_CLASS_SCALAR = 1


def _is_scalar_metadata(buf: bytes) -> bool:
    plugin = ""
    data_class = 0
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:  # plugin_data { plugin_name (1) }
            for plugin_number, plugin_wire, plugin_value in _fields(value):
                if plugin_number == 1 and plugin_wire == 2:
                    plugin = bytes(plugin_value).decode("utf-8", "replace")
        elif number == 4 and wire == 0:
            data_class = value
    return plugin in _SCALAR_PLUGINS or data_class == _DATA_CLASS_SCALAR


@dataclass(frozen=True)
class Scalar:
    """One scalar read from an event file."""

    tag: str
    value: float
    step: int
    wall_time: float


def parse_event(payload: bytes) -> Optional[List[Scalar]]:
    """The scalars in one ``Event`` (``simple_value`` and one-element numeric tensors), or None when the
    payload is not a readable Event. Never raises."""
    try:
        return _parse_event(payload)
    except (_Malformed, struct.error, ValueError, IndexError, OverflowError):
        return None


def _parse_event(payload: bytes) -> List[Scalar]:
    wall_time = 0.0
    step = 0
    summaries = []
    for number, wire, value in _fields(payload):
        if number == 1 and wire == 1:
            (wall_time,) = struct.unpack("<d", value)
        elif number == 2 and wire == 0:
            step = _signed64(value)
        elif number == 5 and wire == 2:
            summaries.append(value)
    scalars: List[Scalar] = []
    for summary in summaries:
        for number, wire, value_buf in _fields(summary):
            if number != 1 or wire != 2:
                continue
            tag = ""
            simple: Optional[float] = None
            tensor: Optional[bytes] = None
            metadata: Optional[bytes] = None
            for value_number, value_wire, item in _fields(value_buf):
                if value_number == 1 and value_wire == 2:
                    tag = bytes(item).decode("utf-8", "replace")
                elif value_number == 2 and value_wire == 5:
                    simple = _float32(struct.unpack("<f", item)[0])
                elif value_number == 8 and value_wire == 2:
                    tensor = item
                elif value_number == 9 and value_wire == 2:
                    metadata = item
            if simple is None and tensor is not None and (metadata is None or _is_scalar_metadata(metadata)):
                simple = _tensor_scalar(tensor)
            if simple is not None:
                scalars.append(Scalar(tag, simple, step, wall_time))
    return scalars


def read_scalars(data: bytes) -> Tuple[List[Scalar], ScanResult]:
    """Every scalar in the whole records of an event file's bytes (a helper for tools and the benchmark)."""
    result = RecordScanner().scan(data)
    scalars: List[Scalar] = []
    for payload in result.payloads:
        scalars.extend(parse_event(payload) or [])
    return scalars, result


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

    def _load_positions(self) -> None:
        saved = read_json(self.position_path)
        files = saved.get("files") if isinstance(saved, dict) else None
        self.files = {}
        self._already_journalled = self._journalled_after_last_save(saved.get("journal") if isinstance(saved, dict) else None)
        if isinstance(files, dict):
            for rel, entry in files.items():
                if not isinstance(rel, str) or not isinstance(entry, dict):
                    continue
                offset = entry.get("offset")
                if type(offset) is not int or offset < 0:
                    continue
                corrupt = entry.get("corrupt")
                state = _FileState(
                    os.path.join(self.directory, rel), offset=offset,
                    corrupt=corrupt if type(corrupt) is int else 0, ignored=entry.get("ignored") is True,
                    scanner=RecordScanner(at_file_start=offset == 0),
                )
                self.files[rel] = state

    def _journalled_after_last_save(self, mark: Any) -> Dict[Tuple[Any, Any, Any], int]:
        """What the previous reader journalled after its last save of the positions: a reader killed
        between journalling a batch and saving where it was left those records; its successor reads the
        batch again and must not journal it twice. They are the previous reader's records (its pid) after
        the journal size it saved, identified by (name, step, wall time)."""
        if not isinstance(mark, dict) or type(mark.get("pid")) is not int or type(mark.get("end")) is not int:
            return {}
        found: Dict[Tuple[Any, Any, Any], int] = {}
        reader = JournalReader(self.run_dir, offset=max(0, mark["end"]))
        try:
            while True:
                entries = reader.read_available()
                if not entries:
                    break
                for entry in entries:
                    record = entry.record
                    if record is not None and record.pid == mark["pid"] and record.kind == KIND_INTERMEDIATE:
                        signature = (record.name, record.step, record.ts)
                        found[signature] = found.get(signature, 0) + 1
        finally:
            reader.close()
        return found

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
            if rel not in self._said_unreadable:
                self._said_unreadable.add(rel)
                get_logger().warning("cannot read the event file %s: %s", state.path, exc.strerror)
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
                        counters.count(COUNTER_UNREADABLE, "tensorboard record", result.corrupt)
                if result.consumed:
                    state.offset += result.consumed
                    moved = True
                elif result.need <= len(chunk):
                    break  # no progress possible with what is there
                need = result.need
        except OSError as exc:
            if rel not in self._said_unreadable:
                self._said_unreadable.add(rel)
                get_logger().warning("cannot read the event file %s: %s", state.path, exc.strerror)
        finally:
            os.close(fd)
        return journalled, moved

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
