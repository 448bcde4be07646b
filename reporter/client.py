"""The AnyLearn API spoken over a :class:`~reporter.transport.Transport`: endpoints, forms, the answers
classified, and the retry policy with its loop (:class:`Retrier`).

Every request the product makes (records, heartbeats, ``doctor``'s check, log shipping) goes through
:meth:`BackendClient.request`: the key only in the ``Secret-Key`` header and only to the configured backend,
under the transport's policy (no redirect ever followed, a total deadline). ``tenacity`` loads on the first
failure only; ``import reporter`` loads none of this.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Protocol, Tuple, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from .config import DEFAULT_REQUEST_TIMEOUT_S, Config, Secret
from .record import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE, Record
from .transport import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, Answer, Transport, TransientError

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
UNSUPPORTED_STATUSES = frozenset({404, 405})
ENDPOINTS = {
    KIND_INTERMEDIATE: "train_task/intermediate_metric",
    KIND_FINAL: "train_task/final_metric",
    KIND_STATE: "train_task/state",
}
HEARTBEAT_ENDPOINT = "train_task/heartbeat"  # POST with the Secret-Key; PATCH with a user's token (local tasks)
USER_AGENT = "anylearn-reporter"
# The backoff: exponential with full jitter from INITIAL_BACKOFF_S, each wait capped at MAX_BACKOFF_S.
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 3600.0


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


class BackendClient:
    """Speaks the AnyLearn API for one task over one :class:`Transport` (one keep-alive connection). Knows
    nothing of journals or threads.

    The key goes only in the ``Secret-Key`` header, a user's token (a local task's) only in ``Authorization:
    Bearer``, both only to ``base_url``, and both are masked in every answer. One thread at a time uses a client.
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
        auth_token: Optional[Secret] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.task_id = task_id
        self._secret_key = secret_key
        self._auth_token = auth_token
        self.has_secret_key = bool(secret_key)
        self._transport = Transport(self.base_url, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                                    request_timeout_s=request_timeout_s, user_agent=USER_AGENT,
                                    thread_name="anylearn-reporter-deadline")
        self.request_timeout_s = request_timeout_s
        self.setup_problem = self._transport.setup_problem  # said as a pause, not retried for ever

    @classmethod
    def from_config(cls, config: Config, *, request_timeout_s: Optional[float] = None,
                    with_token: bool = False) -> "BackendClient":
        """The client for ``config``'s backend, task and key, with its request timeout (or the shorter
        ``request_timeout_s``); ``with_token`` adds a local task's user token (heartbeats, log shipping)."""
        timeout_s = config.request_timeout_s if request_timeout_s is None else min(config.request_timeout_s, request_timeout_s)
        return cls(config.backend_url or "", config.task_id or "", config.secret_key, request_timeout_s=timeout_s,
                   auth_token=config.auth_token if with_token else None)

    @property
    def first_hop(self) -> Tuple[str, int, bool]:
        """Where a request connects first: ``(host, port, via_proxy)``, the proxy when one is used."""
        return self._transport.first_hop

    def request(self, method: str, endpoint: str, *, form: Optional[Mapping[str, str]] = None,
                params: Optional[Mapping[str, str]] = None, headers: Optional[Dict[str, str]] = None,
                timeout_s: Optional[float] = None, body: Optional[bytes] = None) -> Answer:
        """One request to ``base_url/endpoint`` with the task's credentials, under the transport's policy
        (no redirect followed, the total deadline); :class:`TransientError` on any failure to get a whole answer."""
        all_headers = dict(headers) if headers else {}
        secret = self._secret_key.reveal() if self._secret_key else None
        token = self._auth_token.reveal() if self._auth_token else None
        if secret:
            all_headers["Secret-Key"] = secret
        if token:
            all_headers["Authorization"] = "Bearer " + token
        return self._transport.request(method, endpoint, form=form, params=params, headers=all_headers, body=body,
                                       timeout_s=timeout_s, redact=(secret, token))

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

    def interrupt(self) -> None:
        """From another thread: cut off the request in flight (the transport's deadline watch shuts its socket
        down at its next look, within a second, as at the request deadline). The caller sends no more."""
        self._transport._watchdog.deadline = 0.0

    def close(self) -> None:
        """Let the connection go."""
        self._transport.close()


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
    "Answer", "BackendClient", "Outcome", "RecordClient", "Retrier", "SendResult", "TransientError", "classify",
    "delivery_retrying", "location_host", "retry_after_seconds",
]
