"""reporter.integrations.xgboost with real XGBoost on CPU (tiny data made here)."""

from __future__ import annotations

import pytest

xgb = pytest.importorskip("xgboost", reason="xgboost is not installed (pip install 'anylearn-reporter[xgboost]')")

import numpy as np  # noqa: E402
from integrations_support import delivered, journal, named, reporting  # noqa: E402,F401

from reporter.integrations.xgboost import AnylearnCallback  # noqa: E402


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    return x, (x[:, 0] + 0.3 * rng.normal(size=200) > 0).astype(int)


def test_train_reports_each_data_metric_pair_at_each_iteration_and_the_best_as_final(reporting):
    x, y = data()
    train, valid = xgb.DMatrix(x[:150], label=y[:150]), xgb.DMatrix(x[150:], label=y[150:])
    results = {}
    xgb.train({"objective": "binary:logistic", "eval_metric": ["error", "logloss"], "max_depth": 2}, train, 4,
              evals=[(train, "train"), (valid, "validation")], evals_result=results, verbose_eval=False,
              callbacks=[AnylearnCallback()])
    expected = []
    for i in range(4):
        expected += [("train-error", i, pytest.approx(results["train"]["error"][i])),
                     ("train-logloss", i, pytest.approx(results["train"]["logloss"][i])),
                     ("validation-error", i, pytest.approx(results["validation"]["error"][i])),
                     (None, i, pytest.approx(results["validation"]["logloss"][i]))]  # the last of the last data set
    assert named(journal(reporting.run_dir)) == expected
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(results["validation"]["logloss"])
    assert task["final_metric"] == pytest.approx(min(results["validation"]["logloss"]))


def test_sklearn_fit_names_like_xgboost_and_auc_is_maximised(reporting):
    x, y = data()
    model = xgb.XGBClassifier(n_estimators=4, max_depth=2, eval_metric=["logloss", "auc"], callbacks=[AnylearnCallback()])
    model.fit(x[:150], y[:150], eval_set=[(x[150:], y[150:])], verbose=False)
    aucs = model.evals_result()["validation_0"]["auc"]
    assert [name for name, step, _ in named(journal(reporting.run_dir)) if step == 0] == ["validation_0-logloss", None]
    task = delivered(reporting.server)
    assert task["intermediate_metrics"] == pytest.approx(aucs) and task["final_metric"] == pytest.approx(max(aucs))


def test_final_last_and_never_stopping_training(reporting):
    x, y = data()
    booster = xgb.train({"objective": "binary:logistic", "eval_metric": "logloss"}, xgb.DMatrix(x, label=y), 5,
                        evals=[(xgb.DMatrix(x, label=y), "train")], verbose_eval=False,
                        callbacks=[AnylearnCallback(final="last", mode="max")])
    assert booster.num_boosted_rounds() == 5
    task = delivered(reporting.server)
    assert task["final_metric"] == task["intermediate_metrics"][-1] and len(task["intermediate_metrics"]) == 5


def test_a_process_of_another_rank_reports_nothing(reporting, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    x, y = data()
    xgb.train({"eval_metric": "rmse"}, xgb.DMatrix(x, label=y), 2, evals=[(xgb.DMatrix(x, label=y), "train")],
              verbose_eval=False, callbacks=[AnylearnCallback()])
    assert journal(reporting.run_dir) == []


def test_a_model_carrying_the_callback_still_pickles(reporting):
    import pickle

    x, y = data()
    model = xgb.XGBClassifier(n_estimators=2, callbacks=[AnylearnCallback()]).fit(x, y, eval_set=[(x, y)], verbose=False)
    assert pickle.loads(pickle.dumps(model)).predict(x[:3]).shape == (3,)
