"""Helpers for the wrapper's tests: a run's environment, a script file, the summary, a wrapper process."""

import json
import subprocess
import sys
import textwrap

from conftest import task_env


def run_env(base_url, tmp_path, **extra):
    """The environment of a wrapper reporting to ``base_url`` with its run directory at ``tmp_path/run``."""
    return task_env(base_url, str(tmp_path / "run"), **extra)


def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def summary(tmp_path):
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def start_wrapper(args, env, cwd):
    """``anylearn-reporter run ARGS`` as a running process with text pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "reporter", "run", *args], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
