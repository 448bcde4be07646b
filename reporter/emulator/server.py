"""A local AnyLearn backend emulator (``anylearn-reporter serve``): try a container end to end, and the
real server our integration tests run against.

Standard library only: a threaded ``http.server`` speaking HTTP/1.1 keep-alive and ``sqlite3``. It
implements the train-task endpoints of the platform contract, checks ``Secret-Key``, deduplicates by
``Idempotency-Key`` and can inject faults (latency, 503s, 429 with ``Retry-After``). A local task's agent
endpoints (heartbeat, log shipping, log offsets, reading the log back) take the user's bearer token.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import io
import json
import random
import re
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Tuple
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..config import STATE_NAMES

API_PREFIX = "/api"
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 unread
LOG_TAIL_LINES = 20  # a task's log lines the page shows
CATCH_KEYS = ("output_cache_pointer", "error_cache_pointer")  # a local task's log offsets (bytes)
DEFAULT_IDLE_TIMEOUT_S = 30.0  # a connection silent this long is closed
TOKEN_COOKIE = "anylearn_token"  # the page's copy of the token (set after /?token=T)
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s]*")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS task (id TEXT PRIMARY KEY, secret_key TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,
                                 final_metric REAL, final_reported_at TEXT, last_heartbeat REAL);
CREATE TABLE IF NOT EXISTS intermediate_metric (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
                                 train_task_id TEXT NOT NULL, metric REAL NOT NULL, reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state_change (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 state INTEGER NOT NULL, reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeat (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS task_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 offset_ms INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS local_task_catch (train_task_id TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
                                 PRIMARY KEY (train_task_id, key));
CREATE TABLE IF NOT EXISTS idempotency (key TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
                                 body TEXT NOT NULL, PRIMARY KEY (key, endpoint));
"""


@dataclass
class Faults:
    """Fault injection, applied to POST requests in arrival order."""

    latency_ms: float = 0.0
    fail_first: int = 0
    fail_rate: float = 0.0
    retry_after_s: Optional[float] = None  # injected failures become 429 with this Retry-After
    seed: Optional[int] = None


def _now_text(ts: Optional[float] = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if ts is None else ts).strftime("%Y-%m-%d %H:%M:%S.%f")


def _public_time(text: str) -> str:
    return text[:19]


def _new_id(prefix: str) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(28))


class Backend:
    """The emulator's state and rules, independent of HTTP (one sqlite connection behind a lock)."""

    def __init__(self, tasks: Mapping[str, str], db_path: str = ":memory:", faults: Optional[Faults] = None,
                 token: Optional[str] = None):
        self.faults = faults or Faults()
        self.token = token  # None: reads accept any bearer token
        self._random = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        for task_id, key in tasks.items():
            self._db.execute(
                "INSERT INTO task (id, secret_key) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET secret_key = excluded.secret_key",
                (task_id, key),
            )
        self.posts_seen = 0
        self.post_times: List[float] = []  # arrival times of the last 1000 POSTs
        self.counters: Dict[str, int] = {
            "connections": 0, "requests": 0, "duplicates": 0, "injected_failures": 0, "unauthorized": 0,
        }

    # --- faults and auth -----------------------------------------------------------------------------

    def note_post(self) -> int:
        """Count a POST to an endpoint (before its body is read); returns its arrival number."""
        with self._lock:
            self.posts_seen += 1
            self.post_times.append(time.time())
            del self.post_times[:-1000]
            return self.posts_seen

    def injected_failure(self, arrival: int) -> Optional[Tuple[int, Dict[str, Any], Dict[str, str]]]:
        """Decide whether the POST that arrived ``arrival``-th fails on purpose; (status, body, headers) if so."""
        with self._lock:
            fail = arrival <= self.faults.fail_first or (
                self.faults.fail_rate > 0 and self._random.random() < self.faults.fail_rate
            )
            if fail:
                self.counters["injected_failures"] += 1
        if not fail:
            return None
        if self.faults.retry_after_s is not None:
            return 429, {"msg": "too many requests (injected)"}, {"Retry-After": f"{self.faults.retry_after_s:g}"}
        return 503, {"msg": "service unavailable (injected)"}, {}

    def count(self, counter: str) -> None:
        with self._lock:
            self.counters[counter] += 1

    def authorized(self, task_id: str, key: str) -> bool:
        """Whether ``key`` is the Secret-Key of ``task_id``."""
        with self._lock:
            row = self._db.execute("SELECT secret_key FROM task WHERE id = ?", (task_id,)).fetchone()
        ok = row is not None and hmac.compare_digest(row[0].encode(), key.encode())
        if not ok:
            self.count("unauthorized")
        return ok

    def known_key(self, key: str) -> bool:
        """Whether ``key`` is some task's Secret-Key (checked before a request body is read)."""
        with self._lock:
            keys = [k for (k,) in self._db.execute("SELECT secret_key FROM task").fetchall()]
        ok = bool(key) and any(hmac.compare_digest(k.encode(), key.encode()) for k in keys)
        if not ok:
            self.count("unauthorized")
        return ok

    def bearer_accepted(self, token: str) -> bool:
        """Whether a read's ``Authorization: Bearer`` token is accepted (any, when no token is set)."""
        if not token:
            return False
        return self.token is None or hmac.compare_digest(self.token.encode(), token.encode())

    # --- idempotency ---------------------------------------------------------------------------------

    def replay(self, key: str, endpoint: str) -> Optional[Tuple[int, Dict[str, Any]]]:
        if not key:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT status, body FROM idempotency WHERE key = ? AND endpoint = ?", (key, endpoint)
            ).fetchone()
            if row is not None:
                self.counters["duplicates"] += 1
        return None if row is None else (row[0], json.loads(row[1]))

    def _remember(self, key: str, endpoint: str, status: int, body: Dict[str, Any]) -> None:
        if key:
            self._db.execute(
                "INSERT OR IGNORE INTO idempotency (key, endpoint, status, body) VALUES (?, ?, ?, ?)",
                (key, endpoint, status, json.dumps(body)),
            )

    # --- writes --------------------------------------------------------------------------------------

    def add_intermediate(self, task_id: str, metric: float, key: str) -> Dict[str, Any]:
        body = {"msg": "intermediate metric reported"}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO intermediate_metric (id, train_task_id, metric, reported_at) VALUES (?, ?, ?, ?)",
                (_new_id("METR"), task_id, metric, _now_text()),
            )
            self._remember(key, "intermediate_metric", 200, body)
            self._db.execute("COMMIT")
        return body

    def set_final(self, task_id: str, metric: float, key: str) -> Dict[str, Any]:
        body = {"msg": "final metric reported"}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "UPDATE task SET final_metric = ?, final_reported_at = ? WHERE id = ?", (metric, _now_text(), task_id)
            )
            self._remember(key, "final_metric", 200, body)
            self._db.execute("COMMIT")
        return body

    def set_state(self, task_id: str, state: int, key: str) -> Dict[str, Any]:
        body = {"msg": "state updated", "state": state}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE task SET state = ? WHERE id = ?", (state, task_id))
            self._db.execute(
                "INSERT INTO state_change (train_task_id, state, reported_at) VALUES (?, ?, ?)",
                (task_id, state, _now_text()),
            )
            self._remember(key, "state", 200, body)
            self._db.execute("COMMIT")
        return body

    def heartbeat(self, task_id: str) -> Dict[str, Any]:
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE task SET last_heartbeat = ? WHERE id = ?", (now, task_id))
            self._db.execute("INSERT INTO heartbeat (train_task_id, reported_at) VALUES (?, ?)", (task_id, _now_text(now)))
        return {"msg": "alive"}

    def known_task(self, task_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM task WHERE id = ?", (task_id,)).fetchone() is not None

    def add_logs(self, task_id: str, text: str) -> Dict[str, Any]:
        """A local task's shipped output: each line of ``text`` becomes a log row (a last line without its
        newline too, as the platform stores each upload)."""
        lines = text.split("\n")
        if lines and lines[-1] == "" and len(lines) > 1:
            lines.pop()
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO task_log (train_task_id, offset_ms, text) VALUES (?, ?, ?)",
                                 [(task_id, now_ms, line) for line in lines])
            self._db.execute("COMMIT")
        return {"msg": "logs uploaded"}

    def set_catch(self, task_id: str, key: str, value: int) -> Dict[str, Any]:
        with self._lock:
            self._db.execute(
                "INSERT INTO local_task_catch (train_task_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(train_task_id, key) DO UPDATE SET value = excluded.value", (task_id, key, value))
        return {"msg": "catch updated", key: value}

    def catch(self, task_id: str) -> Dict[str, Any]:
        """A local task's log offsets: ``{"output_cache_pointer": n, "error_cache_pointer": n}`` (0 when unset)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM local_task_catch WHERE train_task_id = ?", (task_id,)).fetchall())
        return {key: int(rows.get(key, 0)) for key in CATCH_KEYS}

    def detail(self, task_id: str) -> List[Dict[str, Any]]:
        """``GET /train_task/query``'s answer as the SDK's ``TrainTask.get_detail`` reads it (its ``stream_log``
        polls it to learn the task ended); the fields the emulator does not keep are empty, the key is never sent."""
        with self._lock:
            row = self._db.execute("SELECT state FROM task WHERE id = ?", (task_id,)).fetchone()
        empty = ("description", "creator_id", "project_id", "algorithm_id", "algorithm_git_ref", "files", "results_id",
                 "secret_key", "create_time", "finish_time", "entrypoint", "output", "mirror_id", "envs")
        return [{"id": task_id, "name": task_id, "state": row[0] if row else None, "args": "{}", "is_local": 1,
                 "resource_request": "[]", **dict.fromkeys(empty)}]

    def logs(self, task_id: str, limit: int, direction: str, offset_index: int) -> List[Dict[str, Any]]:
        """The SDK's ``get_log`` answer: ``init`` gives the newest ``limit`` lines newest first, ``back`` the
        lines after the row ``offset_index`` oldest first."""
        with self._lock:
            if direction == "back":
                rows = self._db.execute(
                    "SELECT seq, offset_ms, text FROM task_log WHERE train_task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (task_id, offset_index, limit)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT seq, offset_ms, text FROM task_log WHERE train_task_id = ? ORDER BY seq DESC LIMIT ?",
                    (task_id, limit)).fetchall()
        return [{"offset": ms, "offset_index": seq, "text": text} for seq, ms, text in rows]

    # --- reads ---------------------------------------------------------------------------------------

    def intermediate(self, task_id: str, last_timestamp: str = "") -> List[Dict[str, Any]]:
        """The contract's list answer, in arrival order, after ``last_timestamp``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, metric, train_task_id, reported_at FROM intermediate_metric "
                "WHERE train_task_id = ? AND reported_at > ? ORDER BY seq",
                (task_id, last_timestamp or ""),
            ).fetchall()
        return [{"id": r[0], "metric": r[1], "train_task_id": r[2], "reported_at": _public_time(r[3])} for r in rows]

    def final(self, task_id: str) -> Dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT final_metric FROM task WHERE id = ?", (task_id,)).fetchone()
        return {"final_metric": row[0] if row else None, "id": task_id, "name": task_id}

    def tasks(self) -> List[Dict[str, Any]]:
        """Every task with its state, metrics, state history and heartbeats (the page and tests read it)."""
        with self._lock:
            tasks = self._db.execute(
                "SELECT id, state, final_metric, last_heartbeat FROM task ORDER BY id"
            ).fetchall()
            result = []
            for task_id, state, final_metric, last_heartbeat in tasks:
                metrics = self._db.execute(
                    "SELECT metric, reported_at FROM intermediate_metric WHERE train_task_id = ? ORDER BY seq",
                    (task_id,),
                ).fetchall()
                states = self._db.execute(
                    "SELECT state FROM state_change WHERE train_task_id = ? ORDER BY seq", (task_id,)
                ).fetchall()
                beats = self._db.execute(
                    "SELECT COUNT(*) FROM heartbeat WHERE train_task_id = ?", (task_id,)
                ).fetchone()[0]
                log_tail = self._db.execute(
                    "SELECT text FROM task_log WHERE train_task_id = ? ORDER BY seq DESC LIMIT ?", (task_id, LOG_TAIL_LINES)
                ).fetchall()
                result.append({
                    "id": task_id,
                    "state": state,
                    "state_name": STATE_NAMES.get(state, str(state)),
                    "final_metric": final_metric,
                    "intermediate_metrics": [m for m, _ in metrics],
                    "reported_at": [_public_time(t) for _, t in metrics],
                    "states": [s for (s,) in states],
                    "heartbeats": beats,
                    "last_heartbeat": last_heartbeat,
                    "log_tail": [t for (t,) in reversed(log_tail)],
                })
        return result

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {**self.counters, "posts": self.posts_seen, "post_times": list(self.post_times)}

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
        cookie = cookies.get(TOKEN_COOKIE)
        return cookie is not None and self.backend.bearer_accepted(unquote(cookie.value))

    def _page(self, query: Dict[str, str]) -> None:
        """The page; ``?token=T`` (a browser cannot send a bearer header) sets the cookie, then redirects to
        the page without the token in its address, so it stays out of history and bookmarks."""
        from .page import render_page

        if "token" in query and self.backend.token is not None:
            if not self.backend.bearer_accepted(query["token"]):
                self.backend.count("unauthorized")
                return self._send(401, b"wrong token\n", content_type="text/plain; charset=utf-8")
            cookie = f"{TOKEN_COOKIE}={quote(query['token'], safe='')}; HttpOnly; SameSite=Strict; Path=/"
            return self._send(303, b"", {"Location": "/", "Set-Cookie": cookie}, content_type="text/plain")
        if not self._dev_read_authorized():
            self.backend.count("unauthorized")
            return self._send(401, b"this emulator has a token: open /?token=YOUR_TOKEN once (it sets a cookie)\n",
                              {"WWW-Authenticate": 'Bearer realm="anylearn-devserver"'}, content_type="text/plain; charset=utf-8")
        return self._send(200, render_page(self.backend.tasks()).encode(), content_type="text/html; charset=utf-8")

    _unread_body = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.backend.count("requests")
        self._unread_body = False
        if self._body_length() is None:
            return
        path, query = self._route()
        if path == "/":
            return self._page(query)
        if path.startswith("/_dev/") and not self._dev_read_authorized():
            self.backend.count("unauthorized")
            return self._answer(401, {"msg": "this emulator has a token: send Authorization: Bearer <token>"})
        if path == "/_dev/tasks":
            return self._send(200, self.backend.tasks())
        if path == "/_dev/stats":
            return self._send(200, self.backend.stats())
        if path in ("/train_task/local_task_catch", "/train_task/logs", "/train_task/query"):  # a local task's agent, the SDK's readers
            task_id = query.get("id", "")
            if not self._bearer_authorized():
                return self._answer(401, {"msg": "invalid or missing bearer token"})
            if not self.backend.known_task(task_id):
                return self._answer(400, {"msg": f"no such task: {task_id!r}"})
            if path.endswith("local_task_catch"):
                return self._answer(200, self.backend.catch(task_id))
            if path.endswith("query"):
                return self._answer(200, self.backend.detail(task_id))
            try:
                limit, offset_index = int(query.get("limit", "100")), int(query.get("offset_index", "-1"))
            except ValueError:
                return self._answer(400, {"msg": "limit and offset_index must be whole numbers"})
            return self._answer(200, self.backend.logs(task_id, max(0, min(limit, 10000)), query.get("direction", "init"), offset_index))
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
        self.backend.count("requests")
        self._unread_body = False
        path, _ = self._route()
        if path not in ("/train_task/heartbeat", "/train_task/local_logs", "/train_task/local_task_catch"):
            self.close_connection = True  # the body is not read
            return self._send(404, {"msg": f"no such endpoint: PATCH {path}"})
        arrival = self.backend.note_post()
        length = self._body_length()
        if length is None:
            return
        if not self._bearer_authorized():
            return self._answer(401, {"msg": "invalid or missing bearer token"})
        form = self._form(length)
        failure = self.backend.injected_failure(arrival)
        if failure is not None:
            return self._send(failure[0], failure[1], failure[2])
        task_id = form.get("train_task_id" if path.endswith("heartbeat") else "id", "")
        if not self.backend.known_task(task_id):
            return self._send(400, {"msg": f"no such task: {task_id!r}"})
        if path.endswith("heartbeat"):
            return self._send(200, self.backend.heartbeat(task_id))
        if path.endswith("local_logs"):
            return self._send(200, self.backend.add_logs(task_id, form.get("logs", "")))
        key, value = form.get("key", ""), form.get("value", "")
        if key not in CATCH_KEYS or not value.isdigit():
            return self._send(400, {"msg": f"key must be one of {list(CATCH_KEYS)} and value a byte offset"})
        return self._send(200, self.backend.set_catch(task_id, key, int(value)))


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
    ) -> None:
        self.backend = Backend(tasks, db_path, faults, token)
        # StreamRequestHandler.timeout: every socket read (request line, headers, body) waits at most this
        handler = type("Handler", (_Handler,), {"backend": self.backend, "quiet": quiet, "timeout": idle_timeout_s})
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
                  token: Optional[str] = None, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> int:
    """The ``serve`` command: serve until SIGTERM or Ctrl-C."""
    import signal

    from ..config import ENV_AUTH_TOKEN, ConfigError

    try:
        server = DevServer(tasks, host=host, port=port, db_path=db_path, faults=faults, quiet=not verbose,
                           token=token, idle_timeout_s=idle_timeout_s)
    except sqlite3.Error as exc:  # before listening: the database comes first
        raise ConfigError(f"cannot open --db {db_path}: {exc}; give a file in a directory that exists and you can write") from None
    except (OSError, OverflowError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                          "choose another --host or --port") from None

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"AnyLearn backend emulator at {server.base_url} (page: {server.origin}/)", flush=True)
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
    return 0


def make_server(tasks: Mapping[str, str], **kwargs: Any) -> DevServer:
    """The public factory: a :class:`DevServer` for ``tasks`` (task id -> secret key), not yet started."""
    return DevServer(tasks, **kwargs)
