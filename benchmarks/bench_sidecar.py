"""Benchmark of the sidecar at rest: its RSS and CPU over a window with nothing to deliver.

    python benchmarks/bench_sidecar.py [--seconds 60] [--write docs/benchmarks.md]

Beside it, measured in the same run, a floor: a bare Python interpreter that imports what the sidecar
needs at rest (http.client, psutil) and sleeps, which no Python sidecar can go below.
Targets: RSS <= 40 MB, idle CPU <= 1% of a core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, Tuple

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import KEY, TASK_ID, Serve, machine, publish  # noqa: E402

FLOOR = "import http.client, psutil, time\nwhile True: time.sleep(3600)"


def measure(proc: subprocess.Popen, seconds: float) -> Tuple[float, float]:
    """(peak RSS in MB, CPU % of one core) of ``proc`` over ``seconds`` after a warm-up."""
    process = psutil.Process(proc.pid)
    time.sleep(3)  # start-up is not rest
    start_cpu = sum(process.cpu_times()[:2])
    start = time.monotonic()
    peak_rss = 0
    while time.monotonic() - start < seconds:
        peak_rss = max(peak_rss, process.memory_info().rss)
        time.sleep(0.5)
    cpu = sum(process.cpu_times()[:2]) - start_cpu
    return peak_rss / 1e6, 100.0 * cpu / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--write", metavar="MARKDOWN")
    args = parser.parse_args()

    results: Dict[str, Tuple[float, float]] = {}
    server = Serve()
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": KEY,
               "ANYLEARN_BACKEND_URL": server.base_url, "ANYLEARN_REPORTER_DIR": directory}
        floor = subprocess.Popen([sys.executable, "-c", FLOOR])
        sidecar = subprocess.Popen([sys.executable, "-m", "reporter", "sidecar"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # Measured one after the other would double the time; side by side they share the machine.
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                floor_result = pool.submit(measure, floor, args.seconds)
                sidecar_result = pool.submit(measure, sidecar, args.seconds)
                results["floor: python importing http.client, psutil, asleep"] = floor_result.result()
                results["anylearn-reporter sidecar, idle (10 s samples, 30 s heartbeat)"] = sidecar_result.result()
        finally:
            for proc in (floor, sidecar):
                proc.terminate()
                proc.wait(30)
            server.stop()

    lines = [
        f"Machine: {machine()}. Window: {args.seconds:g} s after a 3 s warm-up.",
        "",
        "| process | peak RSS (MB) | CPU (% of a core) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {rss:.1f} | {cpu:.2f} |" for name, (rss, cpu) in results.items()]
    publish(lines, args.write, "sidecar")


if __name__ == "__main__":
    main()
