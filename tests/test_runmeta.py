"""What a run directory keeps beside its journal (reporter/runmeta.py) and what show/status make of it:
the objective's direction ("best" of a loss is its minimum), the duration of a run without the wrapper,
the failure reason, and the attempts of a task run again."""

import json
import os
import subprocess
import sys

from conftest import TASK_ID, clean_environ, cli

from reporter.journal import JournalWriter
from reporter.runinfo import read_run
from reporter.runmeta import attempt_segments, mark_attempt, read_objective, write_objective

RERUN = "import reporter\nfor i, v in enumerate({values}): reporter.report_metric(v, step=i)\nreporter.report_metric({final}, final=True)\n"


def _journal(run_dir, values, ts0=1_000_000.0, dt=0.1):
    writer = JournalWriter(str(run_dir))
    for i, value in enumerate(values):
        writer.append("intermediate", value, None, i, ts=ts0 + i * dt)
    writer.close()


def _show_json(run_dir, **env):
    done = cli("show", "--json", str(run_dir), env=clean_environ(**env))
    assert done.returncode == 0, done.stderr
    (info,) = json.loads(done.stdout)
    return info


def test_best_of_a_minimised_objective_is_its_minimum(tmp_path):
    run_dir = tmp_path / "run"
    _journal(run_dir, [0.52, 0.4, 0.28, 0.3])
    assert _show_json(run_dir)["best_metric"] == 0.52  # unknown direction: the maximum, as before
    write_objective(str(run_dir), "validation_0-logloss", "min", "xgboost")
    info = _show_json(run_dir)
    assert info["best_metric"] == 0.28 and info["objective_name"] == "validation_0-logloss"
    table = cli("show", str(run_dir), env=clean_environ()).stdout
    assert "validation_0-logloss (min)" in table and "0.28" in table


def test_objective_mode_from_the_environment_when_the_run_has_none(tmp_path):
    run_dir = tmp_path / "run"
    _journal(run_dir, [3.0, 1.0, 2.0])
    assert _show_json(run_dir, ANYLEARN_OBJECTIVE_MODE="min")["best_metric"] == 1.0
    done = cli("show", str(run_dir), env=clean_environ(ANYLEARN_OBJECTIVE_MODE="lowest"))
    assert "ANYLEARN_OBJECTIVE_MODE='lowest' must be 'min' or 'max'" in done.stderr + done.stdout or done.returncode == 0


def test_the_hook_records_the_objective_mode_and_the_sink_its_objective(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_OBJECTIVE_MODE="min")
    done = subprocess.run([sys.executable, "-c", RERUN.format(values=[3.0, 1.0, 2.0], final=1.0)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    objective = read_objective(str(tmp_path / TASK_ID))
    assert (objective.name, objective.mode) == ("metric", "min")
    code = ("from reporter.integrations._objective import MetricSink\n"
            "s = MetricSink('demo', natural='val_loss')\ns.log({'val_loss': 0.5}, 0)\ns.log({'val_loss': 0.2}, 1)\ns.finish()\n")
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID="sink-task")
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
    objective = read_objective(str(tmp_path / "sink-task"))
    assert (objective.name, objective.mode, objective.source) == ("val_loss", "min", "demo")


def test_duration_of_a_run_without_the_wrapper_is_first_to_last_record(tmp_path):
    run_dir = tmp_path / "run"
    _journal(run_dir, [1.0] * 6, dt=0.1)  # records 0.5 s apart, long ago
    info = read_run(str(run_dir))
    assert abs(info.duration_s - 0.5) < 1e-6
    assert _show_json(run_dir)["duration_s"] < 1.0


def test_show_and_status_say_why_a_run_failed(tmp_path):
    done = cli("run", "--", sys.executable, "-c", "import sys; print('boom: out of memory', file=sys.stderr); sys.exit(3)",
               env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID=TASK_ID))
    assert done.returncode == 3
    run_dir = str(tmp_path / TASK_ID)
    shown = cli("show", run_dir, env=clean_environ()).stdout
    assert "exited with code 3" in shown and "boom: out of memory" in shown
    status = cli("status", run_dir, env=clean_environ()).stdout
    assert "failure:" in status and "exited with code 3" in status and "boom: out of memory" in status


def test_a_task_run_again_keeps_its_attempts_apart(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID=TASK_ID)
    for values, final in (([0.1, 0.2, 0.3], 0.3), ([0.15, 0.25], 0.25)):  # a plain script, no wrapper
        done = subprocess.run([sys.executable, "-c", RERUN.format(values=values, final=final)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    for code in ("print('metric=0.5')", "import sys; sys.exit(4)"):  # the same task under the wrapper, twice
        cli("run", "--", sys.executable, "-c", code, env=env)
    run_dir = str(tmp_path / TASK_ID)
    info = read_run(run_dir)
    assert [a.number for a in info.attempts] == [1, 2, 3, 4]
    assert [a.metrics for a in info.attempts[:2]] == [[0.1, 0.2, 0.3], [0.15, 0.25]]
    assert [a.final_metric for a in info.attempts[:2]] == [0.3, 0.25]
    assert [a.state_name for a in info.attempts[2:]] == ["success", "fail"]
    assert info.attempts[3].failure_reason and "code 4" in info.attempts[3].failure_reason
    assert os.path.exists(os.path.join(run_dir, "summary.3.json")) and os.path.exists(os.path.join(run_dir, "summary.4.json"))
    table = cli("show", run_dir, env=clean_environ()).stdout
    assert f"{TASK_ID} #4" in table and "  #1" in table and "  #2" in table


def test_a_second_process_while_the_first_runs_is_the_same_attempt(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        from reporter.runmeta import process_identity

        with open(os.path.join(run_dir, "attempts.jsonl"), "w") as f:
            f.write(json.dumps({"attempt": 1, "offset": 0, "pid": sleeper.pid, "proc": process_identity(sleeper.pid)}) + "\n")
        assert mark_attempt(run_dir, "hook", only_if_ended=True) is None
    finally:
        sleeper.communicate(b"")
    assert mark_attempt(run_dir, "hook", only_if_ended=True) == 2
    assert [m.attempt for m in attempt_segments(run_dir)] == [2]  # both at offset 0: attempt 1 journalled nothing


def test_the_wrapper_records_the_hyper_parameters_for_ui_with_the_key_masked(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path), ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY="k3y-s3cret",
                        ANYLEARN_BACKEND_URL="http://127.0.0.1:9/api", ANYLEARN_DRAIN_TIMEOUT="0",
                        ANYLEARN_TRAIN_PARAMS='{"lr": 0.01, "token": "k3y-s3cret"}')
    cli("run", "--", sys.executable, "-c", "pass", env=env)
    with open(tmp_path / TASK_ID / "params.json") as f:
        assert json.load(f) == {"lr": 0.01, "token": "***"}
