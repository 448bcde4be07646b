"""``anylearn-reporter run`` with real subprocesses against the local backend on loopback."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import SECRET_KEY, clean_environ, cli, free_port, task_env
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.journal import count_pending, iter_records
from reporter.wrapper import MetricLineParser, ParsedMetric, compile_metric_patterns


def run_env(base_url, tmp_path, **extra):
    return task_env(base_url, str(tmp_path / "run"), **extra)


def write_script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def summary(tmp_path):
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def start_wrapper(args, env, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "reporter", "run", *args], env=env, cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_metric_lines_of_any_program_arrive_and_output_passes_through(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import sys
        print("starting")
        print("ANYLEARN_METRIC 0.25")
        print('ANYLEARN_METRIC {"value": 0.5, "step": 2}')
        print("epoch=3 acc=0.75", flush=True)
        print("to stderr", file=sys.stderr)
        print("ANYLEARN_FINAL_METRIC 0.9")
    """)
    done = cli("run", "--metric-pattern", r"epoch=(?P<step>\d+) acc=(?P<value>[\d.]+)", "--", sys.executable, script,
               env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "starting\nANYLEARN_METRIC 0.25\n" in done.stdout and "to stderr" in done.stderr
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [0.25, 0.5, 0.75] and task["final_metric"] == 0.9
    assert task["states"] == [1, 2]
    assert "epoch=3 acc=0.75" in (tmp_path / "run" / "stdout.log").read_text()
    assert (tmp_path / "run" / "stderr.log").read_text() == "to stderr\n"
    steps = [r.step for _, r in iter_records(str(tmp_path / "run")) if r.kind == "intermediate"]
    assert steps == [None, 2, 3]
    result = summary(tmp_path)
    assert result["state"] == 2 and result["exit_code"] == 0 and result["final_metric"] == 0.9
    assert result["last_intermediate_metric"] == 0.75 and result["records"]["pending"] == 0
    assert result["records"]["delivered"] == 6 and result["peak_rss_bytes"] > 0


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
        reporter.report_metric(0.5)
    """)
    env = run_env(server.base_url, tmp_path, secret_key=SECRET_KEY)
    done = cli("run", "--isolate-secret", "--", sys.executable, script, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "KEY None None" in done.stdout
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5]  # the wrapper delivered for it


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


def test_backend_down_during_the_whole_run_keeps_the_childs_exit_code_and_counts_pending(tmp_path):
    script = write_script(tmp_path, "child.py", """
        import sys, reporter
        for i in range(5):
            reporter.report_metric(float(i))
        sys.exit(4)
    """)
    env = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    done = cli("run", "--drain-timeout", "1", "--", sys.executable, script, env=env, cwd=tmp_path)
    assert done.returncode == 4
    assert re.search(r"7 records stay pending in .*run; deliver them with `anylearn-reporter sync", done.stderr)
    assert summary(tmp_path)["records"]["pending"] == 7  # 5 metrics and 2 states
    assert count_pending(str(tmp_path / "run")) == 7


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
        (["--grace-period", "soon"], {}, "grace period must be a number"),
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


def test_an_existing_non_empty_output_directory_is_kept(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "checkpoint.pt").write_text("weights")
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = cli("run", "--", sys.executable, "-c", "pass", env=env, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stderr.count("exists and is not empty: keeping it") == 1
    assert (tmp_path / "output" / "checkpoint.pt").read_text() == "weights"


def test_a_command_that_cannot_start_fails_with_127(server, tmp_path):
    done = cli("run", "--", "no-such-program-xyz", env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 127 and "no-such-program-xyz" in done.stderr
    assert summary(tmp_path)["state"] == -2 and server.backend.tasks()[0]["states"] == [1, -2]


def test_the_secret_appears_in_no_wrapper_output_log_or_run_file(server, tmp_path):
    script = write_script(tmp_path, "child.py", """
        import reporter, sys
        reporter.report_metric(1.0)
        print("ANYLEARN_METRIC 2.0")
        sys.exit(1)
    """)
    done = cli("run", "--", sys.executable, script, env=run_env(server.base_url, tmp_path, ANYLEARN_REPORTER_LOG_LEVEL="DEBUG"), cwd=tmp_path)
    assert done.returncode == 1
    assert SECRET_KEY not in done.stdout + done.stderr
    for path in (tmp_path / "run").iterdir():
        assert SECRET_KEY.encode() not in path.read_bytes(), path.name


def test_offline_run_journals_everything_and_says_where(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = cli("run", "--", sys.executable, "-c", "import reporter; reporter.report_metric(0.5); print('ANYLEARN_METRIC 0.6')", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert done.stderr.count("offline mode") == 1 and str(run_dir) in done.stderr
    kinds = [(r.kind, r.value) for _, r in iter_records(str(run_dir))]
    assert kinds == [("state", 1), ("intermediate", 0.5), ("intermediate", 0.6), ("state", 2)]


def test_output_without_newlines_passes_through_whole_and_stays_bounded(tmp_path):
    code = "import sys\nfor i in range(300): sys.stdout.write('x' * 10000 + '\\r')\nsys.stdout.flush()\nprint()\nprint('ANYLEARN_METRIC 0.5')"
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = cli("run", "--", sys.executable, "-c", code, env=env, cwd=tmp_path)
    assert done.returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = (run_dir / "stdout.log").read_bytes()
    assert logged == (b"x" * 10000 + b"\r") * 300 + b"\nANYLEARN_METRIC 0.5\n"
    assert done.stdout.replace("\n", "").count("x") == 3_000_000  # all of it passed through
    assert [r.value for _, r in iter_records(str(run_dir)) if r.kind == "intermediate"] == [0.5]


def test_drain_shows_a_progress_bar_on_a_terminal(tmp_path):
    import pty

    script = write_script(tmp_path, "child.py", "import reporter\nfor i in range(3): reporter.report_metric(float(i))\n")
    env = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    leader, follower = pty.openpty()
    wrapper = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--drain-timeout", "1.5", "--", sys.executable, script],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the wrapper
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert wrapper.wait(30) == 0
    text = seen.decode()
    assert re.search(r"\rrun \[\.{30}\] 0/5", text), text  # 3 metrics and 2 states, none delivered
    assert "5 records stay pending" in text


def test_metric_patterns_from_the_environment_one_per_line(server, tmp_path):
    patterns = r"loss=(?P<value>[\d.]+) step=(?P<step>\d+)" + "\n" + r"(?P<name>acc)uracy: (?P<value>[\d.]+)"
    code = "print('loss=0.5 step=1')\nprint('accuracy: 0.9')"
    env = run_env(server.base_url, tmp_path, ANYLEARN_METRIC_PATTERNS=patterns, ANYLEARN_OBJECTIVE_METRIC="acc")
    done = cli("run", "--", sys.executable, "-c", code, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [(r.name, r.value, r.step) for _, r in iter_records(str(tmp_path / "run")) if r.kind == "intermediate"]
    assert records == [(None, 0.5, 1), ("acc", 0.9, None)]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5, 0.9]  # unnamed and the objective are sent


# --- the reader threads cannot die (issue 10, item 2) ----------------------------------------------

BAD_METRIC_LINES = {
    "a step of 1e400": 'ANYLEARN_METRIC {"value": 0.5, "step": 1e400}',
    "nesting deeper than the JSON parser's recursion": 'ANYLEARN_METRIC {"value": ' + "[" * 30000 + "]" * 30000 + "}",
    "a payload above 64 KiB": 'ANYLEARN_METRIC {"value": 0.5, "pad": "' + "x" * 70000 + '"}',
}


@pytest.mark.parametrize("what", list(BAD_METRIC_LINES))
def test_an_unusable_metric_line_is_counted_and_output_and_parsing_go_on(tmp_path, what):
    (tmp_path / "bad.txt").write_text(BAD_METRIC_LINES[what] + "\n")
    script = write_script(tmp_path, "child.py", """
        import sys
        sys.stdout.write(open("bad.txt").read())
        for i in range(3000):
            print("line %05d " % i + "y" * 100)  # more than a pipe holds: a dead reader would block the command
        print("ANYLEARN_METRIC 0.75")
        sys.stdout.write(open("bad.txt").read())
    """)
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = cli("run", "--", sys.executable, script, env=env, cwd=tmp_path, timeout_s=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "line 02999" in done.stdout and "ANYLEARN_METRIC 0.75" in done.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert [r.value for _, r in iter_records(str(run_dir)) if r.kind == "intermediate"] == [0.75]
    result = json.loads((run_dir / "summary.json").read_text())
    assert result["output"]["unreadable_metric_lines"] == 2 and result["records"]["unreadable_metric_lines"] == 2
    assert result["counters"]["unreadable"] == {"metric line": 2}  # the run's counters, which status.json shows too
    assert done.stderr.count("could not be read") == 1  # warned once


def test_a_full_disk_under_stdout_log_is_counted_and_the_output_still_passes_through(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stdout.log").symlink_to("/dev/full")  # every write: ENOSPC, like a full disk
    script = write_script(tmp_path, "child.py", """
        import sys
        for i in range(3000):
            print("line %05d " % i + "y" * 100)
        print("ANYLEARN_METRIC 0.5")
        print("to stderr", file=sys.stderr)
    """)
    env = clean_environ(ANYLEARN_REPORTER_RUN_DIR=str(run_dir))
    done = cli("run", "--", sys.executable, script, env=env, cwd=tmp_path, timeout_s=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 3001 and "ANYLEARN_METRIC 0.5" in done.stdout
    assert done.stderr.count("cannot write") == 1 and "No space left on device" in done.stderr
    assert [r.value for _, r in iter_records(str(run_dir)) if r.kind == "intermediate"] == [0.5]
    failures = summary(tmp_path)["output"]["log_write_failures"]
    assert failures["stdout.log"] >= 1 and failures["stderr.log"] == 0
    assert (run_dir / "stderr.log").read_text() == "to stderr\n"


PATTERNS = [r"(?P<name>\w+)=(?P<value>\S+)(?: step=(?P<step>\S+))?", r"loss (?P<value>.*)"]
PREFIXES = [b"", b"ANYLEARN_METRIC ", b"ANYLEARN_FINAL_METRIC ", b"  ANYLEARN_METRIC {", b"acc=", b"loss "]


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from(PREFIXES), body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       with_patterns=st.booleans())
def test_the_metric_line_parser_never_raises_on_any_bytes(prefix, body, with_patterns):
    parser = MetricLineParser(compile_metric_patterns(PATTERNS) if with_patterns else [])
    line = prefix + body
    result = parser.parse(line)
    assert result is None or isinstance(result.value, float)
    assert parser.parse(line.decode("utf-8", "replace")) == result


@settings(max_examples=100, deadline=None)
@given(payload=st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)),
       value=st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=20), st.none()),
       step=st.one_of(st.floats(), st.integers(min_value=-10**400, max_value=10**400), st.text(max_size=20), st.none()))
def test_the_metric_line_parser_never_raises_on_any_json_payload(payload, value, step):
    parser = MetricLineParser([])
    line = "ANYLEARN_METRIC " + json.dumps({"value": value, "step": step, "extra": payload})
    result = parser.parse(line)
    assert result is not None or parser.unreadable == 1


def test_an_unusable_metric_line_is_one_of_the_counted_kinds():
    parser = MetricLineParser([])
    for line in BAD_METRIC_LINES.values():
        assert parser.parse(line) is None
    assert parser.unreadable == 3
    assert parser.parse('ANYLEARN_METRIC {"value": 0.5, "step": 3.0}') == ParsedMetric("intermediate", 0.5, None, 3)


# --- the failure ladder (issue 10, item 5) ---------------------------------------------------------

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
    from reporter.wrapper import check_launchable

    check_launchable(["python", "x.py"], {"A": "b"})
    with pytest.raises(ConfigError, match="environment variable LD_X contains a NUL byte"):
        check_launchable(["python"], {"LD_X": "a\0b"})
    with pytest.raises(ConfigError, match="contains '='"):
        check_launchable(["python"], {"A=B": "c"})
    with pytest.raises(ConfigError, match="the program .* NUL"):
        check_launchable(["pyt\0hon"], {})


def test_signal_handlers_are_restored_even_when_the_end_of_a_run_fails(tmp_path, monkeypatch):
    from argparse import Namespace

    from reporter import wrapper

    monkeypatch.setenv("ANYLEARN_REPORTER_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(wrapper, "become_subreaper", lambda: True)  # pytest must not stay the reaper of every test
    monkeypatch.setattr(wrapper.Supervisor, "drain", lambda self: (_ for _ in ()).throw(RuntimeError("drain broke")))
    before = {sig: signal.getsignal(sig) for sig in wrapper.FORWARDED_SIGNALS}
    args = Namespace(command=[sys.executable, "-c", "pass"], params=None, params_file=None, params_prefix=None,
                     params_delimiter=None, metric_pattern=None, output=None, grace_period=None, drain_timeout=None,
                     nnodes=None, nproc_per_node=None, isolate_secret=False, dry_run=False)
    with pytest.raises(RuntimeError, match="drain broke"):
        wrapper.run(args)
    assert {sig: signal.getsignal(sig) for sig in wrapper.FORWARDED_SIGNALS} == before


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
    from reporter.wrapper import outcome_of

    outcome = outcome_of(returncode, stop_signal, start_error, "prog")
    assert (outcome.state, outcome.exit_code, outcome.failure) == expected


# --- a run directory that cannot be made (issue 10, item 6) ----------------------------------------

@pytest.mark.parametrize("case", ["a file in the way", "under /proc", "under a file", "a task id too long"])
def test_a_run_directory_that_cannot_be_made_exits_2_naming_the_path_and_the_fix(server, tmp_path, case):
    from conftest import TASK_ID

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
    assert "Traceback" not in line and f"cannot make the run directory {path}:" in line and fix in line
    assert not marker.exists() and all(t["states"] == [] for t in server.backend.tasks())


# --- --isolate-secret isolates (issue 10, item 8) --------------------------------------------------

READ_EVERY_ENVIRON = """
    import os, sys
    key = os.environ["PROBE_KEY_TO_FIND"].encode()  # given under another name: the probe is told what to look for
    del os.environ["PROBE_KEY_TO_FIND"]
    found, readable = [], 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        for part in ("environ", "cmdline", "mem"):
            try:
                with open(f"/proc/{name}/{part}", "rb") as f:
                    data = f.read() if part != "mem" else b""
            except OSError:
                continue
            readable += part == "environ"
            if key in data:
                found.append((name, part))
    supervisor = os.environ["ANYLEARN_REPORTER_SUPERVISOR_PID"]
    try:
        open(f"/proc/{supervisor}/environ", "rb").read()
        supervisor_environ = "readable"
    except OSError as exc:
        supervisor_environ = type(exc).__name__
    print("FOUND", found, "READABLE", readable, "SUPERVISOR", supervisor_environ, flush=True)
    import reporter
    reporter.report_metric(0.5)
"""


def _interpreter_for(user, work):
    """A Python and a PYTHONPATH that ``user`` can run the reporter with, or None.

    This interpreter first; else the system's, with copies of the runtime dependencies (this interpreter
    may live where other users cannot read, like root's home)."""
    import importlib
    import shutil

    here = os.environ.get("PYTHONPATH", "")
    candidates = [(sys.executable, here)]
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system:
        site = os.path.join(work, "site")
        os.makedirs(site, exist_ok=True)
        for name in ("requests", "urllib3", "idna", "charset_normalizer", "certifi", "tenacity", "psutil"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            shutil.copytree(os.path.dirname(module.__file__), os.path.join(site, name), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        candidates.append((system, os.pathsep.join(p for p in (here, site) if p)))
    for exe, path in candidates:
        try:
            probe = subprocess.run([exe, "-c", "import reporter.deliver, requests, tenacity"], env={**clean_environ(), "PYTHONPATH": path},
                                   cwd=work, capture_output=True, user=user.pw_uid, group=user.pw_gid, extra_groups=[], timeout=60)
        except OSError:  # the user cannot even execute it
            continue
        if probe.returncode == 0:
            return exe, path
    return None


def test_isolate_secret_hides_the_key_from_every_process_an_unprivileged_command_can_see(tmp_path):
    import pwd
    import secrets
    import shutil
    import tempfile

    from conftest import TASK_ID

    from reporter.devserver import make_server

    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to run the command as")
    key = "isolated-" + secrets.token_hex(16)  # unique: another run's processes cannot hold it
    srv = make_server({TASK_ID: key}).start()
    work = tempfile.mkdtemp(prefix="anylearn-isolate-")  # tmp_path's parents are closed to other users
    try:
        os.chmod(work, 0o777)
        interpreter = _interpreter_for(nobody, work)
        if interpreter is None:
            pytest.skip("no Python that user 'nobody' can run the reporter with")
        python, pythonpath = interpreter
        script = os.path.join(work, "probe.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(READ_EVERY_ENVIRON))
        env = task_env(srv.base_url, os.path.join(work, "run"), ANYLEARN_SECRET_KEY=key, HOME=work)
        env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=pythonpath)
        done = subprocess.run(
            [python, "-m", "reporter", "run", "--isolate-secret", "--", python, script],
            env={**env, "PROBE_KEY_TO_FIND": key}, cwd=work, capture_output=True, text=True, timeout=60,
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        )
        assert done.returncode == 0, done.stderr
        line = next(line for line in done.stdout.splitlines() if line.startswith("FOUND"))
        assert line.startswith("FOUND [] "), line
        assert "SUPERVISOR PermissionError" in line, line  # the wrapper (same user) is not readable
        assert srv.backend.tasks()[0]["intermediate_metrics"] == [0.5]  # the wrapper still delivers with the key
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)
