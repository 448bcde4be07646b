"""Unchanged NNI trials under ``anylearn-reporter run --nni``: the channel, NNI results -> records, and a real
``nni`` package end to end against the local backend."""

import json
import math
import sys
import textwrap

import pytest
from conftest import TASK_ID, clean_environ, cli, task_env
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.nni_trial import (
    ResultRecord,
    nni_environment,
    nni_version_problem,
    parameter_record,
    result_records,
)
from reporter.reader import iter_records
from reporter.record import KIND_FINAL, KIND_INTERMEDIATE

TRIAL = """
    import json, os, sys
    import nni

    params = nni.get_next_parameter()
    print("NNI", json.dumps({"params": params, "argv": sys.argv[1:], "trial": nni.get_trial_id(),
                             "experiment": nni.get_experiment_id(), "output": os.environ.get("NNI_OUTPUT_DIR"),
                             "again": nni.get_next_parameter()}))
    best = 0.0
    for epoch in range(int(params.get("epochs", 3))):
        acc = 0.5 + 0.1 * epoch
        if epoch % 2:
            nni.report_intermediate_result({"default": acc, "loss": 1 - acc, "note": "text is dropped"})
        else:
            nni.report_intermediate_result(acc)
        best = max(best, acc)
    nni.report_final_result({"default": best, "loss": 0.125})
"""


def nni_trial_script(tmp_path):
    pytest.importorskip("nni", reason="nni is not installed (pip install nni==3.0)")
    path = tmp_path / "trial.py"
    path.write_text(textwrap.dedent(TRIAL))
    return str(path)


def trial_info(stdout):
    (line,) = [line for line in stdout.splitlines() if line.startswith("NNI ")]
    return json.loads(line[4:])


# --- NNI results -> records ----------------------------------------------------------------------------


def test_a_number_is_the_objective_and_the_sequence_is_the_step():
    assert result_records("PERIODICAL", 4, 0.5) == ([ResultRecord(KIND_INTERMEDIATE, 0.5, None, 4)], [])
    assert result_records("FINAL", 0, 7) == ([ResultRecord(KIND_FINAL, 7.0, None, None)], [])


def test_in_a_dict_default_is_the_objective_and_other_numbers_go_by_name():
    records, problems = result_records("PERIODICAL", 2, {"default": 0.9, "loss": 0.1, "tag": "x", "ok": True})
    assert records == [ResultRecord(KIND_INTERMEDIATE, 0.9, None, 2), ResultRecord(KIND_INTERMEDIATE, 0.1, "loss", 2)]
    assert problems == ["a result value that is not a number (str)", "a result value that is not a number (bool)"]


def test_a_dict_without_default_is_journalled_by_name_and_says_nothing_is_sent():
    records, problems = result_records("FINAL", 0, {"acc": 0.5})
    assert records == [ResultRecord(KIND_FINAL, 0.5, "acc", None)] and "without a 'default' key" in problems[0]


def test_numpy_and_torch_scalars_are_numbers():
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    assert result_records("FINAL", 0, np.float32(0.25))[0] == [ResultRecord(KIND_FINAL, 0.25, None, None)]
    assert result_records("FINAL", 0, np.array([1.0, 2.0]))[0] == []


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.sampled_from(["PERIODICAL", "FINAL"]), st.text(max_size=5), st.none(), st.integers()),
    st.one_of(st.integers(), st.none(), st.floats(), st.text(max_size=3)),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=5)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
        ),
        max_leaves=12,
    ),
)
def test_any_result_gives_records_or_reasons_and_never_raises(metric_type, sequence, value):
    records, problems = result_records(metric_type, sequence, value)
    assert records or problems or value == {}
    for record in records:
        assert isinstance(record.value, float) and record.kind in (KIND_INTERMEDIATE, KIND_FINAL)
        assert record.step is None or type(record.step) is int
        assert record.name is None or isinstance(record.name, str)
    if metric_type not in ("PERIODICAL", "FINAL"):
        assert records == []


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=40), st.from_regex(r'\{"[a-z]{1,3}": ?[0-9]{1,3}\}', fullmatch=True)))
def test_any_parameter_text_gives_a_record_of_a_dict(text):
    record, problem = parameter_record(text)
    assert isinstance(record["parameters"], dict) and record["parameter_id"] == 0
    assert (problem is None) == (text is not None and isinstance(_json_or_none(text), dict))


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_the_environment_names_the_channel_and_the_ids():
    env = nni_environment({"lr": 0.1}, task_id="TRAIx", experiment_id=None, output_dir="/out")
    assert env["NNI_TRIAL_COMMAND_CHANNEL"] == "import://reporter.nni_channel.AnyLearnTrialChannel"
    assert env["NNI_TRIAL_JOB_ID"] == "TRAIx" and env["NNI_EXP_ID"] == "STANDALONE" and env["NNI_OUTPUT_DIR"] == "/out"
    assert json.loads(env["ANYLEARN_NNI_PARAMETERS"]) == {"lr": 0.1} and "NNI_PLATFORM" not in env


@pytest.mark.parametrize("installed, told", [("2.10", True), ("3.0", False), ("3.1rc1", False), (None, False)])
def test_an_nni_without_the_import_channel_is_named(monkeypatch, installed, told):
    import importlib.metadata

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    problem = nni_version_problem()
    assert (problem is not None) == told and (not told or "install nni>=3.0" in problem)


def test_the_channel_gives_the_parameters_once_and_journals_through_the_api(monkeypatch, tmp_path):
    pytest.importorskip("nni", reason="nni is not installed (pip install nni==3.0)")
    from reporter import api
    from reporter.nni_channel import AnyLearnTrialChannel

    monkeypatch.setenv("ANYLEARN_NNI_PARAMETERS", '{"lr": 0.5}')
    monkeypatch.setenv("ANYLEARN_REPORTER_RUN_DIR", str(tmp_path / "run"))
    channel = AnyLearnTrialChannel()
    assert channel.receive_parameter()["parameters"] == {"lr": 0.5}
    assert channel.receive_parameter() is None  # as NNI's own channel: one parameter set per trial
    channel.send_metric("PERIODICAL", 0, "t", 3, {"default": 0.25, "loss": math.inf, "s": "x"})
    channel.send_metric("FINAL", 0, "t", 0, [1, 2])
    api._reset_for_tests()
    got = [(r.kind, r.value, r.name, r.step) for _, r in iter_records(str(tmp_path / "run"))]
    assert got == [("intermediate", 0.25, None, 3), ("intermediate", None, "loss", 3)]  # inf is journalled as null
    assert channel.dropped == {"a result value that is not a number (str)": 1,
                               "a result that is neither a number nor a dict (list)": 1}


# --- end to end: the real nni package, an unchanged trial --------------------------------------------


def test_an_unchanged_nni_trial_reports_in_order_with_the_right_final_metric(server, tmp_path):
    script = nni_trial_script(tmp_path)
    env = task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_NNI="1", ANYLEARN_EXPERIMENT_ID="EXPabc")
    done = cli("run", "--params", '{"lr": 0.1, "epochs": 4}', "--", sys.executable, script, env=env, cwd=tmp_path, timeout_s=60)
    assert done.returncode == 0, done.stderr
    info = trial_info(done.stdout)
    assert info["params"] == {"lr": 0.1, "epochs": 4} and info["again"] is None
    assert info["argv"] == ["--lr", "0.1", "--epochs", "4"]  # still rendered to argv as well
    assert info["trial"] == TASK_ID and info["experiment"] == "EXPabc" and info["output"] == str(tmp_path / "output")
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [0.5, 0.6, 0.7, 0.8] and task["final_metric"] == 0.8
    assert task["states"] == [1, 2]
    named = [(r.kind, r.value, r.step) for _, r in iter_records(str(tmp_path / "run")) if r.name == "loss"]
    assert [(kind, round(value, 6), step) for kind, value, step in named] == [
        ("intermediate", 0.4, 1), ("intermediate", 0.2, 3), ("final", 0.125, None)]
    assert "not a number (str) (said once)" in done.stderr


def test_without_nni_the_same_trial_runs_in_nni_standalone_mode(server, tmp_path):
    script = nni_trial_script(tmp_path)
    env = task_env(server.base_url, str(tmp_path / "run"))
    done = cli("run", "--params", '{"epochs": 2}', "--", sys.executable, script, env=env, cwd=tmp_path, timeout_s=60)
    assert done.returncode == 0, done.stderr
    info = trial_info(done.stdout)
    assert info["params"] == {} and info["trial"] == "STANDALONE" and info["experiment"] == "STANDALONE"
    assert "Final result: {'default': 0.7, 'loss': 0.125}" in done.stdout + done.stderr  # NNI's standalone log line
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [] and task["final_metric"] is None and task["states"] == [1, 2]


def test_dry_run_shows_the_nni_environment(tmp_path):
    done = cli("run", "--dry-run", "--nni", "--params", '{"lr": 0.1}', "--", "python", "trial.py",
               env=task_env("http://127.0.0.1:9/api", str(tmp_path / "run"), ANYLEARN_EXPERIMENT_ID="EXP1"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    argv_line, env_text = done.stdout.split("\n", 1)
    assert json.loads(argv_line) == ["python", "trial.py", "--lr", "0.1"]
    shown = json.loads(env_text)
    assert shown["NNI_TRIAL_COMMAND_CHANNEL"] == "import://reporter.nni_channel.AnyLearnTrialChannel"
    assert shown["NNI_TRIAL_JOB_ID"] == TASK_ID and shown["NNI_EXP_ID"] == "EXP1"
    assert shown["NNI_OUTPUT_DIR"] == str(tmp_path / "output") and json.loads(shown["ANYLEARN_NNI_PARAMETERS"]) == {"lr": 0.1}


def test_a_wrong_anylearn_nni_value_exits_2_and_says_what_to_set(tmp_path):
    done = cli("run", "--", "python", "trial.py", env=clean_environ(ANYLEARN_NNI="maybe"), cwd=tmp_path)
    assert done.returncode == 2 and "ANYLEARN_NNI='maybe' must be 1" in done.stderr
