"""End to end with real processes: a training subprocess, ``anylearn-reporter serve`` on loopback,
real outages, a real ``kill -9``."""

import os
import signal
import subprocess
import sys
import time

from conftest import SECRET_KEY, free_port, run_python, task_env, wait_until

from reporter.client import BackendClient
from reporter.config import Secret
from reporter.cursor import count_pending
from reporter.deliver import Deliverer, DeliveryOptions
from reporter.reader import iter_records

TRAIN_1000 = """
import reporter
for step in range(1000):
    reporter.report_metric(step / 1000, step=step)
reporter.report_final_metric(0.999)
"""


def test_1000_reports_from_a_real_process_arrive_exactly_once_and_in_order(serve_process, tmp_path):
    server = serve_process()
    done = run_python(TRAIN_1000, task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_FLUSH_TIMEOUT="60"), timeout_s=90)
    assert done.returncode == 0, done.stderr
    task = server.task()
    assert task["intermediate_metrics"] == [step / 1000 for step in range(1000)]
    assert task["final_metric"] == 0.999
    stats = server.get("/_dev/stats")
    assert stats["posts"] == 1001 and stats["duplicates"] == 0
    assert stats["connections"] <= 3  # one keep-alive session (plus this test's own reads)
    assert count_pending(str(tmp_path / "run")) == 0


def test_backend_down_for_the_first_seconds_then_up_loses_nothing(serve_process, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/api"
    code = "import reporter\nfor i in range(20): reporter.report_metric(float(i), step=i)\nprint('journalled', flush=True)\n"
    trainer = subprocess.Popen(
        [sys.executable, "-c", code], env=task_env(base_url, str(tmp_path / "run"), ANYLEARN_FLUSH_TIMEOUT="60"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert trainer.stdout.readline().strip() == "journalled"
    wait_until(lambda: os.path.exists(tmp_path / "run" / "status.json"), 20, what="a failed delivery attempt")
    time.sleep(1.0)  # the outage lasts a while: several retries fail
    server = serve_process(port=port)
    out, err = trainer.communicate(timeout=90)
    assert trainer.returncode == 0
    assert server.task()["intermediate_metrics"] == [float(i) for i in range(20)]
    assert err.count("delivery to") == 1 and "retrying with backoff" in err  # one line for the outage, not one per retry
    assert "delivery resumed" in err


def test_429_with_retry_after_2_waits_at_least_2_seconds(serve_process, tmp_path):
    server = serve_process("--fail-first", "1", "--retry-after", "2")
    done = run_python("import reporter; reporter.report_metric(0.5)", task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_FLUSH_TIMEOUT="30"))
    assert done.returncode == 0, done.stderr
    first, second = server.get("/_dev/stats")["post_times"]
    assert second - first >= 2.0
    assert server.task()["intermediate_metrics"] == [0.5]


def test_401_pauses_with_one_clear_message_and_records_stay_pending(serve_process, tmp_path):
    server = serve_process()
    env = task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_SECRET_KEY="not-the-key-4242")
    done = run_python("import reporter\nfor i in range(5): reporter.report_metric(float(i))", env)
    assert done.returncode == 0
    assert done.stderr.count("refused the task id or the secret key") == 1
    assert "5 records stay pending" in done.stderr and "anylearn-reporter sync" in done.stderr
    assert "not-the-key-4242" not in done.stderr + done.stdout
    assert count_pending(str(tmp_path / "run")) == 5
    assert server.get("/_dev/stats")["posts"] == 1


def test_kill_9_right_after_reporting_keeps_every_record_for_the_next_deliverer(serve_process, tmp_path):
    run_dir = tmp_path / "run"
    closed = f"http://127.0.0.1:{free_port()}/api"  # the backend is down while the trainer lives
    code = "import reporter, time\nfor i in range(37): reporter.report_metric(float(i), step=i)\nprint('reported', flush=True)\ntime.sleep(60)\n"
    trainer = subprocess.Popen([sys.executable, "-c", code], env=task_env(closed, str(run_dir)), stdout=subprocess.PIPE, text=True)
    assert trainer.stdout.readline().strip() == "reported"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    assert [r.step for _, r in iter_records(str(run_dir))] == list(range(37))

    server = serve_process()
    from conftest import TASK_ID

    deliverer = Deliverer(str(run_dir), BackendClient(server.base_url, TASK_ID, Secret(SECRET_KEY)), DeliveryOptions(lock_poll_interval_s=0.05)).start()
    assert deliverer.flush(30)
    deliverer.close(5)
    assert server.task()["intermediate_metrics"] == [float(i) for i in range(37)]


def test_the_secret_key_appears_in_no_output_log_or_file(serve_process, tmp_path):
    server = serve_process("--fail-first", "3")
    run_dir = tmp_path / "run"
    code = "import reporter\nreporter.report_metric(1.0)\nreporter.report_metric(float('nan'))\nreporter.report_final_metric(2.0)\n"
    done = run_python(code, task_env(server.base_url, str(run_dir), ANYLEARN_REPORTER_LOG_LEVEL="DEBUG"))
    assert done.returncode == 0
    bad = run_python(code, task_env(server.base_url, str(tmp_path / "bad"), ANYLEARN_SECRET_KEY=SECRET_KEY + "x"))
    assert server.task()["final_metric"] == 2.0
    outputs = done.stdout + done.stderr + bad.stdout + bad.stderr
    assert SECRET_KEY not in outputs
    for directory in (run_dir, tmp_path / "bad"):
        for name in os.listdir(directory):
            assert SECRET_KEY.encode() not in (directory / name).read_bytes(), name


def test_exit_with_a_hanging_backend_waits_only_the_flush_timeout_and_says_what_stays(serve_process, tmp_path):
    server = serve_process("--latency-ms", "60000")  # every POST hangs for a minute
    env = task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_FLUSH_TIMEOUT="1")
    done = run_python("import reporter\nfor i in range(3): reporter.report_metric(float(i))\nprint('trained')", env, timeout_s=30)
    assert done.returncode == 0 and done.stdout.strip() == "trained"
    assert "3 records stay pending" in done.stderr and str(tmp_path / "run") in done.stderr
    assert count_pending(str(tmp_path / "run")) == 3


BAD_LINES = (
    b'{"kind": "intermediate", "value": "0.2x", "name": null, "step": 0}\n'
    b'{"kind": "final", "value": {"nested": [1]}, "name": null, "step": null}\n'
)


def _seed_bad_lines(run_dir):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_bytes(BAD_LINES)


def test_the_wrapper_delivers_past_invalid_records_and_counts_them(server, tmp_path):
    run_dir = tmp_path / "run"
    _seed_bad_lines(run_dir)
    child = "import reporter; reporter.report_metric(0.25, step=1); print('ANYLEARN_METRIC 0.5')"
    done = subprocess.run([sys.executable, "-m", "reporter", "run", "--", sys.executable, "-c", child],
                          env=task_env(server.base_url, str(run_dir)), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.25, 0.5]
    summary = json_file(run_dir / "summary.json")
    assert summary["records"]["pending"] == 0
    assert summary["records"]["skipped"]["invalid record (value is not a number)"] == 2


def test_the_sidecar_delivers_past_invalid_records_and_counts_them(server, tmp_path):
    from conftest import TASK_ID, clean_environ

    run_dir = tmp_path / TASK_ID
    _seed_bad_lines(run_dir)
    writer_env = clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_REPORTER_DIR=str(tmp_path))
    assert run_python("import reporter; reporter.report_metric(0.75, step=2)", writer_env).returncode == 0
    (run_dir / "summary.json").write_text("{}")  # the run has ended: the sidecar drains and exits
    sidecar = subprocess.run(
        [sys.executable, "-m", "reporter", "sidecar", "--heartbeat", "0.3", "--interval", "0.3"],
        env={**writer_env, "ANYLEARN_BACKEND_URL": server.base_url, "ANYLEARN_SECRET_KEY": SECRET_KEY},
        capture_output=True, text=True, timeout=120,
    )
    assert sidecar.returncode == 0, sidecar.stderr
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.75]
    assert json_file(run_dir / "status.json")["skipped"]["invalid record (value is not a number)"] == 2


def json_file(path):
    import json

    return json.loads(path.read_text())
