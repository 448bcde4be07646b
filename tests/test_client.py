"""The HTTP client with requests-mock: request shape, answer classification, the retry policy."""

import threading
import time
from email.utils import formatdate
from urllib.parse import parse_qs

import pytest
import requests

from reporter.client import (
    BackendClient,
    Outcome,
    TransientError,
    delivery_retrying,
    retry_after_seconds,
)
from reporter.config import Secret

BASE = "http://backend.test/api"
KEY = "k-very-secret-99"
RECORD = {"kind": "intermediate", "value": 0.125, "name": None, "step": 3, "ts": 1.0, "rank": 0, "pid": 1, "key": "abc-1"}


@pytest.fixture
def client():
    c = BackendClient(BASE, "TRAIx", Secret(KEY))
    yield c
    c.close()


def test_intermediate_metric_request_has_the_contract_shape(client, requests_mock):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", json={"msg": "ok"})
    assert client.send(RECORD).outcome is Outcome.DELIVERED
    request = requests_mock.last_request
    assert parse_qs(request.text) == {"id": ["TRAIx"], "metric": ["0.125"]}
    assert request.headers["Secret-Key"] == KEY
    assert request.headers["Idempotency-Key"] == "abc-1"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_final_and_state_records_go_to_their_endpoints(client, requests_mock):
    final = requests_mock.post(f"{BASE}/train_task/final_metric", json={"msg": "ok"})
    state = requests_mock.post(f"{BASE}/train_task/state", json={"msg": "ok"})
    client.send({**RECORD, "kind": "final", "value": 1e-05})
    client.send({**RECORD, "kind": "state", "value": -2})
    assert parse_qs(final.last_request.text)["metric"] == ["1e-05"]
    assert parse_qs(state.last_request.text) == {"id": ["TRAIx"], "state": ["-2"]}


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses_raise_transient(client, requests_mock, status):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", status_code=status, json={"msg": "later"})
    with pytest.raises(TransientError) as info:
        client.send(RECORD)
    assert info.value.status == status


@pytest.mark.parametrize("status, outcome", [(401, Outcome.AUTH), (403, Outcome.AUTH), (400, Outcome.REJECTED), (404, Outcome.REJECTED), (422, Outcome.REJECTED)])
def test_final_answers_are_classified(client, requests_mock, status, outcome):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", status_code=status, json={"msg": "why"})
    result = client.send(RECORD)
    assert (result.outcome, result.status, result.reason) == (outcome, status, "why")


@pytest.mark.parametrize("status", [404, 405])
def test_missing_state_endpoint_is_unsupported_not_rejected(client, requests_mock, status):
    requests_mock.post(f"{BASE}/train_task/state", status_code=status, text="Not Found")
    assert client.send({**RECORD, "kind": "state", "value": 1}).outcome is Outcome.UNSUPPORTED


@pytest.mark.parametrize("body", ["", "[]", "<html>proxy</html>"])
def test_a_2xx_answer_that_is_not_a_json_object_is_retried(client, requests_mock, body):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", text=body)
    with pytest.raises(TransientError, match="not a JSON object"):
        client.send(RECORD)


@pytest.mark.parametrize("exc", [requests.ConnectionError, requests.ConnectTimeout, requests.ReadTimeout])
def test_connection_errors_and_timeouts_are_transient_and_never_show_the_key(client, requests_mock, exc):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", exc=exc)
    with pytest.raises(TransientError) as info:
        client.send(RECORD)
    assert KEY not in str(info.value) and KEY not in repr(info.value)


def test_proxy_and_ca_bundle_come_from_the_environment(monkeypatch):
    from reporter.client import make_session

    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "internal.test")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/custom-ca.pem")
    session = make_session("https://backend.test/api")
    assert session.proxies.get("https") == "http://proxy.test:3128" and session.verify == "/etc/ssl/custom-ca.pem"
    assert make_session("https://internal.test/api").proxies == {}  # NO_PROXY honoured
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert make_session("https://backend.test/api").verify is True  # certificates are verified by default


def test_retry_after_in_seconds_and_as_an_http_date():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert 9 <= retry_after_seconds(formatdate(now + 10, usegmt=True), now=now) <= 10
    assert retry_after_seconds(formatdate(now - 10, usegmt=True), now=now) == 0.0


def test_policy_honours_retry_after_then_succeeds(client, requests_mock):
    requests_mock.post(
        f"{BASE}/train_task/intermediate_metric",
        [{"status_code": 429, "headers": {"Retry-After": "7"}, "json": {}}, {"status_code": 503, "json": {}}, {"json": {"msg": "ok"}}],
    )
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=30)
    assert retrying(client.send, RECORD).outcome is Outcome.DELIVERED
    assert slept[0] == 7.0  # Retry-After wins
    assert 0 <= slept[1] <= 1.0  # then full-jitter exponential backoff (attempt 2: up to 0.5 * 2)


def test_policy_backoff_is_capped_and_jittered(client, requests_mock):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", [{"status_code": 503, "json": {}}] * 40 + [{"json": {}}])
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=30)
    retrying(client.send, RECORD)
    assert len(slept) == 40 and max(slept) <= 30
    assert len(set(slept)) > 30  # jitter: not one fixed sequence


def test_policy_stops_when_the_stop_event_is_set(client, requests_mock):
    requests_mock.post(f"{BASE}/train_task/intermediate_metric", status_code=503, json={})
    stop = threading.Event()
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 3:
            stop.set()

    with pytest.raises(TransientError):
        delivery_retrying(stop, sleep=sleep)(client.send, RECORD)
    assert len(calls) == 3
