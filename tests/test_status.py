"""``status`` (a run's delivery health, for probes) and ``show`` (a table of runs).

``status`` is unhealthy whenever records have waited longer than ``--stale-after`` with no delivery,
whatever the cause (a request stuck in flight, no deliverer at all), judged from the journal and cursor."""

import json
import re
import os
import subprocess
import sys

from conftest import (
    HAND_EDITED,
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    free_port,
    offline_run,
    wait_until,
)
from httpfakes import DribblingServer

from reporter.journal import JournalWriter
from reporter.status import oldest_pending_ts, sparkline


def _env(tmp_path, base_url, **extra):
    values = {"ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": SECRET_KEY, "ANYLEARN_BACKEND_URL": base_url,
              "ANYLEARN_REPORTER_DIR": str(tmp_path)}
    return clean_environ(**{**values, **extra})


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


def test_records_left_pending_with_no_deliverer_make_an_ended_run_unhealthy_at_once(tmp_path):
    run_dir = tmp_path / TASK_ID
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 0.5, None, 1)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps({"task_id": TASK_ID, "state": 2, "ended": 1.0}))
    assert oldest_pending_ts(str(run_dir)) is not None
    code, info = _status(run_dir, 1000)  # not "ok" until --stale-after: nothing will deliver them
    assert code == 1 and info["deliverer_pid"] is None
    assert info["health"].startswith("1 record stays pending and no deliverer is running")
    assert f"anylearn-reporter sync {run_dir}`" in info["health"]


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
    from reporter.reader import MAX_LINE_BYTES, JournalReader

    run_dir = tmp_path / TASK_ID
    run_dir.mkdir()
    ok = '{"kind":"intermediate","value":0.25,"name":null,"step":%d,"ts":1.0,"rank":0,"pid":1,"key":"a-%d"}\n'
    near = '{"kind":"intermediate","value":0.5,"name":"%s","step":2,"ts":1.0,"rank":0,"pid":1,"key":"a-2"}\n' % ("n" * (MAX_LINE_BYTES - 200))
    huge = '{"kind":"intermediate","value":0.5,"name":"%s","step":3,"ts":1.0,"rank":0,"pid":1,"key":"a-3"}\n' % ("x" * (3 * MAX_LINE_BYTES))
    (run_dir / "metrics.jsonl").write_text(ok % (1, 1) + near + huge + ok % (4, 4))
    reader = JournalReader(str(run_dir))
    entries = reader.read_available()
    assert [e.record.step if e.record else e.problem for e in entries] == [1, 2, f"line longer than {MAX_LINE_BYTES} bytes", 4]
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


def test_status_exit_codes(serve_process, tmp_path):
    server = serve_process()
    run_dir = tmp_path / TASK_ID
    JournalWriter(str(run_dir)).append("intermediate", 1.0, None, None)
    assert cli("status", str(tmp_path / "nothing")).returncode == 1
    unnamed = cli("status", env=clean_environ())
    assert unnamed.returncode == 2 and "give RUN_DIR" in unnamed.stderr
    pending = cli("status", str(run_dir))
    assert pending.returncode == 1 and "no deliverer is running" in pending.stdout
    env = _env(tmp_path, server.base_url)
    flushed = subprocess.run([sys.executable, "-c", "import reporter; reporter.report_metric(2.0); print(reporter.flush(20))"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert flushed.stdout.strip() == "True"
    healthy = cli("status", env=env)  # RUN_DIR from the task id
    assert healthy.returncode == 0, healthy.stdout
    assert "2 journalled, 2 delivered, 0 pending" in healthy.stdout and "health:" in healthy.stdout
    assert re.search(r"objective:\s+metric \(max\): last 2, best 2, final -", healthy.stdout), healthy.stdout
    wrong = _env(tmp_path, server.base_url, ANYLEARN_SECRET_KEY="bad-key-0000")
    subprocess.run([sys.executable, "-c", "import reporter; reporter.report_metric(3.0)"], env=wrong, capture_output=True, timeout=60)
    paused = cli("status", str(run_dir), "--json")
    assert paused.returncode == 1 and json.loads(paused.stdout)["paused"] == "auth: HTTP 401"


def test_status_is_unhealthy_when_delivery_fails_for_too_long(tmp_path):
    env = _env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    trainer = subprocess.Popen([sys.executable, "-c", "import reporter, time; reporter.report_metric(1.0); time.sleep(30)"], env=env)
    try:
        wait_until(lambda: (tmp_path / TASK_ID / "status.json").exists() and "failing_since" in (tmp_path / TASK_ID / "status.json").read_text()
                   and json.loads((tmp_path / TASK_ID / "status.json").read_text())["failing_since"], 30, what="a failure")
        retrying = cli("status", str(tmp_path / TASK_ID), "--stale-after", "1000")
        assert retrying.returncode == 0  # for a probe: a live deliverer retries, until --stale-after
        assert re.search(r"health:\s+retrying: delivery has failed for", retrying.stdout), retrying.stdout
        failing = cli("status", str(tmp_path / TASK_ID))  # no --stale-after: a failed last attempt is not ok
        assert failing.returncode == 1, failing.stdout
        assert re.search(r"health:\s+failing: delivery has failed for \d+ s \(.*; deliverer pid \d+ retrying\)", failing.stdout)

        def failed_for_over_a_second():
            done = cli("status", str(tmp_path / TASK_ID), "--stale-after", "1")
            return done.returncode == 1 and "has failed for" in done.stdout

        wait_until(failed_for_over_a_second, 30, interval_s=0.3, what="status to say delivery has failed for over 1 s")
    finally:
        trainer.kill()
        trainer.wait()


# --- show -------------------------------------------------------------------------------------------


def test_status_hints_a_sync_to_the_backend_the_run_recorded(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/api"
    env = _env(tmp_path, closed, ANYLEARN_FLUSH_TIMEOUT="1")
    trained = subprocess.run([sys.executable, "-c", "import reporter; reporter.report_metric(1.0)"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert trained.returncode == 0, trained.stderr
    done = cli("status", str(tmp_path / TASK_ID), env=clean_environ())  # a shell without ANYLEARN_BACKEND_URL
    assert done.returncode == 1
    assert f"anylearn-reporter sync {tmp_path / TASK_ID} --backend-url {closed}`" in done.stdout, done.stdout


def test_show_names_a_synced_offline_directory_beside_the_tasks_own_and_the_default_objective(tmp_path):
    offline_run(tmp_path, 2, name=TASK_ID)
    synced = offline_run(tmp_path, 3)
    (synced / "summary.json").write_text(json.dumps({"task_id": TASK_ID, "state": 2}))
    done = cli("show", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")))
    assert done.returncode == 0, done.stderr
    names = sorted(line.split("  ")[0].strip() for line in done.stdout.splitlines()[1:3])
    assert names == [TASK_ID, f"{TASK_ID} ({synced.name})"], done.stdout
    assert all("metric (max)" in line for line in done.stdout.splitlines()[1:3]), done.stdout


def test_show_on_an_empty_reporter_directory(tmp_path):
    done = cli("show", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "none")))
    assert done.returncode == 0 and "no runs under" in done.stdout
    as_json = cli("show", "--json", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "none")))
    assert json.loads(as_json.stdout) == []


def test_show_lists_runs_newest_first_with_metrics_and_a_sparkline(tmp_path):
    older = offline_run(tmp_path, 5, name="offline-20261101-000000-aaaaaa")
    os.utime(older / "metrics.jsonl", (1, 1))
    newer = offline_run(tmp_path, 8, name="TRAInewer")
    done = cli("show", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")))
    assert done.returncode == 0
    header, first, second = done.stdout.splitlines()[:3]
    assert header.split()[:3] == ["run", "state", "start"]
    assert first.startswith("TRAInewer") and second.startswith("offline-20261101")
    assert "success" in first and "▁" in first and "█" in first
    data = json.loads(cli("show", "--json", str(newer), env=clean_environ()).stdout)
    (run,) = data
    assert (run["pending"], run["last_metric"], run["best_metric"], run["final_metric"]) == (11, 7.0, 7.0, 8.0)


def test_show_on_a_broken_run_directory_reports_the_problems_without_failing(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b"{not json\n")
    (run_dir / "status.json").write_text("{broken")
    (run_dir / "cursor").write_text("garbage")
    done = cli("show", str(run_dir), env=clean_environ())
    assert done.returncode == 0, done.stderr
    assert "(!)" in done.stdout and "torn or invalid" in done.stdout and "status.json is not valid JSON" in done.stdout
    missing = cli("show", str(tmp_path / "no-such-run"), env=clean_environ())
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and f"no run directory at {tmp_path / 'no-such-run'}" in missing.stderr


def test_show_status_and_summary_never_fail_on_invalid_records_or_hand_edited_files(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 1e308, None, 3)
    writer.append("intermediate", -1e308, None, 4)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(HAND_EDITED)
        f.write(b'{"kind": "state", "value": "running"}\n')  # the last state line: not an int
    (run_dir / "status.json").write_text(json.dumps({"task_id": 7, "delivered": "abc", "skipped": {"x": "y"},
                                                     "last_delivery_ts": "yesterday", "failing_since": 1e300}))
    (run_dir / "summary.json").write_text(json.dumps({"started": "x", "ended": [], "state": "done", "final_metric": "?"}))
    env = clean_environ()
    table = cli("show", str(run_dir), env=env)
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert "5 invalid journal records skipped" in table.stdout
    assert "▁" in table.stdout and "█" in table.stdout  # +-1e308 drawn
    (run,) = json.loads(cli("show", "--json", str(run_dir), env=env).stdout)
    assert run["metrics"] == [0.0, 1.0, 1e308, -1e308] and run["delivered"] == 0 and run["started"] is not None
    assert run["invalid"] == {"value is not a number": 1, "value is not a finite number": 1, "unknown kind": 1,
                              "not a JSON object": 1, "state value is not an integer": 1}
    metrics = cli("show", "--metrics", str(run_dir), env=env)
    assert metrics.returncode == 0 and len(metrics.stdout.splitlines()) == 2 + 7
    for args in (["status", str(run_dir)], ["status", "--json", str(run_dir)]):
        probe = cli(*args, env=env)
        assert probe.returncode in (0, 1) and "Traceback" not in probe.stderr, probe.stderr
    assert json.loads(cli("status", "--json", str(run_dir), env=env).stdout)["state_name"] == "success"

def test_show_metrics_lists_the_records(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    done = cli("show", str(run_dir), "--metrics", env=clean_environ())
    lines = done.stdout.splitlines()
    assert lines[0] == f"# {run_dir}" and len(lines) == 2 + 5
    assert "intermediate" in lines[3] and lines[3].split()[-1] == "0.0"


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([]) == "" and len(sparkline(list(range(100)), width=20)) == 20
    assert sparkline([3, 3]) == "▅▅"



def test_status_reads_the_state_from_the_journals_last_state_record(tmp_path):
    run_dir = offline_run(tmp_path, 3, name=TASK_ID)  # states 1 then 2, all pending, nobody delivering
    done = cli("status", str(run_dir), "--json", env=clean_environ())
    info = json.loads(done.stdout)
    assert (info["state_name"], info["journalled"], info["pending"]) == ("success", 6, 6)
    assert done.returncode == 1 and "no deliverer is running" in info["health"]


def _large_journal(run_dir, count):
    """A journal of ``count`` intermediate records, written directly (seconds, not a writer's minutes)."""
    os.makedirs(run_dir, exist_ok=True)
    line = ('{"kind":"intermediate","value":%d.5,"name":"loss","step":%d,"ts":1796511399.5,"rank":0,'
            '"pid":7,"key":"5955e20363d8-7-%d"}\n')
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for start in range(0, count, 10_000):
            f.write("".join(line % (i, i, i + 1) for i in range(start, min(count, start + 10_000))))


def test_show_metrics_streams_a_large_journal_in_bounded_memory(tmp_path):
    run_dir = str(tmp_path / "run")
    _large_journal(run_dir, 200_000)
    # Measured in a helper process: RUSAGE_CHILDREN of this one keeps the largest child any earlier test ran.
    measure = (
        "import resource, subprocess, sys\n"
        f"done = subprocess.run([sys.executable, '-m', 'reporter', 'show', '--metrics', '--json', {run_dir!r}],"
        " stdout=open(sys.argv[1], 'w'))\n"
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", measure, str(out)], capture_output=True, text=True, timeout=120,
                          env=clean_environ())
    code, peak_kib = map(int, done.stdout.split())
    assert code == 0, done.stderr
    records = json.loads(out.read_text())
    assert len(records) == 200_000 and records[-1]["step"] == 199_999 and records[0]["name"] == "loss"
    # Unstreamed, the records, their dicts and the whole text were all held at once: ~450 MB for 200k.
    assert peak_kib < 100 * 1024, f"show peaked at {peak_kib / 1024:.0f} MB"
