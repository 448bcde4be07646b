"""Benchmark of ``show`` on a long journal: wall time and peak RSS, beside floors measured in the same run.

    python benchmarks/bench_show.py [--records 1000000] [--before DIR] [--write docs/benchmarks.md]

One journal of ``--records`` intermediate records (written directly, in the page cache). Each command runs as
its own process; its peak RSS is read by a helper process through ``RUSAGE_CHILDREN`` (so no other child of
this one counts). The floors: a Python process that does nothing (its RSS is the interpreter's), and a Python
loop reading the journal's lines (no parsing). ``--before DIR`` also measures the code in DIR (a directory
holding an older ``reporter`` package, e.g. from ``git archive <commit> reporter | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import machine, publish  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "elapsed = time.perf_counter() - start\n"
    "print(done.returncode, elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def write_journal(run_dir: str, count: int) -> None:
    os.makedirs(run_dir, exist_ok=True)
    line = ('{"kind":"intermediate","value":%d.5,"name":"loss","step":%d,"ts":1796511399.5,"rank":0,'
            '"pid":7,"key":"5955e20363d8-7-%d"}\n')
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for start in range(0, count, 10_000):
            f.write("".join(line % (i, i, i + 1) for i in range(start, min(count, start + 10_000))))


def measure(argv: List[str], code_dir: str) -> Tuple[float, float]:
    """(seconds, peak RSS in MB) of ``argv`` run with ``code_dir`` first on the path."""
    env = {**os.environ, "PYTHONPATH": code_dir}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, env=env, check=True,
                          cwd=os.path.dirname(code_dir))  # not this checkout: `-m reporter` would find it first
    code, elapsed, peak_kib = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{argv} exited {code}")
    return float(elapsed), int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--before", metavar="DIR", help="also measure the reporter package in DIR")
    parser.add_argument("--write", metavar="FILE", help="write the table into FILE's show section")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        write_journal(run_dir, args.records)
        journal = os.path.join(run_dir, "metrics.jsonl")
        size_mb = os.path.getsize(journal) / 1e6
        rows: List[Tuple[str, float, float]] = []
        rows.append(("floor: a Python process doing nothing", *measure([sys.executable, "-c", "pass"], ROOT)))
        rows.append(("floor: Python reading the journal's lines",
                     *measure([sys.executable, "-c", f"for _ in open({journal!r}, 'rb'): pass"], ROOT)))
        commands = [["show", "--metrics", "--json"], ["show", "--metrics"], ["show", "--json"]]
        versions: List[Tuple[str, Optional[str]]] = [("", ROOT)] + ([("before: ", args.before)] if args.before else [])
        for label, code_dir in versions:
            for command in commands:
                seconds, peak = measure([sys.executable, "-m", "reporter", *command, run_dir], code_dir or ROOT)
                rows.append((f"{label}`{' '.join(command)}`", seconds, peak))

    floor_s = rows[1][1]
    lines = [
        f"Machine: {machine()}. One journal of {args.records:,} records ({size_mb:.0f} MB); output to /dev/null. "
        "Time is the wall time of the whole process, peak RSS its maximum resident set.",
        "",
        "| command | time (s) | peak RSS (MB) | time / line-reading floor |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {seconds:.2f} | {peak:.0f} | {seconds / floor_s:.1f}x |" for name, seconds, peak in rows]
    publish(lines, args.write, "show")


if __name__ == "__main__":
    main()
