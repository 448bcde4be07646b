"""reporter.integrations.lightning with a real Lightning Trainer on CPU (tiny model and data made here)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch", reason="Lightning needs torch")
L = pytest.importorskip("lightning", reason="lightning is not installed (pip install 'anylearn-reporter[lightning]')")

import torch  # noqa: E402
from integrations_support import close, delivered, journal, named, reporting  # noqa: E402,F401
from lightning.pytorch.loggers import Logger  # noqa: E402

from reporter.integrations.lightning import AnylearnLogger  # noqa: E402


class Regression(L.LightningModule):
    """A linear regression; ``Regression.on(package)`` is the same model for another Lightning package."""

    @classmethod
    def on(cls, package):
        return cls if package is L else type("Regression", (package.LightningModule,), dict(vars(cls)))

    def __init__(self, lr: float = 0.1) -> None:
        super(type(self), self).__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Recorder(Logger):
    """Records what Lightning hands a logger, to compare with what ours reported."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    name = "recorder"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def loader():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def fit(trainer_module, *loggers, epochs=3):
    data = loader()
    trainer = trainer_module.Trainer(
        max_epochs=epochs, logger=list(loggers), log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(Regression.on(trainer_module)(), data, data)
    return trainer


def expected_rows(calls, objective="val_loss"):
    rows, seen = [], {}
    for metrics, step in calls:
        objective_row = []
        for key, value in metrics.items():
            value = float(value)
            if seen.get(key) == (step, value):
                continue
            seen[key] = (step, value)
            (objective_row if key == objective else rows).append((None if key == objective else key, step, value))
        rows += objective_row
    return rows


def test_reports_what_lightning_logged_in_order_with_steps_and_the_best_val_loss_as_final(reporting):
    recorder = Recorder()
    fit(L, recorder, AnylearnLogger())
    rows = named(journal(reporting.run_dir))
    expected = expected_rows(recorder.calls)
    assert [(n, s) for n, s, _ in rows] == [(n, s) for n, s, _ in expected]
    assert all(close(a[2], b[2]) for a, b in zip(rows, expected))
    val_losses = [float(m["val_loss"]) for m, _ in recorder.calls if "val_loss" in m]
    assert len(val_losses) == 3
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(val_losses)
    assert task["final_metric"] == pytest.approx(min(val_losses))
    with open(os.path.join(reporting.run_dir, "params.json")) as f:
        assert json.load(f) == {"lr": 0.1}


def test_final_last_with_mode_max(reporting):
    fit(L, AnylearnLogger(objective="train_loss", final="last"), epochs=2)
    task = delivered(reporting.server)
    assert task["final_metric"] == task["intermediate_metrics"][-1] and len(task["intermediate_metrics"]) == 8
    fit(L, AnylearnLogger(objective="train_loss", mode="max"), epochs=1)  # a second fit, its own final
    rows = journal(reporting.run_dir)
    second = rows[[r[0] for r in rows].index("final") + 1:]
    objective = [value for kind, name, _, value in second if kind == "intermediate" and name is None]
    assert len(objective) == 4 and second[-1] == ("final", None, None, max(objective))


def test_only_global_rank_zero_reports(reporting, monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    logger = AnylearnLogger()
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning's strategies set on other ranks
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"val_loss": 0.5}, step=0)
    logger.finalize("success")
    assert journal(reporting.run_dir) == [] and not os.path.exists(os.path.join(reporting.run_dir, "params.json"))


def test_works_with_the_pytorch_lightning_package_too(reporting):
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    fit(pl, AnylearnLogger(), epochs=2)
    task = delivered(reporting.server)
    assert len(task["intermediate_metrics"]) == 2 and task["final_metric"] == min(task["intermediate_metrics"])



def test_the_logger_version_is_the_task_id_the_platform_gives(monkeypatch):
    monkeypatch.delenv("ANYLEARN_TASK_ID", raising=False)
    monkeypatch.setenv("task_id", "TRAIx")  # the platform's own name for it
    assert AnylearnLogger().version == "TRAIx"
    monkeypatch.setenv("ANYLEARN_TASK_ID", "TRAIy")
    assert AnylearnLogger().version == "TRAIy"
    monkeypatch.delenv("ANYLEARN_TASK_ID")
    monkeypatch.delenv("task_id")
    assert AnylearnLogger().version == "offline"
