"""``status``: unhealthy whenever records have waited longer than ``--stale-after`` with no delivery,
whatever the cause (a request stuck in flight, no deliverer at all), judged from the journal and cursor."""

import json
import subprocess
import sys

from conftest import SECRET_KEY, TASK_ID, clean_environ, cli, wait_until
from httpfakes import DribblingServer

from reporter.journal import JournalWriter
from reporter.status import oldest_pending_ts


def _env(tmp_path, base_url, **extra):
    return clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY=SECRET_KEY, ANYLEARN_BACKEND_URL=base_url,
                         ANYLEARN_REPORTER_DIR=str(tmp_path), **extra)


def _unhealthy(run_dir, stale_after):
    code, info = _status(run_dir, stale_after)
    return info if code == 1 else None


def _status(run_dir, stale_after):
    done = cli("status", str(run_dir), "--json", "--stale-after", str(stale_after))
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


def test_a_request_stuck_in_flight_makes_the_run_stale(tmp_path):
    stuck = DribblingServer(interval_s=5.0).start()  # answers one byte every 5 s: the request never fails
    env = _env(tmp_path, stuck.base_url, ANYLEARN_REQUEST_TIMEOUT="600")
    trainer = subprocess.Popen([sys.executable, "-c", "import reporter, time; reporter.report_metric(1.0); time.sleep(60)"], env=env)
    run_dir = tmp_path / TASK_ID
    try:
        wait_until(lambda: stuck.connections >= 1, 30, what="the request in flight")
        code, info = _status(run_dir, 1000)
        assert code == 0 and info["pending"] == 1 and info["failing_since"] is None and info["deliverer_pid"] == trainer.pid
        info = wait_until(lambda: _unhealthy(run_dir, 0.5), 20, what="stale")
        assert "nothing delivered for" in info["health"] and f"pid {trainer.pid}" in info["health"]
    finally:
        trainer.kill()
        trainer.wait()
        stuck.stop()


def test_records_left_pending_with_no_deliverer_make_an_ended_run_stale(tmp_path):
    run_dir = tmp_path / TASK_ID
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 0.5, None, 1)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"task_id": TASK_ID, "state": 2, "ended": 1.0}))
    assert oldest_pending_ts(str(run_dir)) is not None
    assert _status(run_dir, 1000)[0] == 0
    info = wait_until(lambda: _unhealthy(run_dir, 0.2), 20, what="stale")
    assert "no deliverer running" in info["health"] and info["deliverer_pid"] is None


def test_nothing_pending_is_healthy_however_old_the_run(tmp_path):
    run_dir = tmp_path / TASK_ID
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 0.5, None, 1)
    writer.close()
    (run_dir / "cursor").write_text(str((run_dir / "metrics.jsonl").stat().st_size))
    assert oldest_pending_ts(str(run_dir)) is None
    assert _status(run_dir, 0.0)[0] == 0


def test_a_lone_surrogate_in_names_and_reasons_is_printed_escaped_never_a_traceback(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    code = ("import reporter\n"
            "reporter.report_metrics({'\\ud800': 0.5})\n"
            "print('ANYLEARN_METRIC {\"value\": 0.25, \"name\": \"\\\\udcff\"}', flush=True)\n")
    done = cli("run", "--", sys.executable, "-c", code, env=env)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    with open(run_dir / "metrics.jsonl", "a") as f:  # written by another tool, and a backend's reason with one
        f.write('{"kind":"intermediate","value":0.75,"name":"hand\\udfff","step":1,"ts":1.0,"rank":0,"pid":1,"key":"h-1"}\n')
    (run_dir / "status.json").write_text(json.dumps({"last_error": "HTTP 400: bad name \ud800", "failing_since": 1.0}))
    show = cli("show", "--metrics", str(run_dir), env=env)
    status = cli("status", str(run_dir), env=env)
    for done in (show, status):
        assert "Traceback" not in done.stderr and "UnicodeEncodeError" not in done.stderr, done.stderr
    assert show.returncode == 0
    assert "\\ud800" in show.stdout and "\\udcff" in show.stdout and "hand\\udfff" in show.stdout
    assert "bad name \\ud800" in status.stdout
    journal = (run_dir / "metrics.jsonl").read_bytes().decode("utf-8")  # the writers journalled UTF-8 text
    assert journal.count('\\\\ud800') == 1 and journal.count('\\\\udcff') == 1


def test_a_line_above_the_bound_is_skipped_unread_and_counted_and_the_next_records_kept(tmp_path):
    from reporter.journal import MAX_LINE_BYTES, JournalReader

    run_dir = tmp_path / TASK_ID
    run_dir.mkdir()
    ok = '{"kind":"intermediate","value":0.25,"name":null,"step":%d,"ts":1.0,"rank":0,"pid":1,"key":"a-%d"}\n'
    near = '{"kind":"intermediate","value":0.5,"name":"%s","step":2,"ts":1.0,"rank":0,"pid":1,"key":"a-2"}\n' % ("n" * (MAX_LINE_BYTES - 200))
    huge = '{"kind":"intermediate","value":0.5,"name":"%s","step":3,"ts":1.0,"rank":0,"pid":1,"key":"a-3"}\n' % ("x" * (3 * MAX_LINE_BYTES))
    (run_dir / "metrics.jsonl").write_text(ok % (1, 1) + near + huge + ok % (4, 4))
    reader = JournalReader(str(run_dir))
    entries = reader.read_available()
    assert [e.record["step"] if e.record else e.problem for e in entries] == [1, 2, f"line longer than {MAX_LINE_BYTES} bytes", 4]
    assert reader.offset == (run_dir / "metrics.jsonl").stat().st_size
    assert reader.invalid == {f"line longer than {MAX_LINE_BYTES} bytes": 1}
    show = cli("show", str(run_dir))
    assert show.returncode == 0 and "1 line longer than" in show.stdout + show.stderr


def test_a_journal_that_is_a_device_is_said_once_never_read_and_makes_status_unhealthy(server, tmp_path):
    run_dir = tmp_path / TASK_ID
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # reads give zeros forever, writes fail: ENOSPC
    code = ("import os, time, reporter\nreporter.report_metric(0.5)\ndeadline = time.monotonic() + 20\n"
            f"while not os.path.exists({str(run_dir / 'status.json')!r}) and time.monotonic() < deadline:\n"
            "    time.sleep(0.02)\n")  # the deliverer, idle, has written its status
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path, server.base_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and (run_dir / "status.json").exists(), done.stderr
    assert done.stderr.count("is not a regular file") == 1, done.stderr
    status = cli("status", str(run_dir), "--json", timeout_s=30)
    assert status.returncode == 1 and "not a regular file" in json.loads(status.stdout)["health"]
    for command in (("show", str(run_dir)), ("show", "--metrics", str(run_dir))):
        shown = cli(*command, timeout_s=30)
        assert "Traceback" not in shown.stderr, shown.stderr
