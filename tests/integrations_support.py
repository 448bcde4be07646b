"""Helpers shared by the framework integration tests: a task reporting to the local backend, the journal
as (kind, name, step, value) rows, and an unchanged script run under ``run --autolog``."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import pytest
from conftest import SECRET_KEY, TASK_ID, cli, task_env

import reporter
from reporter.reader import iter_records

Row = Tuple[str, Optional[str], Optional[int], Optional[float]]


@pytest.fixture
def reporting(monkeypatch: pytest.MonkeyPatch, tmp_path, server) -> SimpleNamespace:
    """This process reports for the test task to the local backend, journalling in ``tmp_path/run``."""
    run_dir = tmp_path / "run"
    for name, value in {
        "ANYLEARN_BACKEND_URL": server.base_url,
        "ANYLEARN_TASK_ID": TASK_ID,
        "ANYLEARN_SECRET_KEY": SECRET_KEY,
        "ANYLEARN_REPORTER_RUN_DIR": str(run_dir),
    }.items():
        monkeypatch.setenv(name, value)
    return SimpleNamespace(run_dir=str(run_dir), server=server)


def journal(run_dir: str) -> List[Row]:
    """The run's records as (kind, name, step, value), in journal order; state records left out."""
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return []
    return [(r.kind, r.name, r.step, r.value) for _, r in iter_records(run_dir) if r.kind != "state"]


def named(rows: List[Row]) -> List[Tuple[Optional[str], Optional[int], Optional[float]]]:
    """The intermediate rows as (name, step, value); the objective's name is None."""
    return [(name, step, value) for kind, name, step, value in rows if kind == "intermediate"]


def delivered(server) -> Dict[str, Any]:
    """Flush this process's reports and return the test task as the backend holds it."""
    assert reporter.flush(15), "the reports were not delivered to the local backend"
    (task,) = server.backend.tasks()
    return task


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def run_autolog(script: str, server, tmp_path, **extra_env: str) -> Tuple[Any, List[Row], Dict[str, Any]]:
    """Run ``script`` (unchanged training code) under ``anylearn-reporter run --autolog``; return the
    finished process, the journal and the task as the local backend holds it."""
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    run_dir = str(tmp_path / "autolog-run")
    env = task_env(server.base_url, run_dir, **extra_env)
    done = cli("run", "--autolog", "--", sys.executable, str(path), env=env, cwd=tmp_path, timeout_s=120)
    assert done.returncode == 0, done.stderr
    tasks = server.backend.tasks()
    return done, journal(run_dir), tasks[0] if tasks else {}


def offline_tracker_env(tmp_path) -> Dict[str, str]:
    """Environment keeping MLflow, W&B and DVCLive on this machine: stores under ``tmp_path``, telemetry
    off, and W&B's server a closed loopback port should anything try it."""
    return {
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3's default store is sqlite, which needs sqlalchemy
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
    }
