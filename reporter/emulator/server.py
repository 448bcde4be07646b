"""A local AnyLearn backend emulator (``anylearn-reporter serve``): try a container end to end, and the
real server our integration tests run against.

Standard library only: a threaded ``http.server`` speaking HTTP/1.1 keep-alive and ``sqlite3``. It
implements the train-task endpoints of the platform contract, checks ``Secret-Key``, deduplicates by
``Idempotency-Key`` and can inject faults (latency, 503s, 429 with ``Retry-After``). A local task's agent
endpoints (heartbeat, log shipping, log offsets, reading the log back) take the user's bearer token.
This module is the HTTP side and the contract's routes; the state and faults are in :mod:`.store`, the page
and the local task's routes in :mod:`.routes`.
"""

from __future__ import annotations

import io
import json
import re
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Mapping, Optional, Tuple
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, unquote, urlsplit

from ..config import ENV_AUTH_TOKEN, STATE_NAMES, ConfigError
from . import routes
from .store import Backend, Faults  # Faults: cli and tests import it from here, with make_server

API_PREFIX = "/api"
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 unread
DEFAULT_IDLE_TIMEOUT_S = 30.0  # a connection silent this long is closed
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s]*")


class _DeadlineSocketIO(io.RawIOBase):
    """The socket's read side, each read waiting at most the idle timeout and, while a request line and
    its headers are read, no later than their deadline: a client that drips header bytes just inside the
    idle timeout cannot hold a thread for ever."""

    def __init__(self, sock: socket.socket, handler: "_Handler") -> None:
        super().__init__()
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self._handler.timeout
        deadline = self._handler.headers_deadline
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the request line and headers took longer than the idle timeout")
            timeout = remaining if timeout is None else min(timeout, remaining)
        self._sock.settimeout(timeout)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # answers go out at once, not after the client's delayed ACK
    server_version = "anylearn-devserver"
    backend: Backend  # set on the subclass made per server
    anyboard: Any = None  # the local Anyboard's AnyboardStore, with serve --anyboard-port
    prefix: str = API_PREFIX
    quiet: bool = True

    headers_deadline: Optional[float] = None  # while a request line and headers are read: when they must be in

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineSocketIO(self.connection, self))
        self.backend.count("connections")  # keep-alive clients open few

    def handle_one_request(self) -> None:
        # The request line and headers together get the idle timeout (the body has its own reads' timeout).
        self.headers_deadline = time.monotonic() + (self.timeout or DEFAULT_IDLE_TIMEOUT_S)
        try:
            super().handle_one_request()
        finally:
            self.headers_deadline = None

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.headers_deadline = None
        return parsed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if not self.quiet:  # the page's ?token= never reaches the log
            super().log_message(format, *(_TOKEN_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in args))

    def _send(self, status: int, body: Any, headers: Optional[Mapping[str, str]] = None, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> Tuple[str, Dict[str, str]]:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        if path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]
        return path.rstrip("/") or "/", query

    def _body_length(self) -> Optional[int]:
        """The request's Content-Length (0 when absent), or None after answering 400/413 for a bad one.

        The body is not read here: a request is routed and authenticated first. Any answer given without
        reading a body closes the connection, since the unread bytes cannot be told from the next request.
        """
        values = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(400, {"msg": "Transfer-Encoding is not supported; send Content-Length"})
            return None
        if not values:
            return 0
        text = values[0].strip()
        if len(values) > 1 or not text.isascii() or not text.isdigit():
            self.close_connection = True
            self._send(400, {"msg": "malformed Content-Length"})
            return None
        length = int(text) if len(text) <= 12 else MAX_BODY_BYTES + 1
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, {"msg": f"request body above {MAX_BODY_BYTES} bytes"})
            return None
        if length:
            self._unread_body = True
        return length

    def _answer(self, status: int, body: Any, headers: Optional[Mapping[str, str]] = None) -> None:
        """Answer; when a body was left unread, the connection then closes."""
        if self._unread_body:
            self.close_connection = True
        self._send(status, body, headers)

    def _form(self, length: int) -> Dict[str, str]:
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self._unread_body = False
        return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    def _bearer_authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth[:7].lower() == "bearer " and self.backend.bearer_accepted(auth[7:].strip())

    def _read_authorized(self, task_id: str) -> bool:
        """A read accepts the task's Secret-Key or a bearer token (the AnyLearn SDK's login token)."""
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            if self.backend.bearer_accepted(auth[7:].strip()):
                return True
        return self.backend.authorized(task_id, self.headers.get("Secret-Key", ""))

    def _dev_read_authorized(self) -> bool:
        """With a token set, the page and the ``/_dev/*`` reads need it: as a bearer token, or in the
        HttpOnly cookie the page sets after ``/?token=T``. Without one they are open, like the reads."""
        if self.backend.token is None:
            return True
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer " and self.backend.bearer_accepted(auth[7:].strip()):
            return True
        cookies = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except CookieError:
            return False
        cookie = cookies.get(routes.TOKEN_COOKIE)
        return cookie is not None and self.backend.bearer_accepted(unquote(cookie.value))

    _unread_body = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.backend.count("requests")
        self._unread_body = False
        if self._body_length() is None:
            return
        path, query = self._route()
        if path == "/":
            return routes.page(self, query)
        if self.anyboard is not None and (path == "/anyboard" or path.startswith("/anyboard/")):
            if path == "/anyboard" and not self._dev_read_authorized():  # the curves page, behind the token as "/" is
                self.backend.count("unauthorized")
                return self._answer(401, {"msg": "this emulator has a token: send Authorization: Bearer <token>"})
            from .anyboard import handle_get

            return handle_get(self, path, query)
        if path.startswith("/_dev/") and not self._dev_read_authorized():
            self.backend.count("unauthorized")
            return self._answer(401, {"msg": "this emulator has a token: send Authorization: Bearer <token>"})
        if path == "/_dev/tasks":
            return self._send(200, self.backend.tasks())
        if path == "/_dev/stats":
            return self._send(200, self.backend.stats())
        if path in routes.LOCAL_TASK_READS:  # a local task's agent, the SDK's readers
            return routes.local_task_read(self, path, query)
        if path in ("/train_task/intermediate_metric", "/train_task/final_metric"):
            task_id = query.get("id", "")
            if not self._read_authorized(task_id):
                return self._answer(401, {"msg": "invalid task id, secret key or token"})
            if path.endswith("intermediate_metric"):
                return self._answer(200, self.backend.intermediate(task_id, query.get("last_timestamp", "")))
            return self._answer(200, self.backend.final(task_id))
        return self._answer(404, {"msg": f"no such endpoint: GET {path}"})

    def do_POST(self) -> None:  # noqa: N802
        self.backend.count("requests")
        self._unread_body = False
        path, _ = self._route()
        endpoint = path.rsplit("/", 1)[-1]
        if path not in ("/train_task/intermediate_metric", "/train_task/final_metric", "/train_task/state", "/train_task/heartbeat"):
            self.close_connection = True  # the body is not read
            return self._send(404, {"msg": f"no such endpoint: POST {path}"})
        arrival = self.backend.note_post()
        length = self._body_length()
        if length is None:
            return
        if not self.backend.known_key(self.headers.get("Secret-Key", "")):  # writes: the Secret-Key only
            return self._answer(401, {"msg": "invalid task id or secret key"})
        form = self._form(length)
        if self.backend.faults.latency_ms:
            time.sleep(self.backend.faults.latency_ms / 1000.0)
        failure = self.backend.injected_failure(arrival)
        if failure is not None:
            return self._send(failure[0], failure[1], failure[2])
        task_id = form.get("id", "")
        if not task_id:
            return self._send(400, {"msg": "form field 'id' is missing"})
        if not self.backend.authorized(task_id, self.headers.get("Secret-Key", "")):
            return self._send(401, {"msg": "invalid task id or secret key"})
        if endpoint == "heartbeat":
            return self._send(200, self.backend.heartbeat(task_id))
        key = self.headers.get("Idempotency-Key", "")
        replayed = self.backend.replay(key, endpoint)
        if replayed is not None:
            return self._send(*replayed)
        if endpoint == "state":
            try:
                state = int(form.get("state", ""))
            except ValueError:
                state = None
            if state not in STATE_NAMES:
                return self._send(400, {"msg": f"state must be one of {sorted(STATE_NAMES)}"})
            return self._send(200, self.backend.set_state(task_id, state, key))
        try:
            metric = float(form.get("metric", ""))
        except ValueError:
            return self._send(400, {"msg": "form field 'metric' must be a number"})
        if metric != metric or metric in (float("inf"), float("-inf")):
            return self._send(400, {"msg": "form field 'metric' must be a finite number"})
        if endpoint == "intermediate_metric":
            return self._send(200, self.backend.add_intermediate(task_id, metric, key))
        return self._send(200, self.backend.set_final(task_id, metric, key))


    def do_PATCH(self) -> None:  # noqa: N802
        """A local task's agent (the SDK's shape): heartbeat, shipped logs and log offsets, with the user's token."""
        return routes.local_task_patch(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # a client that hung up, or went silent past the idle timeout, is no error
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class DevServer:
    """The emulator bound to a loopback port; ``start()`` serves from a thread, ``stop()`` ends it."""

    def __init__(
        self,
        tasks: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        db_path: str = ":memory:",
        faults: Optional[Faults] = None,
        quiet: bool = True,
        token: Optional[str] = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        anyboard: Any = None,
    ) -> None:
        self.backend = Backend(tasks, db_path, faults, token)
        self.anyboard = anyboard
        # StreamRequestHandler.timeout: every socket read (request line, headers, body) waits at most this
        handler = type("Handler", (_Handler,), {"backend": self.backend, "quiet": quiet, "timeout": idle_timeout_s,
                                            "anyboard": anyboard})
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), handler)
        except BaseException:
            self.backend.close()
            raise
        self.host, self.port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self._thread: Optional[threading.Thread] = None

    @property
    def origin(self) -> str:
        """``http://host:port``, an IPv6 address in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The API base to give as ``ANYLEARN_BACKEND_URL``."""
        return f"{self.origin}{API_PREFIX}"

    def start(self) -> "DevServer":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="anylearn-devserver", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self.backend.close()

    def __enter__(self) -> "DevServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_command(tasks: Mapping[str, str], *, host: str, port: int, db_path: str, faults: Faults, verbose: bool,
                  token: Optional[str] = None, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                  anyboard: Optional[Mapping[str, Any]] = None) -> int:
    """The ``serve`` command: serve until SIGTERM or Ctrl-C."""
    import signal

    local_anyboard = None
    if anyboard is not None:  # {"port", "user", "password"}: the local Anyboard's IoTDB wire beside the HTTP API
        from .anyboard import start_local_anyboard

        local_anyboard = start_local_anyboard(db_path, host=host, **anyboard)
    try:
        server = DevServer(tasks, host=host, port=port, db_path=db_path, faults=faults, quiet=not verbose,
                           token=token, idle_timeout_s=idle_timeout_s,
                           anyboard=local_anyboard.store if local_anyboard else None)
    except sqlite3.Error as exc:  # before listening: the database comes first
        if local_anyboard is not None:
            local_anyboard.stop()
        raise ConfigError(f"cannot open --db {db_path}: {exc}; give a file in a directory that exists and you can write") from None
    except (OSError, OverflowError) as exc:
        if local_anyboard is not None:
            local_anyboard.stop()
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                          "choose another --host or --port") from None

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"AnyLearn backend emulator at {server.base_url} (page: {server.origin}/)", flush=True)
    if local_anyboard is not None:
        print(f"local Anyboard: IoTDB at {host}:{local_anyboard.port}, curves at {server.origin}/anyboard",
              flush=True)
    if not tasks:
        print("no tasks given: every report will get 401; add --task ID:KEY", flush=True)
    if token is None:
        print(f"reads accept any bearer token (no --token or {ENV_AUTH_TOKEN} set) or the task's Secret-Key", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.backend.close()
        if local_anyboard is not None:
            local_anyboard.stop()
    return 0


def make_server(tasks: Mapping[str, str], **kwargs: Any) -> DevServer:
    """The public factory: a :class:`DevServer` for ``tasks`` (task id -> secret key), not yet started."""
    return DevServer(tasks, **kwargs)
