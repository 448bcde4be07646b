"""``anylearn-reporter sync``: deliver what runs left pending, resumable, and say what was delivered and skipped."""

import signal
import subprocess
import sys

import pytest
from conftest import (
    HAND_EDITED,
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    free_port,
    offline_run,
    task_env,
    wait_until,
)

from reporter.journal import JournalWriter


def sync_env(**extra):
    return clean_environ(ANYLEARN_SECRET_KEY=SECRET_KEY, **extra)



def test_sync_of_an_offline_run_interrupted_then_run_again_delivers_each_record_once(serve_process, tmp_path):
    server = serve_process("--latency-ms", "20")
    run_dir = offline_run(tmp_path, 60)
    args = [sys.executable, "-m", "reporter", "sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url]
    first = subprocess.Popen(args, env=sync_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(server.task()["intermediate_metrics"]) >= 10, 30, what="the first sync to deliver some")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert len(server.task()["intermediate_metrics"]) < 60
    second = subprocess.run(args, env=sync_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    task = server.task()
    assert task["intermediate_metrics"] == [float(i) for i in range(60)]
    assert task["final_metric"] == 60.0 and task["states"] == [1, 2]
    assert "0 pending" in second.stdout
    again = subprocess.run(args, env=sync_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing pending" in again.stdout


def test_sync_reads_the_key_from_a_file_and_the_task_from_the_directory_name(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 3, name=TASK_ID)
    key_file = tmp_path / "key"
    key_file.write_text(SECRET_KEY + "\n")
    done = cli("sync", str(run_dir), "--backend-url", server.base_url, "--secret-key-file", str(key_file), env=clean_environ())
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 1.0, 2.0]
    assert f"{run_dir}: 6/6 records delivered\n" in done.stderr  # the last plain progress line off a terminal
    assert f"{run_dir}: 6 delivered, 0 pending\n" in done.stdout


def test_sync_with_a_wrong_key_leaves_records_pending_and_exits_3(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 3)
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url,
               env=clean_environ(ANYLEARN_SECRET_KEY="wrong-key-1234"))
    assert done.returncode == 3 and "refused the task id or the secret key" in done.stderr
    assert "wrong-key-1234" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--task-id", TASK_ID, "--backend-url", "http://127.0.0.1:9/api"], {}, "no secret key"),
        (["--backend-url", "http://127.0.0.1:9/api"], {"ANYLEARN_SECRET_KEY": "k"}, "offline run: say which task"),
        (["--task-id", TASK_ID, "--secret-key-file", "/nonexistent/key"], {}, "cannot read --secret-key-file"),
        (["--task-id", TASK_ID, "--secret-key", "k"], {}, "unrecognized arguments"),  # never a key in argv
    ],
)
def test_sync_usage_errors_exit_2(tmp_path, args, env, message):
    run_dir = offline_run(tmp_path, 1)
    done = cli("sync", str(run_dir), *args, env=clean_environ(**env))
    assert done.returncode == 2 and message in done.stderr


def test_sync_refuses_a_directory_that_is_not_a_run(tmp_path):
    done = cli("sync", str(tmp_path), "--task-id", TASK_ID, env=sync_env())
    assert done.returncode == 2 and "not a run directory" in done.stderr


def test_sync_refuses_another_tasks_run(tmp_path):
    run_dir = offline_run(tmp_path, 1, name="TRAIothertask")
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", "http://127.0.0.1:9/api", env=sync_env())
    assert done.returncode == 2 and "TRAIothertask" in done.stderr




def test_sync_delivers_past_invalid_records_and_says_what_it_skipped(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 2)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(HAND_EDITED)
    JournalWriter(str(run_dir)).append("intermediate", 0.75, "loss", 11)  # not the objective metric
    JournalWriter(str(run_dir)).append("intermediate", 0.5, None, 12)
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url, env=sync_env())
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 1.0, 0.5]
    assert (f"{run_dir}: 6 delivered, 5 skipped (1 invalid record (not a JSON object), 1 invalid record (unknown kind), "
            "1 invalid record (value is not a finite number), 1 invalid record (value is not a number), "
            "1 not the objective metric), 0 pending") in done.stdout
    status = cli("status", str(run_dir), env=clean_environ())
    assert "skipped:       5 (" in status.stdout and "value is not a number" in status.stdout, status.stdout


def test_a_run_directory_named_anything_syncs_to_the_task_its_own_files_record(serve_process, tmp_path):
    """ANYLEARN_REPORTER_RUN_DIR may name the run directory anything: the task comes from its status.json."""
    run_dir = tmp_path / "my-experiment"
    closed = f"http://127.0.0.1:{free_port()}/api"  # the backend is down while training reports
    code = "import reporter\nfor i in range(3): reporter.report_metric(i / 4)\n"
    trained = subprocess.run([sys.executable, "-c", code], env=task_env(closed, str(run_dir), ANYLEARN_FLUSH_TIMEOUT="1"),
                             capture_output=True, text=True, timeout=60)
    assert trained.returncode == 0, trained.stderr
    assert TASK_ID in (run_dir / "status.json").read_text()

    server = serve_process()
    done = cli("sync", str(run_dir), "--backend-url", server.base_url, env=sync_env())  # no task id given
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 0.25, 0.5]
    again = cli("sync", str(run_dir), "--backend-url", server.base_url, env=sync_env(ANYLEARN_TASK_ID=TASK_ID))
    assert again.returncode == 0 and "nothing pending" in again.stdout, again.stderr
    other = cli("sync", str(run_dir), "--task-id", "TRAIsomeoneelse", "--backend-url", server.base_url, env=sync_env())
    assert other.returncode == 2 and "its own files say so" in other.stderr


@pytest.mark.parametrize("sent, code, said", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "terminated (SIGTERM)"),
])
def test_sync_stopped_by_ctrl_c_or_sigterm_says_how_many_records_stay_pending(tmp_path, sent, code, said):
    run_dir = offline_run(tmp_path, 4)
    args = [sys.executable, "-m", "reporter", "sync", str(run_dir), "--task-id", TASK_ID,
            "--backend-url", f"http://127.0.0.1:{free_port()}/api"]  # nothing listens: it retries
    syncing = subprocess.Popen(args, env=sync_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (run_dir / "deliver.lock").exists() and b"failing_since" in (run_dir / "status.json").read_bytes()
               if (run_dir / "status.json").exists() else False, 30, what="sync to be retrying")
    syncing.send_signal(sent)
    _, err = syncing.communicate(timeout=30)
    assert syncing.returncode == code, err
    assert f"{said}: 7 records stay pending in {run_dir}; run the same command again to deliver the rest" in err, err


def test_sync_without_a_backend_url_delivers_to_the_one_the_run_recorded(serve_process, tmp_path):
    server = serve_process()
    run_dir = tmp_path / "run"
    code = "import reporter\nfor i in range(3): reporter.report_metric(float(i))\n"
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=task_env(server.base_url, str(run_dir), ANYLEARN_SECRET_KEY="wrong-key-5678"))
    assert "refused the task id or the secret key" in refused.stderr, refused.stderr
    done = cli("sync", str(run_dir), env=sync_env())  # neither --backend-url nor ANYLEARN_BACKEND_URL
    assert done.returncode == 0, done.stderr
    assert f"{run_dir}: delivering to {server.base_url} (from status.json of the run)" in done.stderr, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 1.0, 2.0]
