"""The HTTP client against real loopback servers: request shape, answer classification, the request
policy (no redirects, a total deadline) and the retry policy."""

import json as _json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from urllib.parse import parse_qs, quote, quote_plus

import pytest
from conftest import SECRET_KEY, TASK_ID, clean_environ, free_port, wait_until
from httpfakes import DribblingServer, FakeServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reporter.client import (
    MAX_ANSWER_BYTES,
    Answer,
    BackendClient,
    Outcome,
    RecordClient,
    Retrier,
    SendResult,
    TransientError,
    classify,
    connection_settings,
    delivery_retrying,
    retry_after_seconds,
)
from reporter.config import Secret, load_config
from reporter.journal import Record

KEY = "k-very-secret-99"
RECORD = Record("intermediate", 0.125, None, 3, 1.0, 0, 1, "abc-1")


@pytest.fixture
def fakes():
    started = []

    def make(*args, cls=FakeServer, **kwargs):
        srv = cls(*args, **kwargs).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def backend(fakes):
    """A server answering 200 {"msg": "ok"}, and a client of it for task TRAIx."""
    server = fakes()
    client = BackendClient(server.base_url, "TRAIx", Secret(KEY))
    yield server, client
    client.close()


def client_of(server):
    return BackendClient(server.base_url, "TRAIx", Secret(KEY))


def test_intermediate_metric_request_has_the_contract_shape(backend):
    server, client = backend
    assert client.send(RECORD).outcome is Outcome.DELIVERED
    method, path, headers, body = server.last()
    assert (method, path) == ("POST", "/api/train_task/intermediate_metric")
    assert parse_qs(body.decode()) == {"id": ["TRAIx"], "metric": ["0.125"]}
    assert headers["Secret-Key"] == KEY
    assert headers["Idempotency-Key"] == "abc-1"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_final_and_state_records_go_to_their_endpoints(backend):
    server, client = backend
    client.send(replace(RECORD, kind="final", value=1e-05))
    final = server.last()
    client.send(replace(RECORD, kind="state", value=-2))
    state = server.last()
    assert final[1] == "/api/train_task/final_metric" and parse_qs(final[3].decode())["metric"] == ["1e-05"]
    assert state[1] == "/api/train_task/state" and parse_qs(state[3].decode()) == {"id": ["TRAIx"], "state": ["-2"]}


def test_requests_share_one_keep_alive_connection(backend):
    server, client = backend
    for _ in range(4):
        assert client.send(RECORD).outcome is Outcome.DELIVERED
    assert server.count() == 4 and len(set(server.peers)) == 1  # one connection, reused


def test_a_connection_the_server_closed_is_replaced_without_a_failure(fakes):
    server = fakes(close_after_answer=True)  # closes every connection after its answer, without saying so
    client = client_of(server)
    for _ in range(3):
        assert client.send(RECORD).outcome is Outcome.DELIVERED  # never a TransientError
    client.close()
    assert server.count() == 3 and len(set(server.peers)) == 3


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses_raise_transient(fakes, status):
    client = client_of(fakes(status, {}, b'{"msg": "later"}'))
    with pytest.raises(TransientError) as info:
        client.send(RECORD)
    client.close()
    assert info.value.status == status


@pytest.mark.parametrize("status, outcome", [(401, Outcome.AUTH), (403, Outcome.AUTH), (400, Outcome.REJECTED), (404, Outcome.REJECTED), (422, Outcome.REJECTED)])
def test_final_answers_are_classified(fakes, status, outcome):
    client = client_of(fakes(status, {}, b'{"msg": "why"}'))
    result = client.send(RECORD)
    client.close()
    assert (result.outcome, result.status, result.reason) == (outcome, status, "why")


@pytest.mark.parametrize("status", [404, 405])
def test_missing_state_endpoint_is_unsupported_not_rejected(fakes, status):
    client = client_of(fakes(status, {}, b"Not Found"))
    assert client.send(replace(RECORD, kind="state", value=1)).outcome is Outcome.UNSUPPORTED
    client.close()


@pytest.mark.parametrize("status,body", [(204, b""), (200, b""), (200, b"[]"), (200, b"<html>ok</html>"), (201, b"{")])
def test_a_2xx_answer_that_is_not_a_json_object_is_delivered_and_noted(fakes, status, body):
    """The backend stored the record: sending it again would store it again (issue 16)."""
    server = fakes(status, {}, body)
    client = client_of(server)
    result = client.send(RECORD)
    client.close()
    assert (result.outcome, result.status) == (Outcome.DELIVERED, status)
    assert "not a JSON object" in result.reason  # the deliverer says it once
    assert server.count() == 1


def test_connection_errors_and_timeouts_are_transient_and_never_show_the_key(fakes):
    refused = BackendClient(f"http://127.0.0.1:{free_port()}/api", "TRAIx", Secret(KEY))
    with pytest.raises(TransientError) as refused_info:
        refused.send(RECORD)
    refused.close()
    silent = fakes(cls=DribblingServer, interval_s=30)  # sends its first byte after 30 s
    slow = BackendClient(silent.base_url, "TRAIx", Secret(KEY), read_timeout_s=0.2)
    with pytest.raises(TransientError) as timeout_info:
        slow.send(RECORD)
    slow.close()
    assert "cannot connect" in refused_info.value.reason and "timed out" in timeout_info.value.reason
    for info in (refused_info, timeout_info):
        assert KEY not in str(info.value) and KEY not in repr(info.value)


def test_proxy_and_ca_bundle_come_from_the_environment():
    env = {"HTTPS_PROXY": "http://proxy.test:3128", "NO_PROXY": "internal.test,10.0.0.0/8", "REQUESTS_CA_BUNDLE": "/etc/ssl/custom-ca.pem"}
    assert connection_settings("https://backend.test/api", env) == ("http://proxy.test:3128", "/etc/ssl/custom-ca.pem")
    assert connection_settings("https://api.internal.test/api", env).proxy is None  # NO_PROXY honoured, subdomains too
    assert connection_settings("https://10.1.2.3/api", env).proxy is None  # and CIDR blocks
    assert connection_settings("http://backend.test/api", env).proxy is None  # an https proxy is for https only
    assert connection_settings("http://backend.test/api", {"http_proxy": "http://low:1", "HTTP_PROXY": "http://up:2"}).proxy == "http://low:1"
    default = connection_settings("https://backend.test/api", {}).ca_bundle
    assert default is None or default.endswith(".pem")  # certifi's bundle (requests' default), else the system's


def test_a_plain_http_proxy_gets_the_absolute_url_and_its_own_credentials(fakes):
    proxy = fakes()
    client = BackendClient("http://backend.invalid:8080/api", "TRAIx", Secret(KEY),
                           env={"http_proxy": f"http://user:p%40ss@127.0.0.1:{proxy.port}"})
    assert client.send(RECORD).outcome is Outcome.DELIVERED
    client.close()
    _, path, headers, _ = proxy.last()
    assert path == "http://backend.invalid:8080/api/train_task/intermediate_metric"
    assert headers["Proxy-Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss


def test_an_ipv6_backend_through_a_plain_proxy_keeps_its_brackets(fakes):
    proxy = fakes()
    client = BackendClient("http://[::1]:9/api", "TRAIx", Secret(KEY), env={"http_proxy": f"http://127.0.0.1:{proxy.port}"})
    assert client.send(RECORD).outcome is Outcome.DELIVERED
    client.close()
    _, path, headers, _ = proxy.last()
    assert path == "http://[::1]:9/api/train_task/intermediate_metric" and headers["Host"] == "[::1]:9"


def test_retry_after_in_seconds_and_as_an_http_date():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert 9 <= retry_after_seconds(formatdate(now + 10, usegmt=True), now=now) <= 10
    assert retry_after_seconds(formatdate(now - 10, usegmt=True), now=now) == 0.0


def test_policy_honours_retry_after_then_succeeds(fakes):
    server = fakes(answers=[(429, {"Retry-After": "7"}, b"{}"), (503, {}, b"{}"), (200, {}, b'{"msg": "ok"}')])
    client = client_of(server)
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=30)
    assert retrying(client.send, RECORD).outcome is Outcome.DELIVERED
    client.close()
    assert slept[0] == 7.0  # Retry-After lengthens the backoff's own wait (attempt 1: up to 0.5)
    assert 0 <= slept[1] <= 1.0  # then full-jitter exponential backoff (attempt 2: up to 0.5 * 2)


def test_policy_backoff_is_capped_and_jittered(fakes):
    server = fakes(answers=[(503, {}, b"{}")] * 40 + [(200, {}, b"{}")])
    client = client_of(server)
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=30)
    retrying(client.send, RECORD)
    client.close()
    assert len(slept) == 40 and max(slept) <= 30
    assert len(set(slept)) > 30  # jitter: not one fixed sequence


def test_policy_stops_when_the_stop_event_is_set(fakes):
    client = client_of(fakes(503, {}, b"{}"))
    stop = threading.Event()
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 3:
            stop.set()

    with pytest.raises(TransientError):
        delivery_retrying(stop, sleep=sleep)(client.send, RECORD)
    client.close()
    assert len(calls) == 3


def test_retrier_replays_the_first_failure_then_backs_off_before_the_second_request(fakes):
    server = fakes(answers=[(429, {"Retry-After": "7"}, b"{}"), (503, {}, b"{}"), (200, {}, b'{"msg": "ok"}')])
    client = client_of(server)
    slept, seen = [], []
    retrier = Retrier(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=30)
    assert retrier.call(lambda: client.send(RECORD), seen.append).outcome is Outcome.DELIVERED
    client.close()
    assert server.count() == 3  # the first failure is not sent again before the backoff
    assert slept[0] == 7.0 and 0 <= slept[1] <= 1.0
    assert [type(e) for e in seen] == [TransientError, TransientError]  # the exception, never tenacity's state
    assert [e.status for e in seen] == [429, 503]


def test_retrier_does_not_load_tenacity_or_call_on_retry_when_the_first_try_succeeds():
    seen = []
    retrier = Retrier(threading.Event(), sleep=seen.append)
    assert retrier.call(lambda: "done", seen.append) == "done"
    assert seen == [] and retrier._retrying is None


def test_retrier_raises_the_transient_error_once_stopped():
    stop = threading.Event()
    attempts, seen = [], []

    def attempt():
        attempts.append(1)
        raise TransientError("HTTP 503", status=503)

    def sleep(_seconds):
        if len(seen) == 3:
            stop.set()

    with pytest.raises(TransientError):
        Retrier(stop, sleep=sleep).call(attempt, seen.append)
    assert len(seen) == 3 and len(attempts) == 4


def test_the_fake_and_the_real_client_are_record_clients():
    from fakes import FakeClient

    client = BackendClient("http://127.0.0.1:9/api", "T", None)
    assert isinstance(FakeClient(), RecordClient) and isinstance(client, RecordClient)
    client.close()


# --- hardening against real loopback servers (issue 10) -------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_the_key_stays_home(fakes, status):
    elsewhere = fakes()
    redirecting = fakes(status, {"Location": f"{elsewhere.root}/steal?x=1"}, b"")
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
    redirecting = fakes(302, {"Location": f"{elsewhere.root}/api/train_task/final_metric"}, b"")
    env = clean_environ(ANYLEARN_BACKEND_URL=redirecting.base_url, ANYLEARN_TASK_ID=TASK_ID,
                        ANYLEARN_SECRET_KEY=SECRET_KEY, ANYLEARN_REPORTER_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "reporter", "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("FAIL") and "backend" in x]
    assert "HTTP 302" in line and f"127.0.0.1:{elsewhere.port}" in line
    assert SECRET_KEY not in done.stdout + done.stderr
    assert elsewhere.count() == 0 and redirecting.count() == 1


def test_a_dribbling_answer_is_cut_at_the_total_deadline(fakes):
    dribbler = fakes(cls=DribblingServer, interval_s=0.02)
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


def test_request_timeout_comes_from_the_environment():
    assert BackendClient.from_config(load_config({"ANYLEARN_REQUEST_TIMEOUT": "2.5"})[0]).request_timeout_s == 2.5
    assert BackendClient.from_config(load_config({"ANYLEARN_REQUEST_TIMEOUT": "soon"})[0]).request_timeout_s == 30.0


@pytest.mark.parametrize("retry_after", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_retry_after_cannot_switch_the_backoff_off(fakes, retry_after):
    server = fakes(429, {"Retry-After": retry_after}, b'{"msg": "slow down"}')
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


def test_retry_after_lengthens_a_wait_but_never_past_the_maximum(fakes):
    client = client_of(fakes(answers=[(429, {"Retry-After": "3600"}, b"{}"), (429, {"Retry-After": "0"}, b"{}"),
                                      (503, {"Retry-After": "2"}, b"{}"), (200, {}, b'{"msg": "ok"}')]))
    slept = []
    retrying = delivery_retrying(threading.Event(), sleep=slept.append, initial_backoff_s=0.5, max_backoff_s=5)
    assert retrying(client.send, RECORD).outcome is Outcome.DELIVERED
    client.close()
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
    reason=st.one_of(st.none(), _header_text),
    optional=st.booleans(),
)
def test_any_answer_is_classified_and_nothing_else_is_raised(status, retry_after, location, body, reason, optional):
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if location is not None:
        headers["LOCATION"] = location  # header names are matched whatever their case
    try:
        result = classify(Answer(status, headers, body, reason), optional_endpoint=optional)
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
    redirecting = fakes(307, {"Location": f"{elsewhere.root}/api/train_task/intermediate_metric"}, b"")
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


# --- what the backend sends back cannot carry the key out, nor flood the process ----------------------------


@pytest.mark.parametrize("status", [400, 401, 503])
def test_a_key_the_backend_echoes_is_masked_in_every_message_file_and_status(fakes, tmp_path, status):
    echo = _json.dumps({"msg": f"invalid secret key {SECRET_KEY}"}).encode()
    server = fakes(status, {"X-Echo": SECRET_KEY, "Retry-After": "60"}, echo)
    run_dir = tmp_path / "run"
    env = clean_environ(ANYLEARN_BACKEND_URL=server.base_url, ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY=SECRET_KEY,
                        ANYLEARN_REPORTER_RUN_DIR=str(run_dir), ANYLEARN_FLUSH_TIMEOUT="2")
    done = subprocess.run([sys.executable, "-m", "reporter", "report", "0.5"], env=env, capture_output=True, text=True, timeout=60)
    assert server.count() >= 1 and "***" in done.stderr  # the backend's reason is shown, masked
    shown = subprocess.run([sys.executable, "-m", "reporter", "status", str(run_dir)], env=env, capture_output=True, text=True, timeout=60)
    written = b"".join(p.read_bytes() for p in run_dir.iterdir() if p.is_file())
    assert SECRET_KEY not in done.stdout + done.stderr + shown.stdout + shown.stderr
    assert SECRET_KEY.encode() not in written


def test_a_key_echoed_inside_json_escapes_is_masked_too():
    key = 'k"ey\\with-quotes'
    body = _json.dumps({"msg": f"bad key {key}"}).encode()  # the quote and backslash arrive escaped
    answer = Answer(401, {}, body, "Unauthorized " + key, secret=key)
    result = classify(answer)
    assert key not in result.reason and "***" in result.reason
    assert key not in answer.reason and key.encode() not in answer.body


def test_a_users_token_is_masked_like_the_key():
    answer = Answer(401, {"X-Echo": "tok-123456"}, b'{"msg": "bad token tok-123456"}', "no tok-123456", secret="k", also_secret="tok-123456")
    assert "tok-123456" not in classify(answer).reason + answer.reason + str(answer.header("X-Echo"))
    assert b"tok-123456" not in answer.body


def test_with_a_users_token_the_heartbeat_is_the_sdk_agents_patch(fakes):
    server = fakes(200, {}, b'{"msg": "alive"}')
    client = BackendClient(server.base_url, TASK_ID, None, auth_token=Secret("tok-123456"))
    try:
        assert client.heartbeat().outcome is Outcome.DELIVERED
    finally:
        client.close()
    method, path, headers, body = server.last()
    assert (method, path, headers["Authorization"], body) == ("PATCH", "/api/train_task/heartbeat", "Bearer tok-123456",
                                                              f"train_task_id={TASK_ID}".encode())
    assert "Secret-Key" not in headers


def test_an_endless_answer_is_read_up_to_the_bound_and_the_process_stays_small():
    """A server announcing 8 GB and streaming it as fast as it can: the client reads its bound and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = {"bytes": 0}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8000000000\r\n\r\n")
            chunk = b"x" * 65536
            try:
                while sent["bytes"] < 8_000_000_000:
                    conn.sendall(chunk)
                    sent["bytes"] += len(chunk)
            except OSError:  # the client hung up: what we wanted
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = BackendClient(f"http://127.0.0.1:{listener.getsockname()[1]}/api", "TRAIx", Secret(KEY), request_timeout_s=20)
    try:
        result = client.send(RECORD)  # a 2xx: stored, whatever follows; the body is cut at the bound
        assert result.outcome is Outcome.DELIVERED and "not a JSON object" in result.reason
    finally:
        client.close()
        thread.join(20)
        listener.close()
    assert not thread.is_alive()
    assert sent["bytes"] < 64 * MAX_ANSWER_BYTES  # read to the bound, then the connection was dropped


# --- the wire: every value arrives as it was journalled -----------------------------------------------------


@pytest.fixture(scope="module")
def emulator():
    from reporter.emulator.server import make_server

    srv = make_server({TASK_ID: SECRET_KEY}).start()
    client = BackendClient(srv.base_url, TASK_ID, Secret(SECRET_KEY))
    yield srv, client
    client.close()
    srv.stop()


def _big_int_as_sent(n):
    from reporter.journal import metric_number

    return metric_number(n)  # what report_metric journals for an int: the nearest double


@given(value=st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(1 << 1023), max_value=1 << 1023).map(_big_int_as_sent),
    st.sampled_from([-0.0, 1e16, -1e16, 1e22, 1.7976931348623157e308, 5e-324, -2.5e-308, 123456789012345678.0]),
))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_finite_double_arrives_at_the_emulator_as_sent(emulator, value):
    """The form body goes through a standard decoder (the emulator's ``parse_qs`` and ``float``): 1e+16 once
    read as "1e 16" and was rejected for good (issue 16)."""
    server, client = emulator
    for kind in ("intermediate", "final"):
        result = client.send(replace(RECORD, kind=kind, value=value, key=f"k-{kind}-{value!r}-{time.monotonic_ns()}"))
        assert result.outcome is Outcome.DELIVERED, result
    stored = server.backend.intermediate(TASK_ID)[-1]["metric"]
    final = server.backend.final(TASK_ID)["final_metric"]
    assert stored == value and final == value
    assert float(parse_qs(f"metric={value!r}".replace("+", "%2B"))["metric"][0]) == value  # the decoder itself


def test_every_form_and_query_the_client_makes_is_form_encoded(fakes):
    server = fakes()
    client = BackendClient(server.base_url, "TRAI+x&y=1 z", Secret(KEY))
    client.send(replace(RECORD, value=1e16))
    client.heartbeat()
    client.read_final_metric()
    client.close()
    (_, _, _, metric), (_, _, _, beat), (_, query, _, _) = server.requests
    assert parse_qs(metric.decode(), strict_parsing=True) == {"id": ["TRAI+x&y=1 z"], "metric": ["1e+16"]}
    assert parse_qs(beat.decode(), strict_parsing=True) == {"id": ["TRAI+x&y=1 z"]}
    assert parse_qs(query.split("?", 1)[1], strict_parsing=True) == {"id": ["TRAI+x&y=1 z"]}


# --- a key echoed in any form it takes on the wire is masked --------------------------------------------------

ODD_KEY = 'Sk+y/with=odd&chars%7e"\\x\u00e9'
_ODD_KEY_FORMS = {
    "raw": ODD_KEY,
    "quote": quote(ODD_KEY, safe=""),
    "quote-safe-slash": quote(ODD_KEY),
    "quote_plus": quote_plus(ODD_KEY),
    "lower-hex": quote(ODD_KEY, safe="").lower().replace("sk", "Sk"),
    "json": _json.dumps(ODD_KEY)[1:-1],
    "json-unicode": _json.dumps(ODD_KEY, ensure_ascii=False)[1:-1],
}


@pytest.mark.parametrize("form", sorted(_ODD_KEY_FORMS))
@pytest.mark.parametrize("status", [400, 401])
def test_a_key_echoed_in_any_wire_form_is_masked_in_logs_files_and_status(fakes, tmp_path, capsys, form, status):
    from reporter.deliver import Deliverer, DeliveryOptions
    from reporter.journal import JournalWriter

    echoed = _ODD_KEY_FORMS[form]
    body = ('{"msg": "invalid key ' + echoed.replace("\\", "\\\\").replace('"', '\\"') + '"}').encode("utf-8")
    if form.startswith("json"):  # already escaped: sent as it is
        body = ('{"msg": "invalid key ' + echoed + '"}').encode("utf-8")
    server = fakes(status, {"X-Echo": echoed.encode("utf-8").decode("latin-1")}, body)
    writer = JournalWriter(str(tmp_path))
    writer.append("intermediate", 0.5, None, 1)
    writer.close()
    client = BackendClient(server.base_url, TASK_ID, Secret(ODD_KEY))
    answer = client.request("POST", "train_task/intermediate_metric", form={"id": TASK_ID, "metric": "0.5"})
    deliverer = Deliverer(str(tmp_path), client, DeliveryOptions(poll_interval_s=0.05, lock_poll_interval_s=0.05)).start()
    wait_until(lambda: deliverer.paused_reason or (tmp_path / "rejected.jsonl").exists(), 20, what="the answer booked")
    deliverer.close(5)
    said = capsys.readouterr()
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert "***" in answer.body.decode("utf-8") and "***" in answer.header("X-Echo")
    for text in (said.out + said.err, written.decode("utf-8", "replace"), answer.body.decode("utf-8", "replace"),
                 str(answer.header("X-Echo"))):
        for shown in set(_ODD_KEY_FORMS.values()):
            assert shown not in text
    assert b"***" in written  # the backend's reason is kept, masked
