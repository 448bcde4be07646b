"""The in-process hook: types, never raising for runtime trouble, never blocking, fork safety."""

import decimal
import fractions
import json
import os

import pytest
from conftest import SECRET_KEY, TASK_ID, free_port

import reporter
from reporter import api
from reporter.devserver import Faults
from reporter.journal import iter_records


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
    assert [r["value"] for r in journalled(task)] == [1.0, 2.5, 0.5, 0.25]


def test_numpy_scalars_and_0_d_arrays_are_numbers_and_numpy_bools_and_vectors_are_not(task):
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    for value in (np.float32(0.25), np.int64(3), np.array(7.0)):
        reporter.report_metric(value)
    assert [r["value"] for r in journalled(task)] == [0.25, 3.0, 7.0]
    for bad in (np.bool_(True), np.array([1.0, 2.0])):
        with pytest.raises(TypeError):
            reporter.report_metric(bad)


def test_a_0_d_torch_tensor_is_a_number():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    assert api._as_float(torch.tensor(0.5)) == 0.5
    with pytest.raises(TypeError):
        api._as_float(torch.tensor([0.5, 1.0]))


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
    assert [r["step"] for r in journalled(task)] == list(range(200))
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
    assert [(r["name"], r["step"]) for r in journalled(task)] == [("acc", 1), ("loss", 1)]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.9]


def test_non_finite_values_are_journalled_as_null_and_warned_about_once_per_name(task, capsys):
    for _ in range(3):
        reporter.report_metric(float("nan"))
        reporter.report_metric(float("inf"), name="loss")
    err = capsys.readouterr().err
    assert err.count("journalled as null") == 2
    assert [r["value"] for r in journalled(task)] == [None] * 6


def test_offline_mode_journals_and_says_so_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ANYLEARN_REPORTER_DIR", str(tmp_path / "runs"))
    for i in range(3):
        reporter.report_metric(i)
    assert reporter.flush(1) is False  # nothing can be delivered
    err = capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert err.count("offline mode") == 1 and str(run_dir) in err
    assert run_dir.name.startswith("offline-") and len(journalled(run_dir)) == 3


def test_disk_trouble_never_raises_and_is_counted(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ANYLEARN_REPORTER_RUN_DIR", str(blocker / "run"))
    for _ in range(5):
        reporter.report_metric(1.0)  # must not raise
    assert sum(api._hook.writer.lost.values()) == 5
    assert capsys.readouterr().err.count("could not be journalled") == 1


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
            hook = api._hook
            ok = hook.deliverer is None and not hook.writer._pid != os.getpid()
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reporter.report_metric(3.0, step=2)
    assert reporter.flush(10)
    assert server.backend.tasks()[0]["intermediate_metrics"] == [1.0, 2.0, 3.0]  # the parent delivered for the child
    records = journalled(task)
    assert [r["pid"] for r in records] == [os.getpid(), pid, os.getpid()]
    assert len({r["key"] for r in records}) == 3


def test_import_reporter_loads_no_http_stack():
    import subprocess
    import sys

    code = "import sys, reporter; print(json.dumps(sorted(m for m in ('requests', 'tenacity', 'psutil', 'urllib3') if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_public_names_are_exported():
    for name in ("report_metric", "report_intermediate_metric", "report_final_metric", "report_metrics", "flush"):
        assert name in reporter.__all__ and callable(getattr(reporter, name))
