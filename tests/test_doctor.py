"""``anylearn-reporter doctor``: each check against the real local backend."""


from conftest import (
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    free_port,
    task_env,
)
from httpfakes import FakeServer

from reporter.doctor import FAIL, OK, run_checks


def test_doctor_passes_against_serve_with_the_right_key(server, tmp_path):
    done = cli("doctor", env=task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout
    assert "accepted the secret key" in done.stdout and "ending in" in done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr


def test_doctor_fails_against_serve_with_a_wrong_key(server, tmp_path):
    wrong = "Wrong-Key-abcdef99"
    done = cli("doctor", env=task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_SECRET_KEY=wrong, ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert "refused the task id or the secret key" in done.stdout and "check that" in done.stdout
    assert "1 problem: a run would only journal locally until it is fixed." in done.stderr
    assert wrong not in done.stdout + done.stderr and "'99'" in done.stdout  # at most the last two characters


def test_doctor_fails_against_a_closed_port(tmp_path):
    port = free_port()
    done = cli("doctor", env=task_env(f"http://127.0.0.1:{port}/api", str(tmp_path / "run"), ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in done.stdout


def test_doctor_with_nothing_configured_says_what_to_set(tmp_path):
    done = cli("doctor", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert "ANYLEARN_TASK_ID" in done.stdout and "ANYLEARN_SECRET_KEY" in done.stdout and "ANYLEARN_BACKEND_URL" in done.stdout


def test_doctor_reports_an_unwritable_reporter_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = cli("doctor", env=clean_environ(ANYLEARN_REPORTER_DIR=str(blocker / "runs")))
    assert done.returncode == 1 and "is not writable" in done.stdout


def test_doctor_points_at_a_misspelt_variable(tmp_path):
    done = cli("doctor", env=clean_environ(ANYLEARN_TASKID="TRAIx", ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert "ANYLEARN_TASKID is set: did you mean ANYLEARN_TASK_ID?" in done.stdout + done.stderr


def _proxied_backend_env(tmp_path):
    return {"ANYLEARN_BACKEND_URL": "http://backend.invalid/api", "ANYLEARN_TASK_ID": TASK_ID,
            "ANYLEARN_SECRET_KEY": SECRET_KEY, "ANYLEARN_REPORTER_DIR": str(tmp_path)}


def test_doctor_reaches_the_backend_through_the_proxy(tmp_path, monkeypatch):
    proxy = FakeServer().start()
    try:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        checks = run_checks(_proxied_backend_env(tmp_path))  # resolving backend.invalid would fail the test
    finally:
        proxy.stop()
    by_subject = {c.subject: c for c in checks}
    assert [c for c in checks if c.level == FAIL] == []
    assert by_subject["auth"].level == OK
    assert f"through the proxy http://127.0.0.1:{proxy.port}" in by_subject["route"].text
    assert by_subject["proxy TCP"].level == OK
    method, path, headers, _ = proxy.last()
    assert (method, path) == ("GET", f"http://backend.invalid:80/api/train_task/final_metric?id={TASK_ID}")
    assert headers["Secret-Key"] == SECRET_KEY  # to the backend, through the proxy that was configured


def test_doctor_fails_on_a_proxy_it_cannot_speak(tmp_path, monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    (failed,) = [c for c in run_checks(_proxied_backend_env(tmp_path)) if c.level == FAIL]
    assert failed.subject == "proxy" and "socks5://" in failed.text
