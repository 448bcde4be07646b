"""The launch: options, the command's argv and environment, and every check before launch (exit 2, nothing reported)."""

import json
import re
import sys

import pytest
from conftest import (
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    task_env,
)
from wrapperkit import run_env, write_script

from reporter.wrapper.launch import check_launchable


@pytest.mark.parametrize(
    "args, env_extra, message",
    [
        (["--params", '{"lr": 0.1,}'], {}, r"--params is not valid JSON: .*line 1 column 12"),
        (["--params", "[1]"], {}, "must be a JSON object"),
        ([], {"ANYLEARN_TRAIN_PARAMS": "{oops"}, "ANYLEARN_TRAIN_PARAMS is not valid JSON"),
        (["--output", "/abs/out"], {}, "must be a relative path"),
        (["--output", "a/../../b"], {}, "must not contain '..'"),
        ([], {"ANYLEARN_OUTPUT": "/etc"}, "must be a relative path"),
        (["--metric-pattern", "acc=([0-9.]+)"], {}, r"needs a named group \(\?P<value>"),
        (["--metric-pattern", "(?P<value>"], {}, "not a valid regular expression"),
        (["--grace-period", "soon"], {}, r"--grace-period \(ANYLEARN_GRACE_PERIOD\) must be a number"),
        ([], {"ANYLEARN_REPORT_RANKS": "most"}, "ANYLEARN_REPORT_RANKS"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_launches_nothing(tmp_path, args, env_extra, message):
    marker = tmp_path / "launched"
    env = clean_environ(**env_extra)
    done = cli("run", *args, "--", "touch", str(marker), env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "anylearn-runs").exists()


def test_no_command_and_no_entrypoint_names_both(tmp_path):
    done = cli("run", env=clean_environ(), cwd=tmp_path)
    assert done.returncode == 2 and "--" in done.stderr and "ANYLEARN_ENTRYPOINT" in done.stderr


def test_entrypoint_and_params_from_the_environment_are_argv_not_a_shell(tmp_path):
    script = write_script(tmp_path, "echo_args.py", "import json, sys; print(json.dumps(sys.argv[1:]))")
    env = clean_environ(
        ANYLEARN_ENTRYPOINT=f"{sys.executable} {script} --fixed 'two words'",
        ANYLEARN_TRAIN_PARAMS='{"x": "$(touch pwned)", "y": "a; rm -rf /", "data": "$DS1"}',
        ANYLEARN_TRAIN_PARAMS_PREFIX="-",
        ANYLEARN_TRAIN_PARAMS_DELIMETER="=",
        ANYLEARN_ARTIFACT_IDS="DS1",
        DS1="/datasets/ds1",
        ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"),
    )
    done = cli("run", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == ["--fixed", "two words", "-x=$(touch pwned)", "-y=a; rm -rf /", "-data=/datasets/ds1"]
    assert not (tmp_path / "pwned").exists()


def test_dry_run_prints_argv_and_added_environment_without_the_secret(tmp_path):
    env = task_env("http://127.0.0.1:9/api", str(tmp_path / "run"))
    done = cli("run", "--dry-run", "--isolate-secret", "--params", '{"lr": 0.01, "name": "a b"}', "--", "python", "train.py", env=env, cwd=tmp_path)
    assert done.returncode == 0
    argv_line, *rest = done.stdout.splitlines()
    assert json.loads(argv_line) == ["python", "train.py", "--lr", "0.01", "--name", "a b"]
    added = json.loads("\n".join(rest))
    assert added["ANYLEARN_TASK_OUTPUT_PATH"] == str(tmp_path / "output") and added["ANYLEARN_SECRET_KEY"] is None
    assert SECRET_KEY not in done.stdout + done.stderr
    assert not (tmp_path / "output").exists() and not (tmp_path / "run").exists()


def test_the_child_gets_run_dir_output_path_and_unbuffered_and_only_journals(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import json, os, reporter
        keys = ["ANYLEARN_REPORTER_RUN_DIR", "ANYLEARN_TASK_OUTPUT_PATH", "PYTHONUNBUFFERED", "ANYLEARN_SECRET_KEY"]
        print(json.dumps({k: os.environ.get(k) for k in keys}))
        for i in range(50):
            reporter.report_metric(i / 50, step=i)
    """)
    done = cli("run", "--output", "out/model", "--", sys.executable, script, env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[0])
    assert seen["ANYLEARN_REPORTER_RUN_DIR"] == str(tmp_path / "run")
    assert seen["ANYLEARN_TASK_OUTPUT_PATH"] == str(tmp_path / "out" / "model") and (tmp_path / "out" / "model").is_dir()
    assert seen["PYTHONUNBUFFERED"] == "1" and seen["ANYLEARN_SECRET_KEY"] == SECRET_KEY
    assert server.backend.tasks()[0]["intermediate_metrics"] == [i / 50 for i in range(50)]
    assert server.backend.stats()["duplicates"] == 0  # one deliverer: the wrapper


def test_isolate_secret_keeps_the_key_from_the_child(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import os, reporter
        print("KEY", os.environ.get("ANYLEARN_SECRET_KEY"), os.environ.get("secret_key"))
        print("TOKEN", os.environ.get("ANYLEARN_AUTH_TOKEN"), os.environ.get("ANYLEARN_TOKEN"))
        reporter.report_metric(0.5)
    """)
    env = run_env(server.base_url, tmp_path, secret_key=SECRET_KEY)
    env.update(ANYLEARN_AUTH_TOKEN="tok-123456", ANYLEARN_TOKEN="tok-123456")  # a user's token: a secret like the key
    done = cli("run", "--isolate-secret", "--", sys.executable, script, "tok-123456", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "KEY None None" in done.stdout and "TOKEN None None" in done.stdout
    assert "tok-123456" not in done.stderr  # the command line is logged with the token masked
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5]  # the wrapper delivered for it


def test_an_existing_non_empty_output_directory_is_kept(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "checkpoint.pt").write_text("weights")
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = cli("run", "--", sys.executable, "-c", "pass", env=env, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stderr.count(f"the output directory {tmp_path / 'output'} already holds files") == 1
    assert "resumed task" not in done.stderr  # an offline run is a new run, not a resumed task
    assert (tmp_path / "output" / "checkpoint.pt").read_text() == "weights"


@pytest.mark.parametrize(
    "args, env_extra, message",
    [
        (["--params", '{"x": "a\\u0000b"}'], {}, r"argument 3 of the command .* contains a NUL byte"),
        (["--params", '{"x": "\\ud800"}'], {}, r"argument 3 of the command .* file system encoding"),
        ([], {"ANYLEARN_TRAIN_PARAMS": '{"lr": "0.1\\u0000"}'}, r"argument 3 of the command .* NUL byte"),
    ],
)
def test_what_exec_cannot_take_exits_2_before_anything_is_reported(server, tmp_path, args, env_extra, message):
    marker = tmp_path / "launched"
    env = run_env(server.base_url, tmp_path, **env_extra)
    done = cli("run", *args, "--", "touch", str(marker), env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not marker.exists() and all(t["states"] == [] for t in server.backend.tasks())  # no state 1 left "running"
    assert not (tmp_path / "run").exists()


def test_a_nul_byte_or_a_bad_name_in_the_environment_is_a_configuration_error():
    from reporter.config import ConfigError

    check_launchable(["python", "x.py"], {"A": "b"})
    with pytest.raises(ConfigError, match="environment variable LD_X contains a NUL byte"):
        check_launchable(["python"], {"LD_X": "a\0b"})
    with pytest.raises(ConfigError, match="contains '='"):
        check_launchable(["python"], {"A=B": "c"})
    with pytest.raises(ConfigError, match="the program .* NUL"):
        check_launchable(["pyt\0hon"], {})


@pytest.mark.parametrize("case", ["a file in the way", "under /proc", "under a file", "a task id too long"])
def test_a_run_directory_that_cannot_be_made_exits_2_naming_the_path_and_the_fix(server, tmp_path, case):
    (tmp_path / "afile").write_text("x")
    env = run_env(server.base_url, tmp_path)
    del env["ANYLEARN_REPORTER_RUN_DIR"]
    if case == "a file in the way":
        env["ANYLEARN_REPORTER_RUN_DIR"] = path = str(tmp_path / "afile")
        fix = "a file is in the way"
    elif case == "under /proc":
        env["ANYLEARN_REPORTER_DIR"] = "/proc/anylearn-runs"
        path, fix = "/proc/anylearn-runs/" + TASK_ID, "to a writable directory"
    elif case == "under a file":
        env["ANYLEARN_REPORTER_DIR"] = str(tmp_path / "afile" / "runs")
        path, fix = str(tmp_path / "afile" / "runs" / TASK_ID), "a file is in the way"
    else:
        env["ANYLEARN_REPORTER_DIR"] = str(tmp_path / "runs")
        env["ANYLEARN_TASK_ID"] = "T" * 300
        path, fix = str(tmp_path / "runs" / ("T" * 300)), "ANYLEARN_REPORTER_RUN_DIR to a shorter"
    marker = tmp_path / "launched"
    done = cli("run", "--", "touch", str(marker), env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    if case == "a task id too long":  # refused as a task id before any directory is tried
        assert "Traceback" not in line and "ANYLEARN_TASK_ID='TTTT" in line and "more than 255 bytes" in line
    else:
        assert "Traceback" not in line and f"cannot make the run directory {path}:" in line and fix in line
    assert not marker.exists() and all(t["states"] == [] for t in server.backend.tasks())

