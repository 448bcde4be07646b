"""Benchmark of the core: the cost of one report call, and the drain rate to the local backend.

    python benchmarks/bench_core.py [--calls 100000] [--drain 10000] [--write docs/benchmarks.md]

Each figure is printed beside a floor measured in the same run, because absolute times on a shared
machine vary up to 3x between runs:
- a report call against a bare ``os.write`` of one JSON line to an ``O_APPEND`` file;
- the drain rate against a bare ``http.client`` keep-alive loop posting the same form to the same server.
Each report-call condition runs in a fresh process; the backend runs in its own process (``serve``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

TASK_ID = "TRAIbenchmark000000000000000000"
PACE_US = 3000  # the paced rows: a training step's worth of Python work between reports
KEY = "benchmark-key"


def percentiles(samples_ns: List[int]) -> Tuple[float, float]:
    samples_ns.sort()
    return statistics.median(samples_ns) / 1000, samples_ns[int(len(samples_ns) * 0.99)] / 1000


def time_calls(call, calls: int, work_us: int = 0) -> Tuple[float, float]:
    """Median and p99 in microseconds of ``call(i)``; ``work_us`` > 0 spins that long in Python before
    each call, like a training step (delivery then runs between calls instead of being held back)."""
    clock = time.perf_counter_ns
    samples = []
    work_ns = work_us * 1000
    for i in range(calls):
        if work_ns:
            until = clock() + work_ns
            while clock() < until:
                pass
        start = clock()
        call(i)
        samples.append(clock() - start)
    return percentiles(samples)


def floor_os_write(calls: int, directory: str, work_us: int = 0) -> Tuple[float, float]:
    fd = os.open(os.path.join(directory, "floor.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    line = b'{"kind":"intermediate","value":0.5,"name":null,"step":1,"ts":1.0,"rank":0,"pid":1,"key":"k-1"}\n'
    try:
        return time_calls(lambda _: os.write(fd, line), calls, work_us)
    finally:
        os.close(fd)


def worker_report_calls(calls: int, work_us: int) -> None:
    """Runs in a fresh process with the environment set: time each report_metric call."""
    import reporter

    reporter.report_metric(0.0)  # the first call starts delivery; time the steady state
    time.sleep(0.5)
    report = reporter.report_metric
    median_us, p99_us = time_calls(lambda step: report(step * 0.001, step=step), calls, work_us)
    print(json.dumps({"median_us": median_us, "p99_us": p99_us}), flush=True)
    os._exit(0)  # skip the exit flush: only the calls are measured here


class Serve:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "ANYLEARN_SECRET_KEY": KEY}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reporter", "serve", "--port", "0", "--task", TASK_ID, *args],
            env=env, stdout=subprocess.PIPE, text=True,
        )
        self.base_url = self.proc.stdout.readline().split(" at ", 1)[1].split()[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def report_condition(calls: int, base_url: str, directory: str, name: str, work_us: int = 0) -> Dict[str, float]:
    env = {
        **os.environ,
        "ANYLEARN_TASK_ID": TASK_ID,
        "ANYLEARN_SECRET_KEY": KEY,
        "ANYLEARN_BACKEND_URL": base_url,
        "ANYLEARN_REPORTER_RUN_DIR": os.path.join(directory, name),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(calls), "--work-us", str(work_us)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def floor_http_client(base_url: str, requests_count: int) -> float:
    import http.client  # here, not at the top: the report-call workers import this module and must not preload it

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Secret-Key": KEY, "Content-Type": "application/x-www-form-urlencoded"}
    start = time.perf_counter()
    for i in range(requests_count):
        conn.request("POST", f"{parts.path}/train_task/intermediate_metric", body=f"id={TASK_ID}&metric={i * 0.001!r}", headers=headers)
        conn.getresponse().read()
    elapsed = time.perf_counter() - start
    conn.close()
    return requests_count / elapsed


def drain_rate(records: int, directory: str) -> Tuple[float, float]:
    from reporter.client import BackendClient
    from reporter.config import Secret
    from reporter.deliver import Deliverer
    from reporter.journal import JournalWriter

    server = Serve()
    try:
        floor = floor_http_client(server.base_url, records)
        run_dir = tempfile.mkdtemp(dir=directory)  # a fresh run each call: callers repeat it
        writer = JournalWriter(run_dir)
        for step in range(records):
            writer.append("intermediate", step * 0.001, None, step)
        writer.close()
        deliverer = Deliverer(run_dir, BackendClient(server.base_url, TASK_ID, Secret(KEY)))
        start = time.perf_counter()
        deliverer.start()
        if not deliverer.flush(600):
            raise SystemExit("the drain did not finish")
        elapsed = time.perf_counter() - start
        deliverer.close(5)
        return records / elapsed, floor
    finally:
        server.stop()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--drain", type=int, default=10_000)
    parser.add_argument("--write", metavar="MARKDOWN", help="also replace the core section of this file")
    parser.add_argument("--paced-calls", type=int, default=2000, help="calls of the paced condition")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work-us", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_report_calls(args.worker, args.work_us)
        return

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        floor_median, floor_p99 = floor_os_write(args.calls, directory)
        rows.append(("floor: bare os.write of one JSON line", floor_median, floor_p99, floor_median))
        paced_floor, paced_floor_p99 = floor_os_write(args.paced_calls, directory, work_us=PACE_US)
        healthy = Serve()
        slow = Serve("--latency-ms", "200")
        try:
            down_port = "http://127.0.0.1:9/api"
            for name, base in (("healthy", healthy.base_url), ("slow (200 ms a request)", slow.base_url), ("down", down_port)):
                result = report_condition(args.calls, base, directory, name.split()[0])
                rows.append((f"report_metric(), backend {name}", result["median_us"], result["p99_us"], floor_median))
            rows.append((f"paced floor: os.write after {PACE_US // 1000} ms of work each", paced_floor, paced_floor_p99, paced_floor))
            paced = report_condition(args.paced_calls, healthy.base_url, directory, "paced", work_us=PACE_US)
            rows.append((f"paced: report_metric() after {PACE_US // 1000} ms of work each, backend healthy",
                         paced["median_us"], paced["p99_us"], paced_floor))
        finally:
            healthy.stop()
            slow.stop()
        rate, floor_rate = drain_rate(args.drain, directory)

    lines = [
        f"Machine: {machine()}. {args.calls:,} calls per tight-loop condition, {args.paced_calls:,} per paced one; "
        f"{args.drain:,} records drained. Each row's ratio is against the floor of its kind (tight or paced).",
        "",
        "| measurement | median (us) | p99 (us) | median / floor |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, median_us, p99_us, floor_us in rows:
        lines.append(f"| {label} | {median_us:.2f} | {p99_us:.2f} | {median_us / floor_us:.1f}x |")
    lines += [
        "",
        "| drain to `serve` on loopback | records/s | share of floor |",
        "| --- | ---: | ---: |",
        f"| floor: bare http.client keep-alive loop | {floor_rate:,.0f} | 100% |",
        f"| Deliverer (http.client, retries, grouped acknowledgement) | {rate:,.0f} | {rate / floor_rate:.0%} |",
    ]
    publish(lines, args.write, "core")


def publish(lines: List[str], path: Optional[str], name: str) -> None:
    """Print a benchmark's table and, given ``path``, write it into that file's section ``name``."""
    table = "\n".join(lines)
    print(table)
    if path:
        write_section(path, name, table)


def write_section(path: str, name: str, body: str) -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
