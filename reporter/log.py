"""The agent's logger: one stderr line per message, prefixed ``anylearn-reporter:``.

The handler is attached to the package's own logger only, so the host program's logging setup is left
alone; ``ANYLEARN_REPORTER_LOG_LEVEL`` (default INFO) sets how much is said.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "anylearn_reporter"
ENV_LOG_LEVEL = "ANYLEARN_REPORTER_LOG_LEVEL"


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


def say_offline(run_dir: str) -> None:
    """The one line that says a run only journals here."""
    get_logger().info(
        "offline mode (no task credentials or backend here): journalling to %s; a sidecar or "
        "`anylearn-reporter sync %s` can deliver it", run_dir, run_dir,
    )


def warn_pending(count: int, run_dir: str) -> None:
    """The one line that counts what stays pending at the end and names the command that delivers it."""
    get_logger().warning(
        "%d records stay pending in %s; deliver them with `anylearn-reporter sync %s`", count, run_dir, run_dir
    )
