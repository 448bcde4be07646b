"""The in-process hook: types, never raising for runtime trouble, never blocking, fork safety."""

import decimal
import fractions
import json
import os
import subprocess
import sys

import pytest
from conftest import (
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    free_port,
    run_python,
    task_env,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reporter
from reporter import api
from reporter.emulator.server import Faults
from reporter.ledger import COUNTER_LOST, read_host_counters
from reporter.reader import iter_records
from reporter.runlock import lock_holder_pid


@pytest.fixture
def task(monkeypatch, tmp_path):
    """Point the hook at a run directory and, until a test sets its own, at a closed loopback port (never
    AnyLearn's default host, which a task id and key alone would resolve to)."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", f"http://127.0.0.1:{free_port()}/api")
    monkeypatch.setenv("ANYLEARN_TASK_ID", TASK_ID)
    monkeypatch.setenv("ANYLEARN_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("ANYLEARN_REPORTER_RUN_DIR", str(run_dir))
    return run_dir


def journalled(run_dir):
    return [r for _, r in iter_records(str(run_dir))]


@pytest.mark.parametrize("bad", [True, False, "0.5", b"1", None, [1.0], {"a": 1}, object()])
def test_a_value_that_is_not_a_number_raises_type_error_and_journals_nothing(task, bad):
    with pytest.raises(TypeError, match="number"):
        reporter.report_metric(bad)
    assert not task.exists() or journalled(task) == []


def test_numbers_of_every_kind_are_accepted_as_floats(task, monkeypatch):
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", "http://127.0.0.1:9/api")
    for value in (1, 2.5, decimal.Decimal("0.5"), fractions.Fraction(1, 4)):
        reporter.report_metric(value)
    assert [r.value for r in journalled(task)] == [1.0, 2.5, 0.5, 0.25]


def test_numpy_scalars_and_0_d_arrays_are_numbers_and_numpy_bools_and_vectors_are_not(task):
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    for value in (np.float32(0.25), np.int64(3), np.array(7.0)):
        reporter.report_metric(value)
    assert [r.value for r in journalled(task)] == [0.25, 3.0, 7.0]
    for bad in (np.bool_(True), np.array([1.0, 2.0])):
        with pytest.raises(TypeError):
            reporter.report_metric(bad)


def test_a_0_d_torch_tensor_is_a_number(task):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    reporter.report_metric(torch.tensor(0.5))
    with pytest.raises(TypeError):
        reporter.report_metric(torch.tensor([0.5, 1.0]))
    assert [r.value for r in journalled(task)] == [0.5]


def test_step_and_name_are_checked(task):
    with pytest.raises(TypeError, match="step"):
        reporter.report_metric(1.0, step="3")
    with pytest.raises(TypeError, match="name"):
        reporter.report_metric(1.0, name=3)


def test_reports_return_while_the_backend_hangs(task, monkeypatch, server_factory):
    server = server_factory(Faults(latency_ms=30_000))  # every POST hangs for 30 s
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", server.base_url)
    for i in range(200):
        reporter.report_metric(float(i), step=i)
    # All 200 are on disk while the backend has not answered a single request.
    assert [r.step for r in journalled(task)] == list(range(200))
    assert server.backend.tasks()[0]["intermediate_metrics"] == []
    assert reporter.flush(0.2) is False


def test_anylearn_compatible_names_report_intermediate_and_final(task, monkeypatch, server):
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", server.base_url)
    reporter.report_intermediate_metric(0.5)
    reporter.report_intermediate_metric(0.6)
    reporter.report_final_metric(0.7)
    assert reporter.flush(10) is True
    (state,) = server.backend.tasks()
    assert state["intermediate_metrics"] == [0.5, 0.6] and state["final_metric"] == 0.7


def test_report_metrics_journals_every_name_and_sends_the_objective(task, monkeypatch, server):
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", server.base_url)
    monkeypatch.setenv("ANYLEARN_OBJECTIVE_METRIC", "acc")
    reporter.report_metrics({"acc": 0.9, "loss": 0.1}, step=1)
    with pytest.raises(TypeError):
        reporter.report_metrics({"acc": 0.8, "loss": "bad"}, step=2)
    assert reporter.flush(10)
    assert [(r.name, r.step) for r in journalled(task)] == [("acc", 1), ("loss", 1)]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.9]


def test_non_finite_values_are_journalled_as_null_and_warned_about_once_per_name(task, capsys):
    for _ in range(3):
        reporter.report_metric(float("nan"))
        reporter.report_metric(float("inf"), name="loss")
    err = capsys.readouterr().err
    assert err.count("journalled as null") == 2
    assert [r.value for r in journalled(task)] == [None] * 6


def test_offline_mode_journals_and_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANYLEARN_REPORTER_DIR", str(tmp_path / "runs"))
    for i in range(3):
        reporter.report_metric(i)
    assert reporter.flush(1) is False  # nothing can be delivered
    err = capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert err.count("offline mode") == 1 and str(run_dir) in err
    assert run_dir.name.startswith("offline-") and len(journalled(run_dir)) == 3


def test_disk_trouble_never_raises_and_is_counted(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = "import reporter\nfor _ in range(5):\n    reporter.report_metric(1.0)  # must not raise\nprint('ok')"
    done = run_python(code, clean_environ(ANYLEARN_REPORTER_RUN_DIR=str(blocker / "run")))
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert done.stderr.count("could not be journalled in") == 1
    assert "5 records could not be journalled (5 cannot open the journal (Not a directory))" in done.stderr


def test_invalid_configuration_warns_and_still_journals(task, monkeypatch, capsys):
    monkeypatch.setenv("ANYLEARN_REPORT_RANKS", "sometimes")
    reporter.report_metric(1.0)
    assert "ANYLEARN_REPORT_RANKS" in capsys.readouterr().err
    assert len(journalled(task)) == 1


def test_forked_child_journals_but_does_not_deliver(task, monkeypatch, server):
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", server.base_url)
    reporter.report_metric(1.0, step=0)
    assert reporter.flush(10)
    pid = os.fork()
    if pid == 0:
        try:
            reporter.report_metric(2.0, step=1)
            reporter.flush(0.5)  # returns: the child has no deliverer of its own to wait for
            os._exit(0 if lock_holder_pid(str(task)) == os.getppid() else 1)  # the parent still delivers
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reporter.report_metric(3.0, step=2)
    assert reporter.flush(10)
    assert server.backend.tasks()[0]["intermediate_metrics"] == [1.0, 2.0, 3.0]  # the parent delivered for the child
    assert server.backend.stats()["duplicates"] == 0 and server.backend.stats()["posts"] == 3
    records = journalled(task)
    assert [r.pid for r in records] == [os.getpid(), pid, os.getpid()]
    assert len({r.key for r in records}) == 3


def test_import_reporter_loads_no_http_stack():
    import subprocess
    import sys

    code = "import sys, reporter; print(json.dumps(sorted(m for m in ('requests', 'tenacity', 'psutil', 'urllib3', 'http.client', 'urllib.request') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_public_names_are_exported():
    for name in ("report_metric", "report_intermediate_metric", "report_final_metric", "report_metrics", "flush"):
        assert name in reporter.__all__ and callable(getattr(reporter, name))


# --- odd input never raises anything but TypeError (issue 10, item 9) --------------------------------


def test_a_step_beyond_64_bits_is_journalled_as_null_and_never_raises(task, capsys):
    reporter.report_metric(0.5, step=10**5000)
    reporter.report_metrics({"metric": 0.6}, step=-(10**30))
    reporter.report_metric(0.7, step=2**63 - 1)
    assert [r.step for r in journalled(task)] == [None, None, 2**63 - 1]
    assert capsys.readouterr().err.count("beyond a 64-bit integer") == 1


class _Raising:
    """A number-like object whose conversions fail with something other than TypeError."""

    def __float__(self):
        raise ZeroDivisionError("no value yet")

    def __index__(self):
        raise OverflowError("too big")

    def __bool__(self):
        raise ValueError("ambiguous")


ODD_VALUES = st.one_of(
    st.floats(), st.integers(), st.just(10**5000), st.just(-(10**5000)), st.booleans(), st.none(), st.text(max_size=5),
    st.decimals(), st.fractions(), st.just(_Raising()), st.binary(max_size=3),
)
ODD_STEPS = st.one_of(
    st.none(), st.integers(), st.just(10**5000), st.just(-(10**400)), st.floats(), st.booleans(), st.text(max_size=3),
    st.just(_Raising()),
)
ODD_NAMES = st.one_of(st.none(), st.text(), st.integers(), st.binary(max_size=3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=ODD_VALUES, step=ODD_STEPS, name=ODD_NAMES, final=st.one_of(st.booleans(), st.none(), st.just(_Raising())))
def test_any_value_step_and_name_journal_or_raise_type_error_and_nothing_else(monkeypatch, tmp_path, value, step, name, final):
    monkeypatch.setenv("ANYLEARN_REPORTER_RUN_DIR", str(tmp_path / "run"))  # offline: journal only
    for call in (
        lambda: reporter.report_metric(value, step=step, name=name, final=final),
        lambda: reporter.report_metrics({name if isinstance(name, str) else "metric": value}, step=step),
    ):
        try:
            call()
        except TypeError:
            pass
    assert reporter.flush(float("inf")) in (True, False)
    assert reporter.flush(float("nan")) in (True, False)


# --- invalid journal records never stop the in-process deliverer (item 4) ----------------------------


def test_an_invalid_record_on_disk_is_skipped_counted_and_delivery_goes_on(task, monkeypatch, server):
    monkeypatch.setenv("ANYLEARN_BACKEND_URL", server.base_url)
    task.mkdir()
    (task / "metrics.jsonl").write_text('{"kind": "intermediate", "value": "0.2x", "name": null, "step": 0}\n')
    for i in range(1, 4):
        reporter.report_metric(i / 10, step=i)
    assert reporter.flush(10) is True
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.1, 0.2, 0.3]
    api._reset_for_tests()  # the deliverer closes and writes its final status
    status = json.loads((task / "status.json").read_text())
    assert status["delivered"] == 3
    assert status["skipped"] == {"invalid record (value is not a number)": 1}


# --- a run directory that cannot be made (item 6) and records that cannot be journalled (item 4) -----


def test_try_report_metric_says_whether_the_record_was_journalled_and_the_exit_does_not_repeat_a_loss(task, capsys):
    assert api.try_report_metric(0.5, step=1) is True
    assert [(r.value, r.step) for r in journalled(task)] == [(0.5, 1)]
    api._reset_for_tests()
    task.joinpath("metrics.jsonl").unlink()
    task.joinpath("metrics.jsonl").symlink_to("/dev/full")  # opens, but every write fails: ENOSPC
    assert api.try_report_metric(0.25) is False
    assert sum(api._get_hook().writer.lost.values()) == 1  # still counted (status.json, counters.<pid>.json)
    capsys.readouterr()
    api._get_hook().close_at_exit()
    assert "could not be journalled" not in capsys.readouterr().err
    assert sum(read_host_counters(str(task))[COUNTER_LOST].values()) == 1  # saved at exit, not cleared

_REPORT_FOR_A_WHILE = """
import time, reporter
deadline, count = time.monotonic() + 1.6, 0
while time.monotonic() < deadline:  # the training loop: long enough for the deliverer to retry the lock
    reporter.report_metric(0.5, step=count)
    count += 1
print(count)
"""


@pytest.mark.parametrize("where", ["under a file", "under /proc"])  # a task id too long: test_config, a configuration problem
def test_a_run_directory_that_cannot_be_made_is_said_once_and_training_goes_on(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    task_id = TASK_ID
    reporter_dir = {"under a file": str(blocker), "under /proc": "/proc/anylearn-runs"}.get(where, str(tmp_path))
    if where.startswith("a task id"):
        task_id = "TRAI" + "x" * 300
    env = task_env(f"http://127.0.0.1:{free_port()}/api", "", ANYLEARN_TASK_ID=task_id,
                   ANYLEARN_REPORTER_DIR=reporter_dir, ANYLEARN_FLUSH_TIMEOUT="1")
    del env["ANYLEARN_REPORTER_RUN_DIR"]
    done = run_python(_REPORT_FOR_A_WHILE, env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    count = int(done.stdout)
    assert done.stderr.count("cannot take the deliver lock") == 1, done.stderr
    assert done.stderr.count("could not be journalled in") == 1
    assert f"{count} records could not be journalled ({count} cannot open the journal" in done.stderr


_FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
import reporter
for i in range(60):
    reporter.report_metric(i / 100, step=i)
reporter.flush(10)
"""


def test_records_that_cannot_be_journalled_are_counted_in_status_json_and_by_status(server, tmp_path):
    run_dir = tmp_path / "run"
    done = run_python(_FILE_SIZE_LIMITED, task_env(server.base_url, str(run_dir)))
    assert done.returncode == 0, done.stderr
    journalled_count = len(journalled(run_dir))
    status = json.loads((run_dir / "status.json").read_text())
    lost = status["counters"]["lost"]
    assert 0 < journalled_count < 60 and journalled_count + sum(lost.values()) == 60
    assert any("EFBIG" in reason or "short write" in reason for reason in lost)
    shown = cli("status", str(run_dir), env=task_env(server.base_url, str(run_dir)))
    assert f"lost:          {sum(lost.values())} (" in shown.stdout, shown.stdout


def test_records_the_command_could_not_journal_are_counted_in_summary_json(server, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_FILE_SIZE_LIMITED)
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "reporter", "run", "--", sys.executable, str(script)],
                          env=task_env(server.base_url, str(run_dir)), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    lost = summary["records"]["lost"]
    command_records = [r for r in journalled(run_dir) if r.kind == "intermediate"]
    assert sum(lost.values()) > 0 and len(command_records) + sum(lost.values()) == 60


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=400))
def test_any_name_is_journalled_as_utf8_of_at_most_the_name_limit(name):
    from reporter.record import MAX_NAME_CHARS, clean_name

    cleaned = clean_name(name)
    cleaned.encode("utf-8")  # never raises: a lone surrogate became its escape
    assert len(cleaned) <= MAX_NAME_CHARS and clean_name(cleaned) == cleaned
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return
    assert cleaned == name[:MAX_NAME_CHARS]  # a printable name is only ever cut, never changed


def test_a_name_above_the_limit_is_cut_once_said_and_never_raises(task, capsys):
    from reporter.record import MAX_NAME_CHARS

    reporter.report_metrics({"x" * 40_000: 0.5, "y" * 300: 0.25})
    reporter.report_metric(0.125, name="\ud800")
    names = [r.name for r in journalled(task)]
    assert names == ["x" * MAX_NAME_CHARS, "y" * MAX_NAME_CHARS, "\\ud800"]
    assert capsys.readouterr().err.count(f"longer than {MAX_NAME_CHARS} characters") == 1


def test_offline_mode_says_which_variable_is_missing_and_suggests_a_misspelt_one(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"), ANYLEARN_TASKID=TASK_ID, ANYLEARN_SECRET_KEY=SECRET_KEY)
    done = run_python("import reporter; reporter.report_metric(1.0)", env)
    assert "offline mode: ANYLEARN_TASK_ID (or task_id) is not set (ANYLEARN_TASKID is set: did you mean ANYLEARN_TASK_ID?)" in done.stderr
    assert SECRET_KEY not in done.stderr and "--task-id '<the task id>'" in done.stderr
    only_id = run_python("import reporter; reporter.report_metric(1.0)",
                         clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"), ANYLEARN_TASK_ID=TASK_ID))
    assert "offline mode: ANYLEARN_SECRET_KEY (or secret_key) is not set," in only_id.stderr
    assert "task credentials" not in only_id.stderr


def test_configuration_warnings_say_what_the_hook_does_about_them(tmp_path):
    env = task_env(f"http://127.0.0.1:{free_port()}/api", str(tmp_path / "run"), ANYLEARN_SECRET_KEY="k\u00e9y\u20ac",
                   ANYLEARN_FLUSH_TIMEOUT="soon")
    done = run_python("import reporter; reporter.report_metric(float('nan'))", env)
    assert "records are only journalled until it is fixed" in done.stderr
    key_line = next(line for line in done.stderr.splitlines() if "HTTP header" in line)
    assert "(using the default)" not in key_line  # a key that cannot be sent has no default
    assert "ANYLEARN_FLUSH_TIMEOUT must be a number of seconds, 0 or more (or inf for no limit), not 'soon' (using the default)" in done.stderr
    assert "the metric 'metric' is nan" in done.stderr and "metric metric" not in done.stderr


# --- the hook's lifetime: a journal replaced under it, exit, ranks, forks, signal handlers ----------------

_REPLACE_JOURNAL = """
import json, os, time, reporter
journal = os.path.join(os.environ["ANYLEARN_REPORTER_RUN_DIR"], "metrics.jsonl")
for i in range(50):
    reporter.report_metric(float(i), step=i)
assert reporter.flush(30)  # delivery follows the journal (a file nobody read before it was replaced is lost)
if {delete}:
    os.unlink(journal)
else:
    os.rename(journal, journal + ".1")  # log rotation
for i in range(50, 100):
    reporter.report_metric(float(i), step=i)
    time.sleep(0.01)
print(json.dumps({{"flushed": reporter.flush(30)}}), flush=True)
os._exit(0)  # no exit flush: what flush() said must hold by itself
"""


@pytest.mark.parametrize("delete", [False, True], ids=["renamed", "deleted"])
def test_a_journal_renamed_or_deleted_under_a_running_process_is_reopened_and_flush_waits_for_its_records(server_factory, tmp_path, delete):
    server = server_factory(Faults(latency_ms=5))  # delivery slower than reporting: flush() must really wait
    run_dir = tmp_path / "run"
    result = run_python(_REPLACE_JOURNAL.format(delete=delete), task_env(server.base_url, str(run_dir)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"flushed": True}, result.stderr
    assert server.backend.tasks()[0]["intermediate_metrics"] == [float(i) for i in range(100)]
    assert server.backend.stats()["duplicates"] == 0
    steps = [r.step for r in journalled(run_dir)]  # the path names a new journal holding the later records
    assert steps and steps == list(range(steps[0], 100)) and steps[0] >= 50
    assert "was renamed or deleted under this process" in result.stderr
    if not delete:
        kept = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl.1").read_text().splitlines()]
        assert kept == list(range(steps[0]))


_ATEXIT_REPORTS = {
    # "report the best at exit", registered before the first report: it runs before our exit flush
    "registered after import": "import atexit, reporter\natexit.register(lambda: reporter.report_metric(max(best), final=True))\n",
    # registered before reporter is imported: it runs after our exit flush, which then flushes again
    "registered before import": "import atexit\natexit.register(lambda: __import__('reporter').report_metric(max(best), final=True))\nimport reporter\n",
}


@pytest.mark.parametrize("order", sorted(_ATEXIT_REPORTS))
@pytest.mark.parametrize("steps", [5, 0], ids=["after-reports", "first-report-at-exit"])
def test_a_final_metric_reported_from_a_users_atexit_handler_is_delivered(server, tmp_path, order, steps):
    code = _ATEXIT_REPORTS[order] + (
        "best = [0.4]\n"
        f"for i in range({steps}):\n"
        "    reporter.report_metric(i / 10, step=i)\n"
    )
    result = run_python(code, task_env(server.base_url, str(tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    task = server.backend.tasks()[0]
    assert task["intermediate_metrics"] == [i / 10 for i in range(steps)]
    assert task["final_metric"] == 0.4, result.stderr


_MANY_REPORTS_AT_EXIT = """
import atexit, json
flushes = []
import threading
atexit.register(lambda: print(json.dumps(len(flushes)), flush=True))  # runs last: after the reports' flush
def report_from_a_thread():  # not the main thread: flushed before the report returns
    thread = threading.Thread(target=reporter.report_metric, args=(9.5,), kwargs={"final": True})
    thread.start()
    thread.join()
atexit.register(report_from_a_thread)
def report_all():
    for i in range(300):
        reporter.report_metric(i / 100, step=i)
    raise RuntimeError("a handler that fails after its reports")
atexit.register(report_all)  # registered before reporter is imported: runs after the exit flush
import reporter
from reporter import api
exit_flush = api._close_at_exit
def counted_exit_flush():
    flushes.append(1)
    exit_flush()
api._close_at_exit = counted_exit_flush  # the late reports' flushes (atexit keeps the exit flush itself)
reporter.report_metric(-1.0, step=-1)
"""


def test_reports_from_an_atexit_handler_after_the_exit_flush_are_flushed_once_when_it_returns_or_raises(server, tmp_path):
    result = run_python(_MANY_REPORTS_AT_EXIT, task_env(server.base_url, str(tmp_path / "run")))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == 2, result.stderr  # one for the handler's 300 reports, not one each; one for the thread's
    task = server.backend.tasks()[0]
    assert task["intermediate_metrics"] == [-1.0] + [i / 100 for i in range(300)]
    assert task["final_metric"] == 9.5
    assert server.backend.stats()["duplicates"] == 0


_RANK = """
import os, sys, time, reporter
from reporter.runlock import lock_holder_pid
run_dir = os.environ["ANYLEARN_REPORTER_RUN_DIR"]
for i in range(50):
    reporter.report_metric(float(i), step=i)
if os.environ["RANK"] == "1":  # the deliverer, until the test tells it to finish and exit
    while lock_holder_pid(run_dir) != os.getpid():
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(50, 100):
        reporter.report_metric(float(i), step=i)
else:  # its last records and its final metric come just after the deliverer has exited
    assert reporter.flush(30)  # delivered by rank 1 (and this rank's deliverer waits for the lock)
    deliverer = lock_holder_pid(run_dir)
    print("ready", flush=True)
    while lock_holder_pid(run_dir) == deliverer:
        time.sleep(0.001)
    for i in range(50, 100):
        reporter.report_metric(float(i), step=i)
    reporter.report_metric(99.5, final=True)
"""


def test_a_rank_whose_deliverer_rank_exited_first_takes_delivery_over_at_exit(server, tmp_path):
    run_dir = str(tmp_path / "run")
    procs = {}
    for rank in ("1", "0"):  # rank 1 starts first and becomes the deliverer
        procs[rank] = subprocess.Popen(
            [sys.executable, "-c", _RANK], env=task_env(server.base_url, run_dir, RANK=rank),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert procs[rank].stdout.readline().strip() == "ready"
    try:
        holder = lock_holder_pid(run_dir)
        assert holder == procs["1"].pid
        _, err1 = procs["1"].communicate("go\n", timeout=60)
        _, err0 = procs["0"].communicate(timeout=60)
    finally:
        for proc in procs.values():
            proc.kill()
    assert procs["1"].returncode == 0 and procs["0"].returncode == 0, err1 + err0
    task = server.backend.tasks()[0]
    assert task["intermediate_metrics"] == [float(i) for i in range(100)], err0
    assert task["final_metric"] == 99.5, err0
    assert "pending" not in err0


def test_a_forked_child_that_outlives_its_parent_takes_delivery_over(server, tmp_path):
    out = tmp_path / "child.json"
    code = (
        "import json, os, sys, time, reporter\n"
        "reporter.report_metric(1.0, step=0)\n"
        "assert reporter.flush(20)\n"
        "parent = os.getpid()\n"
        "if os.fork() == 0:\n"
        "    deadline = time.monotonic() + 30\n"
        "    while os.getppid() == parent and time.monotonic() < deadline:  # the parent exits first\n"
        "        time.sleep(0.01)\n"
        "    reporter.report_metric(2.0, step=1)\n"
        "    flushed = reporter.flush(20)\n"
        f"    open({str(out)!r}, 'w').write(json.dumps({{'flushed': flushed}}))\n"
        "    reporter.report_metric(3.0, step=2)  # left for the exit flush\n"
        "    sys.exit(0)\n"
    )
    parent = subprocess.run(  # the child keeps no pipe of the test open
        [sys.executable, "-c", code], env=task_env(server.base_url, str(tmp_path / "run")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
    )
    assert parent.returncode == 0
    wait_until(lambda: out.exists() and out.read_text(), what="the child's flush")
    assert json.loads(out.read_text()) == {"flushed": True}
    wait_until(lambda: server.backend.tasks()[0]["intermediate_metrics"] == [1.0, 2.0, 3.0], what="the child's exit flush")
    assert server.backend.stats()["duplicates"] == 0


_FORK_DURING_IMPORT = """
import json, os, sys, threading, time
import reporter

importing = threading.Event()

class SlowImport:  # the delivery thread's import of the delivery side takes a while, as on a loaded machine
    def find_spec(self, name, path=None, target=None):
        if name == "reporter.client" and threading.current_thread().name == "anylearn-reporter-delivery":
            importing.set()
            time.sleep(0.5)
        return None

sys.meta_path.insert(0, SlowImport())
for i in range(10):
    reporter.report_metric(float(i), step=i)
assert importing.wait(20)
parent = os.getpid()
if os.fork() == 0:  # while the delivery thread is inside `import reporter.deliver`
    deadline = time.monotonic() + 30
    while os.getppid() == parent and time.monotonic() < deadline:  # the parent exits first: the child delivers
        time.sleep(0.01)
    for i in range(10, 60):
        reporter.report_metric(float(i), step=i)
    print(json.dumps({"flushed": reporter.flush(10)}), flush=True)
    os._exit(0)
os._exit(0)  # no exit flush: the child takes delivery over
"""


def test_a_process_forked_while_the_delivery_side_is_being_imported_delivers_in_the_child(server, tmp_path):
    result = run_python(_FORK_DURING_IMPORT, task_env(server.base_url, str(tmp_path / "run")))  # ends with the child (its pipes)
    assert json.loads(result.stdout) == {"flushed": True}, result.stderr
    assert "cannot start delivery" not in result.stderr
    assert server.backend.tasks()[0]["intermediate_metrics"] == [float(i) for i in range(60)]
    # The parent ends with os._exit while its deliverer may be sending: what it sent in its last
    # acknowledgement window (cursor saved at most every 50 ms) is sent again by the child with the same
    # Idempotency-Keys, and the backend drops the copies (design.md, "Acknowledgement in groups"). Only
    # the parent's ten records can be resent; each value above is stored once.
    assert server.backend.stats()["duplicates"] <= 10


_SIGNAL_REPORTS = """
import json, signal, reporter
ticks = [0]
def on_alarm(signum, frame):
    ticks[0] += 1
    reporter.report_metric(float(ticks[0]), name="tick")  # from the handler's frame, in the main thread
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
reporter.report_metric(-1.0)  # the first report: the hook is made and the journal opened under the alarms
for i in range(300):
    reporter.report_metric(float(i), step=i)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
reporter.report_metric(300.0, step=300)  # journals what a handler's report left for later
print(json.dumps(ticks[0]), flush=True)
"""


@pytest.mark.parametrize("attempt", range(3))
def test_reports_from_a_signal_handler_never_block_and_are_all_journalled(server, tmp_path, attempt):
    run_dir = tmp_path / "run"
    result = run_python(_SIGNAL_REPORTS, task_env(server.base_url, str(run_dir)), timeout_s=30)
    assert result.returncode == 0, result.stderr
    ticks = json.loads(result.stdout)
    records = journalled(run_dir)
    assert sorted(r.value for r in records if r.name == "tick") == [float(i) for i in range(1, ticks + 1)]
    assert [r.value for r in records if r.name is None] == [-1.0] + [float(i) for i in range(301)]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [-1.0] + [float(i) for i in range(301)]
