"""The agent's logger: one stderr line per message, prefixed ``anylearn-reporter:``.

The handler is attached to the package's own logger only, so the host program's logging setup is left
alone; ``ANYLEARN_REPORTER_LOG_LEVEL`` (default INFO) sets how much is said.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from typing import Any, Mapping, Optional

LOGGER_NAME = "anylearn_reporter"
BAR_WIDTH = 30
ENV_LOG_LEVEL = "ANYLEARN_REPORTER_LOG_LEVEL"
MAX_SAID_KEYS = 4096  # say_once remembers this many keys at most (a key per file or offset must not grow a process)


class _StderrHandler(logging.StreamHandler):
    """Looks sys.stderr up at each message, so a replaced stderr (pytest, a wrapper) is honoured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger() -> logging.Logger:
    """Return the package logger, attaching the stderr handler on first use."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("anylearn-reporter: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        level = os.environ.get(ENV_LOG_LEVEL, "INFO").upper()
        logger.setLevel(getattr(logging, level, logging.INFO))
    return logger


_said_keys: set = set()


def say_once(key: Any, msg: str, *args: Any, level: int = logging.WARNING) -> bool:
    """Log ``msg % args`` the first time ``key`` is seen in this process; True when it was said now.

    For messages with no count behind them (a count's first reason is said by its ledger). The memory is
    bounded: past :data:`MAX_SAID_KEYS` keys it starts afresh, so a message may be said again.
    """
    if not first_time(key):
        return False
    get_logger().log(level, msg, *args)
    return True


def first_time(key: Any) -> bool:
    """True the first time ``key`` is seen in this process (the memory :func:`say_once` uses), for a caller
    that builds its message only when it will be said."""
    if key in _said_keys:
        return False
    if len(_said_keys) >= MAX_SAID_KEYS:
        _said_keys.clear()
    _said_keys.add(key)
    return True


def forget_said() -> None:
    """Forget what :func:`say_once` and :func:`first_time` saw, so each test sees its own first message (tests only)."""
    _said_keys.clear()


def records(count: int) -> str:
    """``1 record``, ``9 records``."""
    return f"{count} record" + ("" if count == 1 else "s")


def stay_pending(count: int) -> str:
    """``1 record stays pending``, ``9 records stay pending``."""
    return f"{records(count)} {'stays' if count == 1 else 'stay'} pending"


def sync_hint(run_dir: str, backend_url: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
              new_key: bool = False) -> str:
    """The complete ``sync`` command that delivers ``run_dir``: the key's variable (never the key) when the
    environment has none (or ``new_key``: the one set was refused), ``--task-id`` for an offline run,
    ``--backend-url`` when it is known."""
    from .config import ENV_SECRET_KEY, ENV_SECRET_KEY_PLATFORM, task_of_run_name

    env = os.environ if env is None else env
    has_key = not new_key and (env.get(ENV_SECRET_KEY, "").strip() or env.get(ENV_SECRET_KEY_PLATFORM, "").strip())
    parts = [] if has_key else [
        f"{ENV_SECRET_KEY}='<the task's secret key>'"]
    parts += ["anylearn-reporter", "sync", shlex.quote(run_dir)]
    if task_of_run_name(os.path.basename(os.path.normpath(run_dir))) is None:
        parts.append("--task-id '<the task id>'")
    if backend_url:
        parts.append(f"--backend-url {shlex.quote(backend_url)}")
    return " ".join(parts)


def say_offline(run_dir: str, why: str = "") -> None:
    """The one line that says a run only journals here, why, and how to deliver it later."""
    get_logger().info(
        "offline mode%s, so records are only journalled to %s; a sidecar or `%s` can deliver them",
        f": {why}" if why else "", run_dir, sync_hint(run_dir),
    )


def warn_pending(count: int, run_dir: str, backend_url: Optional[str] = None, new_key: bool = False) -> None:
    """The one line that counts what stays pending at the end and gives the command that delivers it."""
    get_logger().warning(
        "%s in %s; deliver %s with `%s`", stay_pending(count), run_dir, "it" if count == 1 else "them",
        sync_hint(run_dir, backend_url, new_key=new_key),
    )


class Progress:
    """Delivery progress: a bar on a terminal; otherwise a plain line every ``PLAIN_LINE_INTERVAL_S`` of a
    long delivery, and one when the caller forces it (``sync``'s last line)."""

    PLAIN_LINE_INTERVAL_S = 5.0

    def __init__(self, run_dir: str, total: int, stream: Any = None) -> None:
        self.run_dir = run_dir
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_line = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        done = min(max(done, 0), self.total)  # records journalled meanwhile are not this delivery's
        if self.tty:
            filled = int(BAR_WIDTH * done / self.total)
            self.stream.write(f"\r{os.path.basename(self.run_dir)} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{self.total}")
            self.stream.flush()
        elif force or time.monotonic() - self._last_line >= self.PLAIN_LINE_INTERVAL_S:
            self._last_line = time.monotonic()
            self.stream.write(f"{self.run_dir}: {done}/{self.total} records delivered\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


def counted(counts: Mapping[str, int], what: str = "") -> str:
    """Counts by reason as one phrase: ``3 skipped (2 not the objective metric, 1 torn or invalid line)``."""
    total = f"{sum(counts.values())} {what}".rstrip()
    return f"{total} (" + ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) + ")"
