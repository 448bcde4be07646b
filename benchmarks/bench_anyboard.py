"""Benchmark of Anyboard delivery: points per second into the local Anyboard, and what an open writer costs
a sidecar at rest.

    python benchmarks/bench_anyboard.py [--points 100000] [--sdk-points 5000] [--seconds 30] [--write docs/benchmarks.md]

1. A journal of ``--points`` intermediate scalars (4 names) is synced into ``serve --anyboard-port`` (its own
   process) the way a lane does it: batches of 256 journal entries, each turned into points and written with
   one ``insertTablets`` call. Beside it, in the same run and against the same server, the AnyLearn SDK's own
   ``IotdbWriter`` (one SQL ``insert into`` per point through its session pool) writes ``--sdk-points``
   points (it needs ``anylearn==0.20.7``; skipped without it). Goal: at least 20x the SDK's rate.
2. Peak RSS and CPU at rest over ``--seconds`` of: the sidecar (Anyboard off); the sidecar with an open
   Anyboard writer (our Thrift-only client); and, as the road not taken, the sidecar with ``iotdb.Session``
   imported. Goal: <= 60 MB with Anyboard on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import KEY, TASK_ID, machine, publish  # noqa: E402
from bench_sidecar import measure  # noqa: E402

NAMES = ("train/loss", "train/acc", "lr", "grad_norm")
ANYBOARD_ENV = {"ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_USER": "root",
                "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "root", "ANYLEARN_USER_ID": "USERbench",
                "ANYLEARN_PROJECT_ID": "PROJbench", "ANYLEARN_TASK_ID": TASK_ID}
HOLD_WRITER = """
import sys
from reporter.anyboard import anyboard_config, Point
from reporter.anyboard.writer import AnyboardWriter
writer = AnyboardWriter(anyboard_config())
writer.write([Point(anyboard_config().device_prefix + ".scalar.`rss`", 1, 1, 1, 1.0)])
{extra}
from reporter.cli import main
sys.exit(main(["sidecar"]))
"""


class ServeAnyboard:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "reporter", "serve", "--port", "0", "--anyboard-port", "0",
                                      "--task", f"{TASK_ID}:{KEY}"], stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().split(" at ", 1)[1].split()[0]
        self.iotdb_port = int(re.search(r"IoTDB at [\d.]+:(\d+)", self.proc.stdout.readline()).group(1))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def our_rate(points: int, port: int, directory: str, batch: int = 256) -> Dict[str, Any]:
    """Seconds spent reading the journal, making points and writing them, in a lane-like sync of a journal
    of ``points`` scalars (``batch`` entries at a time), and the insert calls made."""
    from reporter.anyboard import anyboard_config, to_points
    from reporter.anyboard.writer import AnyboardWriter
    from reporter.journal import JournalWriter
    from reporter.reader import JournalReader
    from reporter.record import KIND_INTERMEDIATE

    run_dir = os.path.join(directory, f"run{batch}")
    journal = JournalWriter(run_dir)
    for i in range(points):
        journal.append(KIND_INTERMEDIATE, i / 7, NAMES[i % len(NAMES)], i // len(NAMES))
    journal.close()
    config = anyboard_config({**ANYBOARD_ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port)})
    writer = AnyboardWriter(config)
    reader = JournalReader(run_dir)
    sent = 0
    spent = {"read": 0.0, "points": 0.0, "write": 0.0}
    while True:
        t0 = time.perf_counter()
        entries = reader.read_available(batch)
        t1 = time.perf_counter()
        if not entries:
            break
        made, _ = to_points(entries, config.device_prefix)
        t2 = time.perf_counter()
        writer.write(made)
        t3 = time.perf_counter()
        spent["read"] += t1 - t0
        spent["points"] += t2 - t1
        spent["write"] += t3 - t2
        sent += len(made)
    reader.close()
    writer.close()
    assert sent == points
    result: Dict[str, Any] = {**spent, "calls": writer.calls}
    return result


def sdk_rate(points: int, port: int) -> float:
    """Points/s of the SDK's IotdbWriter, or 0.0 when the SDK cannot be imported."""
    os.environ.update({**ANYBOARD_ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port), "ANYLEARN_TASK_ID": "TRAIsdk"})
    try:
        from anylearn.anyboard.writer.summary import ScalarValue, Summary
        from anylearn.anyboard.writer.writers.iotdb_writer import IotdbWriter
    except ImportError:
        return 0.0
    writer = IotdbWriter()
    writer.start()
    summaries = [Summary(NAMES[i % len(NAMES)], ScalarValue(i / 7), i // len(NAMES), int(time.time() * 1000))
                 for i in range(points)]
    start = time.perf_counter()
    for summary in summaries:
        writer.add(summary)
    elapsed = time.perf_counter() - start
    writer.end()
    return points / elapsed


def at_rest(base_url: str, iotdb_port: int, directory: str, seconds: float) -> Dict[str, Tuple[float, float]]:
    env = {**os.environ, **ANYBOARD_ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(iotdb_port), "ANYLEARN_SECRET_KEY": KEY,
           "ANYLEARN_BACKEND_URL": base_url}
    conditions = {
        "sidecar, Anyboard off": [sys.executable, "-m", "reporter", "sidecar"],
        "sidecar + an open Anyboard writer (Thrift service only)": [sys.executable, "-c", HOLD_WRITER.format(extra="")],
        "sidecar + writer + `iotdb.Session` imported (not used)": [
            sys.executable, "-c", HOLD_WRITER.format(extra="import iotdb.Session")],
    }
    procs = {}
    for i, (name, argv) in enumerate(conditions.items()):
        procs[name] = subprocess.Popen(argv, env={**env, "ANYLEARN_REPORTER_DIR": os.path.join(directory, f"rest{i}")},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            futures = {name: pool.submit(measure, proc, seconds) for name, proc in procs.items()}
            return {name: future.result() for name, future in futures.items()}
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--sdk-points", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--write", metavar="MARKDOWN")
    args = parser.parse_args()

    server = ServeAnyboard()
    try:
        with tempfile.TemporaryDirectory() as directory:
            lane = our_rate(args.points, server.iotdb_port, directory)
            big = our_rate(args.points, server.iotdb_port, directory, batch=2048)
            sdk = sdk_rate(args.sdk_points, server.iotdb_port)
            rest = at_rest(server.base_url, server.iotdb_port, directory, args.seconds)
    finally:
        server.stop()
    lines: List[str] = [
        f"Machine: {machine()}. Server: `serve --anyboard-port` in its own process (sqlite in memory).", "",
        "| what | points | points/s | insert calls | / SDK |", "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {what} | {n:,} | {rate:,.0f} | {calls} | {f'{rate / sdk:.1f}x' if sdk else '-'} |" for what, n, rate, calls in (
            ("ours, whole sync (batches of 256: read the journal, make points, write)", args.points,
             args.points / (lane["read"] + lane["points"] + lane["write"]), f"{lane['calls']:,}"),
            ("ours, the writer alone (`write()` of 256 entries' points)", args.points, args.points / lane["write"],
             f"{lane['calls']:,}"),
            ("ours, the writer alone, batches of 2048", args.points, args.points / big["write"], f"{big['calls']:,}"),
            ("floor: reading the journal alone (the engine's reader, batches of 256)", args.points,
             args.points / lane["read"], "-"),
            ("the SDK's `IotdbWriter`: one SQL statement per point, session pool", args.sdk_points, sdk,
             f"{args.sdk_points:,}"),
        ) if rate],
        "" if sdk else "The SDK could not be imported (anylearn==0.20.7): no comparison.", "",
        f"At rest over {args.seconds:g} s after a 3 s warm-up, side by side:", "",
        "| process | peak RSS (MB) | CPU (% of a core) |", "| --- | ---: | ---: |",
        *[f"| {name} | {rss:.1f} | {cpu:.2f} |" for name, (rss, cpu) in rest.items()],
    ]
    publish(lines, args.write, "anyboard")


if __name__ == "__main__":
    main()
