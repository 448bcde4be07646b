"""The local backend emulator: the contract's answers, auth, idempotency, faults, persistence."""

import re
import socket

import pytest
import requests
from conftest import SECRET_KEY, TASK_ID, clean_environ, cli

from reporter.emulator.server import Faults, make_server

AUTH = {"Secret-Key": SECRET_KEY}


def post(server, endpoint, form, headers=AUTH):
    return requests.post(f"{server.base_url}/train_task/{endpoint}", data=form, headers=headers, timeout=10)


def test_answer_shapes_follow_the_contract(server):
    assert post(server, "intermediate_metric", {"id": TASK_ID, "metric": "90.0"}).json()["msg"]
    assert post(server, "final_metric", {"id": TASK_ID, "metric": "662.8"}).json()["msg"]
    listed = requests.get(
        f"{server.base_url}/train_task/intermediate_metric",
        params={"id": TASK_ID, "last_timestamp": "1970-01-01 00:00:00"}, headers=AUTH, timeout=10,
    ).json()
    (item,) = listed
    assert set(item) == {"id", "metric", "train_task_id", "reported_at"}
    assert re.fullmatch(r"METR[a-z0-9]{28}", item["id"]) and item["metric"] == 90.0 and item["train_task_id"] == TASK_ID
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", item["reported_at"])
    later = requests.get(
        f"{server.base_url}/train_task/intermediate_metric",
        params={"id": TASK_ID, "last_timestamp": "2999-01-01 00:00:00"}, headers=AUTH, timeout=10,
    ).json()
    assert later == []
    final = requests.get(f"{server.base_url}/train_task/final_metric", params={"id": TASK_ID}, headers=AUTH, timeout=10).json()
    assert final["final_metric"] == 662.8 and final["id"] == TASK_ID and "name" in final


def test_state_is_recorded_and_validated(server):
    assert post(server, "state", {"id": TASK_ID, "state": "1"}).status_code == 200
    assert post(server, "state", {"id": TASK_ID, "state": "9"}).status_code == 400
    assert server.backend.tasks()[0]["state"] == 1


@pytest.mark.parametrize("headers, task", [({}, TASK_ID), ({"Secret-Key": "wrong"}, TASK_ID), (AUTH, "TRAIunknown")])
def test_wrong_or_missing_key_and_unknown_task_get_401(server, headers, task):
    assert post(server, "intermediate_metric", {"id": task, "metric": "1"}, headers).status_code == 401
    assert requests.get(f"{server.base_url}/train_task/final_metric", params={"id": task}, headers=headers, timeout=10).status_code == 401


def test_bad_metric_is_a_400(server):
    assert post(server, "intermediate_metric", {"id": TASK_ID, "metric": "abc"}).status_code == 400
    assert post(server, "intermediate_metric", {"metric": "1"}).status_code == 400


def test_idempotency_key_deduplicates(server):
    headers = {**AUTH, "Idempotency-Key": "same-key"}
    first = post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}, headers)
    second = post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}, headers)
    assert first.json() == second.json()
    assert server.backend.tasks()[0]["intermediate_metrics"] == [1.0]
    assert server.backend.stats()["duplicates"] == 1


def test_fault_injection_fail_first_then_retry_after():
    with make_server({TASK_ID: SECRET_KEY}, faults=Faults(fail_first=2, retry_after_s=3)) as server:
        answers = [post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}) for _ in range(3)]
        assert [a.status_code for a in answers] == [429, 429, 200]
        assert answers[0].headers["Retry-After"] == "3"


def test_fault_injection_fail_rate_is_seeded():
    with make_server({TASK_ID: SECRET_KEY}, faults=Faults(fail_rate=0.5, seed=1)) as server:
        codes = [post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}).status_code for _ in range(40)]
    assert 5 < codes.count(503) < 35 and codes.count(200) + codes.count(503) == 40


def test_database_file_persists_across_restarts(tmp_path):
    db = str(tmp_path / "backend.sqlite3")
    with make_server({TASK_ID: SECRET_KEY}, db_path=db) as server:
        post(server, "intermediate_metric", {"id": TASK_ID, "metric": "4"})
    with make_server({}, db_path=db) as server:
        assert server.backend.tasks()[0]["intermediate_metrics"] == [4.0]


def test_serve_task_without_a_key_anywhere_is_a_usage_error():
    done = cli("serve", "--port", "0", "--task", TASK_ID, env=clean_environ())
    assert done.returncode == 2 and "ANYLEARN_SECRET_KEY" in done.stderr


# --- hardening (issue 10, item 10): bodies, headers, idle sockets, bearer reads ---------------------------


def exchange(host, port, data, timeout_s=10.0):
    """Send raw bytes on a fresh connection and return everything the server sends until it closes."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def raw_post(path, headers, body=b""):
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /api{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "0x10", "12, 12", "١٢"])
def test_a_malformed_content_length_gets_400_on_a_raw_socket(server, length):
    answer = exchange(server.host, server.port, raw_post("/train_task/intermediate_metric", {
        "Secret-Key": SECRET_KEY, "Content-Length": length}, b"id=x&metric=1"))
    assert answer.startswith(b"HTTP/1.1 400 ") and b"malformed Content-Length" in answer


def test_a_body_above_1_mib_gets_413_before_it_is_sent(server):
    # Only the headers go out: an answer proves the server did not wait for (or read) the body.
    answer = exchange(server.host, server.port, raw_post("/train_task/intermediate_metric", {
        "Secret-Key": SECRET_KEY, "Content-Length": str((1 << 20) + 1)}))
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert server.backend.tasks()[0]["intermediate_metrics"] == []


@pytest.mark.parametrize("path, headers, status", [
    ("/train_task/intermediate_metric", {"Secret-Key": "wrong"}, b"401"),
    ("/train_task/intermediate_metric", {"Authorization": "Bearer anything"}, b"401"),  # writes: Secret-Key only
    ("/no/such/endpoint", {"Secret-Key": SECRET_KEY}, b"404"),
])
def test_a_write_is_routed_and_authenticated_before_its_body_is_read(server, path, headers, status):
    answer = exchange(server.host, server.port, raw_post(path, {**headers, "Content-Length": "100"}))
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert server.backend.tasks()[0]["intermediate_metrics"] == []


def test_keep_alive_still_serves_several_requests_on_one_connection(server):
    body = f"id={TASK_ID}&metric=1".encode()
    one = raw_post("/train_task/intermediate_metric", {"Secret-Key": SECRET_KEY, "Content-Length": str(len(body))}, body)
    last = raw_post("/train_task/intermediate_metric", {"Secret-Key": SECRET_KEY, "Content-Length": str(len(body)),
                                                        "Connection": "close"}, body)
    answer = exchange(server.host, server.port, one + one + last)
    assert answer.count(b"HTTP/1.1 200 ") == 3
    assert server.backend.tasks()[0]["intermediate_metrics"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("sent", [b"", b"POST /api/train_task/state HTTP/1.1\r\nHost: x\r\n",
                                  b"POST /api/train_task/state HTTP/1.1\r\nSecret-Key: " + SECRET_KEY.encode() + b"\r\nContent-Length: 50\r\n\r\nid="])
def test_serve_closes_an_idle_or_stalled_connection(serve_process, sent):
    srv = serve_process("--idle-timeout", "0.3")
    host, port = srv.root.split("//")[1].split(":")
    answer = exchange(host, int(port), sent, timeout_s=20)  # returns once the server hangs up
    assert not answer.startswith(b"HTTP/1.1 200")
    assert srv.proc.poll() is None  # the server lives on
    assert srv.get("/_dev/tasks")[0]["id"] == TASK_ID


def _read(srv, endpoint, headers):
    return requests.get(f"{srv.base_url}/train_task/{endpoint}", params={"id": TASK_ID}, headers=headers, timeout=10)


def test_without_a_token_reads_accept_any_bearer_token_and_serve_says_so(serve_process):
    srv = serve_process()
    assert "any bearer token" in srv.proc.stdout.readline()
    assert requests.post(f"{srv.base_url}/train_task/intermediate_metric", data={"id": TASK_ID, "metric": "0.5"},
                         headers={"Secret-Key": SECRET_KEY}, timeout=10).status_code == 200
    # What the released AnyLearn SDK sends: its login token, never a Secret-Key.
    answer = _read(srv, "intermediate_metric", {"Authorization": "Bearer the-sdk-login-token"})
    assert answer.status_code == 200 and [m["metric"] for m in answer.json()] == [0.5]
    assert _read(srv, "final_metric", {"Authorization": "Bearer x"}).json()["id"] == TASK_ID
    assert _read(srv, "final_metric", {"Authorization": "Basic x"}).status_code == 401
    assert _read(srv, "final_metric", {}).status_code == 401


@pytest.mark.parametrize("how", ["--token", "ANYLEARN_TOKEN", "ANYLEARN_AUTH_TOKEN"])
def test_with_a_token_reads_accept_that_token_or_the_secret_key_and_writes_only_the_key(serve_process, how):
    srv = serve_process("--token", "T0k") if how == "--token" else serve_process(env={how: "T0k"})
    assert _read(srv, "intermediate_metric", {"Authorization": "Bearer T0k"}).status_code == 200
    assert _read(srv, "intermediate_metric", {"Authorization": "Bearer wrong"}).status_code == 401
    assert _read(srv, "intermediate_metric", {"Secret-Key": SECRET_KEY}).status_code == 200
    write = requests.post(f"{srv.base_url}/train_task/final_metric", data={"id": TASK_ID, "metric": "1"},
                          headers={"Authorization": "Bearer T0k"}, timeout=10)
    assert write.status_code == 401


def test_serve_closes_a_connection_that_drips_its_headers_inside_the_idle_timeout(serve_process):
    srv = serve_process("--idle-timeout", "0.6")
    host, port = srv.root.split("//")[1].split(":")
    header = b"GET /api/train_task/final_metric?id=x HTTP/1.1\r\nX-Drip: "  # never ends: only a deadline stops it
    hung_up_after = None
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.settimeout(0.3)  # the drip: one byte every 0.3 s, each well inside the 0.6 s idle timeout
        for sent in range(len(header)):
            try:
                sock.sendall(header[sent:sent + 1])
                sock.recv(1024)  # an answer or the end of the stream: the server gave up on us
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                pass
            hung_up_after = sent + 1
            break
    assert hung_up_after is not None, "the server waited for the whole dripped header"
    assert srv.proc.poll() is None and srv.get("/_dev/tasks")[0]["id"] == TASK_ID


# --- a local task's agent: heartbeat, shipped logs, their offsets, and reading the log back -------------


def test_local_task_endpoints_take_the_token_and_answer_the_sdks_log_shapes(server_factory):
    from reporter.emulator.server import make_server

    srv = make_server({TASK_ID: SECRET_KEY}, token="T0k").start()
    try:
        url, bearer = srv.base_url + "/train_task", {"Authorization": "Bearer T0k"}
        patch = lambda endpoint, data, headers=bearer: requests.patch(f"{url}/{endpoint}", data=data, headers=headers, timeout=10)
        assert patch("local_logs", {"id": TASK_ID, "logs": "one é\n"}, {"Secret-Key": SECRET_KEY}).status_code == 401
        assert patch("local_logs", {"id": "TRAInosuchtask", "logs": "x"}).status_code == 400
        assert patch("local_logs", {"id": TASK_ID, "logs": "one é\ntwo\nthree"}).status_code == 200
        assert patch("local_logs", {"id": TASK_ID, "logs": "four\n"}).status_code == 200
        assert patch("local_task_catch", {"id": TASK_ID, "key": "output_cache_pointer", "value": "21"}).status_code == 200
        assert patch("local_task_catch", {"id": TASK_ID, "key": "elsewhere", "value": "1"}).status_code == 400
        assert patch("heartbeat", {"train_task_id": TASK_ID}).json() == {"msg": "alive"}
        get = lambda endpoint, **params: requests.get(f"{url}/{endpoint}", params={"id": TASK_ID, **params}, headers=bearer, timeout=10)
        assert get("local_task_catch").json() == {"output_cache_pointer": 21, "error_cache_pointer": 0}
        newest = get("logs", limit=2, direction="init").json()
        assert [r["text"] for r in newest] == ["four", "three"] and all(isinstance(r["offset"], int) for r in newest)
        after = get("logs", limit=100, direction="back", index=newest[1]["offset"], offset_index=newest[1]["offset_index"]).json()
        assert [r["text"] for r in after] == ["four"]
        assert [r["text"] for r in get("logs", direction="back", offset_index=-1).json()] == ["one é", "two", "three", "four"]
        (detail,) = get("query").json()  # what the SDK's stream_log polls for the state; never the key
        assert detail["id"] == TASK_ID and detail["state"] == 0 and detail["secret_key"] is None
        assert SECRET_KEY not in get("query").text
        (task,) = srv.backend.tasks()
        assert task["heartbeats"] == 1 and task["log_tail"] == ["one é", "two", "three", "four"]
    finally:
        srv.stop()


# --- bad serve options, IPv6, the token on the page and /_dev reads (issue 16) -----------------------


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "port number"),
    (["--port=-1"], "port number"),
    (["--anyboard-port", "99999"], "port number"),
    (["--anyboard-port=-5"], "port number"),
    (["--db", "/nonexistent-dir/x.db"], "cannot open --db"),
    (["--latency-ms=-5"], "milliseconds"),
    (["--latency-ms", "nan"], "milliseconds"),
    (["--latency-ms", "1e300"], "milliseconds"),
    (["--fail-rate", "2"], "probability"),
    (["--retry-after", "inf"], "seconds"),
    (["--idle-timeout", "0"], "seconds"),
])
def test_serve_refuses_a_bad_option_in_one_line_with_exit_2(args, message):
    done = cli("serve", "--task", f"{TASK_ID}:{SECRET_KEY}", *args, timeout_s=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.splitlines()[-1]


def test_serve_listens_on_an_ipv6_host(serve_process):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound here")
    srv = serve_process("--host", "::1")
    assert srv.base_url.startswith("http://[::1]:")
    answer = requests.post(f"{srv.base_url}/train_task/intermediate_metric", data={"id": TASK_ID, "metric": "0.5"},
                           headers=AUTH, timeout=10)
    assert answer.status_code == 200 and srv.task()["intermediate_metrics"] == [0.5]


def test_with_a_token_the_page_and_dev_reads_need_it_too(serve_process):
    srv = serve_process("--token", "T0k", "--verbose")
    for path in ("/", "/_dev/tasks", "/_dev/stats"):
        anonymous = requests.get(srv.root + path, timeout=10)
        assert anonymous.status_code == 401 and TASK_ID not in anonymous.text, path
        assert requests.get(srv.root + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert requests.get(srv.root + path, headers={"Authorization": "Bearer T0k"}, timeout=10).status_code == 200
    assert requests.get(srv.root + "/?token=wrong", timeout=10).status_code == 401
    # A browser: ?token= once sets an HttpOnly cookie and sends it back to the page without the token.
    browser = requests.Session()
    first = browser.get(srv.root + "/?token=T0k", timeout=10, allow_redirects=False)
    assert first.status_code == 303 and first.headers["Location"] == "/"
    assert "HttpOnly" in first.headers["Set-Cookie"]
    page = browser.get(srv.root + "/", timeout=10)
    assert page.status_code == 200 and TASK_ID in page.text
    assert browser.get(srv.root + "/_dev/tasks", timeout=10).json()[0]["id"] == TASK_ID
    srv.stop()
    assert "T0k" not in srv.proc.stderr.read()  # the verbose request log shows ?token=***


def test_without_a_token_the_page_stays_open(serve_process):
    srv = serve_process()
    assert requests.get(srv.root + "/", timeout=10).status_code == 200
    assert srv.task()["id"] == TASK_ID
