"""The output: the command's stdout and stderr passed through as they arrive, logged, and read for metrics.

One :class:`OutputPump` thread per stream copies bytes to the wrapper's own stream and to ``stdout.log`` /
``stderr.log``, and hands every line to the :class:`MetricLineParser`. Neither can be stopped by what the
command prints or by the disk: an unusable metric line and a failing log write are counted, said once,
and the stream is read to its end, so the command never blocks on a full pipe.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Optional, Union

from ..log import get_logger
from ..record import KIND_FINAL, KIND_INTERMEDIATE

STDERR_TAIL_LINES = 50
MAX_LINE_BYTES = 1 << 20
MAX_METRIC_PAYLOAD_BYTES = 64 * 1024
METRIC_PREFIX = "ANYLEARN_METRIC "
FINAL_METRIC_PREFIX = "ANYLEARN_FINAL_METRIC "


def _call_quietly(callback: Optional[Callable[[], Any]]) -> None:
    """Call a counting hook; its failure must not stop a reader."""
    if callback is not None:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001
            get_logger().debug("a counting hook failed: %s", exc)


# --- metric lines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedMetric:
    kind: str
    value: float
    name: Optional[str] = None
    step: Optional[int] = None


class MetricLineParser:
    """Reads metrics from output lines: ``ANYLEARN_METRIC <value|json>``, ``ANYLEARN_FINAL_METRIC <value>``,
    and user patterns with a named group ``value`` (``name``, ``step`` optional).

    :meth:`parse` never raises, whatever the line: a metric line that cannot be used (bad JSON, a step of
    ``1e400``, nesting deeper than the parser's recursion, a payload above :data:`MAX_METRIC_PAYLOAD_BYTES`)
    is counted in :attr:`unreadable` and warned about once.
    """

    def __init__(self, patterns: List["re.Pattern[str]"], on_unreadable: Optional[Callable[[], Any]] = None) -> None:
        self.patterns = patterns
        self.unreadable = 0
        self._on_unreadable = on_unreadable  # e.g. the run's host counters, so status.json shows the count

    def parse(self, line: Union[str, bytes]) -> Optional[ParsedMetric]:
        """The metric on ``line``, or None (not a metric line, or an unusable one: counted)."""
        try:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            text = text.rstrip("\r\n")
            stripped = text.strip()
            for prefix, kind in ((FINAL_METRIC_PREFIX, KIND_FINAL), (METRIC_PREFIX, KIND_INTERMEDIATE)):
                if stripped.startswith(prefix):
                    if len(stripped) - len(prefix) > MAX_METRIC_PAYLOAD_BYTES:
                        raise ValueError(f"the payload is longer than {MAX_METRIC_PAYLOAD_BYTES} bytes")
                    return self._from_payload(kind, stripped[len(prefix):])
            if len(text) > MAX_METRIC_PAYLOAD_BYTES:
                return None  # user patterns are not run over a progress bar or a binary blob
            for pattern in self.patterns:
                match = pattern.search(text)
                if match:
                    groups = match.groupdict()
                    step = groups.get("step")
                    return ParsedMetric(KIND_INTERMEDIATE, _number(groups["value"]), groups.get("name"), _step(step) if step else None)
        except Exception as exc:  # noqa: BLE001 - any line, any bytes: the reader thread must not die
            self._unreadable(exc, line)
        return None

    def _unreadable(self, exc: BaseException, line: Union[str, bytes]) -> None:
        self.unreadable += 1
        _call_quietly(self._on_unreadable)
        if self.unreadable == 1:
            try:
                shown = repr(line[:120])
            except Exception:  # noqa: BLE001
                shown = "?"
            get_logger().warning(
                "ignoring a metric line that could not be read (%s: %.200s): %s (said once; counted in summary.json)",
                type(exc).__name__, exc, shown,
            )

    @staticmethod
    def _from_payload(kind: str, payload: str) -> ParsedMetric:
        payload = payload.strip()
        if payload.startswith("{"):
            data = json.loads(payload)
            if not isinstance(data, dict):
                raise TypeError("the payload is not a JSON object")
            step = data.get("step")
            name = data.get("name")
            return ParsedMetric(kind, _number(data["value"]), None if name is None else str(name), None if step is None else _step(step))
        return ParsedMetric(kind, _number(payload))


def _number(value: Any) -> float:
    """A metric value as a float: a JSON number or text of one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"the value must be a number, not {type(value).__name__}")
    return float(value)


def _step(value: Any) -> int:
    """A step: an integer, or text or a float with an integer value (``1e400`` raises OverflowError)."""
    if isinstance(value, bool):
        raise TypeError("the step must be an integer, not a boolean")
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"the step {value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"the step must be an integer, not {type(value).__name__}")
    return value


# --- output pumps -----------------------------------------------------------------------------------


def open_log(path: str) -> Optional[int]:
    """A descriptor appending to ``path``, or None (said once) when it cannot be opened: the run goes on."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        get_logger().warning("cannot open %s (%s): the command's output passes through but is not logged", path, exc.strerror)
        return None


class OutputPump(threading.Thread):
    """Copies one of the child's streams to ours as it arrives, to a log file, and to the metric parser.

    It cannot die while the stream is open: a failing log write (a full disk) is counted in
    :attr:`log_write_failures` and warned about once, a failing sink or line handler is ignored, and the
    stream is read to its end, so the command never blocks on a full pipe.
    """

    def __init__(
        self, source: IO[Any], sink: IO[bytes], log_fd: Optional[int], log_path: str,
        on_line: Callable[[bytes], Any], keep_tail: bool = False, on_log_failure: Optional[Callable[[], Any]] = None,
    ) -> None:
        super().__init__(name=f"anylearn-reporter-pump-{os.path.basename(log_path)}", daemon=True)
        self.source = source
        self.sink = sink
        self.log_fd = log_fd
        self.log_path = log_path
        self.on_line = on_line
        self.on_log_failure = on_log_failure  # e.g. the run's host counters, so status.json shows the count
        self.log_write_failures = 0
        if log_fd is None:  # could not be opened: said by open_log, counted here
            self._count_log_failure()
        self.tail: List[str] = [] if keep_tail else None  # type: ignore[assignment]
        self._partial = b""

    def run(self) -> None:
        fd = self.source.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self._pass_through(chunk)
                self._write_log(chunk)
                self._lines(chunk)
        finally:
            if self._partial:
                self._line(self._partial)
            if self.log_fd is not None:
                try:
                    os.close(self.log_fd)
                except OSError:
                    pass

    def _pass_through(self, chunk: bytes) -> None:
        try:
            self.sink.write(chunk)
            self.sink.flush()
        except Exception:  # noqa: BLE001 - our own stdout is gone: keep logging and parsing
            pass

    def _write_log(self, chunk: bytes) -> None:
        if self.log_fd is None:
            return
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.log_fd, view):]
        except OSError as exc:
            self._count_log_failure()
            if self.log_write_failures == 1:
                get_logger().warning(
                    "cannot write %s (%s): the output still passes through (said once; counted in summary.json)",
                    self.log_path, exc.strerror,
                )

    def _count_log_failure(self) -> None:
        self.log_write_failures += 1
        _call_quietly(self.on_log_failure)

    def _lines(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:  # output without newlines (a progress bar, binary) stays bounded
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        try:
            if self.tail is not None:
                self.tail.append(raw[:4096].decode("utf-8", "replace"))
                if len(self.tail) > STDERR_TAIL_LINES:
                    del self.tail[0]
            self.on_line(raw)
        except Exception as exc:  # noqa: BLE001 - the pump outlives any bookkeeping failure
            get_logger().debug("a line handler failed: %s", exc)

