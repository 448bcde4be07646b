"""Supervision: the command's ending, the signals passed to it, and the one failure ladder."""

import signal
import sys
import time

import pytest
from conftest import cli
from wrapperkit import run_env, start_wrapper, summary, write_script

from reporter.wrapper.supervise import outcome_of


def test_child_killed_with_sigkill_after_k_reports_fails_with_137_and_all_k_arrive(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import os, signal, reporter
        for i in range(23):
            reporter.report_metric(float(i), step=i)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = cli("run", "--", sys.executable, script, env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 137
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [float(i) for i in range(23)] and task["states"] == [1, -2]
    result = summary(tmp_path)
    assert result["state"] == -2 and result["signal"] == "SIGKILL"
    assert "killed by SIGKILL" in result["failure"]["reason"]


def test_failure_summary_has_the_reason_and_the_last_50_lines_of_stderr(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import sys
        for i in range(80):
            print(f"err line {i}", file=sys.stderr)
        sys.exit(3)
    """)
    done = cli("run", "--", sys.executable, script, env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 3
    failure = summary(tmp_path)["failure"]
    assert failure["reason"] == "the command exited with code 3"
    assert failure["stderr_tail"] == [f"err line {i}" for i in range(30, 80)]
    assert server.backend.tasks()[0]["state"] == -2


SIGTERM_CHILD = """
    import os, signal, sys, time
    mode = sys.argv[1]
    if mode == "catch":
        def stop(signum, frame):
            print("child got SIGTERM", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, stop)
    elif mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize(
    "mode, sent, exit_code",
    [("default", signal.SIGTERM, 143), ("catch", signal.SIGTERM, 7), ("default", signal.SIGHUP, 129), ("default", signal.SIGINT, 130)],
)
def test_a_stop_signal_to_the_wrapper_reaches_the_child_and_aborts_the_task(server, tmp_path, mode, sent, exit_code):
    script = write_script(tmp_path, "child.py", SIGTERM_CHILD)
    wrapper = start_wrapper(["--", sys.executable, script, mode], run_env(server.base_url, tmp_path), tmp_path)
    assert wrapper.stdout.readline().strip() == "ready"
    wrapper.send_signal(sent)
    out, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == exit_code, err
    if mode == "catch":
        assert "child got SIGTERM" in out
    assert server.backend.tasks()[0]["states"] == [1, -3]
    assert summary(tmp_path)["stop_signal"] == sent.name and summary(tmp_path)["state"] == -3


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(server, tmp_path):
    script = write_script(tmp_path, "child.py", SIGTERM_CHILD)
    wrapper = start_wrapper(["--grace-period", "1", "--", sys.executable, script, "ignore"], run_env(server.base_url, tmp_path), tmp_path)
    assert wrapper.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    wrapper.send_signal(signal.SIGTERM)
    _, err = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 137 and time.monotonic() - sent >= 1.0
    assert "grace period" in err
    assert server.backend.tasks()[0]["state"] == -3


def test_signals_go_to_the_whole_process_group(server, tmp_path):
    grandchild_marker = tmp_path / "grandchild-stopped"
    script = write_script(tmp_path, "child.py", f"""
        import subprocess, sys, time
        code = "import signal, sys, time\\n" \\
               "def stop(*a):\\n open({str(grandchild_marker)!r}, 'w').close(); sys.exit(0)\\n" \\
               "signal.signal(signal.SIGTERM, stop)\\nprint('up', flush=True)\\ntime.sleep(60)"
        grandchild = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        grandchild.stdout.readline()
        print("ready", flush=True)
        grandchild.wait()
    """)
    wrapper = start_wrapper(["--", sys.executable, script], run_env(server.base_url, tmp_path), tmp_path)
    assert wrapper.stdout.readline().strip() == "ready"
    wrapper.send_signal(signal.SIGTERM)
    wrapper.communicate(timeout=60)
    assert grandchild_marker.exists()


def test_a_command_that_cannot_start_fails_with_127(server, tmp_path):
    done = cli("run", "--", "no-such-program-xyz", env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 127 and "no-such-program-xyz" in done.stderr
    assert summary(tmp_path)["state"] == -2 and server.backend.tasks()[0]["states"] == [1, -2]


@pytest.mark.parametrize("in_the_way", ["stdout.log", "child.pid"])
def test_bookkeeping_that_fails_after_launch_leaves_the_command_supervised(server, tmp_path, in_the_way):
    run_dir = tmp_path / "run"
    (run_dir / in_the_way).mkdir(parents=True)  # a directory where the wrapper writes a file
    script = write_script(tmp_path, "child.py", """
        import sys
        print("ANYLEARN_METRIC 0.5")
        print("to stderr", file=sys.stderr)
        sys.exit(5)
    """)
    done = cli("run", "--", sys.executable, script, env=run_env(server.base_url, tmp_path), cwd=tmp_path, timeout_s=60)
    assert done.returncode == 5, done.stderr  # the command's own ending, not "cannot start"
    assert "cannot start" not in done.stderr and in_the_way in done.stderr
    assert "ANYLEARN_METRIC 0.5" in done.stdout
    (task,) = server.backend.tasks()
    assert task["states"] == [1, -2] and task["intermediate_metrics"] == [0.5]
    result = summary(tmp_path)
    assert result["failure"]["reason"] == "the command exited with code 5" and result["failure"]["stderr_tail"] == ["to stderr"]


def test_signal_handlers_are_restored_even_when_the_end_of_a_run_fails(tmp_path, monkeypatch):
    from argparse import Namespace

    from reporter.wrapper import runner, supervise

    monkeypatch.setenv("ANYLEARN_REPORTER_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(runner, "become_subreaper", lambda: True)  # pytest must not stay the reaper of every test
    monkeypatch.setattr(runner.Run, "drain", lambda self: (_ for _ in ()).throw(RuntimeError("drain broke")))
    before = {sig: signal.getsignal(sig) for sig in supervise.FORWARDED_SIGNALS}
    args = Namespace(command=[sys.executable, "-c", "pass"], params=None, params_file=None, params_prefix=None,
                     params_delimiter=None, metric_pattern=None, output=None, grace_period=None, drain_timeout=None,
                     nnodes=None, nproc_per_node=None, isolate_secret=False, dry_run=False)
    with pytest.raises(RuntimeError, match="drain broke"):
        runner.run(args)
    assert {sig: signal.getsignal(sig) for sig in supervise.FORWARDED_SIGNALS} == before


@pytest.mark.parametrize(
    "returncode, stop_signal, start_error, expected",
    [
        (0, None, None, (2, 0, None)),
        (3, None, None, (-2, 3, "the command exited with code 3")),
        (-9, None, None, (-2, 137, "the command was killed by SIGKILL")),
        (-15, signal.SIGTERM, None, (-3, 143, "stopped: the wrapper received SIGTERM")),
        (None, None, FileNotFoundError(2, "No such file or directory"), (-2, 127, "cannot start 'prog': No such file or directory")),
        (None, None, PermissionError(13, "Permission denied"), (-2, 126, "cannot start 'prog': Permission denied")),
    ],
)
def test_one_ladder_maps_every_ending_to_state_exit_code_and_reason(returncode, stop_signal, start_error, expected):
    outcome = outcome_of(returncode, stop_signal, start_error, "prog")
    assert (outcome.state, outcome.exit_code, outcome.failure) == expected
