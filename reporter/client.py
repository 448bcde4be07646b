"""HTTP to the AnyLearn backend: one record per request, answers classified, retry policy in one place.

``requests`` and ``tenacity`` are imported here, on the delivery side only: ``import reporter`` never
pays for them.
"""

from __future__ import annotations

import email.utils
import enum
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional
from urllib.parse import urlencode

import requests
import tenacity
from tenacity.wait import wait_base

from .config import Secret
from .journal import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE

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
    """Parse ``Retry-After``: delta-seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _reason_of(response: "requests.Response") -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("msg"):
            return str(body["msg"])
    except ValueError:
        pass
    text = (response.text or "").strip().replace("\n", " ")
    return text[:200] or response.reason or f"HTTP {response.status_code}"


def classify(response: "requests.Response", *, optional_endpoint: bool = False) -> SendResult:
    """Turn an HTTP answer into a :class:`SendResult`, or raise :class:`TransientError` to retry it."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TransientError(f"HTTP {status} with an answer that is not a JSON object", status=status)
        return SendResult(Outcome.DELIVERED, status)
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


class BackendClient:
    """Sends records of one task over one keep-alive session. Knows nothing of journals or threads."""

    def __init__(
        self,
        base_url: str,
        task_id: str,
        secret_key: Optional[Secret],
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.task_id = task_id
        self._secret_key = secret_key
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._session = make_session(self.base_url)

    def _post(self, endpoint: str, form: Mapping[str, str], headers: Dict[str, str], timeout_s: Optional[float]):
        headers["Content-Type"] = FORM_CONTENT_TYPE
        if self._secret_key:
            headers["Secret-Key"] = self._secret_key.reveal()
        read_timeout = self.read_timeout_s if timeout_s is None else max(0.05, min(self.read_timeout_s, timeout_s))
        connect_timeout = min(self.connect_timeout_s, read_timeout)
        try:
            return self._session.post(
                f"{self.base_url}/{endpoint}", data=urlencode(form).encode(), headers=headers, timeout=(connect_timeout, read_timeout)
            )
        except requests.Timeout as exc:
            raise TransientError(f"timed out ({type(exc).__name__})") from None
        except requests.ConnectionError as exc:
            raise TransientError(f"cannot connect to {self.base_url} ({_short_cause(exc)})") from None
        except requests.RequestException as exc:
            raise TransientError(f"request failed ({type(exc).__name__})") from None

    def send(self, record: Mapping[str, Any], timeout_s: Optional[float] = None) -> SendResult:
        """POST one journal record to its endpoint; raise :class:`TransientError` to have it retried."""
        kind = record["kind"]
        if kind == KIND_STATE:
            form = {"id": self.task_id, "state": str(int(record["value"]))}
        else:
            form = {"id": self.task_id, "metric": repr(float(record["value"]))}
        headers = {"Idempotency-Key": str(record.get("key", ""))}
        response = self._post(ENDPOINTS[kind], form, headers, timeout_s)
        return classify(response, optional_endpoint=kind == KIND_STATE)

    def heartbeat(self, timeout_s: Optional[float] = None) -> SendResult:
        """POST a heartbeat for the task; raise :class:`TransientError` on a passing failure."""
        response = self._post(HEARTBEAT_ENDPOINT, {"id": self.task_id}, {}, timeout_s)
        return classify(response, optional_endpoint=True)

    def close(self) -> None:
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
    """Wait what the server's ``Retry-After`` asked for, else what ``fallback`` says."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: "tenacity.RetryCallState") -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, TransientError) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return self.fallback(retry_state)


def delivery_retrying(
    stop_event: threading.Event,
    *,
    initial_backoff_s: float = INITIAL_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    sleep: Optional[Callable[[float], Any]] = None,
    before_sleep: Optional[Callable[["tenacity.RetryCallState"], None]] = None,
) -> "tenacity.Retrying":
    """The retry policy: transient failures retried until ``stop_event`` is set, never busy-looping.

    Exponential backoff with full jitter capped at ``max_backoff_s``; ``Retry-After`` wins when the
    server sends it. The sleep is ``stop_event.wait`` by default, so shutting down interrupts a backoff.
    """
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        stop=tenacity.stop_when_event_set(stop_event),
        wait=wait_retry_after_or(tenacity.wait_random_exponential(multiplier=initial_backoff_s, max=max_backoff_s)),
        sleep=sleep or stop_event.wait,  # type: ignore[arg-type]
        before_sleep=before_sleep,
        reraise=True,
    )
