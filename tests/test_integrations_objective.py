"""The rule every framework integration shares (reporter/integrations/_objective.py), without a framework:
which key is the objective, what is final, rank zero only, what is skipped; and the import promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import clean_environ
from integrations_support import delivered, journal, named, reporting  # noqa: F401

from reporter.integrations._objective import MetricSink, default_mode


def test_objective_is_sent_as_the_task_metric_and_the_rest_journalled_by_name(reporting):
    sink = MetricSink("demo", natural="val_loss")
    sink.log({"loss": 0.9, "val_loss": 0.8, "note": "text", "flag": True, "vector": [1, 2]}, 0)
    sink.log({"loss": 0.5, "val_loss": 0.6}, 1)
    sink.log({"loss": 0.4, "val_loss": 0.7}, 2)
    assert sink.finish() == 0.6
    assert named(journal(reporting.run_dir)) == [
        ("loss", 0, 0.9), (None, 0, 0.8), ("loss", 1, 0.5), (None, 1, 0.6), ("loss", 2, 0.4), (None, 2, 0.7),
    ]
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == [0.8, 0.6, 0.7] and task["final_metric"] == 0.6


@pytest.mark.parametrize(("final", "mode", "expected"), [("best", None, 0.2), ("best", "max", 0.9), ("last", None, 0.5)])
def test_final_follows_final_and_mode(reporting, final, mode, expected):
    sink = MetricSink("demo", objective="val_loss", final=final, mode=mode)
    for step, value in enumerate([0.9, 0.2, float("nan"), 0.5]):
        sink.log({"val_loss": value}, step)
    assert sink.finish() == expected
    assert sink.finish() is None  # once
    assert [r for r in journal(reporting.run_dir) if r[0] == "final"] == [("final", None, None, expected)]


def test_nan_is_journalled_as_null_and_never_chosen_as_best(reporting):
    sink = MetricSink("demo", objective="acc")
    sink.log({"acc": float("nan")}, 0)
    sink.log({"acc": 0.3}, 1)
    assert sink.finish() == 0.3
    assert named(journal(reporting.run_dir))[0] == (None, 0, None)


def test_env_objective_wins_when_logged_else_the_natural_choice(reporting, monkeypatch):
    monkeypatch.setenv("ANYLEARN_OBJECTIVE_METRIC", "val_acc")
    sink = MetricSink("demo", natural="val_loss")
    sink.log({"val_loss": 0.5, "val_acc": 0.7}, 0)
    assert sink.objective == "val_acc" and sink.mode == "max"
    other = MetricSink("demo", natural="val_loss")
    other.log({"val_loss": 0.5}, 0)
    assert other.objective == "val_loss" and other.mode == "min"


def test_the_choice_is_said_in_one_line(reporting, capsys):
    sink = MetricSink("demo", natural="val_loss", natural_why="the usual val_loss")
    for step in range(3):
        sink.log({"val_loss": 1.0 / (step + 1)}, step)
    said = [line for line in capsys.readouterr().err.splitlines() if "objective metric is" in line]
    assert said == ["anylearn-reporter: demo: objective metric is 'val_loss' (from the usual val_loss); final = best (min)"]


def test_an_objective_never_logged_gives_no_final_and_says_which_keys_were(reporting, capsys):
    sink = MetricSink("demo", natural="val_loss")
    sink.log({"loss": 0.5}, 0)
    assert sink.finish() is None
    assert "the objective 'val_loss' was never logged (logged: loss)" in capsys.readouterr().err
    assert [r[0] for r in journal(reporting.run_dir)] == ["intermediate"]


def test_a_tracker_whose_objective_was_never_logged_points_to_the_variable_not_objective_eq(reporting, capsys, monkeypatch):
    from reporter.integrations._tracker import TrackerBridge

    monkeypatch.setenv("ANYLEARN_OBJECTIVE_METRIC", "val_los")  # misspelt
    bridge = TrackerBridge("demo-tracker")
    for run in ("a", "b"):  # two runs of one process: said once
        bridge.log(run, {"val_loss": 0.5, "acc": 0.9}, 0)
        bridge.end(run)
    said = [line for line in capsys.readouterr().err.splitlines() if "never logged" in line]
    assert len(said) == 1 and "objective=" not in said[0], said
    assert "'val_los' (ANYLEARN_OBJECTIVE_METRIC) was never logged (logged: val_loss, acc)" in said[0]
    assert "set ANYLEARN_OBJECTIVE_METRIC=<key>" in said[0]
    assert [r[0] for r in journal(reporting.run_dir)] == ["intermediate"] * 4  # by name, no final


def test_a_repeat_of_the_same_key_value_and_step_is_reported_once(reporting):
    sink = MetricSink("demo", objective="eval_loss")
    sink.log({"eval_loss": 0.5, "epoch": 1.0}, 10)  # e.g. transformers' on_log, then on_evaluate
    sink.log({"eval_loss": 0.5, "epoch": 1.0, "eval_runtime": 0.1}, 10)
    sink.log({"eval_loss": 0.5}, 11)
    assert named(journal(reporting.run_dir)) == [("epoch", 10, 1.0), (None, 10, 0.5), ("eval_runtime", 10, 0.1), (None, 11, 0.5)]


def test_a_trainer_logging_to_a_tracker_sends_each_objective_value_once_and_one_final(reporting):
    trainer = MetricSink("lightning", objective="val_loss")  # Lightning's hook...
    tracker = MetricSink("mlflow", objective="val_loss", tracker=True)  # ...and its MLFlowLogger, told first
    for step, value in enumerate([0.9, 0.4, 0.6]):
        tracker.log({"val_loss": value}, step)
        trainer.log({"val_loss": value}, step)
    other = MetricSink("keras", objective="val_loss")  # two trainers alike are never merged
    other.log({"val_loss": 0.6}, 0)
    assert [tracker.finish(), trainer.finish(), other.finish()] == [0.4, None, 0.6]
    assert named(journal(reporting.run_dir)) == [(None, 0, 0.9), (None, 1, 0.4), (None, 2, 0.6), (None, 0, 0.6)]
    assert delivered(reporting.server)["intermediate_metrics"] == [0.9, 0.4, 0.6, 0.6]


def test_a_process_of_another_rank_reports_nothing(reporting, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    sink = MetricSink("demo", objective="loss")
    sink.log({"loss": 0.5}, 0)
    assert sink.finish() is None
    assert journal(reporting.run_dir) == []


@pytest.mark.parametrize(("name", "mode"), [
    ("val_loss", "min"), ("validation_0-logloss", "min"), ("train-error", "min"), ("valid_0-l2", "min"),
    ("validation_0-rmse", "min"), ("eval_accuracy", "max"), ("valid_0-auc", "max"), ("f1", "max"),
])
def test_default_mode_is_min_for_losses_and_errors(name, mode):
    assert default_mode(name) == mode


def test_bad_final_or_mode_is_a_clear_value_error():
    with pytest.raises(ValueError, match="final must be 'best' or 'last'"):
        MetricSink("demo", final="mean")
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        MetricSink("demo", mode="up")


def test_import_reporter_imports_no_framework():
    code = (
        "import sys, json, reporter; reporter.autolog; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'lightning', 'pytorch_lightning', 'keras', 'tensorflow', 'xgboost', 'lightgbm', "
        "'mlflow', 'wandb', 'dvclive', 'dvc', 'numpy', 'requests', 'tenacity', 'psutil'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=clean_environ(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("reporter.integrations.transformers", "transformers", "transformers"),
    ("reporter.integrations.lightning", "lightning", "lightning"),
    ("reporter.integrations.keras", "keras", "keras"),
    ("reporter.integrations.xgboost", "xgboost", "xgboost"),
    ("reporter.integrations.lightgbm", "lightgbm", "lightgbm"),
    ("reporter.integrations.mlflow", "mlflow", "mlflow"),
    ("reporter.integrations.wandb", "wandb", "wandb"),
    ("reporter.integrations.dvclive", "dvclive", "dvclive"),
])
def test_a_missing_framework_is_an_import_error_naming_the_extra(module, framework, extra):
    blocked = [framework] + (["pytorch_lightning"] if framework == "lightning" else []) + (["tensorflow"] if framework == "keras" else [])
    code = (
        f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
        f"try:\n    import {module}\nexcept ImportError as exc:\n    print(exc)\nelse:\n    print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=clean_environ(), capture_output=True, text=True, timeout=60)
    assert f"pip install 'anylearn-reporter[{extra}]'" in done.stdout, done.stdout + done.stderr


def test_a_log_the_sink_cannot_read_is_said_once_and_never_raises(reporting, capsys):
    class Odd(dict):
        def items(self):
            raise RuntimeError("not today")

    sink = MetricSink("demo", objective="loss")
    sink.log(Odd(a=1), 0)
    sink.log(Odd(a=1), 1)
    sink.log({"loss": 0.5}, 2)
    assert sink.finish() == 0.5
    assert capsys.readouterr().err.count("demo: a log could not be reported (RuntimeError: not today)") == 1


def test_a_sink_pickles_so_callbacks_survive_a_saved_model_or_a_spawned_process(reporting):
    import pickle

    from reporter.integrations._objective import env_rank_is_zero

    sink = MetricSink("demo", natural="val_loss", is_rank_zero=env_rank_is_zero)
    sink.log({"val_loss": 0.5}, 0)
    copy = pickle.loads(pickle.dumps(sink))
    assert copy.objective == "val_loss" and copy.best == 0.5 and copy.is_rank_zero()
    assert pickle.loads(pickle.dumps(MetricSink("demo"))).is_rank_zero()
