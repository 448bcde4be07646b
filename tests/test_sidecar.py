"""The sidecar with real processes: a trainer that only journals, a sidecar that delivers, kill -9, ends."""

import json
import signal
import subprocess
import sys

from conftest import SECRET_KEY, TASK_ID, clean_environ, cli, free_port, wait_until

from reporter.journal import JournalWriter
from reporter.reader import iter_records
from reporter.runlock import lock_holder_pid

TRAINER = """
import sys, time, reporter
count, pause = int(sys.argv[1]), float(sys.argv[2])
for i in range(count):
    reporter.report_metric(float(i), step=i)
    time.sleep(pause)
print("done", flush=True)
"""


def shared_env(reporter_dir, base_url=None, with_key=True, **extra):
    """Both containers get the task id and the shared reporter directory; only the sidecar the key."""
    env = clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_REPORTER_DIR=str(reporter_dir), **extra)
    if base_url:
        env["ANYLEARN_BACKEND_URL"] = base_url
    if with_key:
        env.setdefault("ANYLEARN_SECRET_KEY", SECRET_KEY)
    return env


def start(args, env):
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_sidecar(env, *args):
    return start(["-m", "reporter", "sidecar", "--heartbeat", "0.3", "--interval", "0.3", *args], env)


def test_a_journalling_trainer_and_a_sidecar_deliver_everything_exactly_once(serve_process, tmp_path):
    server = serve_process()
    trainer = start(["-c", TRAINER, "200", "0.002"], shared_env(tmp_path, with_key=False))
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url), "--pid", str(trainer.pid))
    assert trainer.wait(60) == 0
    out, err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, err
    assert "is gone" in err
    task = server.task()
    assert task["intermediate_metrics"] == [float(i) for i in range(200)]
    assert server.get("/_dev/stats")["duplicates"] == 0
    assert task["heartbeats"] >= 1


def test_the_sidecar_killed_with_sigkill_and_restarted_loses_nothing(serve_process, tmp_path):
    server = serve_process("--latency-ms", "5")
    run_dir = tmp_path / TASK_ID
    trainer = start(["-c", TRAINER, "300", "0.005"], shared_env(tmp_path, with_key=False))
    first = start_sidecar(shared_env(tmp_path, server.base_url))
    wait_until(lambda: len(server.task()["intermediate_metrics"]) >= 30, 30, what="the first sidecar to deliver some")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    delivered_before = len(server.task()["intermediate_metrics"])
    second = start_sidecar(shared_env(tmp_path, server.base_url), "--pid", str(trainer.pid))
    assert trainer.wait(60) == 0
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert server.task()["intermediate_metrics"] == [float(i) for i in range(300)]
    # At most what was acknowledged within one cursor window (50 ms; each request takes >= 5 ms here, so
    # <= 10 records) plus the record in flight is sent again, with the same Idempotency-Keys.
    assert server.get("/_dev/stats")["duplicates"] <= 11
    assert 30 <= delivered_before < 300
    assert len(list(iter_records(str(run_dir)))) == 300


def test_summary_json_appearing_ends_the_sidecar_with_exit_0(serve_process, tmp_path):
    server = serve_process()
    run_dir = tmp_path / TASK_ID
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 0.5, None, None)
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url))
    wait_until(lambda: server.task()["intermediate_metrics"] == [0.5], 30, what="the delivery")
    writer.append("final", 0.75, None, None)
    (run_dir / "summary.json").write_text("{}")
    _, err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, err
    assert "summary.json appeared" in err
    assert server.task()["final_metric"] == 0.75


def test_sigterm_ends_the_sidecar_after_draining(serve_process, tmp_path):
    server = serve_process()
    JournalWriter(str(tmp_path / TASK_ID)).append("intermediate", 1.0, None, None)
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url))
    wait_until(lambda: server.task()["intermediate_metrics"] == [1.0], 30, what="the delivery")
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(30) == 0


def test_backend_down_at_the_end_exits_3_with_the_pending_count(tmp_path):
    writer = JournalWriter(str(tmp_path / TASK_ID))
    for i in range(4):
        writer.append("intermediate", float(i), None, None)
    (tmp_path / TASK_ID / "summary.json").write_text("{}")
    sidecar = start_sidecar(shared_env(tmp_path, f"http://127.0.0.1:{free_port()}/api"), "--drain-timeout", "1")
    _, err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 3
    assert "4 records stay pending" in err


def test_resources_jsonl_has_samples_of_the_watched_process_with_its_rss(serve_process, tmp_path):
    server = serve_process()
    hog = start(["-c", "import time; data = bytearray(60 * 1024 * 1024); print('ready', flush=True); time.sleep(30)"], clean_environ())
    assert hog.stdout.readline().strip() == "ready"
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url), "--pid", str(hog.pid))
    path = tmp_path / TASK_ID / "resources.jsonl"
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= 2, 30, what="two resource samples")
    hog.kill()
    hog.wait()
    sidecar.communicate(timeout=60)
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    watched = [s["process"] for s in samples if s["process"]]
    assert watched and all(p["pid"] == hog.pid for p in watched)
    assert max(p["rss_bytes"] for p in watched) >= 60 * 1024 * 1024
    assert all(p["threads"] >= 1 and p["open_files"] >= 0 for p in watched)
    system = samples[0]["system"]
    assert 0 < system["memory_used_bytes"] <= system["memory_total_bytes"] and 0 <= system["cpu_percent"] <= 100
    assert "gpus" not in samples[0]  # no GPU here: skipped without an error


def test_the_in_process_hook_leaves_delivery_to_a_live_sidecar(serve_process, tmp_path):
    server = serve_process()
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url))
    wait_until(lambda: lock_holder_pid(str(tmp_path / TASK_ID)) == sidecar.pid, 30, what="the sidecar to take the lock")
    trainer = start(["-c", TRAINER, "50", "0"], shared_env(tmp_path, server.base_url))  # has the key: could deliver
    assert trainer.wait(60) == 0
    wait_until(lambda: len(server.task()["intermediate_metrics"]) == 50, 30, what="the sidecar to deliver")
    status = json.loads((tmp_path / TASK_ID / "status.json").read_text())
    assert status["deliverer_pid"] == sidecar.pid
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(30) == 0


def test_the_sidecar_takes_over_from_an_in_process_thread_that_held_the_lock(serve_process, tmp_path):
    server = serve_process()
    code = TRAINER + "import sys; sys.stdin.readline()\n"  # keep the lock until told
    trainer = subprocess.Popen([sys.executable, "-c", code, "10", "0"], env=shared_env(tmp_path, server.base_url),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert trainer.stdout.readline().strip() == "done"
    wait_until(lambda: lock_holder_pid(str(tmp_path / TASK_ID)) == trainer.pid, 30, what="the trainer's thread to hold the lock")
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url), "--drain-timeout", "20")
    trainer.communicate("\n", timeout=30)
    wait_until(lambda: lock_holder_pid(str(tmp_path / TASK_ID)) == sidecar.pid, 30, what="the sidecar to take over")
    (tmp_path / TASK_ID / "summary.json").write_text("{}")
    assert sidecar.wait(30) == 0
    assert server.task()["intermediate_metrics"] == [float(i) for i in range(10)]


def test_sidecar_without_a_task_is_a_usage_error(tmp_path):
    done = cli("sidecar", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 2 and "ANYLEARN_TASK_ID" in done.stderr


def test_heartbeat_endpoint_missing_turns_heartbeats_off_once():
    from httpfakes import FakeServer

    from reporter.config import load_config
    from reporter.sidecar import Heartbeat

    server = FakeServer(404, {}, b"no").start()
    try:
        config, _ = load_config({"ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": SECRET_KEY, "ANYLEARN_BACKEND_URL": server.base_url})
        heartbeat = Heartbeat(config)
        for _ in range(3):
            heartbeat.beat()
        heartbeat.close()
    finally:
        server.stop()
    assert server.count() == 1 and not heartbeat.enabled
    method, path, headers, _ = server.last()
    assert (method, path, headers["Secret-Key"]) == ("POST", "/api/train_task/heartbeat", SECRET_KEY)


def test_heartbeats_turned_off_are_said_once_and_status_shows_them_off(tmp_path):
    from httpfakes import FakeServer

    from reporter.config import load_config
    from reporter.journal import JournalWriter
    from reporter.sidecar import Heartbeat

    run_dir = tmp_path / TASK_ID
    JournalWriter(str(run_dir)).append("intermediate", 0.5, None, None)  # a run `status` can look at
    server = FakeServer(405, {}, b"no").start()
    try:
        config, _ = load_config({"ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": SECRET_KEY, "ANYLEARN_BACKEND_URL": server.base_url})
        heartbeat = Heartbeat(config, str(run_dir))
        heartbeat.beat()
        heartbeat.beat()
        heartbeat.close()
    finally:
        server.stop()
    shown = cli("status", str(run_dir), env=clean_environ())
    assert "heartbeats: off (the backend has no heartbeat endpoint (HTTP 405))" in " ".join(shown.stdout.split())
    as_json = cli("status", "--json", str(run_dir), env=clean_environ())
    assert json.loads(as_json.stdout)["heartbeats"]["heartbeats"] == "off"


def test_kubernetes_pattern_wrapper_journals_and_the_sidecar_delivers_live(serve_process, tmp_path):
    """The training container (task id, no key) runs the wrapper; the sidecar (with the key) delivers while
    the command still runs, and ends once the wrapper's summary.json appears."""
    server = serve_process()
    sidecar = start_sidecar(shared_env(tmp_path, server.base_url))
    child = "import sys, reporter\nreporter.report_metric(0.5)\nprint('reported', flush=True)\nsys.stdin.readline()\nprint('ANYLEARN_FINAL_METRIC 0.8')"
    wrapper = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--", sys.executable, "-c", child],
                               env=shared_env(tmp_path, with_key=False), cwd=tmp_path,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wrapper.stdout.readline().strip() == "reported"
    wait_until(lambda: server.task()["intermediate_metrics"] == [0.5], 30, what="live delivery by the sidecar")
    assert server.task()["states"] == [1]
    _, err = wrapper.communicate("\n", timeout=60)
    assert wrapper.returncode == 0, err
    assert err.count("offline mode") == 1
    assert sidecar.wait(60) == 0
    task = server.task()
    assert task["final_metric"] == 0.8 and task["states"] == [1, 2]
