"""The TensorBoard event-file format, read with the standard library only: framing, CRC-32C, protobuf fields.

An event file (``events.out.tfevents.*``, written by PyTorch's ``SummaryWriter``, tensorboardX, Keras'
TensorBoard callback or TensorFlow summaries) is a sequence of records::

    uint64 length | uint32 masked CRC-32C of length | payload (an ``Event`` protobuf) | uint32 masked CRC-32C of payload

This module reads that framing and the few protobuf fields of ``Event``, ``Summary``, ``Value`` and
``TensorProto`` it needs, with no TensorFlow, tensorboard or protobuf package. It is pure (bytes in,
records out, never raising) and imports nothing from the package; :mod:`reporter.tbevents` follows the
files and journals what this module reads.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length
FOOTER_BYTES = 4  # uint32 masked CRC of the payload
MAX_SCALAR_RECORD_BYTES = 1 << 20  # a longer record (a graph, an image) is skipped unread: it holds no scalar

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
