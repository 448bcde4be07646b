"""Shared fixtures: a real local backend on loopback, a clean environment, polling helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from reporter import api
from reporter.emulator.server import DevServer, Faults, make_server
from reporter.journal import JournalWriter

TASK_ID = "TRAI" + "testtask0000000000000000000a"
SECRET_KEY = "s3cret-Key-never-logged-7f3a9c"
REPORTER_ENV_PREFIXES = ("ANYLEARN_", "BACKEND_NAMESPACE", "RANK", "task_id", "secret_key", "MASTER_", "NODE_RANK")


def wait_until(predicate: Callable[[], object], timeout_s: float = 20.0, interval_s: float = 0.02, what: str = "") -> object:
    """Poll ``predicate`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environ(**extra: str) -> Dict[str, str]:
    """The current environment without any reporter or distributed variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(REPORTER_ENV_PREFIXES)}
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(REPORTER_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    api._reset_for_tests()
    yield
    api._reset_for_tests()


@pytest.fixture
def server() -> Iterator[DevServer]:
    srv = make_server({TASK_ID: SECRET_KEY}).start()
    yield srv
    srv.stop()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., DevServer]]:
    started: List[DevServer] = []

    def factory(faults: Optional[Faults] = None, port: int = 0) -> DevServer:
        srv = make_server({TASK_ID: SECRET_KEY}, faults=faults, port=port).start()
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop()


def task_env(base_url: str, run_dir: str, **extra: str) -> Dict[str, str]:
    """Environment of a process reporting to ``base_url`` for the test task."""
    values = {
        "ANYLEARN_BACKEND_URL": base_url,
        "ANYLEARN_TASK_ID": TASK_ID,
        "ANYLEARN_SECRET_KEY": SECRET_KEY,
        "ANYLEARN_REPORTER_RUN_DIR": run_dir,
        **extra,
    }
    return clean_environ(**values)


def run_python(code: str, env: Dict[str, str], timeout_s: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def cli(*args: str, env: Optional[Dict[str, str]] = None, timeout_s: float = 120.0, **kwargs) -> subprocess.CompletedProcess:
    """Run ``anylearn-reporter ARGS`` as a real subprocess (``python -m reporter``)."""
    return subprocess.run(
        [sys.executable, "-m", "reporter", *args], env=env if env is not None else clean_environ(),
        capture_output=True, text=True, timeout=timeout_s, **kwargs,
    )


class ServeProcess:
    """``anylearn-reporter serve`` as a real subprocess on a loopback port."""

    def __init__(self, *args: str, port: int = 0, env: Optional[Dict[str, str]] = None) -> None:
        env = clean_environ(ANYLEARN_SECRET_KEY=SECRET_KEY, **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reporter", "serve", "--port", str(port), "--task", TASK_ID, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if "emulator at" not in line:
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.base_url = line.split(" at ", 1)[1].split()[0]
        self.root = self.base_url.rsplit("/api", 1)[0]
        # With a token, serve's /_dev reads need it too: the harness reads with it.
        self.token = args[args.index("--token") + 1] if "--token" in args else (env.get("ANYLEARN_AUTH_TOKEN") or env.get("ANYLEARN_TOKEN"))

    def get(self, path: str):
        import json
        import urllib.request

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        with urllib.request.urlopen(urllib.request.Request(self.root + path, headers=headers), timeout=10) as answer:
            return json.loads(answer.read())

    def task(self):
        (task,) = self.get("/_dev/tasks")
        return task

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    started: List[ServeProcess] = []

    def start(*args: str, port: int = 0, env: Optional[Dict[str, str]] = None) -> ServeProcess:
        srv = ServeProcess(*args, port=port, env=env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Network tests stay on this machine: the test process refuses to resolve any name but loopback, so
    no lookup or connection can leave it (a made-up host name in a test fails at once)."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("127.0.0.1", "localhost", "::1", "") and not name.startswith("127."):
            raise AssertionError(f"a test tried to reach {name}: tests use loopback only")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


def offline_run(tmp_path, count, name="offline-20261125-101500-abc123"):
    run_dir = tmp_path / "runs" / name
    writer = JournalWriter(str(run_dir))
    writer.append("state", 1, None, None)
    for i in range(count):
        writer.append("intermediate", float(i), None, i)
    writer.append("final", float(count), None, None)
    writer.append("state", 2, None, None)
    writer.close()
    return run_dir



# Journal lines a hand edit or another tool could leave: each is an invalid record, skipped and counted.
HAND_EDITED = (
    b'{"kind": "intermediate", "value": "0.2x", "name": null, "step": 9}\n'
    b'{"kind": "intermediate", "value": 1e400, "step": 10}\n'
    b'{"kind": "bogus", "value": 1.0}\n'
    b'["not", "a", "record"]\n'
)

