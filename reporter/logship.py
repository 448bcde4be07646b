"""A local task's agent (``anyctl localtrain``'s part, in the SDK agent's shape): heartbeat and log shipping.

With the user's token (``ANYLEARN_AUTH_TOKEN``) the wrapper runs this beside the command. One thread tails the
run directory's ``stdout.log`` and ``stderr.log`` (the files the output pumps write, never the pipe: shipping
can never slow the command) and ships new text with ``PATCH /train_task/local_logs`` in slices of at most
``SLICE_BYTES``, whole lines while output flows and always whole UTF-8 characters. Each stream's offset (bytes)
is kept on the backend through ``local_task_catch`` (read at start, written after each shipped slice), so a
resumed task goes on where delivery stopped; a file shorter than the offset (a new run directory, a
truncated log) is a new file, shipped from its start, said once. Another thread heartbeats
(``PATCH /train_task/heartbeat``). A backend that is down only delays both (the client's retry policy); one
that refuses (401/403, another 4xx) or lacks these endpoints (404/405) turns them off, said once. The secret
key and the token are masked (every form they take on the wire) in what is shipped. At the end the last line
shipped says how the command ended.

Delivery is at least once, not exactly once: the platform keeps no idempotency key for ``local_logs``, so a
slice whose answer is lost (the request deadline passes after the backend stored it, the connection drops)
is shipped again and shows twice. The window is one slice (at most ``SLICE_BYTES``) per lost answer; the
offset PATCH that follows a stored slice has the same window, for the same slice.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable, List, Optional

from .client import BackendClient, Outcome, Retrier, SendResult, TransientError, classify
from .config import HEARTBEAT_FILE, LOCAL_HEARTBEAT_INTERVAL_S, STDERR_LOG, STDOUT_LOG, Config
from .log import get_logger
from .osutil import atomic_write_json
from .transport import REDACTED, secret_forms

LOGS_ENDPOINT = "train_task/local_logs"
CATCH_ENDPOINT = "train_task/local_task_catch"
SLICE_BYTES = 64 * 1024  # the most one request ships
SHIP_INTERVAL_S = 0.25  # how often the logs are looked at while the command is quiet
BUSY_INTERVAL_S = 0.05  # the pause after a shipped round while the command runs: encoding a slice holds the
# GIL for milliseconds, so a flood of output is shipped at most 20 slices a second per stream (about 1.3 MB/s)
# while the wrapper's pumps must keep up with the command; what is left goes at full speed once it ended
PARTIAL_LINE_WAIT_S = 1.0  # a line without its newline (a progress bar) is shipped after this long
REQUEST_TIMEOUT_S = 10.0
CLOSE_JOIN_S = 2.0  # how long close waits for each thread once its request was cut off (within a second)
STREAMS = ((STDOUT_LOG, "output_cache_pointer"), (STDERR_LOG, "error_cache_pointer"))


def utf8_boundary(data: bytes) -> int:
    """The length of the longest prefix of ``data`` that does not end inside a UTF-8 character (bytes that
    are not UTF-8 count as whole characters: they are shipped replaced)."""
    n = len(data)
    for i in range(n - 1, max(n - 4, 0) - 1, -1):
        byte = data[i]
        if 0x80 <= byte < 0xC0:  # a continuation byte: look further back for its lead byte
            continue
        need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if 0xF0 <= byte < 0xF8 else 1
        return n if n - i >= need else i
    return n


def end_line(exit_code: int) -> str:
    """The last line shipped, in the SDK agent's words."""
    return f"Task finished with code {exit_code}" if exit_code == 0 else f"Task failed with code {exit_code}"


class _Stream:
    """One log file and how much of it the backend holds."""

    def __init__(self, path: str, key: str) -> None:
        self.path = path
        self.key = key
        self.offset = 0
        self.inode: Optional[int] = None  # the file the offset counts in (None: not seen yet)
        self.partial_since: Optional[float] = None  # when a line without its newline was first seen
        self.on_new_file: Callable[["_Stream", int, str], None] = lambda stream, size, why: None

    def next_slice(self, final: bool) -> Optional[bytes]:
        """The bytes to ship next (None: nothing now): whole lines, or a partial line that waited long
        enough, a full slice, or (``final``) everything; always cut on a whole UTF-8 character. A file
        shorter than the offset or replaced by another is a new one: shipped from its start."""
        size, inode = self.stat()
        replaced = inode is not None and self.inode is not None and inode != self.inode
        if inode is not None:
            self.inode = inode
        if size < self.offset or (replaced and self.offset):
            self.on_new_file(self, size, "replaced by another" if replaced else "truncated")
            self.offset, self.partial_since = 0, None
        if size <= self.offset:  # the usual case while the command is quiet: one stat, no open
            self.partial_since = None
            return None
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(SLICE_BYTES)
        except OSError:
            return None
        if not data:
            self.partial_since = None
            return None
        newline = data.rfind(b"\n")
        full = len(data) == SLICE_BYTES
        if newline >= 0 and (full or not final):  # whole lines: a line split between slices reads as two
            return data[: newline + 1]
        if not full and not final:
            now = time.monotonic()
            if self.partial_since is None:
                self.partial_since = now
            if now - self.partial_since < PARTIAL_LINE_WAIT_S:
                return None
        cut = utf8_boundary(data)
        if cut == 0 and final:  # the output ends inside a character: ship the broken bytes replaced
            cut = len(data)
        return data[:cut] or None

    def size(self) -> int:
        return self.stat()[0]

    def stat(self) -> "tuple[int, Optional[int]]":
        """The file's size and inode; ``(0, None)`` while it does not exist."""
        try:
            st = os.stat(self.path)
        except OSError:
            return 0, None
        return st.st_size, st.st_ino


class LocalAgent:
    """Heartbeat and log shipping for one local task; :meth:`start`, then :meth:`finish` and :meth:`close`."""

    def __init__(self, config: Config, run_dir: str) -> None:
        def make() -> BackendClient:  # one per thread: a client serves one thread at a time
            return BackendClient.from_config(config, request_timeout_s=REQUEST_TIMEOUT_S, with_token=True)

        self.task_id = config.task_id or ""
        self.run_dir = run_dir
        self.log = get_logger()
        self.streams: List[_Stream] = [_Stream(os.path.join(run_dir, name), key) for name, key in STREAMS]
        for stream in self.streams:
            stream.on_new_file = self._new_file
        self._sizes_at_start = [stream.size() for stream in self.streams]  # before the command writes
        secrets = [s.reveal() for s in (config.secret_key, config.auth_token) if s]
        self._masked = tuple(sorted({form for one in secrets for form in secret_forms(one)}, key=len, reverse=True))
        self.shipping = True  # False once the backend refused the output or showed it has no log endpoints
        self.finished = threading.Event()  # everything and the end line shipped
        self._client = make()
        self._beat_client = make()
        self._wake = threading.Event()
        self._stop = threading.Event()  # give up (the drain deadline passed): interrupts any backoff
        self._exit_code: Optional[int] = None
        self._failing = False
        self._threads = [threading.Thread(target=self._ship_loop, name="anylearn-reporter-logship", daemon=True),
                         threading.Thread(target=self._beat_loop, name="anylearn-reporter-heartbeat", daemon=True)]

    def start(self) -> "LocalAgent":
        for thread in self._threads:
            thread.start()
        return self

    def finish(self, exit_code: int) -> None:
        """The command ended with ``exit_code``: ship what is left, then the end line."""
        self._exit_code = exit_code
        self._wake.set()

    @property
    def failing(self) -> bool:
        """True while the backend is down (requests are being retried)."""
        return self._failing

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the shipping to end (everything shipped, or shipping off); True when
        it ended."""
        self._threads[0].join(max(timeout_s, 0.0) if math.isfinite(timeout_s) else None)  # --drain-timeout inf
        return not self._threads[0].is_alive()

    def abandon(self) -> None:
        """Stop now: backoffs and the requests in flight are interrupted (from any thread)."""
        self._stop.set()
        self._wake.set()
        self._client.interrupt()
        self._beat_client.interrupt()

    def close(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the shipping to end, then stop (a request in flight is cut off, so
        this returns soon after ``timeout_s`` even with a hanging backend); True when everything was shipped."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        self.wait(timeout_s)
        self._stop.set()
        self._wake.set()
        for thread in self._threads:  # a request in flight (a heartbeat) may end until the deadline
            left = deadline - time.monotonic()
            thread.join(max(left, 0.0) if math.isfinite(left) else None)
        self.abandon()
        for thread in self._threads:
            thread.join(CLOSE_JOIN_S)  # cut off: each ends at once; a thread still stuck is a daemon
        self._client.close()
        self._beat_client.close()
        done = self.finished.is_set()
        if not done and self.shipping:
            left = sum(max(s.size() - s.offset, 0) for s in self.streams)
            if left:
                self.log.warning("the command's output was not all shipped to the backend within the drain timeout "
                                 "(%d bytes left); a resumed task ships it", left)
            else:
                self.log.warning("the command's output was shipped but not its end line (%r) within the drain timeout",
                                 end_line(self._exit_code or 0))
        return done

    # --- requests ------------------------------------------------------------------------------------

    def _call(self, what: str, send: Callable[[], SendResult]) -> bool:
        """``send`` until it is delivered (retrying with the client's backoff while the backend is down);
        False when the backend refuses (401/403, another 4xx) or lacks the endpoint (shipping is then off,
        said once), or when stopped."""
        def on_retry(exc: TransientError) -> None:
            if not self._failing:
                self._failing = True
                self.log.warning("shipping the command's output failed (%s: %s); will try again", what, exc.reason)

        try:
            result = Retrier(self._stop).call(send, on_retry)  # tenacity loads at the first failure only
        except TransientError:
            return False  # stopped while retrying
        if self._failing:
            self._failing = False
            self.log.info("shipping the command's output again")
        if result.outcome is Outcome.DELIVERED:
            return True
        self.shipping = False
        if result.outcome is Outcome.AUTH:
            self.log.warning("the backend refuses the token (%s: HTTP %d %s); the command's output is not shipped: "
                             "set ANYLEARN_AUTH_TOKEN to a valid login token", what, result.status, result.reason)
        elif result.outcome is Outcome.SETUP:
            self.log.warning("the command's output is not shipped: %s", result.reason)
        else:
            self.log.warning("the backend cannot take the command's output (%s: HTTP %d %s); it is not shipped",
                             what, result.status, result.reason)
        return False

    def _request(self, method: str, endpoint: str, answers: Optional[List[Any]] = None, **kwargs: Any) -> SendResult:
        if self._client.setup_problem:
            return SendResult(Outcome.SETUP, 0, self._client.setup_problem)
        if self._stop.is_set():  # abandoned: no new request (one in flight was cut off)
            raise TransientError("stopped")
        answer = self._client.request(method, endpoint, timeout_s=REQUEST_TIMEOUT_S, **kwargs)
        if answers is not None:
            answers.append(answer)
        return classify(answer, optional_endpoint=True)

    def _read_offsets(self) -> bool:
        answers: List[Any] = []
        if not self._call("reading the log offsets",
                          lambda: self._request("GET", CATCH_ENDPOINT, answers, params={"id": self.task_id})):
            return False
        try:
            held = answers[-1].json()
        except (ValueError, RecursionError):
            held = None
        if not isinstance(held, dict):  # a 2xx that is not a JSON object: nothing is known to be held
            self.log.warning("the backend's log offsets are not a JSON object (HTTP %d); shipping the output from "
                             "its start", answers[-1].status)
            held = {}
        for stream, size in zip(self.streams, self._sizes_at_start):
            try:
                offset = max(int(held.get(stream.key) or 0), 0)
            except (TypeError, ValueError, OverflowError):
                offset = 0
            if offset > size:  # more than the file had before the command wrote: a new file, ship it whole
                self.log.warning("the backend holds %d bytes of %s but this run's file had %d; a new file: shipping "
                                 "it from its start", offset, os.path.basename(stream.path), size)
                offset = 0
            stream.offset = offset
        return True

    def _new_file(self, stream: _Stream, size: int, why: str) -> None:
        self.log.warning("%s was %s (%d bytes, %d shipped): shipping it from its start",
                         os.path.basename(stream.path), why, size, stream.offset)

    def _ship(self, text: str) -> bool:
        for form in self._masked:  # the command may print the key or the token: they never leave the machine
            if form in text:
                text = text.replace(form, REDACTED)
        return self._call("shipping logs", lambda: self._request("PATCH", LOGS_ENDPOINT, form={"id": self.task_id, "logs": text}))

    # --- threads -------------------------------------------------------------------------------------

    def _ship_loop(self) -> None:
        try:
            if not self._read_offsets():
                return
            while not self._stop.is_set():
                final = self._exit_code is not None
                shipped = False
                for stream in self.streams:
                    data = stream.next_slice(final)
                    if data is None:
                        continue
                    if not self._ship(data.decode("utf-8", "replace")):
                        return
                    stream.offset += len(data)
                    stream.partial_since = None
                    shipped = True
                    form = {"id": self.task_id, "key": stream.key, "value": str(stream.offset)}
                    if not self._call("saving the log offset", lambda: self._request("PATCH", CATCH_ENDPOINT, form=form)):
                        return
                if final and not shipped:
                    if self._ship(end_line(self._exit_code or 0)):
                        self.finished.set()
                    return
                if not final:
                    self._wake.wait(BUSY_INTERVAL_S if shipped else SHIP_INTERVAL_S)
                    if self._exit_code is None:
                        self._wake.clear()
        except Exception as exc:  # noqa: BLE001 - the agent never takes the run down
            self.log.warning("log shipping stopped: %s", exc)

    def _record_heartbeats(self, state: str, reason: str = "") -> None:
        """``heartbeat.json`` (what ``status`` shows), as the sidecar writes it."""
        try:
            atomic_write_json(os.path.join(self.run_dir, HEARTBEAT_FILE), {"heartbeats": state, "reason": reason, "ts": time.time()})
        except OSError as exc:
            self.log.debug("cannot write %s: %s", HEARTBEAT_FILE, exc.strerror)

    def _beat_loop(self) -> None:
        failing = False
        said_on = False
        while not self._stop.is_set() and not self.finished.is_set():
            try:
                result = self._beat_client.heartbeat(timeout_s=REQUEST_TIMEOUT_S)
                if result.outcome in (Outcome.UNSUPPORTED, Outcome.REDIRECT, Outcome.SETUP):
                    self.log.warning("the backend takes no local task heartbeat (HTTP %d %s); heartbeats are off",
                                     result.status, result.reason)
                    self._record_heartbeats("off", f"the backend takes no local task heartbeat (HTTP {result.status})")
                    return
                if result.outcome is not Outcome.DELIVERED and not failing:
                    self.log.warning("heartbeat refused (HTTP %d: %s)", result.status, result.reason)
                failing = result.outcome is not Outcome.DELIVERED
                if not failing and not said_on:
                    self._record_heartbeats("on")
                    said_on = True
            except TransientError as exc:
                if not failing and not self._stop.is_set():
                    self.log.warning("heartbeat failed (%s); will try again", exc.reason)
                failing = True
            except Exception as exc:  # noqa: BLE001
                self.log.debug("heartbeat: %s", exc)
            self._stop.wait(LOCAL_HEARTBEAT_INTERVAL_S)


def local_agent(config: Config, run_dir: str) -> Optional[LocalAgent]:
    """A started :class:`LocalAgent` when the run is a local task (a user's token, a task and a backend);
    None otherwise, saying nothing."""
    if not config.auth_token or config.offline:
        return None
    return LocalAgent(config, run_dir).start()


__all__ = ["LocalAgent", "end_line", "local_agent", "utf8_boundary"]
