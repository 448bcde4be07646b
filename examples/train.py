"""A small training run for trying anylearn-reporter: fits y = 3x + 1 with gradient descent, in plain Python.

It reports the objective (accuracy-like score) every epoch through the in-process API, prints a metric
line too (any language can do that), and writes a model file into the output directory.

    anylearn-reporter run --params '{"epochs": 20, "lr": 0.05}' -- python examples/train.py
"""

import argparse
import json
import os
import random

import reporter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    data = [(x / 50, 3 * x / 50 + 1 + rng.gauss(0, 0.05)) for x in range(-50, 50)]
    weight, bias = 0.0, 0.0
    score = 0.0
    for epoch in range(args.epochs):
        grad_w = sum(2 * (weight * x + bias - y) * x for x, y in data) / len(data)
        grad_b = sum(2 * (weight * x + bias - y) for x, y in data) / len(data)
        weight -= args.lr * 10 * grad_w
        bias -= args.lr * 10 * grad_b
        loss = sum((weight * x + bias - y) ** 2 for x, y in data) / len(data)
        score = 1.0 / (1.0 + loss)
        reporter.report_metrics({"metric": score, "loss": loss}, step=epoch)
        print(f"epoch {epoch:3d}  loss {loss:.5f}  score {score:.4f}", flush=True)
    print(f"ANYLEARN_FINAL_METRIC {score}", flush=True)

    output = os.environ.get("ANYLEARN_TASK_OUTPUT_PATH", "output")
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "model.json"), "w") as f:
        json.dump({"weight": weight, "bias": bias, "score": score}, f)


if __name__ == "__main__":
    main()
