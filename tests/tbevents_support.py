"""Test and benchmark helpers for TensorBoard event files: framing records as a writer does, and reading
every scalar of a file's bytes (moved out of ``reporter.tbevents``: the package never writes event files)."""

import struct
from typing import List, Tuple

from reporter.tbformat import RecordScanner, Scalar, ScanResult, masked_crc32c, parse_event


def frame_record(payload: bytes) -> bytes:
    """One record as a TensorFlow record writer frames it (for tests and the benchmark)."""
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def read_scalars(data: bytes) -> Tuple[List[Scalar], ScanResult]:
    """Every scalar in the whole records of an event file's bytes (a helper for tools and the benchmark)."""
    result = RecordScanner().scan(data)
    scalars: List[Scalar] = []
    for payload in result.payloads:
        scalars.extend(parse_event(payload) or [])
    return scalars, result
