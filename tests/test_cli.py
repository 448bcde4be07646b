"""The command line: ``report``, and every command's --help and usage errors."""

import sys

import pytest
from conftest import (
    clean_environ,
    cli,
    run_python,
    task_env,
)

from reporter.journal import COUNTER_LOST, iter_records, read_host_counters

COMMANDS = ["run", "sidecar", "sync", "report", "show", "status", "doctor", "serve"]


def test_report_command_journals_and_delivers_outside_the_wrapper(server, tmp_path):
    env = task_env(server.base_url, str(tmp_path / "run"))
    assert cli("report", "0.5", "--step", "3", env=env).returncode == 0
    assert cli("report", "0.9", "--final", env=env).returncode == 0
    records = [r for _, r in iter_records(str(tmp_path / "run"))]
    assert [(r.kind, r.value, r.step) for r in records] == [("intermediate", 0.5, 3), ("final", 0.9, None)]
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [0.5] and task["final_metric"] == 0.9


def test_report_from_a_shell_script_under_the_wrapper(server, tmp_path):
    script = tmp_path / "train.sh"
    script.write_text(f'#!/bin/sh\nset -e\n"{sys.executable}" -m reporter report 0.25 --step 1\necho "ANYLEARN_METRIC 0.5"\n')
    script.chmod(0o755)
    done = cli("run", "--", str(script), env=task_env(server.base_url, str(tmp_path / "run")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.25, 0.5]


@pytest.mark.parametrize("value", ["abc", "true", ""])
def test_report_refuses_a_value_that_is_not_a_number(tmp_path, value):
    done = cli("report", value, env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 2 and "not a number" in done.stderr



@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    done = cli(command, "--help")
    assert done.returncode == 0 and "example" in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_exits_2_on_bad_usage(command):
    done = cli(command, "--no-such-option")
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


def test_no_command_shows_help_and_exits_2():
    done = cli()
    assert done.returncode == 2 and "COMMAND" in done.stderr


def test_report_exits_1_with_one_line_when_the_record_cannot_be_journalled(server, tmp_path):
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run"  # a file where a directory should be: no journal can exist
    done = cli("report", "0.5", env=task_env(server.base_url, str(run_dir), ANYLEARN_FLUSH_TIMEOUT="1"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and str(run_dir) in done.stderr
    assert "Not a directory" in done.stderr and "records stay in the journal" not in done.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "metrics.jsonl").symlink_to("/dev/full")  # opens, but every write fails: ENOSPC
    done = cli("report", "0.5", env=clean_environ(ANYLEARN_REPORTER_RUN_DIR=str(full)))
    assert done.returncode == 1 and "ENOSPC" in done.stderr and done.stderr.count("could not be journalled") == 1, done.stderr
    assert server.backend.tasks() == [] or server.backend.tasks()[0]["intermediate_metrics"] == []


def test_report_that_cannot_be_journalled_stays_counted_in_the_run_and_is_said_once(tmp_path):
    run_dir = tmp_path / "full"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # opens, but every write fails: ENOSPC
    done = cli("report", "0.5", env=clean_environ(ANYLEARN_REPORTER_RUN_DIR=str(run_dir)))
    assert done.returncode == 1 and done.stderr.count("could not be journalled") == 1, done.stderr
    lost = read_host_counters(str(run_dir)).get(COUNTER_LOST, {})
    assert sum(lost.values()) == 1 and any("ENOSPC" in reason for reason in lost), lost  # status/show still see it


def test_the_hook_says_there_is_no_journal_when_it_cannot_take_the_lock_of_a_run_that_cannot_be_made(server, tmp_path):
    (tmp_path / "a-file").write_text("")
    env = task_env(server.base_url, str(tmp_path / "a-file" / "run"), ANYLEARN_FLUSH_TIMEOUT="1")
    done = run_python("import reporter\nreporter.report_metric(0.5)\nreporter.flush(1)", env)
    assert done.returncode == 0, done.stderr
    assert "cannot take the deliver lock" in done.stderr and "no journal there" in done.stderr
    assert "records stay in the journal" not in done.stderr


def test_an_offline_report_makes_one_run_directory(tmp_path):
    done = cli("report", "0.5", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")))
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [r.value for _, r in iter_records(str(run_dir))] == [0.5]


def test_show_into_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    run_python("import reporter\nfor i in range(5000): reporter.report_metric(float(i), step=i)", env)
    show = subprocess.Popen([sys.executable, "-m", "reporter", "show", "--metrics"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert show.stdout.readline()  # `| head -1`: read one line, then close the pipe
    show.stdout.close()
    err = show.stderr.read().decode()
    assert show.wait(30) == 141  # 128 + SIGPIPE, as a shell tool killed by it
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
