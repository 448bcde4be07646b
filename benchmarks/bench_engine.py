"""Benchmarks of the delivery engine's four speed targets, each figure beside a floor measured in the same run:

    python benchmarks/bench_engine.py [--repeat 3] [--write docs/benchmarks.md]

- drain: 10,000 journalled records delivered to ``serve`` on loopback, against a bare ``http.client``
  keep-alive loop posting the same form to the same server;
- training: 3,000 steps of fixed GIL-bound Python work (about 1 ms each) reporting one metric each,
  against the same loop without reporting (each in a fresh process, alternated; the delivery thread's CPU
  time is printed too, a steadier figure, and the ratio of the fastest runs, the least disturbed by the
  rest of a shared machine);
- import: ``import reporter`` against a bare interpreter, in subprocess wall time, with the bytecode cached
  (as an installed package has it) and, separately, compiled on every run;
- latency: ``report_metric()`` to the backend receiving the request, reports 10-100 ms apart, against a
  bare ``http.client`` POST made from the same kind of process at the same moments.

Each measurement runs ``--repeat`` times; the table shows the median and the spread of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import KEY, TASK_ID, Serve, machine, publish
from bench_core import drain_rate as drain_once

STEPS = 3000
LATENCY_REPORTS = 150


# --- drain --------------------------------------------------------------------------------------------


# --- training -----------------------------------------------------------------------------------------


def busy_work(iterations: int) -> int:
    """A training step's worth of pure-Python work, holding the GIL throughout."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate_step(target_s: float = 0.001) -> int:
    """Iterations of :func:`busy_work` that take ``target_s`` on this machine (best of several tries)."""
    iterations = 10_000
    best = min(_timed(busy_work, iterations) for _ in range(20))
    return max(1, int(iterations * target_s / best))


def _timed(fn, arg: int) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def _voluntary_switches() -> int:
    """The calling thread's voluntary context switches (Linux): a busy training thread makes one each
    time it hands the interpreter over to another thread and waits to get it back."""
    import threading

    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split(":")[1])
    except OSError:
        pass
    return 0


def worker_training(report: bool, iterations: int) -> None:
    """In a fresh process: time STEPS steps of fixed GIL-bound work (about 1 ms each), reporting one
    metric after each when asked. Fixed work, not a wall-clock spin: time the delivery thread takes from
    the interpreter lengthens the loop."""
    # Both variants load the same modules (the delivery side too): a different set of loaded modules
    # alone moves this loop's speed by several per cent between processes. The delivery side's load
    # is measured apart (start-up CPU).
    import reporter
    import reporter.deliver

    report_metric = reporter.report_metric
    switches = _voluntary_switches()
    start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    for step in range(STEPS):
        busy_work(iterations)
        if report:
            report_metric(step * 0.001, step=step)
    elapsed = time.perf_counter() - start
    other_ms = 1000 * ((time.process_time() - cpu) - (time.thread_time() - main_cpu))
    print(json.dumps({"s": elapsed, "other_ms": other_ms, "handovers": _voluntary_switches() - switches}), flush=True)
    os._exit(0)  # the steps are measured, not the exit flush


def startup_cpu_ms(env: Dict[str, str]) -> float:
    """CPU milliseconds the delivery thread spends loading the delivery side, once per process (median of 5)."""
    code = ("import time, reporter\nstart = time.process_time()\nimport reporter.deliver\n"
            "print(1000 * (time.process_time() - start))")
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                                  check=True).stdout) for _ in range(5))


def training_once(base_url: str, directory: str, env: Dict[str, str], iterations: int) -> Tuple[float, float, float, int]:
    """Seconds without and with reporting, the delivery threads' CPU milliseconds and how often the
    training thread handed the interpreter over."""
    results = {}
    for report in random.sample([False, True], 2):  # in either order: a shared machine's load drifts
        run_env = {**env, "ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": KEY, "ANYLEARN_BACKEND_URL": base_url,
                   "ANYLEARN_REPORTER_RUN_DIR": tempfile.mkdtemp(dir=directory)}
        out = subprocess.run([sys.executable, __file__, "--worker-training", "1" if report else "0", str(iterations)], env=run_env,
                             capture_output=True, text=True, check=True).stdout
        results[report] = json.loads(out.strip().splitlines()[-1])
    return results[False]["s"], results[True]["s"], results[True]["other_ms"], results[True].get("handovers", 0)


# --- import -------------------------------------------------------------------------------------------


def import_once(env: Dict[str, str], runs: int = 15) -> Tuple[float, float, float]:
    """Median wall milliseconds of ``python -c pass`` and of ``python -c 'import reporter'`` run in
    alternation, and the median of the differences within each pair (steadier than the difference of
    the medians when the machine's load drifts)."""
    bare: List[float] = []
    loaded: List[float] = []
    for _ in range(runs):
        for code, into in (("pass", bare), ("import reporter", loaded)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            into.append(1000 * (time.perf_counter() - start))
    return statistics.median(bare), statistics.median(loaded), statistics.median(b - a for a, b in zip(bare, loaded))


def importtime_ms(env: Dict[str, str]) -> float:
    """``-X importtime``'s cumulative time of the ``reporter`` package, in milliseconds (median of 5)."""
    values = []
    for _ in range(5):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import reporter"], env=env,
                             capture_output=True, text=True, check=True).stderr
        for line in err.splitlines():
            if line.rstrip().endswith("| reporter"):
                values.append(int(line.split("|")[1]) / 1000)
    return statistics.median(values)


# --- latency ------------------------------------------------------------------------------------------


def _receiver_server() -> Any:
    """A threaded HTTP server noting when each metric arrives (made here: the workers, which import this
    module, must not load http.server and http.client before the reporter does)."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Receiver(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_POST(self) -> None:
            arrived = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            fields = dict(part.split("=", 1) for part in body.split("&") if "=" in part)
            if "metric" in fields:
                self.server.arrivals[float(fields["metric"])] = arrived  # type: ignore[attr-defined]
            payload = b'{"msg": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    return server


def worker_latency(mode: str, base_url: str, seed: int) -> None:
    """In a fresh process: LATENCY_REPORTS reports 10-100 ms apart; prints the call time of each value."""
    pace = random.Random(seed)
    calls = {}
    if mode == "reporter":
        import reporter

        reporter.report_metric(-1.0)  # start delivery: the steady state is measured
        time.sleep(0.5)
        send = reporter.report_metric
    else:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        headers = {"Secret-Key": KEY, "Content-Type": "application/x-www-form-urlencoded"}

        def send(value: float) -> None:
            conn.request("POST", f"{parts.path}/train_task/intermediate_metric", body=f"id={TASK_ID}&metric={value!r}", headers=headers)
            conn.getresponse().read()

    for i in range(LATENCY_REPORTS):
        time.sleep(pace.uniform(0.010, 0.100))
        value = i + 0.5
        calls[value] = time.time()
        send(value)
    if mode == "reporter":
        reporter.flush(30)
    print(json.dumps(calls), flush=True)
    os._exit(0)


def latency_once(directory: str, env: Dict[str, str], seed: int) -> Dict[str, Tuple[float, float]]:
    """p50 and p90 in milliseconds of the bare POST (floor) and of the reporter."""
    server = _receiver_server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/api"
    figures = {}
    try:
        for mode in ("floor", "reporter"):
            server.arrivals = {}  # type: ignore[attr-defined]
            run_env = {**env, "ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": KEY, "ANYLEARN_BACKEND_URL": base_url,
                       "ANYLEARN_REPORTER_RUN_DIR": tempfile.mkdtemp(dir=directory)}
            out = subprocess.run([sys.executable, __file__, "--worker-latency", mode, base_url, str(seed)], env=run_env,
                                 capture_output=True, text=True, check=True).stdout
            calls = {float(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
            arrivals = server.arrivals  # type: ignore[attr-defined]
            latencies = sorted(1000 * (arrivals[v] - t) for v, t in calls.items() if v in arrivals)
            if len(latencies) < len(calls):
                raise SystemExit(f"{mode}: {len(calls) - len(latencies)} reports never arrived")
            figures[mode] = (statistics.median(latencies), latencies[int(len(latencies) * 0.9)])
    finally:
        server.shutdown()
        server.server_close()
    return figures


# --- the table ----------------------------------------------------------------------------------------


def spread(values: List[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drain", type=int, default=10_000)
    parser.add_argument("--training-pairs", type=int, default=10, help="runs with and without reporting (the noisiest figure)")
    parser.add_argument("--write", metavar="MARKDOWN", help="also replace the engine section of this file")
    parser.add_argument("--only", choices=["drain", "training", "import", "latency"], action="append")
    parser.add_argument("--worker-training", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker-latency", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_training is not None:
        worker_training(args.worker_training[0] == "1", int(args.worker_training[1]))
        return
    if args.worker_latency:
        mode, base_url, seed = args.worker_latency
        worker_latency(mode, base_url, int(seed))
        return

    only = set(args.only or ["drain", "training", "import", "latency"])
    rows: List[str] = []
    with tempfile.TemporaryDirectory() as directory:
        # Subprocesses run as an installed package does: bytecode compiled once and cached (here in a
        # private directory), whatever PYTHONDONTWRITEBYTECODE the calling shell has.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = os.path.join(directory, "pycache")
        subprocess.run([sys.executable, "-c", "import reporter, reporter.deliver, reporter.cli"], env=env, check=True)

        if "drain" in only:
            rates, floors = [], []
            for _ in range(args.repeat):
                rate, floor = drain_once(args.drain, directory)
                rates.append(rate)
                floors.append(floor)
            ratios = [r / f for r, f in zip(rates, floors)]
            rows.append(f"| 1. drain of {args.drain:,} records (records/s) | {spread(rates, '{:,.0f}')} | bare http.client "
                        f"keep-alive loop: {spread(floors, '{:,.0f}')} | {spread(ratios, '{:.2f}x')} | >= 0.3x (goal 0.5x) |")
        if "training" in only:
            serve = Serve()
            iterations = calibrate_step()
            try:
                bases, reports, cpus, handovers = [], [], [], []
                for _ in range(args.training_pairs):
                    base, report, cpu, handed = training_once(serve.base_url, directory, env, iterations)
                    bases.append(base)
                    reports.append(report)
                    cpus.append(cpu)
                    handovers.append(handed / report)
            finally:
                serve.stop()
            slower = [100 * (r / b - 1) for r, b in zip(reports, bases)]
            cpu_share = [100 * c / 1000 / b for c, b in zip(cpus, bases)]
            best = 100 * (min(reports) / min(bases) - 1)
            startup = startup_cpu_ms(env)
            rows.append(f"| 2. {STEPS:,} GIL-bound 1 ms steps reporting each, {len(bases)} pairs (s) | {spread(reports, '{:.3f}')} | "
                        f"the same loop without reporting: {spread(bases, '{:.3f}')} | {spread(slower, '{:+.1f}%')}; fastest runs "
                        f"{best:+.1f}%; delivery threads' CPU {spread(cpu_share, '{:.1f}%')} of the loop; the training thread "
                        f"handed the interpreter over {spread(handovers, '{:.0f}')} times a second | <= +1.5% |")
            rows.append(f"| 2'. loading the delivery side, once per process (CPU ms) | {startup:.1f} | the loop: "
                        f"{1000 * statistics.median(bases):,.0f} | {100 * startup / 1000 / statistics.median(bases):+.1f}% of this loop | |")
        if "import" in only:
            cached = [import_once(env) for _ in range(args.repeat)]
            compiling_env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}
            compiling_env.pop("PYTHONPYCACHEPREFIX")  # the package's own __pycache__, absent in a source tree
            compiled = [import_once(compiling_env) for _ in range(args.repeat)]
            extra = [c[2] for c in cached]
            extra_compiling = [c[2] for c in compiled]
            rows.append(f"| 3. `python -c 'import reporter'`, bytecode cached (ms) | {spread([c[1] for c in cached], '{:.1f}')} | "
                        f"`python -c pass`: {spread([c[0] for c in cached], '{:.1f}')} | {spread(extra, '{:+.1f} ms')} "
                        f"(-X importtime: {importtime_ms(env):.1f} ms) | <= +30 ms |")
            rows.append(f"| 3'. the same, compiling on every run (PYTHONDONTWRITEBYTECODE=1) (ms) | "
                        f"{spread([c[1] for c in compiled], '{:.1f}')} | `python -c pass`: {spread([c[0] for c in compiled], '{:.1f}')} | "
                        f"{spread(extra_compiling, '{:+.1f} ms')} | (not a target) |")
        if "latency" in only:
            p50s, p90s, f50s, f90s = [], [], [], []
            for seed in range(args.repeat):
                figures = latency_once(directory, env, seed)
                f50s.append(figures["floor"][0])
                f90s.append(figures["floor"][1])
                p50s.append(figures["reporter"][0])
                p90s.append(figures["reporter"][1])
            rows.append(f"| 4. report_metric() -> backend, reports 10-100 ms apart: p50 (ms) | {spread(p50s, '{:.1f}')} | bare POST: "
                        f"{spread(f50s, '{:.1f}')} | {spread([p - f for p, f in zip(p50s, f50s)], '{:+.1f} ms')} | <= 20 ms |")
            rows.append(f"| 4. the same: p90 (ms) | {spread(p90s, '{:.1f}')} | bare POST: {spread(f90s, '{:.1f}')} | "
                        f"{spread([p - f for p, f in zip(p90s, f90s)], '{:+.1f} ms')} | <= 50 ms |")

    lines = [
        f"Machine: {machine()}. Each figure: median of {args.repeat} runs (lowest-highest in brackets); "
        f"load average at the end: {os.getloadavg()[0]:.2f}.",
        "",
        "| target | figure | floor (same run) | ratio or difference | target |",
        "| --- | ---: | ---: | ---: | --- |",
        *rows,
    ]
    publish(lines, args.write, "engine")


if __name__ == "__main__":
    main()
