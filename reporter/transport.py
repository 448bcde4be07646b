"""One keep-alive HTTP connection from the standard library's ``http.client``: the environment's proxy
(read by ``urllib.request``'s own functions) and CA bundle, TLS, a total deadline per request, answers read
and bounded, secrets masked in what comes back. It knows no endpoint and no header of any backend: the
client (``client.py``) speaks the backend's API over it.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import SplitResult, quote, quote_plus, unquote, urlencode, urlsplit

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
REDACTED = "***"  # what a secret echoed by a server reads as
MAX_ANSWER_BYTES = 1 << 20  # an answer body longer than this is cut (and its connection not reused)
IDLE_CHECK_S = 1.0  # a keep-alive connection idle this long is checked before reuse


# --- answers ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)  # one secret per client: made once, not per answer
def secret_forms(secret: str) -> Tuple[str, ...]:
    """Every form a secret can take when a server echoes it, longest first: as sent, percent-encoded
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
                 redact: Sequence[Optional[str]] = ()) -> None:
        # A server may echo a secret it was sent (a 401 saying "invalid key ..."): every copy of the strings
        # in ``redact`` in the status text, headers and body, in every form they take on the wire, is masked
        # here, before anything can log, count or write it.
        self._forms = tuple(sorted({form for one in redact if one for form in secret_forms(one)}, key=len, reverse=True))
        self.status = status
        self.reason = self.redacted(reason)
        self.body = body
        for form in self._forms:
            form_bytes = form.encode("utf-8", "surrogatepass")
            if form_bytes in self.body:
                self.body = self.body.replace(form_bytes, REDACTED.encode())
        self._headers = {str(k).lower(): self.redacted(str(v)) for k, v in headers.items()}

    def redacted(self, text: str) -> str:
        """``text`` with the secrets masked in every form they take on the wire (see :func:`secret_forms`)."""
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


# --- where to connect ------------------------------------------------------------------------------


class ConnectionSettings(NamedTuple):
    """What the environment says about reaching ``base_url``: a proxy URL (or None) and a CA bundle."""

    proxy: Optional[str]
    ca_bundle: Optional[str]

    @property
    def problem(self) -> Optional[str]:
        """Why no request can go through the configured proxy (a scheme this client does not speak), or None."""
        if self.proxy and _proxy_url(self.proxy).scheme.lower() != "http":
            return (f"the proxy is a {_proxy_url(self.proxy).scheme.lower()}:// URL and only http:// proxies are "
                    "supported: unset the proxy variable (ALL_PROXY, HTTPS_PROXY, ...) or give an http:// proxy")
        return None

    @property
    def proxy_address(self) -> Optional[Tuple[str, int]]:
        """The proxy's (host, port), or None when the connection is direct."""
        if not self.proxy:
            return None
        proxy = _proxy_url(self.proxy)
        return (proxy.hostname or "", proxy.port or 8080)

    @property
    def proxy_headers(self) -> Dict[str, str]:
        """``Proxy-Authorization`` for a proxy URL with credentials (``http://user:password@host:port``)."""
        proxy = _proxy_url(self.proxy) if self.proxy else None
        if proxy is None or proxy.username is None:
            return {}
        import base64

        token = base64.b64encode(f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()).decode()
        return {"Proxy-Authorization": f"Basic {token}"}


def _proxy_url(proxy: str) -> SplitResult:
    return urlsplit(proxy if "://" in proxy else "http://" + proxy)


def connection_settings(base_url: str) -> ConnectionSettings:
    """The proxy (``<scheme>_proxy`` / ``all_proxy``, lower case first, ``no_proxy`` honoured, CIDR blocks
    too) and the CA bundle (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, else certifi's bundle, else the
    system's) for ``base_url``, read once per connection from the environment, as curl and requests read them.

    The proxy variables are read by the standard library's own functions; ``urllib.request`` is loaded only
    when some ``*_proxy`` variable is set (it costs milliseconds of CPU)."""
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    proxy = None
    if any(name[-6:].lower() == "_proxy" for name in os.environ):
        import urllib.request

        proxies = urllib.request.getproxies_environment()
        proxy = (proxies.get(scheme) or proxies.get("all") or "").strip() or None
        port = parts.port or (443 if scheme == "https" else 80)
        if proxy and _bypassed(parts.hostname or "", port, proxies.get("no", "")):
            proxy = None
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    if ca_bundle is None and scheme == "https":
        try:
            import certifi  # a runtime dependency: slim images may have no system store

            ca_bundle = certifi.where()
        except ImportError:
            ca_bundle = None
    return ConnectionSettings(proxy, ca_bundle)


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """``no_proxy`` covers ``host:port``: the standard library's matching (names, suffixes, ``*``, an
    entry's port), plus CIDR blocks for IP hosts, which it does not read."""
    import urllib.request

    host = host.lower()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if urllib.request.proxy_bypass_environment(target, {"no": no_proxy}):
        return True
    for entry in (e.strip() for e in no_proxy.split(",")):
        if "/" in entry:
            try:
                import ipaddress

                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
    return False


# --- the connection ---------------------------------------------------------------------------------


class _Watchdog:
    """Holds one request at a time to a total deadline (connect, send and the whole answer).

    Socket timeouts bound each read, so a backend that dribbles one byte at a time holds a request for
    ever. A daemon thread looks at the armed deadline every ``granularity_s`` (no wake-up call on the
    request path: arming is one attribute store) and, past it, shuts down the connection's socket; the
    blocked read or write then fails at once.
    """

    def __init__(self, timeout_s: float, current_socket: Callable[[], Optional[socket.socket]], thread_name: str) -> None:
        self.granularity_s = max(0.02, min(1.0, timeout_s / 10))
        self.deadline: Optional[float] = None
        self.armed_s = timeout_s  # the deadline of the request in hand, for the message when it fires
        self.fired = False
        self._current_socket = current_socket
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()
        self._thread_name = thread_name

    def arm(self, timeout_s: float) -> None:
        if self._thread is None or self._pid != os.getpid():  # a forked child starts its own
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._watch, name=self._thread_name, daemon=True)
            self._thread.start()
        self.fired = False
        self.armed_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def disarm(self) -> bool:
        """Stop watching; True when the deadline passed during the request."""
        self.deadline = None
        return self.fired

    def overrun(self) -> "TransientError":
        """What a request the deadline cut short fails with."""
        return TransientError(f"no whole answer within the request deadline of {self.armed_s:g} s")

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
    """One keep-alive connection to a server, direct or through an HTTP proxy (CONNECT for https)."""

    def __init__(self, base_url: str, settings: ConnectionSettings) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.path = parts.path.rstrip("/")
        self.settings = settings
        self.proxy = settings.proxy_address
        self.proxy_headers = settings.proxy_headers
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
        replaced (see :meth:`Transport.request`)."""
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


class Transport:
    """One keep-alive HTTP connection to ``base_url`` and the policy every request follows: no redirect ever
    followed (``http.client`` does not), a total deadline of ``request_timeout_s`` (connect, send and the
    whole answer), the environment's proxy and CA bundle, answers read up to ``MAX_ANSWER_BYTES`` with the
    strings given as ``redact`` masked. One thread at a time uses a transport.
    """

    def __init__(self, base_url: str, *, request_timeout_s: float, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, user_agent: str = "",
                 thread_name: str = "http-deadline") -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s
        self.user_agent = user_agent
        self.settings = connection_settings(self.base_url)
        self.setup_problem = self.settings.problem  # the caller says it once; no request is made
        self._connection: Optional[_Connection] = None
        self._watchdog = _Watchdog(request_timeout_s, self._current_socket, thread_name)

    @property
    def first_hop(self) -> Tuple[str, int, bool]:
        """Where a request connects first: ``(host, port, via_proxy)``, the proxy when one is used."""
        parts = urlsplit(self.base_url)
        address = self.settings.proxy_address
        if address is not None:
            return address[0], address[1], True
        return parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80), False

    def _current_socket(self) -> Optional[socket.socket]:
        connection = self._connection
        return None if connection is None else connection.socket()

    def request(self, method: str, path: str, *, form: Optional[Mapping[str, str]] = None,
                params: Optional[Mapping[str, str]] = None, headers: Optional[Dict[str, str]] = None,
                body: Optional[bytes] = None, timeout_s: Optional[float] = None,
                redact: Sequence[Optional[str]] = ()) -> Answer:
        """One request to ``base_url/path`` under the policy; :class:`TransientError` on any failure to get a
        whole answer (connection trouble, a timeout, the total deadline)."""
        all_headers = {"User-Agent": self.user_agent} if self.user_agent else {}
        if headers:
            all_headers.update(headers)
        if form is not None:
            body = urlencode(form).encode()
        if body is not None:
            all_headers["Content-Type"] = FORM_CONTENT_TYPE
        total = self.request_timeout_s if timeout_s is None else max(0.05, min(self.request_timeout_s, timeout_s))
        read_timeout = min(self.read_timeout_s, total)
        self._watchdog.arm(total)
        connect_timeout = min(self.connect_timeout_s, read_timeout)
        try:
            try:
                return self._exchange(method, path, params, all_headers, body, connect_timeout, read_timeout, redact)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection = self._connection
                if connection is None or not connection.reused or self._watchdog.fired:
                    raise
                # The server had closed the kept-alive connection: once more on a new one (the caller's
                # requests are safe to repeat).
                self._drop_connection()
                return self._exchange(method, path, params, all_headers, body, connect_timeout, read_timeout, redact)
        except TransientError:
            self._drop_connection()
            raise
        except Exception as exc:  # whatever the socket, TLS or HTTP layers raise: a transient failure
            self._drop_connection()
            if self._watchdog.fired:
                raise self._watchdog.overrun() from None
            raise TransientError(_describe(exc, self.base_url)) from None
        finally:
            self._watchdog.disarm()

    def _exchange(self, method: str, path: str, params: Optional[Mapping[str, str]], headers: Dict[str, str],
                  body: Optional[bytes], connect_timeout_s: float, read_timeout_s: float,
                  redact: Sequence[Optional[str]]) -> Answer:
        connection = self._connection
        if connection is None:
            connection = self._connection = _Connection(self.base_url, self.settings)
        if connection.proxy and connection.scheme == "http":
            headers.update(connection.proxy_headers)  # a plain proxy reads the request itself
        conn = connection.open(connect_timeout_s, read_timeout_s)
        conn.request_in_one_send(method, connection.target(path, urlencode(params) if params else ""), body, headers)
        response = conn.getresponse()
        content = response.read(MAX_ANSWER_BYTES)
        if self._watchdog.fired:  # a socket shut down mid-answer can still parse as a (truncated) answer
            raise self._watchdog.overrun()
        if response.will_close or not response.isclosed():
            connection.close()  # the server ends the connection, or the answer was longer than we read
        connection.last_used = time.monotonic()
        return Answer(response.status, dict(response.getheaders()), content, response.reason, redact=redact)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def close(self) -> None:
        """Stop the deadline watch and close the connection."""
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


__all__: List[str] = [
    "Answer", "ConnectionSettings", "MAX_ANSWER_BYTES", "REDACTED", "Transport", "TransientError",
    "connection_settings", "secret_forms",
]
