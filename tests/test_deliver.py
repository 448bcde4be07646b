"""The delivery engine: its policy (skip, pause, reject, order, retry) with an in-memory client, and the
wire against the real local backend on loopback (its injected faults, and tests/httpfakes.py's misbehaving servers)."""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import SECRET_KEY, TASK_ID, cli, task_env, wait_until
from fakes import FakeClient, answer_by_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reporter.client import BackendClient, Outcome, SendResult, TransientError
from reporter.config import Secret
from reporter.cursor import count_pending, load_cursor
from reporter.deliver import Deliverer, DeliveryOptions
from reporter.emulator.server import Faults
from reporter.journal import JournalWriter
from reporter.policy import SendRule

FAST = DeliveryOptions(poll_interval_s=0.05, lock_poll_interval_s=0.05, initial_backoff_s=0.05, max_backoff_s=0.2)
ALL_RANKS = DeliveryOptions(**{**FAST.__dict__, "rule": SendRule(report_all_ranks=True)})


def make_deliverer(run_dir, base_url, key=SECRET_KEY, options=FAST):
    return Deliverer(str(run_dir), BackendClient(base_url, TASK_ID, Secret(key)), options)


def journal(run_dir, values, kind="intermediate", name=None, rank=0):
    writer = JournalWriter(str(run_dir), rank=rank)
    for i, value in enumerate(values):
        writer.append(kind, value, name, i)
    writer.close()


def deliver_with(run_dir, client, options=FAST):
    """Run a deliverer over ``run_dir`` with ``client`` until everything is acknowledged or it pauses."""
    deliverer = Deliverer(str(run_dir), client, options, retry_sleep=lambda s: None).start()
    drained = deliverer.flush(10)
    deliverer.close(5)
    return deliverer, drained


def intermediate_values(server):
    (task,) = server.backend.tasks()
    return task["intermediate_metrics"]


def test_record_delivered_once_after_5xx_then_200(server_factory, tmp_path):
    server = server_factory(Faults(fail_first=3))
    journal(tmp_path, [0.5])
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    assert deliverer.flush(10)
    deliverer.close(5)
    assert intermediate_values(server) == [0.5]
    assert server.backend.stats()["posts"] == 4 and server.backend.stats()["duplicates"] == 0
    assert load_cursor(str(tmp_path)).offset == os.path.getsize(tmp_path / "metrics.jsonl")


def test_records_are_delivered_in_order_and_the_cursor_resumes(server, tmp_path):
    journal(tmp_path, [float(i) for i in range(50)])
    first = make_deliverer(tmp_path, server.base_url).start()
    assert first.flush(20)
    first.close(5)
    journal(tmp_path, [float(i) for i in range(50, 60)])
    second = make_deliverer(tmp_path, server.base_url).start()
    assert second.flush(20)
    second.close(5)
    assert intermediate_values(server) == [float(i) for i in range(60)]
    assert server.backend.stats()["duplicates"] == 0


def test_final_metric_and_state_are_delivered(server, tmp_path):
    writer = JournalWriter(str(tmp_path))
    writer.append("state", 1, None, None)
    writer.append("final", 0.93, None, None)
    writer.append("state", 2, None, None)
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    assert deliverer.flush(10)
    deliverer.close(5)
    (task,) = server.backend.tasks()
    assert (task["final_metric"], task["states"], task["state"]) == (0.93, [1, 2], 2)


# --- policy, with an in-memory client ---------------------------------------------------------------


def test_records_are_sent_one_at_a_time_in_journal_order(tmp_path):
    journal(tmp_path, [float(i) for i in range(20)])
    client = FakeClient()
    deliverer, drained = deliver_with(tmp_path, client)
    assert drained and client.values() == [float(i) for i in range(20)]
    assert [r.step for r in client.sent] == list(range(20))
    assert load_cursor(str(tmp_path)).offset == os.path.getsize(tmp_path / "metrics.jsonl") and deliverer.delivered == 20


def test_transient_failures_are_retried_until_the_record_is_delivered_once(tmp_path):
    journal(tmp_path, [0.5, 0.6])
    client = FakeClient(transient_failures=3)
    deliverer, drained = deliver_with(tmp_path, client)
    assert drained and client.values() == [0.5, 0.6] and len(client.attempts) == 5
    assert deliverer.last_error == "HTTP 503 (fake)"


def test_skipped_records_are_counted_with_their_reason(tmp_path):
    journal(tmp_path, [1.0])
    journal(tmp_path, [2.0], rank=1)
    journal(tmp_path, [3.0], name="loss")
    journal(tmp_path, [float("nan")])
    journal(tmp_path, [4.0], name="metric")
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "intermediate", "value": "0.2x"}\n{not json\n')
    client = FakeClient()
    deliverer, drained = deliver_with(tmp_path, client)
    assert drained and client.values() == [1.0, 4.0]
    assert deliverer.skipped == {"from a rank other than 0": 1, "not the objective metric": 1, "not a finite number": 1,
                                 "invalid record (value is not a number)": 1, "torn or invalid line": 1}
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["delivered"] == 2 and status["skipped"] == deliverer.skipped


def test_report_ranks_all_sends_every_rank(tmp_path):
    journal(tmp_path, [1.0], rank=0)
    journal(tmp_path, [2.0], rank=3)
    client = FakeClient()
    deliver_with(tmp_path, client, ALL_RANKS)
    assert client.values() == [1.0, 2.0]


def test_state_records_of_other_node_ranks_are_never_sent(tmp_path):
    JournalWriter(str(tmp_path), rank=4).append("state", 2, None, None)  # node rank 1 of 4-process nodes
    JournalWriter(str(tmp_path), rank=0).append("state", 1, None, None)
    client = FakeClient()
    deliverer, _ = deliver_with(tmp_path, client, ALL_RANKS)
    assert [(r.kind, r.value) for r in client.sent] == [("state", 1)]
    assert deliverer.skipped == {"from a rank other than 0": 1}


@pytest.mark.parametrize("outcome, status, paused", [(Outcome.AUTH, 401, "auth: HTTP 401"), (Outcome.AUTH, 403, "auth: HTTP 403"),
                                                     (Outcome.REDIRECT, 302, "redirect: HTTP 302")])
def test_a_refused_key_or_a_redirect_pauses_delivery_and_keeps_every_record_pending(tmp_path, outcome, status, paused):
    journal(tmp_path, [1.0, 2.0, 3.0])
    client = FakeClient(answer_by_value({2.0: (outcome, status)}))
    deliverer, drained = deliver_with(tmp_path, client)
    assert not drained and deliverer.paused_reason.startswith(paused)
    assert client.values() == [1.0, 2.0]  # nothing after the pause is tried
    assert count_pending(str(tmp_path)) == 2 and deliverer.delivered == 1
    assert json.loads((tmp_path / "status.json").read_text())["paused"] == deliverer.paused_reason


def test_a_proxy_the_client_cannot_speak_pauses_delivery_once_instead_of_retrying_for_ever(server, tmp_path, capsys, monkeypatch):
    journal(tmp_path, [1.0, 2.0])
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    client = BackendClient(server.base_url, TASK_ID, Secret(SECRET_KEY))
    deliverer, drained = deliver_with(tmp_path, client)
    assert not drained and deliverer.paused_reason.startswith("setup: the proxy is a socks5:// URL")
    assert count_pending(str(tmp_path)) == 2 and server.backend.tasks()[0]["intermediate_metrics"] == []  # nothing sent or lost
    assert capsys.readouterr().err.count("cannot reach the backend as configured") == 1


def test_a_permanent_rejection_goes_to_rejected_jsonl_and_delivery_goes_on(tmp_path):
    journal(tmp_path, [1.0, 2.0, 3.0])
    client = FakeClient(answer_by_value({2.0: (Outcome.REJECTED, 400)}))
    deliverer, drained = deliver_with(tmp_path, client)
    assert drained and client.values() == [1.0, 2.0, 3.0] and deliverer.delivered == 2
    (rejected,) = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert (rejected["value"], rejected["step"], rejected["http_status"]) == (2.0, 1, 400)
    assert rejected["reason"] == "rejected (fake)"


def test_a_backend_without_a_state_endpoint_turns_state_reporting_off_once(tmp_path, capsys):
    writer = JournalWriter(str(tmp_path))
    writer.append("state", 1, None, None)
    writer.append("intermediate", 0.5, None, None)
    writer.append("state", 2, None, None)
    client = FakeClient(answer_by_value({1: (Outcome.UNSUPPORTED, 404)}))
    deliverer, drained = deliver_with(tmp_path, client)
    assert drained and [(r.kind, r.value) for r in client.sent] == [("state", 1), ("intermediate", 0.5)]  # asked once
    assert deliverer.skipped == {"state reporting is off": 2}
    assert capsys.readouterr().err.count("state reporting is off") == 1


# --- the wire, against the real local backend -----------------------------------------------------------


def test_rejected_key_pauses_delivery_with_one_clear_message(server, tmp_path, capsys):
    journal(tmp_path, [1.0, 2.0, 3.0])
    deliverer = make_deliverer(tmp_path, server.base_url, key="wrong-key-xyz").start()
    assert not deliverer.flush(10)  # returns as soon as delivery pauses
    deliverer.close(2)
    err = capsys.readouterr().err
    assert err.count("refused the task id or the secret key") == 1 and TASK_ID in err and "sync" in err
    assert "wrong-key-xyz" not in err
    assert deliverer.paused_reason == "auth: HTTP 401"
    assert load_cursor(str(tmp_path)).offset == 0 and count_pending(str(tmp_path)) == 3
    assert server.backend.stats()["posts"] == 1  # paused: no hammering with a bad key


def test_a_task_state_the_backend_refuses_is_kept_in_rejected_jsonl(server, tmp_path):
    writer = JournalWriter(str(tmp_path))
    writer.append("state", 7, None, None)  # not a task state: the backend answers 400
    writer.append("intermediate", 1.5, None, None)
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    assert deliverer.flush(10)
    deliverer.close(5)
    (rejected,) = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rejected["value"] == 7 and rejected["http_status"] == 400 and "state" in rejected["reason"]
    assert intermediate_values(server) == [1.5]


def test_backend_down_keeps_records_pending_and_close_honours_its_deadline(tmp_path):
    from conftest import free_port

    journal(tmp_path, [1.0, 2.0])
    deliverer = make_deliverer(tmp_path, f"http://127.0.0.1:{free_port()}/api").start()
    assert not deliverer.flush(0.5)
    assert not deliverer.close(0.5)
    assert not deliverer.alive
    assert count_pending(str(tmp_path)) == 2
    status = json.loads((tmp_path / "status.json").read_text())
    assert "cannot connect" in status["last_error"]


def test_a_second_deliverer_waits_for_the_lock_then_takes_over(server, tmp_path):
    journal(tmp_path, [1.0])
    first = make_deliverer(tmp_path, server.base_url).start()
    assert first.flush(10)
    second = make_deliverer(tmp_path, server.base_url).start()
    assert not second.wait_for_lock(5)
    first.close(5)
    wait_until(lambda: second.wait_for_lock(0), 10, what="the second deliverer to take the lock")
    journal(tmp_path, [2.0])
    assert second.flush(10)
    second.close(5)
    assert intermediate_values(server) == [1.0, 2.0]


def test_status_file_never_holds_the_secret(server, tmp_path):
    journal(tmp_path, [1.0])
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    deliverer.flush(10)
    deliverer.close(5)
    for name in os.listdir(tmp_path):
        assert SECRET_KEY.encode() not in (tmp_path / name).read_bytes(), name


# A property over the whole engine: whatever transient failures the backend throws, in whatever order,
# every record reaches it once (acknowledged answers only), in journal order.

TRANSIENT = st.sampled_from(["503", "429", "500", "408", "connection", "not-json"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 12), failures=st.lists(st.one_of(TRANSIENT, st.just("ok")), max_size=30))
def test_any_sequence_of_transient_failures_delivers_each_record_once_in_order(tmp_path_factory, count, failures):
    run_dir = tmp_path_factory.mktemp("prop")
    journal(run_dir, [float(i) for i in range(count)])
    plan = list(failures)

    def scripted(record):
        outcome = plan.pop(0) if plan else "ok"
        if outcome == "connection":
            raise TransientError("cannot connect")
        if outcome == "not-json":
            raise TransientError("HTTP 200 with an answer that is not a JSON object", status=200)
        if outcome != "ok":
            raise TransientError(f"HTTP {outcome}", status=int(outcome))
        return SendResult(Outcome.DELIVERED, 200)

    client = FakeClient(scripted)  # without HTTP: the wire's classification is tested in test_client.py
    deliverer = Deliverer(str(run_dir), client, FAST, retry_sleep=lambda s: None).start()
    assert deliverer.flush(20)
    deliverer.close(5)
    assert client.values() == [float(i) for i in range(count)]
    assert load_cursor(str(run_dir)).offset == os.path.getsize(run_dir / "metrics.jsonl")


def test_a_dribbling_backend_is_a_transient_failure_retried_with_backoff(tmp_path):
    from httpfakes import DribblingServer

    dribbler = DribblingServer(0.02).start()
    try:
        journal(tmp_path, [0.5])
        client = BackendClient(dribbler.base_url, TASK_ID, Secret(SECRET_KEY), request_timeout_s=0.3)
        deliverer = Deliverer(str(tmp_path), client, FAST).start()
        wait_until(lambda: dribbler.connections >= 3, 20, what="requests cut at the deadline and retried")
        assert deliverer.last_error and "deadline" in deliverer.last_error
        assert deliverer.delivered == 0 and count_pending(str(tmp_path)) == 1
        assert not deliverer.close(0.5)
    finally:
        dribbler.stop()
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["failing_since"] and "deadline" in status["last_error"]


# --- the door, the wake-up, grouped acknowledgement, the burst hold-back (issue 13) --------------------

DOOR = {"start", "wait_for_lock", "flush", "drain", "close"}
OBSERVATIONS = {"alive", "status", "run_dir", "client", "options", "delivered", "skipped", "delivered_now", "skipped_now",
                "rejected_now", "paused_reason", "last_error", "last_error_ts", "last_delivery_ts", "started_ts", "state_reporting",
                "held_back"}


def test_hosts_get_a_narrow_door(tmp_path):
    deliverer = make_deliverer(tmp_path, "http://127.0.0.1:9/api")
    public = {name for name in dir(deliverer) if not name.startswith("_")}
    assert public == DOOR | OBSERVATIONS
    for name in OBSERVATIONS - {"status"}:  # everything else only tells what happened
        assert not callable(getattr(deliverer, name)) or name in ("client", "options")


def test_the_journal_write_itself_wakes_an_idle_deliverer(server, tmp_path):
    slow_poll = DeliveryOptions(poll_interval_s=60, watch_interval_s=60, lock_poll_interval_s=0.05)
    journal(tmp_path, [1.0])
    deliverer = make_deliverer(tmp_path, server.base_url, options=slow_poll).start()
    assert deliverer.flush(10)
    wait_until(lambda: load_cursor(str(tmp_path)).offset == os.path.getsize(tmp_path / "metrics.jsonl"), 10,
               what="the cursor saved when the deliverer went idle")
    journal(tmp_path, [2.0])  # the deliverer is blocked on its wake-up now; only the write can wake it
    wait_until(lambda: intermediate_values(server) == [1.0, 2.0], 20, what="delivery without waiting for a poll")
    deliverer.close(5)


def test_without_inotify_the_deliverer_polls(server, tmp_path, monkeypatch):
    from reporter import watch

    monkeypatch.setattr(watch, "_inotify", False)
    journal(tmp_path, [1.0])
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    assert deliverer.flush(10)
    journal(tmp_path, [2.0])
    assert deliverer.flush(10)
    deliverer.close(5)
    assert intermediate_values(server) == [1.0, 2.0]


def test_a_watch_made_before_the_journal_exists_follows_it_once_created(tmp_path):
    from reporter.watch import JournalWatch

    watch = JournalWatch(str(tmp_path), poll_interval_s=60, watch_interval_s=60)
    if not watch.uses_inotify:
        watch.close()
        pytest.skip("no inotify on this system: the deliverer polls (tested above)")
    woken = []

    def waiter():
        for _ in range(2):
            watch.wait()  # first woken by the journal's creation, then by a write to the file itself
            woken.append(1)

    threading.Thread(target=waiter, daemon=True).start()

    def write_and_look():
        journal(tmp_path, [1.0])
        return len(woken) == 2

    wait_until(write_and_look, 20, interval_s=0.2, what="two wake-ups")
    watch.close()


def test_the_cursor_is_saved_in_groups_yet_complete_at_idle_and_close(server, tmp_path, monkeypatch):
    from reporter import ack

    saves = []
    real = ack.save_cursor
    monkeypatch.setattr(ack, "save_cursor", lambda run_dir, offset, **kw: (saves.append(offset), real(run_dir, offset, **kw)))
    journal(tmp_path, [float(i) for i in range(200)])
    grouped = DeliveryOptions(poll_interval_s=0.05, lock_poll_interval_s=0.05, ack_interval_s=3600)
    deliverer = make_deliverer(tmp_path, server.base_url, options=grouped).start()
    assert deliverer.flush(30)
    deliverer.close(5)
    assert len(saves) < 10  # not one rename per record
    assert load_cursor(str(tmp_path)).offset == os.path.getsize(tmp_path / "metrics.jsonl")
    assert intermediate_values(server) == [float(i) for i in range(200)]


def test_a_lone_record_waits_for_a_quiet_host_and_a_burst_holds_each_request_back_once(server, tmp_path):
    from reporter.pacing import BURST_HISTORY, BurstPacing

    asked = []

    def host_busy():
        asked.append(1)
        return True  # the host says it is reporting, all the time

    def line(value, ts):
        return (f'{{"kind":"intermediate","value":{value!r},"name":null,"step":null,"ts":{ts!r},"rank":0,"pid":1,'
                f'"key":"k-{value}"}}\n')

    options = DeliveryOptions(poll_interval_s=0.05, lock_poll_interval_s=0.05)
    pacing = BurstPacing(host_busy, burst_gap_s=0.002, max_defer_s=0.02)
    looks_per_lone_record = 1 + round(pacing.max_defer_s / pacing.burst_gap_s)  # every 2 ms until max_defer_s
    # two records 10 ms apart: not a burst; each waits for the host to be quiet (here: until max_defer_s)
    (tmp_path / "metrics.jsonl").write_text(line(1.0, 1000.0) + line(2.0, 1000.01))
    deliverer = Deliverer(str(tmp_path), BackendClient(server.base_url, TASK_ID, Secret(SECRET_KEY)), options, pacing=pacing).start()
    assert deliverer.flush(10)
    assert len(asked) == 2 * looks_per_lone_record
    # then twelve 0.5 ms apart, one of them 5 ms late (as when the delivery thread had the interpreter a
    # while): once half of the last gaps are short, each request is held back with one look and one wait
    stamps = [1000.02 + 0.0005 * i + (0.005 if i >= 6 else 0.0) for i in range(12)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("".join(line(3.0 + i, ts) for i, ts in enumerate(stamps)))
    asked.clear()
    assert deliverer.flush(10)
    deliverer.close(5)
    before_the_burst_shows = BURST_HISTORY // 2  # records 3 to 6: their history is not a burst yet
    assert len(asked) == before_the_burst_shows * looks_per_lone_record + (12 - before_the_burst_shows)
    assert intermediate_values(server) == [1.0, 2.0] + [3.0 + i for i in range(12)]


def replace_journal(run_dir, how):
    """Take the journal away as a user or logrotate would: delete it, or rename it aside."""
    path = run_dir / "metrics.jsonl"
    if how == "delete":
        path.unlink()
    else:
        path.rename(run_dir / "metrics.jsonl.1")


@pytest.mark.parametrize("how", ["delete", "rename"])
def test_a_replaced_journal_is_followed_and_flush_waits_for_the_new_file(tmp_path, capsys, how):
    gate = threading.Event()

    def answer(record):
        if record.value >= 5:
            gate.wait(30)  # the new file's records are held until the test has looked at flush()
        return SendResult(Outcome.DELIVERED, 200, "ok")

    client = FakeClient(answer)
    deliverer = Deliverer(str(tmp_path), client, FAST).start()
    assert deliverer.wait_for_lock(10)
    journal(tmp_path, [0.0, 1.0, 2.0, 3.0, 4.0])
    assert deliverer.flush(10)
    replace_journal(tmp_path, how)
    journal(tmp_path, [5.0, 6.0, 7.0])
    assert not deliverer.flush(0.5)  # the new file's records are not acknowledged yet
    gate.set()
    assert deliverer.flush(10)
    deliverer.close(5)
    assert client.values() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # the old file's records not sent again
    assert load_cursor(str(tmp_path)).offset == os.path.getsize(tmp_path / "metrics.jsonl")
    assert capsys.readouterr().err.count("was replaced") == 1


def test_a_cursor_of_a_replaced_journal_starts_the_next_deliverer_at_zero(tmp_path):
    journal(tmp_path, [0.0, 1.0])
    first, drained = deliver_with(tmp_path, FakeClient())
    assert drained and first.client.values() == [0.0, 1.0]
    replace_journal(tmp_path, "delete")  # with no deliverer running: the cursor now lies inside the new file
    journal(tmp_path, [2.0, 3.0, 4.0, 5.0])
    assert os.path.getsize(tmp_path / "metrics.jsonl") > int((tmp_path / "cursor").read_text().split()[0])
    second, drained = deliver_with(tmp_path, FakeClient())
    assert drained and second.client.values() == [2.0, 3.0, 4.0, 5.0]


def test_the_watch_follows_the_journal_to_its_new_file(tmp_path):
    from reporter.watch import JournalWatch

    journal(tmp_path, [0.0])
    watch = JournalWatch(str(tmp_path), poll_interval_s=60, watch_interval_s=60)
    if not watch.uses_inotify:
        watch.close()
        pytest.skip("no inotify on this system: the deliverer polls (tested above)")
    woken = []
    done = threading.Event()

    def waiter():
        while not done.is_set():
            watch.wait()
            woken.append(1)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    replace_journal(tmp_path, "rename")
    journal(tmp_path, [1.0])  # the new file: watched once it is made
    wait_until(lambda: woken, 20, what="a wake-up for the rename or the new file")
    wait_until(lambda: watch.watched_ino == os.stat(tmp_path / "metrics.jsonl").st_ino, 20,
               what="the watch on the new file")
    woken.clear()
    journal(tmp_path, [2.0])  # a write to the new file wakes the watch (a 60 s timeout otherwise)
    wait_until(lambda: woken, 20, what="a wake-up by a write to the new file")
    done.set()
    watch.interrupt()
    thread.join(10)
    watch.close()  # after the thread's last wait(): its descriptors are never polled once given back


# --- hardening, second round (issue 16) ------------------------------------------------------------------


def journal_in_a_process(run_dir, values):
    """Journal ``values`` (steps from the first value) from another process, as training would."""
    code = ("import sys; from reporter.journal import JournalWriter\n"
            "w = JournalWriter(sys.argv[1])\n"
            "for v in sys.argv[2:]: w.append('intermediate', float(v), None, int(float(v)))\n"
            "w.close()\n")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir), *map(str, values)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_journal_truncated_in_place_is_a_new_journal_delivered_from_its_start(server, tmp_path, capsys):
    """logrotate's copytruncate: the reader once resumed mid-line at its old offset (records lost, flush()
    True at once) and a later sync sent the new journal again from 0."""
    path = tmp_path / "metrics.jsonl"
    deliverer = make_deliverer(tmp_path, server.base_url).start()
    journal_in_a_process(tmp_path, range(0, 300))
    assert deliverer.flush(30)
    shutil.copy(path, tmp_path / "metrics.jsonl.1")
    os.truncate(path, 0)
    journal_in_a_process(tmp_path, range(300, 350))  # a new journal, shorter than what was read of the old one
    assert deliverer.flush(30)
    assert intermediate_values(server)[300:] == [float(v) for v in range(300, 350)]
    journal_in_a_process(tmp_path, range(350, 700))  # now longer than the old one
    assert deliverer.flush(30)
    deliverer.close(5)
    expected = [float(v) for v in range(700)]
    assert intermediate_values(server) == expected
    assert capsys.readouterr().err.count("truncated in place") == 1
    assert load_cursor(str(tmp_path)).offset == os.path.getsize(path)
    done = cli("sync", str(tmp_path), env=task_env(server.base_url, str(tmp_path)))
    assert done.returncode == 0 and "nothing pending" in done.stdout, done.stdout + done.stderr
    assert intermediate_values(server) == expected
    assert server.backend.stats()["duplicates"] == 0


def test_a_journal_truncated_while_no_deliverer_runs_is_delivered_from_its_start(server, tmp_path):
    journal(tmp_path, [float(v) for v in range(50)])
    first, drained = deliver_with(tmp_path, FakeClient())
    assert drained
    os.truncate(tmp_path / "metrics.jsonl", 0)
    journal(tmp_path, [100.0, 101.0])
    second, drained = deliver_with(tmp_path, FakeClient())
    assert drained and second.client.values() == [100.0, 101.0]


def test_a_negative_gap_is_never_a_burst():
    from reporter.config import BURST_GAP_S
    from reporter.policy import is_short_gap

    assert is_short_gap(0.0, BURST_GAP_S) and is_short_gap(BURST_GAP_S / 2, BURST_GAP_S)
    assert not is_short_gap(BURST_GAP_S, BURST_GAP_S) and not is_short_gap(1.0, BURST_GAP_S)
    assert not is_short_gap(-1e-9, BURST_GAP_S) and not is_short_gap(-3600.0, BURST_GAP_S)


def test_records_stamped_ahead_of_the_clock_are_delivered_without_holding_back(server, tmp_path):
    """A wall clock an hour ahead when the last reports were journalled (then set right): its negative gap
    once read as "reporting in a burst", and each request was held back, about 10 records/s for the hour."""
    from reporter import api
    from reporter.config import load_config
    from reporter.pacing import BurstPacing

    config, problems = load_config(task_env(server.base_url, str(tmp_path)))
    assert not problems
    hook = api._Hook(config, [])
    ahead = time.time() + 3600
    lines = "".join(
        f'{{"kind":"intermediate","value":{float(i)!r},"name":null,"step":{i},"ts":{ahead + i * 1e-4!r},"rank":0,'
        f'"pid":1,"key":"ahead-{i}"}}\n' for i in range(100)
    )
    (tmp_path / "metrics.jsonl").write_text(lines)
    hook.writer.last_append_ts = ahead + 0.01  # what the writer noted at the last report
    assert not hook._reporting_in_a_burst()
    deliverer = Deliverer(str(tmp_path), BackendClient(server.base_url, TASK_ID, Secret(SECRET_KEY)), FAST,
                          pacing=BurstPacing(hook._reporting_in_a_burst)).start()
    assert deliverer.flush(60)
    deliverer.close(5)
    hook.writer.close()
    assert deliverer.held_back == 0
    assert server.backend.stats()["posts"] == 100


def test_a_2xx_without_a_json_object_is_delivered_once_and_said_once(tmp_path, capsys):
    from httpfakes import FakeServer

    fake = FakeServer(204, {}, b"").start()
    try:
        journal(tmp_path, [1.0, 2.0, 3.0])
        deliverer, drained = deliver_with(tmp_path, BackendClient(fake.base_url, TASK_ID, Secret(SECRET_KEY)))
    finally:
        fake.stop()
    assert drained and deliverer.delivered_now == 3
    assert fake.count() == 3  # each record POSTed once
    assert capsys.readouterr().err.count("odd answer") == 1


# --- a full disk when delivery starts: a real small tmpfs ---------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory):
    """Fill the file system of ``directory``; return the file to delete to make room again."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        with pytest.raises(OSError) as info:
            for _ in range(1 << 20):
                f.write(b"\0" * 4096)
    assert info.value.errno == errno.ENOSPC
    return filler


def test_a_lock_file_that_cannot_be_written_leaves_no_lock_behind(small_tmpfs):
    from reporter.runlock import RunLock

    run_dir = small_tmpfs / "run"
    run_dir.mkdir()
    filler = fill(small_tmpfs)
    lock = RunLock(str(run_dir))
    with pytest.raises(OSError) as info:
        lock.try_acquire()
    assert info.value.errno == errno.ENOSPC and not lock.held
    filler.unlink()
    assert lock.try_acquire() and lock.held  # once leaked, the process's own descriptor conflicted for ever
    lock.release()


def test_a_deliverer_that_meets_a_full_disk_says_so_once_and_delivers_when_there_is_room(server, small_tmpfs, capsys,
                                                                                         monkeypatch):
    from reporter.runlock import RunLock

    tries = []
    real_try = RunLock.try_acquire
    monkeypatch.setattr(RunLock, "try_acquire", lambda self: (tries.append(1), real_try(self))[1])
    run_dir = small_tmpfs / "run"
    journal(run_dir, [1.0, 2.0])
    filler = fill(small_tmpfs)
    deliverer = make_deliverer(run_dir, server.base_url).start()
    assert not deliverer.wait_for_lock(10)
    wait_until(lambda: len(tries) >= 3, 10, what="a few tries at the lock while the disk is full")
    assert "No space left" in deliverer.last_error
    filler.unlink()
    assert deliverer.flush(20)
    deliverer.close(5)
    assert intermediate_values(server) == [1.0, 2.0]
    assert capsys.readouterr().err.count("cannot take the deliver lock") == 1


def test_a_deliverer_that_never_got_the_lock_for_a_full_disk_says_so_at_the_end(server, small_tmpfs, capsys):
    run_dir = small_tmpfs / "run"
    journal(run_dir, [1.0, 2.0])
    fill(small_tmpfs)
    deliverer = make_deliverer(run_dir, server.base_url).start()
    assert not deliverer.wait_for_lock(10)
    deliverer.close(1)
    said = capsys.readouterr().err
    assert "nothing was delivered" in said and "2 records stay pending" in said and "sync" in said
    assert intermediate_values(server) == []


# --- inotify out of watches: the poller never spins ---------------------------------------------------


def _cpu_share_of_waits(watch, wall_s=1.0):
    """The share of ``wall_s`` this thread spent on the CPU calling ``watch.wait()`` over and over."""
    start_wall, start_cpu = time.monotonic(), time.thread_time()
    while time.monotonic() - start_wall < wall_s:
        watch.wait()
    return (time.thread_time() - start_cpu) / (time.monotonic() - start_wall)


def test_a_watch_out_of_inotify_watches_falls_back_to_polling_without_spinning(tmp_path, monkeypatch):
    from reporter import watch as deliver_watch

    journal(tmp_path, [0.0])
    watch = deliver_watch.JournalWatch(str(tmp_path), poll_interval_s=0.1, watch_interval_s=0.5)
    if not watch.uses_inotify:
        watch.close()
        pytest.skip("no inotify on this system")
    init1, _, rm_watch = deliver_watch._inotify_calls()
    monkeypatch.setattr(deliver_watch, "_inotify", (init1, lambda *args: -1, rm_watch))  # every new watch: ENOSPC
    replace_journal(tmp_path, "rename")
    journal(tmp_path, [1.0])
    try:
        wait_until(lambda: (watch.wait(), not watch.uses_inotify)[1], 10, what="the fall-back to polling")
        assert _cpu_share_of_waits(watch) < 0.3  # once a closed descriptor stayed in the poller: 100%
    finally:
        watch.close()


def _inotify_watches_in_use():
    """inotify watches held by every process (an upper bound of root's)."""
    count = 0
    for info in glob.glob("/proc/[0-9]*/fdinfo/*"):
        try:
            with open(info) as f:
                count += f.read().count("inotify wd:")
        except OSError:
            pass
    return count


def test_the_real_inotify_limit_reached_while_the_journal_is_replaced_never_spins(tmp_path):
    from reporter import watch as deliver_watch

    limit_file = "/proc/sys/fs/inotify/max_user_watches"
    if not os.access(limit_file, os.W_OK):
        pytest.skip(f"{limit_file} is not writable here")
    journal(tmp_path, [0.0])
    watch = deliver_watch.JournalWatch(str(tmp_path), poll_interval_s=0.1, watch_interval_s=0.5)
    if not watch.uses_inotify:
        watch.close()
        pytest.skip("no inotify on this system")
    init1, add_watch, rm_watch = deliver_watch._inotify_calls()
    probe = init1(0o2000000)
    spare = tmp_path / "spare"
    spare.mkdir()
    with open(limit_file) as f:
        saved = f.read().strip()
    try:
        # Lower the limit to what is in use, then take what is left of it: no new watch can be added.
        with open(limit_file, "w") as f:
            f.write(str(max(1, _inotify_watches_in_use())))
        for i in range(2000):
            (spare / str(i)).touch()
            if add_watch(probe, os.fsencode(spare / str(i)), 0x2) < 0:
                break
        else:
            pytest.skip("could not use up the inotify watches")
        replace_journal(tmp_path, "rename")
        journal(tmp_path, [1.0])
        for _ in range(3):
            watch.wait()  # the rename, the new file: each a try at a new watch
    finally:
        with open(limit_file, "w") as f:
            f.write(saved)
        os.close(probe)
    try:
        assert _cpu_share_of_waits(watch) < 0.3  # once 99% of a core, idle
    finally:
        watch.close()
