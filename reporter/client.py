"""HTTP to the AnyLearn backend: one record per request, answers classified, retry policy in one place.

``requests`` and ``tenacity`` are imported here, on the delivery side only: ``import reporter`` never
pays for them.
"""

from __future__ import annotations

import email.utils
import enum
import math
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional
from urllib.parse import urlencode, urlsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter
from tenacity.wait import wait_base
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .config import DEFAULT_REQUEST_TIMEOUT_S, ENV_REQUEST_TIMEOUT, Secret, parse_number
from .journal import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE, Record

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
UNSUPPORTED_STATUSES = frozenset({404, 405})
ENDPOINTS = {
    KIND_INTERMEDIATE: "train_task/intermediate_metric",
    KIND_FINAL: "train_task/final_metric",
    KIND_STATE: "train_task/state",
}
HEARTBEAT_ENDPOINT = "train_task/heartbeat"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 30.0
INITIAL_BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 3600.0


class Outcome(enum.Enum):
    """What became of one request that got a final answer."""

    DELIVERED = "delivered"
    REJECTED = "rejected"  # a permanent 4xx: the record goes to rejected.jsonl
    AUTH = "auth"  # 401/403: delivery pauses for the run
    UNSUPPORTED = "unsupported"  # 404/405 on an optional endpoint (state, heartbeat)
    REDIRECT = "redirect"  # a 3xx: never followed (the key would go along); delivery pauses like AUTH


@dataclass(frozen=True)
class SendResult:
    """A final answer: the outcome, the HTTP status and the backend's reason in its own words."""

    outcome: Outcome
    status: int
    reason: str = ""


class TransientError(Exception):
    """A failure worth retrying: connection trouble, a timeout, or a retryable status."""

    def __init__(self, reason: str, *, status: Optional[int] = None, retry_after_s: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


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


def _reason_of(response: "requests.Response") -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("msg"):
            return str(body["msg"])[:200]
    except Exception:  # not JSON, too deep to parse, an undecodable body: fall back to the text
        pass
    try:
        text = (response.text or "").strip().replace("\n", " ")
    except Exception:
        text = ""
    return text[:200] or str(response.reason or "")[:200] or f"HTTP {response.status_code}"


def classify(response: "requests.Response", *, optional_endpoint: bool = False) -> SendResult:
    """Turn an HTTP answer into a :class:`SendResult`, or raise :class:`TransientError` to retry it.

    Any status, headers and body give one of the two; nothing else is ever raised.
    """
    status = response.status_code
    if not isinstance(status, int):
        raise TransientError(f"an answer without a readable status ({status!r:.40})")
    if 200 <= status < 300:
        try:
            body = response.json()
        except Exception:
            body = None
        if not isinstance(body, dict):
            raise TransientError(f"HTTP {status} with an answer that is not a JSON object", status=status)
        return SendResult(Outcome.DELIVERED, status)
    if 300 <= status < 400:
        return SendResult(Outcome.REDIRECT, status, f"redirect to {location_host(response.headers.get('Location'))}")
    if status in RETRYABLE_STATUSES:
        raise TransientError(
            f"HTTP {status} {_reason_of(response)}",
            status=status,
            retry_after_s=retry_after_seconds(response.headers.get("Retry-After")),
        )
    if status in AUTH_STATUSES:
        return SendResult(Outcome.AUTH, status, _reason_of(response))
    if optional_endpoint and status in UNSUPPORTED_STATUSES:
        return SendResult(Outcome.UNSUPPORTED, status, _reason_of(response))
    if 400 <= status < 500:
        return SendResult(Outcome.REJECTED, status, _reason_of(response))
    raise TransientError(f"HTTP {status} {_reason_of(response)}", status=status)


class _Watchdog:
    """Holds one request at a time to a total deadline (connect, send and the whole answer).

    ``requests``' timeouts bound each socket operation, so a backend that dribbles one byte at a time
    holds a request for ever. A daemon thread looks at the armed deadline every ``granularity_s`` (no
    wake-up call on the request path: arming is one attribute store) and, past it, shuts down every
    socket of the client's connections; the blocked read or write then fails at once.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.granularity_s = max(0.02, min(1.0, timeout_s / 10))
        self.sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self.deadline: Optional[float] = None
        self.fired = False
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._pid = os.getpid()

    def arm(self, timeout_s: float) -> None:
        if self._thread is None or self._pid != os.getpid():
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
                for sock in list(self.sockets):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def close(self) -> None:
        self._closed.set()


def _watched_pool_classes(watchdog: _Watchdog) -> Dict[str, type]:
    """urllib3 pool classes whose connections hand their sockets to ``watchdog`` when they connect."""

    class WatchedHTTPConnection(HTTPConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.sockets.add(self.sock)

    class WatchedHTTPSConnection(HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            watchdog.sockets.add(self.sock)

    class WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    """An adapter whose connections (direct or through an HTTP proxy) the watchdog can shut down."""

    def __init__(self, watchdog: _Watchdog) -> None:
        self._pool_classes = _watched_pool_classes(watchdog)
        super().__init__(pool_connections=2, pool_maxsize=2)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = self._pool_classes
        return manager

    def __getstate__(self) -> Any:  # pragma: no cover - sessions are never pickled here
        raise TypeError("not picklable")


def request_timeout_from_env(env: Optional[Mapping[str, str]] = None) -> float:
    """``ANYLEARN_REQUEST_TIMEOUT`` (seconds, more than 0), else the default; an unusable value is ignored
    (``load_config`` reports it)."""
    try:
        return float(parse_number((os.environ if env is None else env).get(ENV_REQUEST_TIMEOUT), ENV_REQUEST_TIMEOUT,
                                  DEFAULT_REQUEST_TIMEOUT_S, positive=True))
    except ValueError:
        return DEFAULT_REQUEST_TIMEOUT_S


class BackendClient:
    """Sends records of one task over one keep-alive session. Knows nothing of journals or threads.

    Every request it makes follows one policy: never follow a redirect, a total deadline of
    ``request_timeout_s`` (connect, send and the whole answer), the key only in the ``Secret-Key`` header
    and only to ``base_url``. One thread at a time uses a client.
    """

    def __init__(
        self,
        base_url: str,
        task_id: str,
        secret_key: Optional[Secret],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        request_timeout_s: Optional[float] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.task_id = task_id
        self._secret_key = secret_key
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_from_env() if request_timeout_s is None else request_timeout_s
        self._watchdog = _Watchdog(self.request_timeout_s)
        self._session = make_session(self.base_url)
        adapter = _WatchedAdapter(self._watchdog)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def request(self, method: str, endpoint: str, *, form: Optional[Mapping[str, str]] = None,
                params: Optional[Mapping[str, str]] = None, headers: Optional[Dict[str, str]] = None,
                timeout_s: Optional[float] = None) -> "requests.Response":
        """One request to ``base_url/endpoint`` under the client's policy; :class:`TransientError` on any
        failure to get a whole answer (connection trouble, a timeout, the total deadline)."""
        headers = dict(headers or {})
        if form is not None:
            headers["Content-Type"] = FORM_CONTENT_TYPE
        if self._secret_key:
            headers["Secret-Key"] = self._secret_key.reveal()
        total = self.request_timeout_s if timeout_s is None else max(0.05, min(self.request_timeout_s, timeout_s))
        read_timeout = min(self.read_timeout_s, total)
        connect_timeout = min(self.connect_timeout_s, read_timeout)
        self._watchdog.arm(total)
        try:
            response = self._session.request(
                method, f"{self.base_url}/{endpoint}", params=params,
                data=None if form is None else urlencode(form).encode(), headers=headers,
                timeout=(connect_timeout, read_timeout), allow_redirects=False,
            )
            if self._watchdog.fired:  # a socket shut down mid-answer can still parse as a (truncated) answer
                raise TransientError(f"no whole answer within the request deadline of {total:g} s")
            return response
        except requests.Timeout as exc:
            raise TransientError(f"timed out ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            if self._watchdog.fired:
                raise TransientError(f"no whole answer within the request deadline of {total:g} s") from None
            if isinstance(exc, requests.ConnectionError):
                raise TransientError(f"cannot connect to {self.base_url} ({_short_cause(exc)})") from None
            raise TransientError(f"request failed ({type(exc).__name__})") from None
        except (OSError, ValueError) as exc:  # a socket shut down mid-read can surface below requests' wrapping
            if self._watchdog.fired:
                raise TransientError(f"no whole answer within the request deadline of {total:g} s") from None
            raise TransientError(f"request failed ({type(exc).__name__})") from None
        finally:
            self._watchdog.disarm()

    def send(self, record: Record, timeout_s: Optional[float] = None) -> SendResult:
        """POST one journal record to its endpoint; raise :class:`TransientError` to have it retried."""
        kind = record.kind
        if kind == KIND_STATE:
            form = {"id": self.task_id, "state": str(record.value)}
        else:
            form = {"id": self.task_id, "metric": repr(record.value)}
        headers = {"Idempotency-Key": record.key}
        response = self.request("POST", ENDPOINTS[kind], form=form, headers=headers, timeout_s=timeout_s)
        return classify(response, optional_endpoint=kind == KIND_STATE)

    def heartbeat(self, timeout_s: Optional[float] = None) -> SendResult:
        """POST a heartbeat for the task; raise :class:`TransientError` on a passing failure."""
        response = self.request("POST", HEARTBEAT_ENDPOINT, form={"id": self.task_id}, timeout_s=timeout_s)
        return classify(response, optional_endpoint=True)

    def read_final_metric(self, timeout_s: Optional[float] = None) -> "requests.Response":
        """GET the task's final metric: an authenticated read that changes nothing (``doctor``'s check)."""
        return self.request("GET", ENDPOINTS[KIND_FINAL], params={"id": self.task_id}, timeout_s=timeout_s)

    def close(self) -> None:
        self._watchdog.close()
        self._session.close()


def make_session(base_url: str) -> "requests.Session":
    """A keep-alive session with the environment's proxy and CA bundle settings read once.

    ``requests`` re-reads the whole environment for proxies on every request when ``trust_env`` is on
    (a quarter of a request's CPU here); reading ``HTTPS_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE``
    once gives the same behaviour at a fraction of the cost.
    """
    session = requests.Session()
    session.headers["User-Agent"] = "anylearn-reporter"
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    session.trust_env = False
    return session


def _short_cause(exc: BaseException) -> str:
    """The innermost cause's class and message, without the URL noise requests adds."""
    inner: BaseException = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner)
    if "]" in text and "Errno" in text:
        text = text[text.index("[Errno"):]
    return f"{type(inner).__name__}: {text}"[:200]


class wait_retry_after_or(wait_base):
    """Wait what ``fallback`` says, longer when the server's ``Retry-After`` asks for longer; never more
    than ``max_wait_s``."""

    def __init__(self, fallback: wait_base, max_wait_s: float) -> None:
        self.fallback = fallback
        self.max_wait_s = max_wait_s

    def __call__(self, retry_state: "tenacity.RetryCallState") -> float:
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
    before_sleep: Optional[Callable[["tenacity.RetryCallState"], None]] = None,
) -> "tenacity.Retrying":
    """The retry policy: transient failures retried until ``stop_event`` is set, never busy-looping.

    Exponential backoff with full jitter capped at ``max_backoff_s``; a ``Retry-After`` longer than the
    backoff's own wait lengthens it (up to ``max_backoff_s``), a shorter one (0, negative, a past date) is
    ignored. The sleep is ``stop_event.wait`` by default, so shutting down interrupts a backoff.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        stop=tenacity.stop_when_event_set(stop_event),
        wait=wait_retry_after_or(tenacity.wait_random_exponential(multiplier=initial_backoff_s, max=max_backoff_s), max_backoff_s),
        sleep=sleep or stop_event.wait,  # type: ignore[arg-type]
        before_sleep=before_sleep,
        reraise=True,
    )
