"""reporter.integrations.lightgbm with real LightGBM on CPU (tiny data made here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

lgb = pytest.importorskip("lightgbm", reason="lightgbm is not installed (pip install 'anylearn-reporter[lightgbm]')")

import numpy as np  # noqa: E402
from conftest import task_env  # noqa: E402
from integrations_support import delivered, journal, named, reporting  # noqa: E402,F401

from reporter.integrations.lightgbm import anylearn_callback  # noqa: E402


def data(n=200):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    return x, 2 * x[:, 0] + 0.1 * rng.normal(size=n)


def test_train_reports_each_evaluation_result_at_each_iteration_and_the_best_as_final(reporting):
    x, y = data()
    train, valid = lgb.Dataset(x[:150], y[:150]), lgb.Dataset(x[150:], y[150:])
    results = {}
    lgb.train({"objective": "regression", "metric": ["l1", "l2"], "num_leaves": 4, "verbose": -1}, train, 4,
              valid_sets=[train, valid], valid_names=["training", "valid_0"],
              callbacks=[anylearn_callback(), lgb.record_evaluation(results)])
    expected = []
    for i in range(4):
        expected += [("training-l1", i, pytest.approx(results["training"]["l1"][i])),
                     ("training-l2", i, pytest.approx(results["training"]["l2"][i])),
                     ("valid_0-l1", i, pytest.approx(results["valid_0"]["l1"][i])),
                     (None, i, pytest.approx(results["valid_0"]["l2"][i]))]
    assert named(journal(reporting.run_dir)) == expected
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(results["valid_0"]["l2"])
    assert task["final_metric"] == pytest.approx(min(results["valid_0"]["l2"]))  # l2: LightGBM says lower is better


def test_sklearn_fit_with_final_last(reporting):
    x, y = data()
    model = lgb.LGBMRegressor(n_estimators=3, num_leaves=4, verbose=-1)
    model.fit(x[:150], y[:150], eval_set=[(x[150:], y[150:])], callbacks=[anylearn_callback(final="last", mode="max")])
    l2 = model.evals_result_["valid_0"]["l2"]
    assert [s for n, s, _ in named(journal(reporting.run_dir))] == [0, 1, 2]
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(l2) and task["final_metric"] == pytest.approx(l2[-1])


EARLY_STOP = """
import numpy as np, lightgbm as lgb
from reporter.integrations.lightgbm import anylearn_callback
rng = np.random.default_rng(0)
x = rng.normal(size=(120, 4)); y = rng.normal(size=120)  # noise: the validation loss soon stops improving
lgb.train({"objective": "regression", "num_leaves": 8, "learning_rate": 0.5, "verbose": -1}, lgb.Dataset(x[:80], y[:80]),
          200, valid_sets=[lgb.Dataset(x[80:], y[80:])], callbacks=[anylearn_callback(), lgb.early_stopping(2, verbose=False)])
"""


def test_early_stopping_still_reports_the_best_as_final_when_the_process_ends(server, tmp_path):
    run_dir = str(tmp_path / "run")
    done = subprocess.run([sys.executable, "-c", EARLY_STOP], env=task_env(server.base_url, run_dir), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    objective = [v for kind, name, _, v in journal(run_dir) if kind == "intermediate" and name is None]
    assert 2 < len(objective) < 200
    (task,) = server.backend.tasks()
    assert task["final_metric"] == pytest.approx(min(objective)) and journal(run_dir)[-1][0] == "final"


def test_a_process_of_another_rank_reports_nothing(reporting, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    x, y = data()
    lgb.train({"objective": "regression", "verbose": -1}, lgb.Dataset(x, y), 2, valid_sets=[lgb.Dataset(x, y)],
              callbacks=[anylearn_callback()])
    assert journal(reporting.run_dir) == []
