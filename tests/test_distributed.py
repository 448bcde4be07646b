"""Distributed runs: the torchrun command line, and a real 2-process gloo run on the CPU."""

import importlib.util
import json
import sys
import textwrap
import types

import pytest
from conftest import cli, task_env

from reporter.config import ConfigError
from reporter.wrapper.launch import RunOptions, build_argv, options_from


def options(command, **kw):
    return RunOptions(command=command, params_argv=["--lr", "0.1"], output_dir="/tmp/out", **kw)


def test_a_python_script_runs_through_torchrun():
    argv = build_argv(options(["python", "train.py"], nproc_per_node=2))
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--node-rank=0", "train.py", "--lr", "0.1"]


def test_a_python_module_keeps_its_m_flag():
    argv = build_argv(options(["python3", "-m", "pkg.train"], nproc_per_node=2))
    assert argv[-4:] == ["-m", "pkg.train", "--lr", "0.1"]


def test_a_program_that_is_not_python_runs_with_no_python_and_master_settings():
    argv = build_argv(options(["./train.sh", "x"], nnodes=2, nproc_per_node=4, node_rank=1, master_addr="10.0.0.1", master_port="29500"))
    assert argv[3:] == ["--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500",
                        "--no-python", "./train.sh", "x", "--lr", "0.1"]


def test_a_single_process_is_launched_directly():
    assert build_argv(options(["python", "train.py"])) == ["python", "train.py", "--lr", "0.1"]


def _args(**kw):
    base = dict(command=["python", "t.py"], params=None, params_file=None, params_prefix=None, params_delimiter=None, output=None,
                grace_period=None, drain_timeout=None, metric_pattern=None, nnodes=None, nproc_per_node=None, isolate_secret=False, dry_run=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_without_torch_a_distributed_run_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install anylearn-reporter\[distributed\]"):
        options_from(_args(nproc_per_node="2"), {})


def test_node_rank_comes_from_anylearn_then_generic_variable(monkeypatch):
    # The node rank is read whether or not torch is installed; pretend it is, so this runs on a machine without it.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torch" else real(name, *a))
    assert options_from(_args(nnodes="3"), {"NODE_RANK": "2"}).node_rank == 2
    assert options_from(_args(nnodes="3"), {"NODE_RANK": "2", "ANYLEARN_NODE_RANK": "1"}).node_rank == 1
    with pytest.raises(ConfigError, match="node rank"):
        options_from(_args(), {"NODE_RANK": "1"})


DDP_SCRIPT = """
    import os, torch, torch.distributed as dist, reporter
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    for step in range(3):
        reporter.report_metric(float(rank * 10 + step), step=step)
    print(f"rank {rank} of {dist.get_world_size()} sum {total.item()}", flush=True)
    dist.destroy_process_group()
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install torch==2.13.0)")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks, expected", [("0", [0.0, 1.0, 2.0]), ("all", None)])
def test_two_process_gloo_run_reports_rank_0_by_default(server, tmp_path, ranks, expected):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_REPORT_RANKS=ranks, OMP_NUM_THREADS="1")
    env["MASTER_PORT"] = str(__import__("conftest").free_port())
    done = cli("run", "--nproc-per-node", "2", "--", "python", str(script), env=env, cwd=tmp_path, timeout_s=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2 sum 3.0" in done.stdout and "rank 1 of 2 sum 3.0" in done.stdout
    (task,) = server.backend.tasks()
    assert task["states"] == [1, 2]
    if expected is not None:
        assert task["intermediate_metrics"] == expected
    else:
        assert sorted(task["intermediate_metrics"]) == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["command"][1:3] == ["-m", "torch.distributed.run"]
