"""The MLflow bridge: an unchanged MLflow script under `run --autolog` reports to AnyLearn, and MLflow's
own store holds what it held without us."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'anylearn-reporter[mlflow]')")

from conftest import run_python, task_env  # noqa: E402
from integrations_support import journal, named, offline_tracker_env, run_autolog  # noqa: E402

SCRIPT = """
    import mlflow
    from mlflow import MlflowClient
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 0.1, "layers": 2})
        for step in range(3):
            mlflow.log_metric("train_loss", 1.0 / (step + 1), step=step)
            mlflow.log_metrics({"val_loss": 0.9 - 0.1 * step, "val_acc": 0.5 + 0.1 * step}, step=step)
        MlflowClient().log_metric(run.info.run_id, "lr", 0.01, step=3)
        try:
            MlflowClient().log_metric("0" * 32, "lost", 1.0)  # no such run: MLflow raises, as it would have
        except Exception as exc:
            print("RAISED", type(exc).__name__)
        print("RUN", run.info.run_id)
    print("ENDED")
"""


def test_an_unchanged_mlflow_script_reports_by_name_and_step_and_mlflow_keeps_its_record(server, tmp_path, monkeypatch):
    env = {**offline_tracker_env(tmp_path), "ANYLEARN_OBJECTIVE_METRIC": "val_loss"}
    done, rows, task = run_autolog(SCRIPT, server, tmp_path, **env)
    assert "RAISED MlflowException" in done.stdout, done.stdout + done.stderr
    val_loss = [pytest.approx(0.9 - 0.1 * s) for s in range(3)]
    expected = []
    for step in range(3):
        expected += [("train_loss", step, pytest.approx(1.0 / (step + 1))),
                     ("val_acc", step, pytest.approx(0.5 + 0.1 * step)), (None, step, val_loss[step])]
    assert named(rows) == expected + [("lr", 3, 0.01)]  # the failed call journalled nothing
    assert [kind for kind, *_ in rows].count("final") == 1 and rows[-1][0] == "final"  # at end_run, once
    assert task["intermediate_metrics"] == val_loss and task["final_metric"] == pytest.approx(0.7)  # loss: min
    assert "mlflow: objective metric is 'val_loss'" in done.stderr
    with open(os.path.join(tmp_path, "autolog-run", "params.json")) as f:
        assert json.load(f) == {"lr": "0.1", "layers": "2"}

    run_id = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("RUN ")][0]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # read MLflow's own store back, as MLflow does
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in ("train_loss", "val_loss", "val_acc", "lr")}
    assert history["val_loss"] == [(s, pytest.approx(0.9 - 0.1 * s)) for s in range(3)]
    assert history["train_loss"] == [(s, pytest.approx(1.0 / (s + 1))) for s in range(3)]
    assert history["lr"] == [(3, 0.01)] and len(history["val_acc"]) == 3


def test_without_an_objective_every_number_is_journalled_and_none_is_sent(server, tmp_path):
    done, rows, task = run_autolog(SCRIPT, server, tmp_path, **offline_tracker_env(tmp_path))
    assert len(named(rows)) == 10 and all(name for name, _, _ in named(rows))
    assert "final" not in [kind for kind, *_ in rows] and "objective metric is" not in done.stderr
    # said once (at the run's end), naming what was logged and how to choose the objective
    said = [line for line in done.stderr.splitlines() if "no objective metric sent" in line]
    assert len(said) == 1 and "train_loss" in said[0] and "ANYLEARN_OBJECTIVE_METRIC=<key>" in said[0], done.stderr
    assert not task.get("intermediate_metrics") and task.get("final_metric") is None


LIGHTNING = """
    import torch, lightning as L
    from lightning.pytorch.loggers import MLFlowLogger

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)
        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    logger = MLFlowLogger()
    trainer = L.Trainer(max_epochs=3, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Regression(), data, data)
    print("LOGGERS", [type(lg).__name__ for lg in trainer.loggers])
    print("VAL", [m.value for m in logger.experiment.get_metric_history(logger.run_id, "val_loss")])
"""


def test_a_lightning_trainer_logging_to_mlflow_sends_each_objective_value_once(server, tmp_path):
    pytest.importorskip("lightning", reason="lightning is not installed")
    env = {**offline_tracker_env(tmp_path), "ANYLEARN_OBJECTIVE_METRIC": "val_loss"}
    done, rows, task = run_autolog(LIGHTNING, server, tmp_path, **env)
    assert "LOGGERS ['MLFlowLogger', 'AnylearnLogger']" in done.stdout, done.stdout + done.stderr
    val_loss = json.loads([line for line in done.stdout.splitlines() if line.startswith("VAL ")][0][4:])
    assert len(val_loss) == 3
    assert task["intermediate_metrics"] == pytest.approx(val_loss)  # told to both hooks, sent once
    assert task["final_metric"] == pytest.approx(min(val_loss)) and [k for k, *_ in rows].count("final") == 1


def test_a_run_the_script_never_ended_has_its_final_delivered_before_the_process_ends(server, tmp_path):
    code = textwrap.dedent("""
        import reporter
        reporter.autolog(["mlflow"])
        import mlflow
        mlflow.start_run()  # never ended by the script: MLflow ends it at exit
        for step in range(3):
            mlflow.log_metric("val_loss", 0.5 - 0.1 * step, step=step)
    """)
    run_dir = str(tmp_path / "run")
    env = task_env(server.base_url, run_dir, **offline_tracker_env(tmp_path), ANYLEARN_OBJECTIVE_METRIC="val_loss")
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr
    assert [kind for kind, *_ in journal(run_dir)] == ["intermediate"] * 3 + ["final"], done.stderr
    (task,) = server.backend.tasks()
    assert task["final_metric"] == pytest.approx(0.3) and "pending" not in done.stderr


NESTED = """
    import mlflow
    for trial in range(2):  # a loop of top-level runs, each with nested runs
        with mlflow.start_run():
            for child in range(2):
                with mlflow.start_run(nested=True):
                    mlflow.log_metric("val_loss", 0.5 - 0.1 * child - 0.2 * trial, step=child)
            mlflow.log_metric("val_loss", 0.45 - 0.2 * trial, step=2)
    print("ENDED")
"""


def test_nested_runs_send_no_final_and_a_loop_of_runs_says_its_objective_once(server, tmp_path):
    env = {**offline_tracker_env(tmp_path), "ANYLEARN_OBJECTIVE_METRIC": "val_loss"}
    done, rows, task = run_autolog(NESTED, server, tmp_path, **env)
    assert "ENDED" in done.stdout, done.stdout + done.stderr
    finals = [value for kind, _, _, value in rows if kind == "final"]
    # one final per top-level run (the best of its own and its nested runs' values), none per nested run
    assert finals == [pytest.approx(0.4), pytest.approx(0.2)], rows
    assert task["final_metric"] == pytest.approx(0.2)  # the backend keeps the last one reported
    assert done.stderr.count("mlflow: objective metric is 'val_loss'") == 1, done.stderr


def test_a_key_named_metric_is_the_objective_by_default_as_the_deliverer_sends_it(server, tmp_path):
    script = """
        import mlflow
        with mlflow.start_run():
            for step in range(3):
                mlflow.log_metrics({"metric": 0.5 + 0.1 * step, "loss": 1.0 - 0.1 * step}, step=step)
    """
    done, rows, task = run_autolog(script, server, tmp_path, **offline_tracker_env(tmp_path))
    assert task["intermediate_metrics"] == [pytest.approx(0.5 + 0.1 * s) for s in range(3)], done.stderr
    assert task["final_metric"] == pytest.approx(0.7) and [k for k, *_ in rows].count("final") == 1
    assert "mlflow: objective metric is 'metric'" in done.stderr


def test_the_mlflow_extra_runs_an_unchanged_mlflow_3_script_with_its_default_store(server, tmp_path):
    # what `pip install 'anylearn-reporter[mlflow]'` installs must run MLflow 3's default (sqlite) store
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(os.path.dirname(__file__), os.pardir, "setup.cfg"))
    extra = {line.split(">")[0].split("=")[0].strip().lower() for line in cfg["options.extras_require"]["mlflow"].split("\n") if line.strip()}
    assert "mlflow" in extra or {"mlflow-skinny", "alembic", "sqlalchemy"} <= extra, extra
    pytest.importorskip("alembic", reason="alembic is not installed (the [mlflow] extra installs it)")
    pytest.importorskip("sqlalchemy", reason="sqlalchemy is not installed (the [mlflow] extra installs it)")
    env = {k: v for k, v in offline_tracker_env(tmp_path).items() if not k.startswith("MLFLOW_")}
    script = """
        import mlflow
        with mlflow.start_run() as run:
            for step in range(2):
                mlflow.log_metric("val_loss", 0.5 - 0.1 * step, step=step)
        print("STORE", mlflow.get_tracking_uri())
    """
    done, rows, task = run_autolog(script, server, tmp_path, ANYLEARN_OBJECTIVE_METRIC="val_loss", **env)
    assert "STORE sqlite:" in done.stdout, done.stdout + done.stderr
    assert task["intermediate_metrics"] == [pytest.approx(0.5), pytest.approx(0.4)] and task["final_metric"] == pytest.approx(0.4)
