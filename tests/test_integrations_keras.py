"""reporter.integrations.keras with real Keras 3 on the torch backend, CPU (tiny model and data made here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; tensorflow is not needed
pytest.importorskip("torch", reason="these tests run Keras on its torch backend")
keras = pytest.importorskip("keras", reason="keras is not installed (pip install 'anylearn-reporter[keras]')")

import numpy as np  # noqa: E402
from integrations_support import delivered, journal, named, reporting  # noqa: E402,F401

from reporter.integrations.keras import AnylearnCallback  # noqa: E402


def fit(callback, epochs=3, **kwargs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
    return model.fit(x, y, validation_split=0.25, epochs=epochs, batch_size=16, verbose=0, callbacks=[callback], **kwargs)


def test_reports_each_epochs_logs_with_the_epoch_as_step_and_the_best_val_loss_as_final(reporting):
    history = fit(AnylearnCallback()).history
    expected = []
    for epoch in range(3):
        expected += [(key, epoch, pytest.approx(history[key][epoch])) for key in history if key != "val_loss"]
        expected.append((None, epoch, pytest.approx(history["val_loss"][epoch])))
    assert named(journal(reporting.run_dir)) == expected
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(history["val_loss"])
    assert task["final_metric"] == pytest.approx(min(history["val_loss"]))


def test_every_nth_training_batch_is_reported_under_batch_names(reporting):
    fit(AnylearnCallback(log_every_n_batches=2, objective="mae", final="last"), epochs=2)
    rows = named(journal(reporting.run_dir))
    batch_steps = [step for name, step, _ in rows if name == "batch/loss"]
    assert batch_steps == [2, 4, 6]  # 48 training samples in batches of 16: 3 an epoch, counted across epochs
    assert [name for name, step, _ in rows if step == 2 and name and name.startswith("batch/")] == ["batch/loss", "batch/mae"]
    task = delivered(reporting.server)
    assert len(task["intermediate_metrics"]) == 2 and task["final_metric"] == task["intermediate_metrics"][-1]


def test_a_process_of_another_rank_reports_nothing(reporting, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    fit(AnylearnCallback(), epochs=1)
    assert journal(reporting.run_dir) == []


def test_log_every_n_batches_must_be_a_positive_whole_number():
    with pytest.raises(ValueError, match="log_every_n_batches"):
        AnylearnCallback(log_every_n_batches=0)


def test_tf_keras_takes_the_callback_too(reporting):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed: tf.keras is not tested")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, x.sum(1, keepdims=True), validation_split=0.25, epochs=2, verbose=0, callbacks=[AnylearnCallback()])
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(history.history["val_loss"])
