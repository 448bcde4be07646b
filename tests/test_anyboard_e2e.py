"""Anyboard end to end: unchanged training code under ``run``, beside a sidecar, and ``sync`` of an offline run
put every named metric into the local Anyboard exactly once, with the real IoTDB client against the emulator,
through an outage, a kill -9 and a refused login; the password is nowhere; the SDK's reader reads it back."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("iotdb.thrift.rpc.IClientRPCService", reason="the anyboard extra (apache-iotdb) is not installed")

from conftest import SECRET_KEY, TASK_ID, clean_environ, cli, task_env, wait_until  # noqa: E402

from reporter.emulator.anyboard import AnyboardStore  # noqa: E402
from reporter.emulator.anyboard_iotdb import IoTDBServer  # noqa: E402
from reporter.emulator.server import make_server  # noqa: E402
from reporter.journal import JournalWriter  # noqa: E402

PASSWORD = "iotdb-Pw-never-shown-42"
TOKEN = "reader-token"

# Unchanged training code: several named metrics per step through the hook, and metric lines on stdout. The
# script also checks that the password is in no argv of the wrapper or of itself, and that the training
# process never loads the IoTDB client.
TRAINER = """
import os, sys, time, reporter
count, pause = int(sys.argv[1]), float(sys.argv[2])
for pid in (os.getpid(), os.getppid()):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert os.environ["ANYLEARN_ANYBOARD_IOTDB_PASSWORD"].encode() not in f.read(), pid
for i in range(count):
    reporter.report_metrics({"loss": 1.0 / (i + 1), "lr": 0.1 * 0.9 ** i, "grad_norm": float("nan")}, step=i)
    print('ANYLEARN_METRIC {"name": "acc", "value": %s, "step": %d}' % (i / count, i), flush=True)
    time.sleep(pause)
assert not any(m.startswith(("iotdb", "thrift", "reporter.anyboard")) for m in sys.modules)  # training never loads them
"""

LINES_ONLY = """
import sys
for i in range(int(sys.argv[1])):
    print(f"epoch {i} top1={i / 100}", flush=True)
"""


def anyboard_env(port, password=PASSWORD, **extra):
    return {"ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port),
            "ANYLEARN_ANYBOARD_IOTDB_USER": "root", "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": password,
            "ANYLEARN_USER_ID": "USER1", "ANYLEARN_PROJECT_ID": "PROJ1", **extra}


@pytest.fixture
def board():
    """The local backend and the local Anyboard over one store, in this process."""
    store = AnyboardStore()
    iotdb = IoTDBServer(store, password=PASSWORD).start()
    backend = make_server({TASK_ID: SECRET_KEY}).start()
    yield backend, iotdb, store
    backend.stop()
    iotdb.stop()
    store.close()


def steps(store, name, task=TASK_ID):
    return [p["step"] for p in store.scalars("PROJ1", task, name)]


def assert_password_nowhere(run_dir, *texts):
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert PASSWORD.encode() not in f.read(), name
    for text in texts:
        assert PASSWORD not in text


def anyboard_section(run_dir):
    return json.loads((run_dir / "status.json").read_text())["sinks"]["anyboard"]


def test_run_puts_every_named_metric_into_anyboard_once_and_status_and_show_count_them(board, tmp_path):
    backend, iotdb, store = board
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    env = task_env(backend.base_url, str(run_dir), **anyboard_env(iotdb.port))
    done = cli("run", "--", sys.executable, str(script), "30", "0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("loss", "lr", "acc"):
        assert steps(store, name) == list(range(30)), name
    assert [p["value"] for p in store.scalars("PROJ1", TASK_ID, "loss")] == [1.0 / (i + 1) for i in range(30)]
    assert store.count() == 90 and steps(store, "grad_norm") == []
    section = anyboard_section(run_dir)
    assert section["delivered"] == 90 and section["skipped"]["not a finite number"] == 30
    assert section["cursor"] == (run_dir / "metrics.jsonl").stat().st_size
    status = cli("status", str(run_dir), env=clean_environ())
    assert "anyboard: 90 points delivered, 0 pending, 0 failed writes" in re.sub(r" +", " ", status.stdout)
    show = cli("show", str(run_dir), env=clean_environ())
    assert "anyboard d/p/f" in show.stdout and "90/0/0" in show.stdout
    assert_password_nowhere(run_dir, done.stdout, done.stderr, status.stdout, show.stdout)


def test_a_framework_free_script_printing_metric_lines_lands_in_anyboard(board, tmp_path):
    backend, iotdb, store = board
    script = tmp_path / "lines.py"
    script.write_text(LINES_ONLY)
    env = task_env(backend.base_url, str(tmp_path / "run"), **anyboard_env(iotdb.port),
                   ANYLEARN_METRIC_PATTERNS=r"epoch (?P<step>\d+) (?P<name>top1)=(?P<value>[\d.]+)")
    done = cli("run", "--", sys.executable, str(script), "25", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert steps(store, "top1") == list(range(25)) and store.count() == 25


def test_a_sidecar_beside_a_hook_only_run_delivers_anyboard(board, tmp_path):
    backend, iotdb, store = board
    env = clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_BACKEND_URL=backend.base_url,
                        ANYLEARN_SECRET_KEY=SECRET_KEY, ANYLEARN_OBJECTIVE_METRIC="loss", **anyboard_env(iotdb.port))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "40", "0.002"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sidecar = subprocess.Popen([sys.executable, "-m", "reporter", "sidecar", "--interval", "0.2", "--heartbeat", "0.3",
                                "--pid", str(trainer.pid)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, err
    _, side_err = sidecar.communicate(timeout=60)
    assert sidecar.returncode == 0, side_err
    assert steps(store, "loss") == list(range(40)) and steps(store, "lr") == list(range(40))
    assert store.count() == 80  # the metric lines of a hook-only run are nobody's (no wrapper reads stdout)
    (task,) = backend.backend.tasks()  # the hook delivered the backend itself
    assert task["intermediate_metrics"] == [1.0 / (i + 1) for i in range(40)]
    assert PASSWORD not in err + side_err


def test_sync_of_an_offline_run_delivers_anyboard_and_all_ranks_stay_apart(board, tmp_path):
    backend, iotdb, store = board
    run_dir = tmp_path / "runs" / "offline-20261206-000000-abc123"
    writers = [JournalWriter(str(run_dir), rank=rank) for rank in (0, 1)]
    for i in range(50):
        for rank, writer in enumerate(writers):
            writer.append("intermediate", i + rank / 10, "loss", i)
        writers[0].append("intermediate", float("inf"), "loss", i)
    for writer in writers:
        writer.close()
    env = clean_environ(**anyboard_env(iotdb.port, ANYLEARN_REPORT_RANKS="all"), ANYLEARN_SECRET_KEY=SECRET_KEY)
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", backend.base_url, env=env)
    assert done.returncode == 0, done.stderr
    assert steps(store, "loss") == list(range(50)) and steps(store, "loss/rank1") == list(range(50))
    assert [p["value"] for p in store.scalars("PROJ1", TASK_ID, "loss/rank1")] == [i + 0.1 for i in range(50)]
    assert store.count() == 100 and anyboard_section(run_dir)["skipped"] == {"not a finite number": 50}
    assert_password_nowhere(run_dir, done.stdout, done.stderr)


def test_an_iotdb_outage_then_a_kill_9_of_the_wrapper_then_sync_lands_every_point_once_in_order(board, tmp_path):
    backend, iotdb, store = board
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    env = task_env(backend.base_url, str(run_dir), **anyboard_env(iotdb.port), ANYLEARN_GRACE_PERIOD="1")
    wrapper = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--", sys.executable, str(script), "400", "0.01"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_until(lambda: store.count() >= 30, 30, what="the first points")
        port = iotdb.port
        iotdb.stop()  # IoTDB goes away mid-run...
        wait_until(lambda: "Anyboard" in (anyboard_section(run_dir).get("last_error") or ""), 30,
                   what="the wrapper to see the outage")
        board_again = IoTDBServer(store, port=port, password=PASSWORD).start()  # ...and comes back on its port
        try:
            before = store.count()
            wait_until(lambda: store.count() > before + 30, 30, what="delivery to resume")
            os.killpg(wrapper.pid, signal.SIGKILL)  # the wrapper and the trainer die at once
            wrapper.wait(10)
            done = cli("sync", str(run_dir), env=clean_environ(**anyboard_env(port), ANYLEARN_SECRET_KEY=SECRET_KEY))
            assert done.returncode == 0, done.stderr
        finally:
            board_again.stop()
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait(10)
    lines = (run_dir / "metrics.jsonl").read_bytes().splitlines()
    journalled = {name: sum(1 for line in lines if b'"name":"%s"' % name.encode() in line) for name in ("loss", "lr", "acc")}
    assert journalled["loss"] >= 20
    for name, count in journalled.items():  # each journalled point once, in order (none doubled by the re-sends)
        assert steps(store, name) == list(range(count)), name
    assert store.count() == sum(journalled.values())
    assert anyboard_section(run_dir)["cursor"] == (run_dir / "metrics.jsonl").stat().st_size


def test_a_refused_login_pauses_anyboard_with_one_line_while_the_backend_gets_everything(board, tmp_path):
    backend, iotdb, store = board
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAINER.replace(', "grad_norm": float("nan")', ""))
    env = task_env(backend.base_url, str(run_dir), **anyboard_env(iotdb.port, password="wrong-" + PASSWORD),
                   ANYLEARN_OBJECTIVE_METRIC="loss")
    done = cli("run", "--", sys.executable, str(script), "20", "0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert store.count() == 0 and iotdb.handler.logins_refused == 1
    said = [line for line in done.stderr.splitlines() if "Anyboard" in line]
    assert len(said) == 1 and "Anyboard is paused" in said[0] and "ANYLEARN_ANYBOARD_IOTDB_PASSWORD" in said[0]
    (task,) = backend.backend.tasks()
    assert task["intermediate_metrics"] == [1.0 / (i + 1) for i in range(20)]
    section = anyboard_section(run_dir)
    assert section["paused"] and section["delivered"] == 0
    status = cli("status", str(run_dir), env=clean_environ())
    assert "anyboard: 0 points delivered, 60 pending" in re.sub(r" +", " ", status.stdout) and "paused" in status.stdout
    assert_password_nowhere(run_dir, done.stdout, done.stderr, status.stdout)


def test_the_released_sdks_reader_reads_back_what_run_delivered_through_serve(serve_process, tmp_path):
    sdk = pytest.importorskip("anylearn.anyboard.reader.cloud_reader", reason="the AnyLearn SDK (anylearn==0.20.7) is not importable")
    from anylearn.anyboard.reader.metric import MetricQuery, MetricType

    srv = serve_process("--anyboard-port", "0", "--token", TOKEN, env={"ANYLEARN_ANYBOARD_IOTDB_PASSWORD": PASSWORD})
    port = int(re.search(r"IoTDB at [\d.]+:(\d+)", srv.proc.stdout.readline()).group(1))
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    env = task_env(srv.base_url, str(tmp_path / "run"), **anyboard_env(port))
    done = cli("run", "--", sys.executable, str(script), "15", "0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    reader = sdk.CloudReader(cluster_address=srv.root, token=TOKEN)
    meta = {(m.task_id, m.name): m.count for m in reader.get_metric_meta("PROJ1")}
    assert meta == {(TASK_ID, "loss"): 15, (TASK_ID, "lr"): 15, (TASK_ID, "acc"): 15}
    (loss,) = reader.get_metric(MetricType.SCALAR, "PROJ1", [MetricQuery(TASK_ID, "loss", 0, 100)])
    assert [r.step for r in loss.record_list] == list(range(15)) and loss.get_last() == 1.0 / 15


def test_without_the_extra_run_says_the_pip_line_once_and_the_backend_gets_everything(board, tmp_path):
    backend, iotdb, store = board
    blocker = tmp_path / "block" / "iotdb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    env = task_env(backend.base_url, str(tmp_path / "run"), **anyboard_env(iotdb.port), ANYLEARN_OBJECTIVE_METRIC="loss",
                   PYTHONPATH=f"{tmp_path / 'block'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = cli("run", "--", sys.executable, str(script), "10", "0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "Anyboard" in line]
    assert len(said) == 1 and "pip install 'anylearn-reporter[anyboard]'" in said[0]
    (task,) = backend.backend.tasks()
    assert task["intermediate_metrics"] == [1.0 / (i + 1) for i in range(10)] and store.count() == 0


def test_some_variables_only_is_one_line_naming_what_is_missing_and_the_backend_gets_everything(board, tmp_path):
    backend, iotdb, store = board
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    partial = {k: v for k, v in anyboard_env(iotdb.port).items() if k != "ANYLEARN_PROJECT_ID"}
    env = task_env(backend.base_url, str(tmp_path / "run"), **partial, ANYLEARN_OBJECTIVE_METRIC="loss")
    done = cli("run", "--", sys.executable, str(script), "10", "0", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "Anyboard" in line]
    assert len(said) == 1 and "ANYLEARN_PROJECT_ID is not set" in said[0] and PASSWORD not in done.stderr
    (task,) = backend.backend.tasks()
    assert task["intermediate_metrics"] == [1.0 / (i + 1) for i in range(10)] and store.count() == 0
