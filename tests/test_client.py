"""The HTTP client with requests-mock: request shape, answer classification, the retry policy."""

import json as _json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from urllib.parse import parse_qs

import pytest
import requests
from conftest import SECRET_KEY, TASK_ID, clean_environ, wait_until
from httpfakes import DribblingServer, FakeServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from reporter.client import (
    BackendClient,
    Outcome,
    SendResult,
    TransientError,
    classify,
    delivery_retrying,
    retry_after_seconds,
)
from reporter.config import Secret
from reporter.journal import Record

BASE = "http://backend.test/api"
KEY = "k-very-secret-99"
RECORD = Record("intermediate", 0.125, None, 3, 1.0, 0, 1, "abc-1")


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
    client.send(replace(RECORD, kind="final", value=1e-05))
    client.send(replace(RECORD, kind="state", value=-2))
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
    assert client.send(replace(RECORD, kind="state", value=1)).outcome is Outcome.UNSUPPORTED


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


# --- hardening against real loopback servers (issue 10) -------------------------------------------



@pytest.fixture
def fakes():
    started = []

    def make(cls=FakeServer, *args, **kwargs):
        srv = cls(*args, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_the_key_stays_home(fakes, status):
    elsewhere = fakes()
    redirecting = fakes(FakeServer, status, {"Location": f"{elsewhere.root}/steal?x=1"}, b"")
    client = BackendClient(redirecting.base_url, TASK_ID, Secret(SECRET_KEY))
    try:
        result = client.send(RECORD)
        assert result.outcome is Outcome.REDIRECT and result.status == status
        assert f"127.0.0.1:{elsewhere.port}" in result.reason and "steal" not in result.reason
        heartbeat = client.heartbeat()
        assert heartbeat.outcome is Outcome.REDIRECT
    finally:
        client.close()
    assert redirecting.count() == 2
    assert elsewhere.count() == 0  # no request, so no Secret-Key and no body went there


def test_doctor_fails_its_backend_check_on_a_redirect_and_sends_nothing_elsewhere(fakes, tmp_path):
    elsewhere = fakes()
    redirecting = fakes(FakeServer, 302, {"Location": f"{elsewhere.root}/api/train_task/final_metric"}, b"")
    env = clean_environ(ANYLEARN_BACKEND_URL=redirecting.base_url, ANYLEARN_TASK_ID=TASK_ID,
                        ANYLEARN_SECRET_KEY=SECRET_KEY, ANYLEARN_REPORTER_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "reporter", "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("FAIL") and "backend" in x]
    assert "HTTP 302" in line and f"127.0.0.1:{elsewhere.port}" in line
    assert SECRET_KEY not in done.stdout + done.stderr
    assert elsewhere.count() == 0 and redirecting.count() == 1


def test_a_dribbling_answer_is_cut_at_the_total_deadline(fakes):
    dribbler = fakes(DribblingServer, 0.02)
    client = BackendClient(dribbler.base_url, TASK_ID, Secret(SECRET_KEY), read_timeout_s=5, request_timeout_s=0.5)
    outcome = []

    def send():
        try:
            outcome.append(client.send(RECORD))
        except TransientError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    thread.join(15)  # the old client read one byte every 20 ms for as long as the server kept sending
    client.close()
    assert not thread.is_alive(), "the request outlived its total deadline"
    (exc,) = outcome
    assert isinstance(exc, TransientError) and "deadline" in exc.reason and SECRET_KEY not in str(exc)


def test_request_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANYLEARN_REQUEST_TIMEOUT", "2.5")
    assert BackendClient(BASE, "T", None).request_timeout_s == 2.5
    monkeypatch.setenv("ANYLEARN_REQUEST_TIMEOUT", "soon")
    assert BackendClient(BASE, "T", None).request_timeout_s == 30.0


@pytest.mark.parametrize("retry_after", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_retry_after_cannot_switch_the_backoff_off(fakes, retry_after):
    server = fakes(FakeServer, 429, {"Retry-After": retry_after}, b'{"msg": "slow down"}')
    client = BackendClient(server.base_url, TASK_ID, Secret(SECRET_KEY))
    stop = threading.Event()
    retrying = delivery_retrying(stop, initial_backoff_s=0.1, max_backoff_s=0.4)
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        with pytest.raises(TransientError):
            retrying(client.send, RECORD)
    finally:
        timer.cancel()
        client.close()
    # the backoff alone allows about ten tries in 1 s; the old policy let Retry-After: 0 make hundreds
    assert 2 <= server.count() <= 30


def test_retry_after_lengthens_a_wait_but_never_past_the_maximum(client, requests_mock):
    requests_mock.post(
        f"{BASE}/train_task/intermediate_metric",
        [{"status_code": 429, "headers": {"Retry-After": "3600"}, "json": {}},
         {"status_code": 429, "headers": {"Retry-After": "0"}, "json": {}},
         {"status_code": 503, "headers": {"Retry-After": "2"}, "json": {}},
         {"json": {"msg": "ok"}}],
    )
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=5)
    assert retrying(client.send, RECORD).outcome is Outcome.DELIVERED
    assert slept[0] == 5  # capped at the maximum backoff
    assert 0 <= slept[1] <= 1.0  # Retry-After: 0 leaves the backoff's own wait
    assert slept[2] == 2.0  # lengthened to what was asked (the backoff's own wait is at most 0.5 * 4)


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.one_of(st.integers(min_value=-1, max_value=1000), st.sampled_from([200, 204, 301, 302, 307, 308, 401, 404, 429, 503])),
    retry_after=st.one_of(st.none(), _header_text, st.sampled_from(["0", "-1", "nan", "inf", "1e400", "Mon, 99 Foo 2020", "Wed, 21 Oct 2015 07:28:00 GMT"])),
    location=st.one_of(st.none(), _header_text, st.sampled_from(["http://[::1", "//evil.test:99999/x", "http://u:p@h.test/", "/relative"])),
    body=st.one_of(st.binary(max_size=200), st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"msg": 1e400}', b'{"msg": null}', b"\xff\xfe{"])),
    encoding=st.sampled_from([None, "utf-8", "latin-1", "no-such-codec"]),
    optional=st.booleans(),
)
def test_any_answer_is_classified_and_nothing_else_is_raised(status, retry_after, location, body, encoding, optional):
    response = requests.Response()
    response.status_code = status
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if location is not None:
        headers["Location"] = location
    response.headers = CaseInsensitiveDict(headers)
    response._content = body
    response.encoding = encoding
    try:
        result = classify(response, optional_endpoint=optional)
    except TransientError as exc:
        assert exc.retry_after_s is None or 0 <= exc.retry_after_s <= 3600
        return
    assert isinstance(result, SendResult) and isinstance(result.reason, str)
    if 300 <= status < 400:
        assert result.outcome is Outcome.REDIRECT and "p@" not in result.reason


def test_status_json_of_a_redirected_deliverer_names_the_pause(tmp_path, fakes):
    from reporter.deliver import Deliverer, DeliveryOptions
    from reporter.journal import JournalWriter, count_pending

    elsewhere = fakes()
    redirecting = fakes(FakeServer, 307, {"Location": f"{elsewhere.root}/api/train_task/intermediate_metric"}, b"")
    writer = JournalWriter(str(tmp_path))
    for i in range(3):
        writer.append("intermediate", 0.1 * i, None, i)
    writer.close()
    client = BackendClient(redirecting.base_url, TASK_ID, Secret(SECRET_KEY))
    deliverer = Deliverer(str(tmp_path), client, DeliveryOptions(poll_interval_s=0.05)).start()
    try:
        assert not deliverer.flush(10)  # paused at once: flush gives up
        wait_until(lambda: deliverer.paused_reason, 10)
    finally:
        deliverer.close(2)
    status = _json.loads((tmp_path / "status.json").read_text())
    assert status["paused"].startswith("redirect: HTTP 307") and f"127.0.0.1:{elsewhere.port}" in status["paused"]
    assert status["delivered"] == 0 and count_pending(str(tmp_path)) == 3
    assert elsewhere.count() == 0 and redirecting.count() == 1
    assert SECRET_KEY not in (tmp_path / "status.json").read_text()
