"""The DVCLive bridge: an unchanged DVCLive script under `run --autolog` reports to AnyLearn, and DVCLive's
own files hold what they held without us; internals that moved leave the script alone, said once."""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap

import pytest
from conftest import cli, clean_environ
from integrations_support import journal, named, offline_tracker_env, run_autolog

SCRIPT = """
    from dvclive import Live
    with Live("dvclive", save_dvc_exp=False) as live:
        live.log_params({"lr": 0.1, "layers": 2})
        for epoch in range(3):
            live.log_metric("train/loss", 1.0 / (epoch + 1))
            live.log_metric("val/acc", 0.5 + 0.1 * epoch)
            live.next_step()
        try:
            live.log_metric("bad", [1, 2])  # DVCLive refuses it: it raises, as it would have
        except Exception as exc:
            print("RAISED", type(exc).__name__)
    print("ENDED")
"""


def test_an_unchanged_dvclive_script_reports_by_name_and_step_and_dvclive_keeps_its_files(server, tmp_path):
    pytest.importorskip("dvclive", reason="dvclive is not installed (pip install 'anylearn-reporter[dvclive]')")
    env = {**offline_tracker_env(tmp_path), "ANYLEARN_OBJECTIVE_METRIC": "val/acc"}
    done, rows, task = run_autolog(SCRIPT, server, tmp_path, **env)
    assert "RAISED" in done.stdout and "ENDED" in done.stdout, done.stdout + done.stderr
    expected = []
    for step in range(3):
        expected += [("train/loss", step, pytest.approx(1.0 / (step + 1))), (None, step, pytest.approx(0.5 + 0.1 * step))]
    assert named(rows) == expected
    assert task["intermediate_metrics"] == pytest.approx([0.5, 0.6, 0.7]) and task["final_metric"] == pytest.approx(0.7)
    assert [kind for kind, *_ in rows].count("final") == 1 and rows[-1][0] == "final"  # at Live.end(), once
    with open(os.path.join(tmp_path, "autolog-run", "params.json")) as f:
        assert json.load(f) == {"lr": 0.1, "layers": 2}

    def tsv(name):
        with open(tmp_path / "dvclive" / "plots" / "metrics" / f"{name}.tsv") as f:
            return [(int(row["step"]), float(row[name.rsplit("/", 1)[1]])) for row in csv.DictReader(f, delimiter="\t")]

    assert tsv("train/loss") == [(step, pytest.approx(value)) for name, step, value in named(rows) if name == "train/loss"]
    assert tsv("val/acc") == [(step, pytest.approx(value)) for name, step, value in named(rows) if name is None]


def test_moved_tracker_internals_are_said_once_and_the_script_runs_unhooked(tmp_path):
    fake = tmp_path / "fakes" / "dvclive"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from .live import Live\n")
    (fake / "live.py").write_text(textwrap.dedent("""
        class Live:  # log_metric and log_params as DVCLive's, but no end(): none is wrapped
            step = 0
            def log_metric(self, name, val):
                return f"logged {name}"
            def log_params(self, params):
                pass
    """))
    (tmp_path / "train.py").write_text("from dvclive import Live\nprint(Live().log_metric('loss', 1.0))\n")
    env = clean_environ(PYTHONPATH=os.pathsep.join([str(tmp_path / "fakes"), os.environ.get("PYTHONPATH", "")]),
                        ANYLEARN_REPORTER_RUN_DIR=str(tmp_path / "run"), **offline_tracker_env(tmp_path))
    done = cli("run", "--autolog", "--", sys.executable, str(tmp_path / "train.py"), env=env, cwd=tmp_path)
    assert done.returncode == 0 and "logged loss" in done.stdout, done.stderr
    said = [line for line in done.stderr.splitlines() if "autolog: dvclive" in line]
    assert len(said) == 1 and "cannot hook it (AttributeError" in said[0], done.stderr
    assert journal(str(tmp_path / "run")) == []


def test_the_task_key_logged_as_a_parameter_is_masked_in_params_json(server, tmp_path):
    pytest.importorskip("dvclive", reason="dvclive is not installed (pip install 'anylearn-reporter[dvclive]')")
    from conftest import SECRET_KEY

    script = f"""
    from urllib.parse import quote
    from dvclive import Live
    with Live("dvclive", save_dvc_exp=False) as live:
        live.log_params({{"key": {SECRET_KEY!r}, "url": "https://x/?k=" + quote({SECRET_KEY!r}), "lr": 0.1}})
        live.log_metric("metric", 0.5)
    """
    run_autolog(script, server, tmp_path, **offline_tracker_env(tmp_path))
    text = (tmp_path / "autolog-run" / "params.json").read_text()
    assert SECRET_KEY not in text
    assert json.loads(text) == {"key": "***", "url": "https://x/?k=***", "lr": 0.1}
