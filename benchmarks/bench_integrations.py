"""Benchmark of the framework integrations: the time each callback adds to a training step.

    python benchmarks/bench_integrations.py [--steps 300] [--repeats 3] [--write docs/benchmarks.md]

For each installed framework, a tiny model trains on CPU for ``--steps`` steps (iterations, batches),
every step logged, in a fresh process reporting to the local backend (``serve``) like a task would (for a
tracker -- MLflow, W&B, DVCLive -- a "step" is one call of its own log function, hooked by autolog):
- the floor, measured in the same process: the framework's own step time with a do-nothing logger or
  no callback;
- the same training with our callback: its step time, and the time spent inside the callback's per-step
  hooks, summed and divided by the steps (the cost it adds to the training thread, free of the run-to-run
  noise of a difference of two step times). The end-of-training hooks run once and are left out.
Each condition runs ``--repeats`` times, alternating; the fastest run of each is kept.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_core import KEY, TASK_ID, Serve, machine, publish  # noqa: E402

CALLBACKS = ("transformers", "lightning", "keras", "xgboost", "lightgbm")
TRACKERS = ("mlflow", "wandb", "dvclive")
FRAMEWORKS = CALLBACKS + TRACKERS
# section of docs/benchmarks.md -> (its frameworks, its table's header)
SECTIONS = {
    "integrations": (CALLBACKS, "| framework (version) | floor: step without our callback (us) | step with it (us) | inside our hooks, per step (us) | share of the floor step | at the end, once (ms) |"),
    "trackers": (TRACKERS, "| tracker (version) | floor: its log call, unhooked (us) | the call hooked (us) | inside our bridge, per call (us) | share of the floor call | at the run's end, once (ms) |"),
}
HOOK_TIME_NS = [0]  # inside the per-step hooks
END_TIME_NS = [0]  # inside the end-of-training hooks (once a run)


def timed_hooks(cls: type, *names: str, total: List[int] = HOOK_TIME_NS) -> None:
    """Wrap ``cls``'s hook methods so the time spent in them adds up in ``total``."""
    for name in names:
        original = getattr(cls, name)

        @functools.wraps(original)
        def hook(*args: Any, __original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return __original(*args, **kwargs)
            finally:
                total[0] += time.perf_counter_ns() - start

        setattr(cls, name, hook)


# --- one training setup per framework: run(with_callback) -> seconds ------------------------------------


def setup_transformers(steps: int) -> Callable[[bool], float]:
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainingArguments,
    )

    from reporter.integrations.transformers import AnylearnCallback

    timed_hooks(AnylearnCallback, "on_log", "on_evaluate")
    timed_hooks(AnylearnCallback, "on_train_end", total=END_TIME_NS)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=16, num_labels=2)
    data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.tensor(i % 2)} for i in range(64)]

    def run(with_callback: bool) -> float:
        args = TrainingArguments(output_dir="out", max_steps=steps, logging_steps=1, report_to=[], use_cpu=True,
                                 save_strategy="no", per_device_train_batch_size=4, disable_tqdm=True)
        trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data,
                          callbacks=[AnylearnCallback(objective="loss")] if with_callback else [])
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    return run


def setup_lightning(steps: int) -> Callable[[bool], float]:
    import lightning as L
    import torch
    from lightning.pytorch.loggers import Logger

    from reporter.integrations.lightning import AnylearnLogger

    timed_hooks(AnylearnLogger, "log_metrics")
    timed_hooks(AnylearnLogger, "finalize", total=END_TIME_NS)  # reports the final and waits for delivery (flush)

    class Nothing(Logger):  # the floor: Lightning's own logging path, writing nowhere
        name, version = "nothing", "0"

        def log_metrics(self, metrics: Any, step: Any = None) -> None:
            pass

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, _index: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.randn(steps * 8, 4)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    def run(with_callback: bool) -> float:
        trainer = L.Trainer(max_steps=steps, logger=AnylearnLogger(objective="train_loss") if with_callback else Nothing(),
                            log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")
        start = time.perf_counter()
        trainer.fit(Regression(), data)
        return time.perf_counter() - start

    return run


def setup_keras(steps: int) -> Callable[[bool], float]:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np

    from reporter.integrations.keras import AnylearnCallback

    timed_hooks(AnylearnCallback, "on_train_batch_end", "on_epoch_end")
    timed_hooks(AnylearnCallback, "on_train_end", total=END_TIME_NS)
    x = np.random.default_rng(0).normal(size=(steps * 8, 4)).astype("float32")
    y = x.sum(1, keepdims=True)

    def run(with_callback: bool) -> float:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        callbacks = [AnylearnCallback(objective="loss", log_every_n_batches=1)] if with_callback else []
        start = time.perf_counter()
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    return run


def setup_xgboost(steps: int) -> Callable[[bool], float]:
    import numpy as np
    import xgboost

    from reporter.integrations.xgboost import AnylearnCallback

    timed_hooks(AnylearnCallback, "after_iteration")
    timed_hooks(AnylearnCallback, "after_training", total=END_TIME_NS)
    x = np.random.default_rng(0).normal(size=(500, 4))
    train, valid = xgboost.DMatrix(x[:400], label=x[:400, 0]), xgboost.DMatrix(x[400:], label=x[400:, 0])

    def run(with_callback: bool) -> float:
        start = time.perf_counter()
        xgboost.train({"max_depth": 2, "nthread": 1, "eval_metric": ["rmse", "mae"]}, train, steps,
                      evals=[(train, "train"), (valid, "validation")], verbose_eval=False,
                      callbacks=[AnylearnCallback()] if with_callback else None)
        return time.perf_counter() - start

    return run


def setup_lightgbm(steps: int) -> Callable[[bool], float]:
    import lightgbm
    import numpy as np

    from reporter.integrations.lightgbm import (
        AnylearnLightGBMCallback,
        anylearn_callback,
    )

    timed_hooks(AnylearnLightGBMCallback, "__call__")
    x = np.random.default_rng(0).normal(size=(500, 4))

    def run(with_callback: bool) -> float:
        train = lightgbm.Dataset(x[:400], x[:400, 0])
        valid = lightgbm.Dataset(x[400:], x[400:, 0], reference=train)
        start = time.perf_counter()
        lightgbm.train({"num_leaves": 4, "num_threads": 1, "metric": ["l1", "l2"], "verbose": -1}, train, steps,
                       valid_sets=[train, valid], callbacks=[anylearn_callback()] if with_callback else None)
        return time.perf_counter() - start

    return run


# --- trackers: the floor is the tracker's own log call, unhooked ---------------------------------------


def tracker_hooks(framework: str, owner_of: Callable[[], type], per_step: Tuple[str, ...], at_end: Tuple[str, ...]) -> Callable[[bool], Any]:
    """Turn autolog on for ``framework`` and time our bridge's functions; returns ``hooked(on)``, which
    points the tracker's wrapped methods at our wrapper (on) or at the tracker's own method (off)."""
    import importlib

    from reporter.integrations.autolog import autolog

    autolog([framework])
    bridge = importlib.import_module(f"reporter.integrations.{framework}")
    timed_hooks(bridge, *per_step)  # type: ignore[arg-type]  # a module's functions, as a class's
    timed_hooks(bridge, *at_end, total=END_TIME_NS)  # type: ignore[arg-type]
    owner = owner_of()
    ours = {name: getattr(owner, name) for name in per_step + at_end}

    def hooked(on: bool) -> None:
        for name, wrapper in ours.items():
            setattr(owner, name, wrapper if on else wrapper.__wrapped__)

    return hooked


def setup_mlflow(steps: int) -> Callable[[bool], float]:
    os.environ.update(MLFLOW_TRACKING_URI=f"file:{os.path.abspath('mlruns')}", MLFLOW_ALLOW_FILE_STORE="true")
    hooked = tracker_hooks("mlflow", lambda: __import__("mlflow").MlflowClient, ("log_metric", "log_batch"), ("set_terminated",))
    import mlflow

    def run(with_callback: bool) -> float:
        hooked(with_callback)
        mlflow.start_run()
        start = time.perf_counter()
        for step in range(steps):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.end_run()  # inside the window, as for every framework: the worker takes our end hooks out
        return time.perf_counter() - start

    return run


def setup_wandb(steps: int) -> Callable[[bool], float]:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=os.path.abspath("."), DO_NOT_TRACK="1")
    hooked = tracker_hooks("wandb", lambda: __import__("wandb").sdk.wandb_run.Run, ("log",), ("finish",))
    import wandb

    def run(with_callback: bool) -> float:
        hooked(with_callback)
        wandb_run = wandb.init(project="bench")
        start = time.perf_counter()
        for step in range(steps):
            wandb_run.log({"loss": 1.0 / (step + 1), "eval": {"acc": step / steps}})
        wandb_run.finish()
        return time.perf_counter() - start

    return run


def setup_dvclive(steps: int) -> Callable[[bool], float]:
    os.environ.update(DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")
    hooked = tracker_hooks("dvclive", lambda: __import__("dvclive").Live, ("log_metric",), ("end",))
    from dvclive import Live

    def run(with_callback: bool) -> float:
        hooked(with_callback)
        live = Live("dvclive", save_dvc_exp=False)
        start = time.perf_counter()
        for step in range(steps):
            live.log_metric("loss", 1.0 / (step + 1))
            live.step = step + 1  # next_step() also renders reports: not the log call measured here
        live.end()
        return time.perf_counter() - start

    return run


def worker(framework: str, steps: int, repeats: int) -> Dict[str, float]:
    run = globals()[f"setup_{framework}"](steps)
    run(False)  # warm-up: first-call costs are nobody's step time
    run(True)
    without: List[float] = []
    with_: List[float] = []
    hooks: List[float] = []
    ends: List[float] = []
    for _ in range(repeats):
        without.append(run(False))
        HOOK_TIME_NS[0] = END_TIME_NS[0] = 0
        with_.append(run(True) - END_TIME_NS[0] / 1e9)  # the steps only; the end is its own column
        hooks.append(HOOK_TIME_NS[0] / 1e9)
        ends.append(END_TIME_NS[0] / 1e9)
    return {
        "floor_step_us": min(without) / steps * 1e6,
        "with_step_us": min(with_) / steps * 1e6,
        "hook_us_per_step": min(hooks) / steps * 1e6,
        "end_ms": min(ends) * 1e3,
    }


def versions(framework: str) -> str:
    import importlib
    import importlib.metadata

    module = importlib.import_module({"lightning": "lightning"}.get(framework, framework))
    try:
        return getattr(module, "__version__", None) or importlib.metadata.version(framework)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", metavar="MARKDOWN")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="the sections to measure (and write): framework callbacks, trackers")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({**worker(args.worker, args.steps, args.repeats), "version": versions(args.worker)}))
        return

    server = Serve()
    results: Dict[str, Tuple[Dict[str, Any], str]] = {}
    try:
        with tempfile.TemporaryDirectory() as directory:
            for framework in [f for section in args.only for f in SECTIONS[section][0]]:
                env = {**os.environ, "ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": KEY,
                       "ANYLEARN_BACKEND_URL": server.base_url,
                       "ANYLEARN_REPORTER_RUN_DIR": os.path.join(directory, framework), "KERAS_BACKEND": "torch"}
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", framework, "--steps", str(args.steps), "--repeats", str(args.repeats)],
                    env=env, capture_output=True, text=True, cwd=directory,
                )
                if done.returncode != 0:
                    print(f"{framework}: skipped ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
                    continue
                results[framework] = (json.loads(done.stdout.strip().splitlines()[-1]), "")
    finally:
        server.stop()

    for section in args.only:
        frameworks, header = SECTIONS[section]
        lines = [
            f"Machine: {machine()}. {args.steps} steps, every step logged, best of {args.repeats}; reporting to the local backend.",
            "",
            header,
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for framework, (r, _) in results.items():
            if framework not in frameworks:
                continue
            share = 100 * r["hook_us_per_step"] / r["floor_step_us"]
            lines.append(
                f"| {framework} ({r['version']}) | {r['floor_step_us']:.0f} | {r['with_step_us']:.0f} | "
                f"{r['hook_us_per_step']:.1f} | {share:.1f}% | {r['end_ms']:.1f} |"
            )
        publish(lines, args.write, section)


if __name__ == "__main__":
    main()
