"""HTTP to the AnyLearn backend: one record per request, answers classified, the request and retry policy
in one place.

Every request the product makes (records, heartbeats, ``doctor``'s check) goes through
:meth:`BackendClient.request`: one keep-alive connection from the standard library's ``http.client`` (through
the environment's proxy, with its CA bundle), no redirect ever followed, a total deadline, the key only in
the ``Secret-Key`` header and only to the configured backend. ``tenacity`` loads on the first failure only;
``import reporter`` loads none of this.
"""

from __future__ import annotations

import enum
import functools
import http.client
import json
import math
import os
import re
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Tuple, TypeVar, runtime_checkable
from urllib.parse import quote, quote_plus, unquote, urlencode, urlsplit

from .config import DEFAULT_REQUEST_TIMEOUT_S, Config, Secret
from .journal import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE, Record

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
UNSUPPORTED_STATUSES = frozenset({404, 405})
ENDPOINTS = {
    KIND_INTERMEDIATE: "train_task/intermediate_metric",
    KIND_FINAL: "train_task/final_metric",
    KIND_STATE: "train_task/state",
}
HEARTBEAT_ENDPOINT = "train_task/heartbeat"  # POST with the Secret-Key; PATCH with a user's token (local tasks)
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
USER_AGENT = "anylearn-reporter"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
# The backoff: exponential with full jitter from INITIAL_BACKOFF_S, each wait capped at MAX_BACKOFF_S.
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 3600.0
REDACTED = "***"  # what a key echoed by the backend reads as
MAX_ANSWER_BYTES = 1 << 20  # an answer body longer than this is cut (and its connection not reused)
IDLE_CHECK_S = 1.0  # a keep-alive connection idle this long is checked before reuse


class Outcome(enum.Enum):
    """What became of one request that got a final answer."""

    DELIVERED = "delivered"
    REJECTED = "rejected"  # a permanent 4xx: the record goes to rejected.jsonl
    AUTH = "auth"  # 401/403: delivery pauses for the run
    UNSUPPORTED = "unsupported"  # 404/405 on an optional endpoint (state, heartbeat)
    REDIRECT = "redirect"  # a 3xx: never followed (the key would go along); delivery pauses like AUTH
    SETUP = "setup"  # no request can be made as configured (an unsupported proxy): delivery pauses like AUTH


class SendResult(NamedTuple):
    """A final answer: the outcome, the HTTP status and the backend's reason in its own words."""

    outcome: Outcome
    status: int
    reason: str = ""


@functools.lru_cache(maxsize=4)  # one key per client: made once, not per answer
def secret_forms(secret: str) -> Tuple[str, ...]:
    """Every form a key can take when a backend echoes it, longest first: as sent, percent-encoded
    (``quote`` and ``quote_plus``, upper- and lower-case hex), JSON-escaped (``ensure_ascii`` or not, ``/``
    escaped or not), and its UTF-8 bytes read as Latin-1 (how ``http.client`` decodes a header)."""
    forms = {secret}
    for safe in ("", "/"):
        forms.add(quote(secret, safe=safe, errors="surrogatepass"))
        forms.add(quote_plus(secret, safe=safe, errors="surrogatepass"))
    for escaped in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        forms.update((escaped, escaped.replace("/", "\\/")))
    forms.update({re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), form) for form in forms}
                 | {re.sub(r"\\u[0-9a-f]{4}", lambda m: m.group().upper().replace("\\U", "\\u"), form) for form in forms})
    forms.update({form.encode("utf-8", "surrogatepass").decode("latin-1") for form in forms})
    return tuple(sorted((form for form in forms if form), key=len, reverse=True))


class Answer:
    """An HTTP answer as received: status, headers (looked up case-insensitively) and body."""

    __slots__ = ("_forms", "_headers", "body", "reason", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes = b"", reason: str = "",
                 secret: Optional[str] = None, also_secret: Optional[str] = None) -> None:
        # A backend may echo the key it was sent (a 401 saying "invalid key ..."): with ``secret`` (and
        # ``also_secret``, a user's token) given, every copy of them in the status text, headers and body, in
        # every form they take on the wire, is masked here, before anything can log, count or write it.
        self._forms = tuple(sorted({form for one in (secret, also_secret) if one for form in secret_forms(one)}, key=len, reverse=True))
        self.status = status
        self.reason = self.redacted(reason)
        self.body = body
        for form in self._forms:
            form_bytes = form.encode("utf-8", "surrogatepass")
            if form_bytes in self.body:
                self.body = self.body.replace(form_bytes, REDACTED.encode())
        self._headers = {str(k).lower(): self.redacted(str(v)) for k, v in headers.items()}

    def redacted(self, text: str) -> str:
        """``text`` with the key and token masked in every form they take on the wire (see :func:`secret_forms`)."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def header(self, name: str) -> Optional[str]:
        """The value of header ``name``, or None."""
        return self._headers.get(name.lower())

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError (or RecursionError on absurd nesting) when it is not."""
        return json.loads(self.body.decode("utf-8", "replace"))

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class TransientError(Exception):
    """A failure worth retrying: connection trouble, a timeout, or a retryable status."""

    def __init__(self, reason: str, *, status: Optional[int] = None, retry_after_s: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


# --- answers ---------------------------------------------------------------------------------------


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Parse ``Retry-After``: delta-seconds or an HTTP date, as seconds from now (0 for the past).

    None when absent or unreadable (garbage, NaN): the caller then ignores it. Never raises.
    """
    if not value or not isinstance(value, str):
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            import email.utils  # only for a date: rare, and not worth its import time up front

            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except Exception:  # the date parser raises several kinds on garbage (TypeError, ValueError, IndexError...)
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def location_host(location: Optional[str]) -> str:
    """The host (and port) a ``Location`` header names, printable and short; never the rest of the URL
    (which may hold credentials or tokens)."""
    if not location:
        return "no Location given"
    try:
        parts = urlsplit(location.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "an unreadable Location"
    if not host:
        return "the same host (a relative Location)"
    shown = "".join(c if c.isprintable() and c not in " \t" else "?" for c in host)[:100]
    return f"{shown}:{port}" if port else shown


def _reason_of(answer: Answer) -> str:
    try:
        body = answer.json()
        if isinstance(body, dict) and body.get("msg"):
            return answer.redacted(str(body["msg"]))[:200]
    except Exception:  # not JSON, too deep to parse: fall back to the text
        pass
    text = answer.body[:400].decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:200] or str(answer.reason or "")[:200] or f"HTTP {answer.status}"


def classify(answer: Answer, *, optional_endpoint: bool = False) -> SendResult:
    """Turn an HTTP answer into a :class:`SendResult`, or raise :class:`TransientError` to retry it.

    Any status, headers and body give one of the two; nothing else is ever raised.
    """
    status = answer.status
    if not isinstance(status, int):
        raise TransientError(f"an answer without a readable status ({status!r:.40})")
    if 200 <= status < 300:
        try:
            body = answer.json()
        except Exception:
            body = None
        if not isinstance(body, dict):  # a 204, an empty or a non-JSON 200: stored all the same; resending would store it again
            return SendResult(Outcome.DELIVERED, status, f"HTTP {status} with an answer that is not a JSON object")
        return SendResult(Outcome.DELIVERED, status)
    if 300 <= status < 400:
        return SendResult(Outcome.REDIRECT, status, f"redirect to {location_host(answer.header('Location'))}")
    if status in RETRYABLE_STATUSES:
        raise TransientError(
            f"HTTP {status} {_reason_of(answer)}", status=status, retry_after_s=retry_after_seconds(answer.header("Retry-After")),
        )
    if status in AUTH_STATUSES:
        return SendResult(Outcome.AUTH, status, _reason_of(answer))
    if optional_endpoint and status in UNSUPPORTED_STATUSES:
        return SendResult(Outcome.UNSUPPORTED, status, _reason_of(answer))
    if 400 <= status < 500:
        return SendResult(Outcome.REJECTED, status, _reason_of(answer))
    raise TransientError(f"HTTP {status} {_reason_of(answer)}", status=status)


# --- where to connect ------------------------------------------------------------------------------


class ConnectionSettings(NamedTuple):
    """What the environment says about reaching ``base_url``: a proxy URL (or None) and a CA bundle."""

    proxy: Optional[str]
    ca_bundle: Optional[str]


def connection_settings(base_url: str, env: Optional[Mapping[str, str]] = None) -> ConnectionSettings:
    """The proxy (``<scheme>_proxy`` / ``ALL_PROXY``, lower case first, ``NO_PROXY`` honoured) and the CA
    bundle (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, else certifi's, else the system's) for ``base_url``,
    read once per client, the way ``requests`` reads them."""
    env = os.environ if env is None else env
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    proxy = None
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if env.get(name, "").strip():
            proxy = env[name].strip()
            break
    if proxy and _bypasses_proxy(parts.hostname or "", parts.port, env.get("no_proxy") or env.get("NO_PROXY") or ""):
        proxy = None
    ca_bundle = env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or None
    if ca_bundle is None and scheme == "https":
        try:
            import certifi  # requests' own default; present wherever requests is

            ca_bundle = certifi.where()
        except ImportError:
            ca_bundle = None
    return ConnectionSettings(proxy, ca_bundle)


def proxy_problem(settings: ConnectionSettings) -> Optional[str]:
    """Why no request can go through the configured proxy (a scheme this client does not speak), or None."""
    if not settings.proxy:
        return None
    scheme = settings.proxy.split("://", 1)[0].lower() if "://" in settings.proxy else "http"
    if scheme != "http":
        return (f"the proxy is a {scheme}:// URL and only http:// proxies are supported: "
                "unset the proxy variable (ALL_PROXY, HTTPS_PROXY, ...) or give an http:// proxy")
    return None


def _bypasses_proxy(host: str, port: Optional[int], no_proxy: str) -> bool:
    host = host.lower()
    for entry in (e.strip().lower() for e in no_proxy.replace(" ", ",").split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:  # a CIDR block, for IP hosts
            try:
                import ipaddress

                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name, _, entry_port = entry.partition(":")
        if entry_port and port is not None and entry_port != str(port):
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


# --- the transport ---------------------------------------------------------------------------------


class _Watchdog:
    """Holds one request at a time to a total deadline (connect, send and the whole answer).

    Socket timeouts bound each read, so a backend that dribbles one byte at a time holds a request for
    ever. A daemon thread looks at the armed deadline every ``granularity_s`` (no wake-up call on the
    request path: arming is one attribute store) and, past it, shuts down the connection's socket; the
    blocked read or write then fails at once.
    """

    def __init__(self, timeout_s: float, current_socket: Callable[[], Optional[socket.socket]]) -> None:
        self.granularity_s = max(0.02, min(1.0, timeout_s / 10))
        self.deadline: Optional[float] = None
        self.fired = False
        self._current_socket = current_socket
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()

    def arm(self, timeout_s: float) -> None:
        if self._thread is None or self._pid != os.getpid():  # a forked child starts its own
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._watch, name="anylearn-reporter-deadline", daemon=True)
            self._thread.start()
        self.fired = False
        self.deadline = time.monotonic() + timeout_s

    def disarm(self) -> bool:
        """Stop watching; True when the deadline passed during the request."""
        self.deadline = None
        return self.fired

    def _watch(self) -> None:
        while not self._closed.wait(self.granularity_s):
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self.fired = True
                self.deadline = None
                sock = self._current_socket()
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def close(self) -> None:
        self._closed.set()


def _create_connection(address: Tuple[Any, int], *args: Any, **kwargs: Any) -> socket.socket:
    """``socket.create_connection`` with an ASCII host name given as bytes: a ``str`` host makes
    ``getaddrinfo`` load the ``idna`` codec (with ``stringprep`` and ``unicodedata``), dozens of system
    calls that a GIL-bound training thread would have to hand the interpreter over for."""
    host, port = address
    if isinstance(host, str) and host.isascii():
        host = host.encode("ascii")
    return socket.create_connection((host, port), *args, **kwargs)


class _OneSend:
    """``http.client`` sends a request's head and body in two ``send`` calls, so two packets and two reads
    by the server; this collects both and sends them at once (``send`` is the public hook for it)."""

    _held: Optional[List[bytes]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._create_connection = _create_connection  # http.client's own hook (an instance attribute)

    def send(self, data: Any) -> None:
        if self._held is not None and isinstance(data, bytes):
            self._held.append(data)
        else:
            super().send(data)  # type: ignore[misc]

    def request_in_one_send(self, method: str, url: str, body: Optional[bytes], headers: Dict[str, str]) -> None:
        self._held = []
        try:
            self.request(method, url, body=body, headers=headers)  # type: ignore[attr-defined]
            data = b"".join(self._held)
        finally:
            self._held = None
        self.send(data)


class _HTTPConnection(_OneSend, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_OneSend, http.client.HTTPSConnection):
    pass


class _Connection:
    """One keep-alive connection to the backend, direct or through an HTTP proxy (CONNECT for https)."""

    def __init__(self, base_url: str, settings: ConnectionSettings) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.path = parts.path.rstrip("/")
        self.settings = settings
        self.proxy_headers: Dict[str, str] = {}
        self.proxy: Optional[Tuple[str, int]] = None
        if settings.proxy:
            proxy = urlsplit(settings.proxy if "://" in settings.proxy else "http://" + settings.proxy)
            if proxy.scheme.lower() != "http":
                raise TransientError(f"only http:// proxies are supported, not {proxy.scheme}:// (unset the proxy variable)")
            self.proxy = (proxy.hostname or "", proxy.port or 8080)
            if proxy.username is not None:
                import base64

                token = base64.b64encode(f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()).decode()
                self.proxy_headers["Proxy-Authorization"] = f"Basic {token}"
        self.conn: Any = None  # an _HTTPConnection or _HTTPSConnection
        self.reused = False  # the current request went out on a connection that had served one before
        self.last_used = 0.0

    def target(self, endpoint: str, query: str) -> str:
        path = f"{self.path}/{endpoint}" + (f"?{query}" if query else "")
        if self.proxy and self.scheme == "http":  # absolute form through a plain proxy
            host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal keeps its brackets
            return f"http://{host}:{self.port}{path}"
        return path

    def socket(self) -> Optional[socket.socket]:
        conn = self.conn
        return None if conn is None else conn.sock

    def open(self, connect_timeout_s: float, read_timeout_s: float) -> Any:
        """The live connection, (re)connected when there is none or the server closed it while idle.

        The look at an idle connection (a ``poll``) is made after ``IDLE_CHECK_S`` only: a system call
        less per request in a busy stream. A connection the server closed sooner fails at once and is
        replaced (see :meth:`BackendClient.request`)."""
        conn = self.conn
        if conn is not None and conn.sock is not None:
            self.reused = True
            if time.monotonic() - self.last_used < IDLE_CHECK_S or not _dropped(conn.sock):
                return conn
        self.reused = False
        self.close()
        host, port = self.proxy or (self.host, self.port)
        if self.scheme == "https":
            conn = _HTTPSConnection(host, port, timeout=connect_timeout_s, context=_tls_context(self.settings.ca_bundle))
            if self.proxy:
                conn.set_tunnel(self.host, self.port, headers=self.proxy_headers)
        else:
            conn = _HTTPConnection(host, port, timeout=connect_timeout_s)
        self.conn = conn
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(read_timeout_s)
        return conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


def _dropped(sock: socket.socket) -> bool:
    """True when the server closed an idle keep-alive connection (it reads as EOF or as unexpected data)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us (fileno -1)
        return True


_tls_contexts: Dict[Optional[str], Any] = {}


def _tls_context(ca_bundle: Optional[str]) -> Any:
    context = _tls_contexts.get(ca_bundle)
    if context is None:
        import ssl

        if ca_bundle and os.path.isdir(ca_bundle):
            context = ssl.create_default_context(capath=ca_bundle)
        else:
            context = ssl.create_default_context(cafile=ca_bundle)
        _tls_contexts[ca_bundle] = context
    return context


class BackendClient:
    """Sends requests for one task over one keep-alive connection. Knows nothing of journals or threads.

    Every request follows one policy: never follow a redirect (``http.client`` does not), a total deadline
    of ``request_timeout_s`` (connect, send and the whole answer), the key only in the ``Secret-Key`` header,
    a user's token (a local task's) only in ``Authorization: Bearer``, both only to ``base_url``. One thread at
    a time uses a client.
    """

    def __init__(
        self,
        base_url: str,
        task_id: str,
        secret_key: Optional[Secret],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        env: Optional[Mapping[str, str]] = None,
        auth_token: Optional[Secret] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.task_id = task_id
        self._secret_key = secret_key
        self._auth_token = auth_token
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s
        self.settings = connection_settings(self.base_url, env)
        self.setup_problem = proxy_problem(self.settings)  # said as a pause, not retried for ever
        self._connection: Optional[_Connection] = None
        self._watchdog = _Watchdog(self.request_timeout_s, self._current_socket)
        self.has_secret_key = bool(secret_key)

    @classmethod
    def from_config(cls, config: Config, *, request_timeout_s: Optional[float] = None,
                    with_token: bool = False) -> "BackendClient":
        """The client for ``config``'s backend, task and key, with its request timeout (or the shorter
        ``request_timeout_s``); ``with_token`` adds a local task's user token (heartbeats, log shipping)."""
        timeout_s = config.request_timeout_s if request_timeout_s is None else min(config.request_timeout_s, request_timeout_s)
        return cls(config.backend_url or "", config.task_id or "", config.secret_key, request_timeout_s=timeout_s,
                   auth_token=config.auth_token if with_token else None)

    def _current_socket(self) -> Optional[socket.socket]:
        connection = self._connection
        return None if connection is None else connection.socket()

    def request(self, method: str, endpoint: str, *, form: Optional[Mapping[str, str]] = None,
                params: Optional[Mapping[str, str]] = None, headers: Optional[Dict[str, str]] = None,
                timeout_s: Optional[float] = None, body: Optional[bytes] = None) -> Answer:
        """One request to ``base_url/endpoint`` under the client's policy; :class:`TransientError` on any
        failure to get a whole answer (connection trouble, a timeout, the total deadline)."""
        all_headers = {"User-Agent": USER_AGENT}
        if headers:
            all_headers.update(headers)
        if form is not None:
            body = urlencode(form).encode()
        if body is not None:
            all_headers["Content-Type"] = FORM_CONTENT_TYPE
        if self._secret_key:
            all_headers["Secret-Key"] = self._secret_key.reveal()
        if self._auth_token:
            all_headers["Authorization"] = "Bearer " + self._auth_token.reveal()
        total = self.request_timeout_s if timeout_s is None else max(0.05, min(self.request_timeout_s, timeout_s))
        read_timeout = min(self.read_timeout_s, total)
        self._watchdog.arm(total)
        connect_timeout = min(self.connect_timeout_s, read_timeout)
        try:
            try:
                return self._exchange(method, endpoint, params, all_headers, body, connect_timeout, read_timeout)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection = self._connection
                if connection is None or not connection.reused or self._watchdog.fired:
                    raise
                # The server had closed the kept-alive connection: once more on a new one (the
                # Idempotency-Key makes a repeat harmless).
                self._drop_connection()
                return self._exchange(method, endpoint, params, all_headers, body, connect_timeout, read_timeout)
        except TransientError:
            self._drop_connection()
            raise
        except Exception as exc:  # whatever the socket, TLS or HTTP layers raise: a transient failure
            self._drop_connection()
            if self._watchdog.fired:
                raise TransientError(f"no whole answer within the request deadline of {total:g} s") from None
            raise TransientError(_describe(exc, self.base_url)) from None
        finally:
            self._watchdog.disarm()

    def _exchange(self, method: str, endpoint: str, params: Optional[Mapping[str, str]], headers: Dict[str, str],
                  body: Optional[bytes], connect_timeout_s: float, read_timeout_s: float) -> Answer:
        connection = self._connection
        if connection is None:
            connection = self._connection = _Connection(self.base_url, self.settings)
        if connection.proxy and connection.scheme == "http":
            headers.update(connection.proxy_headers)  # a plain proxy reads the request itself
        conn = connection.open(connect_timeout_s, read_timeout_s)
        conn.request_in_one_send(method, connection.target(endpoint, urlencode(params) if params else ""), body, headers)
        response = conn.getresponse()
        content = response.read(MAX_ANSWER_BYTES)
        if self._watchdog.fired:  # a socket shut down mid-answer can still parse as a (truncated) answer
            raise TransientError(f"no whole answer within the request deadline of {self.request_timeout_s:g} s")
        if response.will_close or not response.isclosed():
            connection.close()  # the server ends the connection, or the answer was longer than we read
        connection.last_used = time.monotonic()
        secret = self._secret_key.reveal() if self._secret_key else None
        token = self._auth_token.reveal() if self._auth_token else None
        return Answer(response.status, dict(response.getheaders()), content, response.reason, secret=secret, also_secret=token)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def send(self, record: Record, timeout_s: Optional[float] = None) -> SendResult:
        """POST one journal record to its endpoint; raise :class:`TransientError` to have it retried."""
        if self.setup_problem:
            return SendResult(Outcome.SETUP, 0, self.setup_problem)
        kind = record.kind
        # Form-encoded: a repr such as 1e+16 would read as "1e 16" (a "+" is a space in a form).
        form = {"id": self.task_id, "state" if kind == KIND_STATE else "metric": repr(record.value)}
        answer = self.request("POST", ENDPOINTS[kind], form=form, timeout_s=timeout_s,
                              headers={"Idempotency-Key": record.key})
        return classify(answer, optional_endpoint=kind == KIND_STATE)

    def heartbeat(self, timeout_s: Optional[float] = None) -> SendResult:
        """A heartbeat for the task: with a user's token in the SDK agent's shape (PATCH, form
        ``train_task_id``), else POST with the key; raise :class:`TransientError` on a passing failure."""
        if self.setup_problem:
            return SendResult(Outcome.SETUP, 0, self.setup_problem)
        if self._auth_token:
            answer = self.request("PATCH", HEARTBEAT_ENDPOINT, form={"train_task_id": self.task_id}, timeout_s=timeout_s)
        else:
            answer = self.request("POST", HEARTBEAT_ENDPOINT, form={"id": self.task_id}, timeout_s=timeout_s)
        return classify(answer, optional_endpoint=True)

    def read_final_metric(self, timeout_s: Optional[float] = None) -> Answer:
        """GET the task's final metric: an authenticated read that changes nothing (``doctor``'s check)."""
        return self.request("GET", ENDPOINTS[KIND_FINAL], params={"id": self.task_id}, timeout_s=timeout_s)

    def close(self) -> None:
        self._watchdog.close()
        self._drop_connection()


def _describe(exc: BaseException, base_url: str) -> str:
    """A short reason for a failed exchange, naming the class and the OS's words, never a header."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {base_url} ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {base_url} (ConnectionRefusedError: {exc.strerror})"
    if isinstance(exc, OSError):
        return f"connection to {base_url} failed ({type(exc).__name__}: {exc.strerror or exc})"[:300]
    if isinstance(exc, http.client.HTTPException):
        return f"unreadable answer from {base_url} ({type(exc).__name__})"
    return f"request failed ({type(exc).__name__})"


# --- the retry policy ------------------------------------------------------------------------------


class wait_retry_after_or:
    """Wait what ``fallback`` says, longer when the server's ``Retry-After`` asks for longer; never more
    than ``max_wait_s``."""

    def __init__(self, fallback: Callable[[Any], float], max_wait_s: float) -> None:
        self.fallback = fallback
        self.max_wait_s = max_wait_s

    def __call__(self, retry_state: Any) -> float:
        wait = self.fallback(retry_state)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TransientError) and exc.retry_after_s is not None:
            wait = max(wait, exc.retry_after_s)  # a server may ask for longer, never for less
        return min(wait, self.max_wait_s)


def delivery_retrying(
    stop_event: threading.Event,
    *,
    initial_backoff_s: float = INITIAL_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    sleep: Optional[Callable[[float], Any]] = None,
    before_sleep: Optional[Callable[[Any], None]] = None,
) -> Any:
    """The retry policy (a ``tenacity.Retrying``): transient failures retried until ``stop_event`` is set,
    never busy-looping.

    Exponential backoff with full jitter capped at ``max_backoff_s``; a ``Retry-After`` longer than the
    backoff's own wait lengthens it (up to ``max_backoff_s``), a shorter one (0, negative, a past date) is
    ignored. The sleep is ``stop_event.wait`` by default, so shutting down interrupts a backoff.
    """
    import tenacity  # on the first failure only: a healthy run never pays for it

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        stop=tenacity.stop_when_event_set(stop_event),
        wait=wait_retry_after_or(tenacity.wait_random_exponential(multiplier=initial_backoff_s, max=max_backoff_s), max_backoff_s),
        sleep=sleep or stop_event.wait,  # type: ignore[arg-type]
        before_sleep=before_sleep,
        reraise=True,
    )


T = TypeVar("T")


class Retrier:
    """Runs an attempt; after a :class:`TransientError`, tenacity (loaded then) replays that failure as its
    first try, so the backoff and any ``Retry-After`` apply before the second request. Raises
    :class:`TransientError` only once ``stop`` is set.

    ``on_retry`` receives the exception before each backoff (never tenacity's ``retry_state``)."""

    def __init__(self, stop: threading.Event, *, initial_backoff_s: float = INITIAL_BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S, sleep: Optional[Callable[[float], Any]] = None) -> None:
        self.stop = stop
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._retrying: Any = None  # built on the first failure, then reused
        self._on_retry: Optional[Callable[[TransientError], None]] = None

    def call(self, attempt: Callable[[], T], on_retry: Callable[[TransientError], None]) -> T:
        """``attempt()``; after a transient failure, retried with backoff until it succeeds or ``stop`` is set."""
        try:
            return attempt()
        except TransientError as exc:
            failed = [exc]
        if self._retrying is None:
            self._retrying = delivery_retrying(
                self.stop, initial_backoff_s=self.initial_backoff_s, max_backoff_s=self.max_backoff_s,
                sleep=self._sleep, before_sleep=self._before_sleep,
            )
        self._on_retry = on_retry

        def replay_then_attempt() -> T:
            if failed:
                raise failed.pop()
            return attempt()

        return self._retrying(replay_then_attempt)

    def _before_sleep(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if self._on_retry is not None and isinstance(exc, TransientError):
            self._on_retry(exc)


@runtime_checkable
class RecordClient(Protocol):
    """What a sink needs of an AnyLearn client; ``tests/fakes.py``'s ``FakeClient`` satisfies it."""

    task_id: str
    base_url: str
    has_secret_key: bool  # for the pause message when the backend refuses

    def send(self, record: Record, timeout_s: Optional[float] = None) -> SendResult:
        """Send one record; raises :class:`TransientError` for a failure worth retrying."""
        ...

    def close(self) -> None:
        """Let the connection go."""
        ...


__all__: List[str] = [
    "Answer", "BackendClient", "ConnectionSettings", "Outcome", "RecordClient", "Retrier", "SendResult",
    "TransientError", "classify", "connection_settings", "delivery_retrying", "location_host", "retry_after_seconds",
]
