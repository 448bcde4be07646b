"""reporter.integrations.transformers with a real (tiny, config-built) transformers Trainer on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="transformers' Trainer needs torch")
pytest.importorskip("transformers", reason="transformers is not installed (pip install 'anylearn-reporter[transformers]')")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

import torch  # noqa: E402
from integrations_support import close, delivered, journal, named, reporting  # noqa: E402,F401
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from reporter.integrations.transformers import AnylearnCallback  # noqa: E402


def tiny_trainer(tmp_path, callbacks, **args):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=16, num_labels=2)
    data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2,
        report_to=[], use_cpu=True, save_strategy="no", per_device_train_batch_size=4, disable_tqdm=True, **args,
    )
    return Trainer(model=BertForSequenceClassification(config), args=arguments, train_dataset=data,
                   eval_dataset=data[:4], callbacks=callbacks)


def expected_rows(log_history, objective):
    """What the trainer logged, in order, as the callback should journal it: per log call the named values,
    then the objective (unnamed); a key already reported at the same step with the same value is not repeated."""
    rows, seen = [], {}
    for entry in log_history:
        step, objective_row = entry["step"], []
        for key, value in entry.items():
            if key == "step" or seen.get(key) == (step, value):
                continue
            seen[key] = (step, value)
            (objective_row if key == objective else rows).append((None if key == objective else key, step, value))
        rows += objective_row
    return rows


def test_reports_every_logged_number_with_the_global_step_and_the_best_eval_loss_as_final(reporting, tmp_path):
    trainer = tiny_trainer(tmp_path, [AnylearnCallback()])
    trainer.train()
    rows = named(journal(reporting.run_dir))
    expected = expected_rows(trainer.state.log_history, "eval_loss")
    assert [(n, s) for n, s, _ in rows] == [(n, s) for n, s, _ in expected]
    assert all(close(a[2], b[2]) for a, b in zip(rows, expected))
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(eval_losses) == 2 and {s for n, s, _ in rows if n is None} == {2, 4}
    task = delivered(reporting.server)
    assert all(close(a, b) for a, b in zip(task["intermediate_metrics"], eval_losses))
    assert len(task["intermediate_metrics"]) == 2
    assert close(task["final_metric"], min(eval_losses))


def test_metric_for_best_model_is_the_objective_and_final_last_takes_the_last_value(reporting, tmp_path):
    trainer = tiny_trainer(tmp_path, [AnylearnCallback(final="last")], metric_for_best_model="runtime", greater_is_better=False)
    trainer.train()
    runtimes = [e["eval_runtime"] for e in trainer.state.log_history if "eval_runtime" in e]
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(runtimes)
    assert task["final_metric"] == pytest.approx(runtimes[-1])


def test_only_the_world_process_zero_reports(reporting, tmp_path):
    trainer = tiny_trainer(tmp_path, [AnylearnCallback()])
    trainer.is_world_process_zero = lambda: False  # what a rank other than 0 answers
    trainer.train()
    assert journal(reporting.run_dir) == []

