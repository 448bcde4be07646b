"""``anylearn-reporter run``: build, launch and supervise a training command, and report for it.

The modules follow one run:

- :mod:`.launch`: the options (command line and environment, in one place), the command's argv and
  environment, and every check that can fail before launch (exit 2, nothing reported);
- :mod:`.output`: the command's stdout/stderr passed through, logged, and read for metric lines;
- :mod:`.supervise`: the command as a child process, the signals passed to it, the one failure ladder;
- :mod:`.reaper`: the command's process tree (orphans reaped, leftovers stopped, the key's guard);
- :mod:`.runner`: one run from the run directory to ``summary.json``.

Imports run one way: ``launch``, ``output``, ``reaper`` -> ``supervise`` -> ``runner``.
"""

from .launch import RunOptions, build_argv, child_environment, options_from
from .output import MetricLineParser, ParsedMetric
from .runner import Run, dry_run, run
from .supervise import RunEnding, outcome_of

__all__ = [
    "MetricLineParser",
    "ParsedMetric",
    "Run",
    "RunEnding",
    "RunOptions",
    "build_argv",
    "child_environment",
    "dry_run",
    "options_from",
    "outcome_of",
    "run",
]
