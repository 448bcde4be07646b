"""reporter.autolog() and `run --autolog`: unchanged training scripts report through every installed
framework; trainers imported before or after the call are hooked once; moved internals never break a run."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest
from conftest import clean_environ, cli, run_python, task_env
from integrations_support import journal, run_autolog

from reporter.integrations.autolog import SITE_DIR


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# Each section is plain training code (no reporter in it); it prints what its objective values were.
SECTIONS = {
    "transformers": (("torch", "transformers", "accelerate"), """
        import torch
        from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        torch.manual_seed(0)
        config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8, max_position_embeddings=16, num_labels=2)
        data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        args = TrainingArguments(output_dir="out", max_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=1,
                                 report_to=[], use_cpu=True, save_strategy="no", per_device_train_batch_size=4,
                                 disable_tqdm=True)
        trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data, eval_dataset=data[:4])
        trainer.train()
        expect("transformers", [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e], min)
    """),
    "lightning": (("torch", "lightning"), """
        import torch, lightning as L
        from lightning.pytorch.loggers import CSVLogger

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

        class Recorder(CSVLogger):
            seen = []
            def log_metrics(self, metrics, step=None):
                self.seen.append(float(metrics["val_loss"])) if "val_loss" in metrics else None
                super().log_metrics(metrics, step)

        torch.manual_seed(0)
        x = torch.randn(16, 4)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
        trainer = L.Trainer(max_epochs=2, logger=Recorder("logs"), enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")
        trainer.fit(Regression(), data, data)
        assert [type(lg).__name__ for lg in trainer.loggers] == ["Recorder", "AnylearnLogger"], trainer.loggers
        assert L.Trainer(logger=False, accelerator="cpu").loggers == []  # logging off stays off
        expect("lightning", Recorder.seen, min)
    """),
    "keras": (("torch", "keras"), """
        import numpy as np, keras
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(x, x.sum(1, keepdims=True), validation_split=0.25, epochs=2, batch_size=8, verbose=0)
        expect("keras", history.history["val_loss"], min)
    """),
    "xgboost": (("xgboost", "sklearn"), """
        import numpy as np, xgboost
        x = np.random.default_rng(0).normal(size=(100, 4)); y = (x[:, 0] > 0).astype(int)
        model = xgboost.XGBClassifier(n_estimators=3, max_depth=2, eval_metric="logloss")
        model.fit(x[:80], y[:80], eval_set=[(x[80:], y[80:])], verbose=False)
        expect("xgboost", model.evals_result()["validation_0"]["logloss"], min)
    """),
    "lightgbm": (("lightgbm", "sklearn"), """
        import numpy as np, lightgbm
        x = np.random.default_rng(0).normal(size=(100, 4)); y = 2 * x[:, 0]
        model = lightgbm.LGBMRegressor(n_estimators=3, num_leaves=4, verbose=-1)
        model.fit(x[:80], y[:80], eval_set=[(x[80:], y[80:])])
        expect("lightgbm", model.evals_result_["valid_0"]["l2"], min)
    """),
}

PRELUDE = """
import json
def expect(framework, values, best):
    print("EXPECT", json.dumps({"framework": framework, "values": [float(v) for v in values], "final": float(best(values))}))
"""


def test_an_unchanged_script_reports_through_every_installed_framework_under_run_autolog(server, tmp_path):
    sections = [name for name, (needs, _) in SECTIONS.items() if installed(*needs)]
    if not sections:
        pytest.skip("none of transformers, lightning, keras, xgboost, lightgbm is installed")
    script = PRELUDE + "".join(textwrap.dedent(SECTIONS[name][1]) for name in sections)
    done, rows, task = run_autolog(script, server, tmp_path, KERAS_BACKEND="torch")
    expected = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("EXPECT ")]
    assert [e["framework"] for e in expected] == sections
    objective = [value for kind, name, _, value in rows if kind == "intermediate" and name is None]
    finals = [value for kind, _, _, value in rows if kind == "final"]
    assert objective == pytest.approx([v for e in expected for v in e["values"]])
    assert finals == pytest.approx([e["final"] for e in expected])  # one final per trainer, none twice
    assert task["intermediate_metrics"] == pytest.approx(objective) and task["final_metric"] == pytest.approx(finals[-1])
    for name in sections:
        assert done.stderr.count(f"{name}: objective metric is") == 1, done.stderr
    if "lightning" in sections:
        assert done.stderr.count("logger=False, so autolog adds no logger") == 1


@pytest.mark.skipif(not installed("xgboost", "lightgbm"), reason="needs xgboost and lightgbm")
def test_trainers_imported_before_or_after_the_call_are_hooked_once(server, tmp_path):
    code = textwrap.dedent("""
        import numpy as np, xgboost                        # imported before autolog()
        import reporter
        print("HOOKED", reporter.autolog())
        from reporter.integrations.xgboost import AnylearnCallback
        import lightgbm                                    # imported after
        x = np.random.default_rng(0).normal(size=(60, 3)); y = x[:, 0]
        d = xgboost.DMatrix(x, label=y)
        xgboost.train({}, d, 2, evals=[(d, "train")], verbose_eval=False)
        xgboost.train({}, d, 2, evals=[(d, "train")], verbose_eval=False, callbacks=[AnylearnCallback()])  # ours already
        lightgbm.train({"verbose": -1}, lightgbm.Dataset(x, y), 2, valid_sets=[lightgbm.Dataset(x, y)])
        reporter.autolog()                                 # again: still one callback each
        xgboost.train({}, d, 1, evals=[(d, "train")], verbose_eval=False)
        print("HOOKED", reporter.autolog())
    """)
    run_dir = str(tmp_path / "run")
    done = run_python(code, task_env(server.base_url, run_dir))
    assert done.returncode == 0, done.stderr
    assert "HOOKED ['xgboost']" in done.stdout and "HOOKED ['xgboost', 'lightgbm']" in done.stdout
    steps = [step for kind, name, step, _ in journal(run_dir) if kind == "intermediate" and name is None]
    assert steps == [0, 1, 0, 1, 0, 1, 0]  # each iteration reported once, whoever added the callback
    assert [kind for kind, *_ in journal(run_dir)].count("final") == 4


def test_moved_internals_are_said_once_and_training_goes_on(tmp_path):
    fake = tmp_path / "fakes"
    (fake / "xgboost").mkdir(parents=True)
    (fake / "xgboost" / "__init__.py").write_text("def fit():\n    return 'trained'\n")  # no train() to hook
    (fake / "keras").mkdir()
    (fake / "keras" / "__init__.py").write_text("class Model:\n    pass\n")  # no Model.fit
    code = "import reporter; reporter.autolog()\nimport xgboost, keras\nimport importlib; importlib.reload(xgboost)\nprint(xgboost.fit())\n"
    env = clean_environ(PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    done = run_python(code, env)
    assert done.returncode == 0 and done.stdout.strip() == "trained", done.stderr
    lines = [line for line in done.stderr.splitlines() if "autolog:" in line]
    assert len(lines) == 2, done.stderr
    assert "xgboost: cannot hook it (AttributeError" in lines[0] and lines[0].endswith("training goes on without it")
    assert "keras: cannot hook it" in lines[1]


def test_run_autolog_chains_to_an_existing_sitecustomize(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = 'yes'\n")
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "print('USER', os.environ.get('USER_SITECUSTOMIZE_RAN'))\n"
        "print('HOOK', any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))\n"
    )
    env = clean_environ(PYTHONPATH=os.pathsep.join([str(own), os.environ.get("PYTHONPATH", "")]))
    done = cli("run", "--autolog", "--", sys.executable, str(script), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "USER yes" in done.stdout and "HOOK True" in done.stdout
    plain = cli("run", "--", sys.executable, str(script), env=env, cwd=tmp_path)
    assert "USER yes" in plain.stdout and "HOOK False" in plain.stdout


@pytest.mark.parametrize("how", ["option", "environment"])
def test_dry_run_shows_autolog_in_the_added_environment(tmp_path, how):
    given = os.pathsep.join(["/opt/site", *filter(None, [os.environ.get("PYTHONPATH")])])  # ours too: the CLI under test
    env = clean_environ(PYTHONPATH=given, **({"ANYLEARN_AUTOLOG": "1"} if how == "environment" else {}))
    args = ["run", "--dry-run"] + (["--autolog"] if how == "option" else []) + ["--", "python", "train.py"]
    done = cli(*args, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout.split("\n", 1)[1])
    assert added["ANYLEARN_AUTOLOG"] == "1"
    assert added["PYTHONPATH"] == os.pathsep.join([SITE_DIR, given])


def test_without_autolog_the_command_environment_is_untouched(tmp_path):
    done = cli("run", "--dry-run", "--", "python", "train.py", env=clean_environ(), cwd=tmp_path)
    added = json.loads(done.stdout.split("\n", 1)[1])
    assert "ANYLEARN_AUTOLOG" not in added and "PYTHONPATH" not in added


def test_autolog_refuses_an_unknown_framework():
    import reporter

    with pytest.raises(ValueError, match="autolog knows transformers, lightning, keras, xgboost, lightgbm, mlflow, wandb, dvclive; not sklearn"):
        reporter.autolog(["sklearn"])
    assert sys.modules.get("xgboost") is None or "autolog" not in repr(getattr(sys.modules["xgboost"], "train", None))


@pytest.mark.skipif(not installed("xgboost"), reason="needs xgboost")
def test_a_call_autolog_cannot_hook_runs_unhooked_and_says_so_once(server, tmp_path):
    code = textwrap.dedent("""
        import numpy as np, reporter, xgboost
        reporter.autolog()
        x = np.random.default_rng(0).normal(size=(60, 3)); d = xgboost.DMatrix(x, label=x[:, 0])
        for _ in range(2):  # callbacks as a generator: not a list autolog can add to
            booster = xgboost.train({}, d, 2, evals=[(d, "train")], verbose_eval=False, callbacks=(c for c in []))
        print("ROUNDS", booster.num_boosted_rounds())
    """)
    run_dir = str(tmp_path / "run")
    done = run_python(code, task_env(server.base_url, run_dir))
    assert done.returncode == 0 and "ROUNDS 2" in done.stdout, done.stderr
    said = [line for line in done.stderr.splitlines() if "autolog: xgboost" in line]
    assert len(said) == 1 and "callbacks is a generator, not a list" in said[0]
    assert journal(run_dir) == []

