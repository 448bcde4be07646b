"""Benchmark of the TensorBoard event-file reader: scalars per second, beside the time to read the same bytes.

    python benchmarks/bench_sources.py [--scalars 100000] [--write docs/benchmarks.md]

One event file of ``--scalars`` records, one scalar each (as PyTorch's ``SummaryWriter.add_scalar`` writes
them), in the page cache. Measured in the same run:

- the floor: reading the file's bytes (``open().read()``), which no reader can go below;
- CRC-32C alone over those bytes (pure Python, table driven: the reader checks two CRCs a record);
- the reader: framing, both CRCs and the protobuf fields (``read_scalars``), no journal;
- the tailer's pass: the same plus one journal line per scalar (``EventFileTailer.poll_once``);
- the latency from a record flushed to the file to its line in the journal, with the tailer's thread at its
  default 0.25 s poll (the promise: within a second).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from typing import List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from bench_core import machine, publish  # noqa: E402
from tbevents_support import frame_record, read_scalars  # noqa: E402

from reporter.journal import JournalWriter, count_lines  # noqa: E402
from reporter.tbevents import EventFileTailer  # noqa: E402
from reporter.tbformat import crc32c  # noqa: E402


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_record(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """One framed Event holding one simple_value, as torch and tensorboardX write them."""
    value_msg = _ld(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step) + _ld(5, _ld(1, value_msg))
    return frame_record(event)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def latency(directory: str, samples: int) -> List[float]:
    """Seconds from a flushed record to its journal line, tailer thread at the default poll."""
    run_dir = os.path.join(directory, "latency-run")
    tb_dir = os.path.join(directory, "latency-tb")
    os.makedirs(tb_dir)
    journal = os.path.join(run_dir, "metrics.jsonl")
    tailer = EventFileTailer(tb_dir, run_dir, JournalWriter(run_dir)).start()
    delays = []
    try:
        with open(os.path.join(tb_dir, "events.out.tfevents.1.bench"), "ab") as f:
            for step in range(samples):
                time.sleep(0.05 + (step % 7) * 0.037)  # not in phase with the poll
                f.write(scalar_record("loss", 1.0, step, time.time()))
                f.flush()
                flushed = time.perf_counter()
                while count_lines(journal) < step + 1:
                    time.sleep(0.001)
                delays.append(time.perf_counter() - flushed)
    finally:
        tailer.stop()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scalars", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--write", metavar="MARKDOWN", help="also replace the sources section of this file")
    args = parser.parse_args()

    rows: List[Tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as directory:
        tb_dir = os.path.join(directory, "tb")
        os.makedirs(tb_dir)
        path = os.path.join(tb_dir, "events.out.tfevents.1.bench")
        now = time.time()
        data = b"".join(scalar_record("train/loss", 1.0 / (1 + i), i, now + i) for i in range(args.scalars))
        with open(path, "wb") as f:
            f.write(data)
        size_mb = len(data) / 1e6

        def read_bytes() -> None:
            with open(path, "rb") as f:
                f.read()

        floor_s = best_of(5, read_bytes)
        crc_s = best_of(3, lambda: crc32c(data))
        scalars, result = read_scalars(data)
        assert len(scalars) == args.scalars and result.corrupt == 0
        reader_s = best_of(3, lambda: read_scalars(data))

        def tail_once() -> None:
            run_dir = tempfile.mkdtemp(dir=directory)
            tailer = EventFileTailer(tb_dir, run_dir, JournalWriter(run_dir))
            assert tailer.poll_once() == args.scalars
            tailer.stop()

        tail_s = best_of(3, tail_once)
        delays = latency(directory, args.latency_samples)

    n = args.scalars
    rows.append(("floor: read the file's bytes", floor_s, f"{size_mb / floor_s:,.0f} MB/s"))
    rows.append(("CRC-32C of the bytes (pure Python)", crc_s, f"{size_mb / crc_s:,.1f} MB/s"))
    rows.append(("reader: framing, CRCs, protobuf (`read_scalars`)", reader_s, f"{n / reader_s:,.0f} scalars/s"))
    rows.append(("tailer pass: the reader + one journal line a scalar", tail_s, f"{n / tail_s:,.0f} scalars/s"))
    lines = [
        f"Machine: {machine()}. One event file of {n:,} scalars ({size_mb:.1f} MB, {len(data) / n:.0f} bytes a record), "
        "in the page cache; best of 3 (the floor: of 5).",
        "",
        "| step | time (ms) | rate |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {seconds * 1000:,.1f} | {rate} |" for name, seconds, rate in rows]
    lines += [
        "",
        f"Flushed record to journal line, tailer thread at its 0.25 s poll, {len(delays)} samples: "
        f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms "
        "(the floor is the poll interval: 0 to 250 ms of waiting).",
    ]
    publish(lines, args.write, "sources")


if __name__ == "__main__":
    main()
