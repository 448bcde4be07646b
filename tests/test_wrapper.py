"""``anylearn-reporter run`` as a whole (the runner): a run from its directory to summary.json, against the local backend."""

import json
import os
import re
import subprocess
import sys

from conftest import (
    SECRET_KEY,
    clean_environ,
    cli,
    free_port,
)
from wrapperkit import run_env, summary, write_script

from reporter.cursor import count_pending
from reporter.reader import iter_records


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


def test_a_refused_key_under_the_wrapper_is_said_once_counted_once_and_only_the_wrapper_delivers(server, tmp_path):
    from wrapperkit import start_wrapper

    script = write_script(tmp_path, "child.py", """
        import reporter
        for i in range(5):
            reporter.report_metric(float(i))
    """)
    env = run_env(server.base_url, tmp_path, ANYLEARN_SECRET_KEY="wrong-key-0000")
    wrapper = start_wrapper(["--drain-timeout", "5", "--", sys.executable, script], env, tmp_path)
    out, err = wrapper.communicate(timeout=120)
    assert wrapper.returncode == 0, err
    assert err.count("the backend refused the task id or the secret key") == 1, err
    assert f"refused the task id or the secret key for task {env['ANYLEARN_TASK_ID']} (it cannot say which): check that" in err, err
    assert len(re.findall(r"\d+ records? stays? pending", err)) == 1, err
    assert "7 records stay pending" in err  # 5 metrics and 2 states
    assert re.search(r"7 records stay pending .*; deliver them with `ANYLEARN_SECRET_KEY='<the task's secret key>' anylearn-reporter sync", err)
    assert "wrong-key-0000" not in err
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["deliverer_pid"] == wrapper.pid


def test_no_key_at_all_is_not_called_a_refused_key(server, tmp_path):
    env = run_env(server.base_url, tmp_path)
    del env["ANYLEARN_SECRET_KEY"]
    done = cli("run", "--drain-timeout", "5", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=env, cwd=tmp_path)
    assert "no secret key is set (ANYLEARN_SECRET_KEY or secret_key) and the backend requires one" in done.stderr
    assert "refused the task id or the secret key" not in done.stderr


def test_no_key_with_a_misspelt_key_variable_says_which_was_meant(server, tmp_path):
    env = run_env(server.base_url, tmp_path)
    env["ANYLEARN_SECRETKEY"] = env.pop("ANYLEARN_SECRET_KEY")
    done = cli("run", "--drain-timeout", "5", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=env, cwd=tmp_path)
    assert re.search(r"no secret key is set .*and the backend requires one.*"
                     r"\(ANYLEARN_SECRETKEY is set: did you mean ANYLEARN_SECRET_KEY\?\)", done.stderr), done.stderr


def test_a_misspelt_backend_url_variable_is_said_once_at_start(tmp_path):
    env = clean_environ(ANYLEARN_BACKEND_URl="http://127.0.0.1:9/api", ANYLEARN_REPORTER_DIR=str(tmp_path))
    done = cli("run", "--drain-timeout", "0", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=env, cwd=tmp_path)
    lines = done.stderr.splitlines()
    said = "anylearn-reporter: ANYLEARN_BACKEND_URl is set: did you mean ANYLEARN_BACKEND_URL?"
    assert lines.count(said) == 1, done.stderr  # its own line, once (the offline line may repeat it as a reason)
    assert lines.index(said) < next(i for i, line in enumerate(lines) if "offline mode" in line), done.stderr


def test_the_pending_hint_is_a_command_that_delivers(serve_process, tmp_path):
    server = serve_process()
    down = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    done = cli("run", "--drain-timeout", "0.5", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=down, cwd=tmp_path)
    (hint,) = re.findall(r"deliver them with `([^`]*)`", done.stderr)
    hint = hint.replace(down["ANYLEARN_BACKEND_URL"], server.base_url)  # the backend is back, at a new address
    hint = hint.replace("anylearn-reporter", f"{sys.executable} -m reporter")  # this checkout's
    again = subprocess.run(hint, shell=True, env=clean_environ(ANYLEARN_SECRET_KEY=SECRET_KEY), cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert server.task()["intermediate_metrics"] == [1.0]


def test_ctrl_c_during_the_drain_stops_it_at_once_and_says_what_stays_pending(tmp_path):
    import signal

    from conftest import wait_until
    from wrapperkit import start_wrapper

    env = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    wrapper = start_wrapper(["--drain-timeout", "600", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')"], env, tmp_path)
    err_lines = []

    def draining():
        line = wrapper.stderr.readline()
        err_lines.append(line)
        return re.search(r"waiting up to 5\d\ds \(--drain-timeout, ANYLEARN_DRAIN_TIMEOUT\) to deliver 3 records .* leaves them", line)

    wait_until(draining, 60, what="the drain's first line")
    wrapper.send_signal(signal.SIGINT)
    _, rest = wrapper.communicate(timeout=30)  # not 600 s: the drain stopped
    err = "".join(err_lines) + rest
    assert wrapper.returncode == 0, err
    assert "interrupted (SIGINT): stopped waiting for delivery" in err
    assert "passing it to the command" not in err
    assert "3 records stay pending in" in err and "anylearn-reporter sync" in err
    assert summary(tmp_path)["records"]["pending"] == 3


def test_sigterm_during_the_drain_stops_it_at_once_and_the_commands_own_ending_stands(tmp_path):
    import signal

    from conftest import wait_until
    from wrapperkit import start_wrapper

    env = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    wrapper = start_wrapper(["--drain-timeout", "600", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')"], env, tmp_path)
    err_lines = []

    def draining():
        err_lines.append(wrapper.stderr.readline())
        return re.search(r"waiting up to [0-9.]+s", err_lines[-1])

    wait_until(draining, 60, what="the drain's first line")
    wrapper.send_signal(signal.SIGTERM)
    _, rest = wrapper.communicate(timeout=30)  # not 600 s: the drain stopped
    err = "".join(err_lines) + rest
    assert "interrupted (SIGTERM): stopped waiting for delivery" in err
    assert "passing it to the command" not in err
    assert wrapper.returncode == 0 and summary(tmp_path)["state"] == 2  # the command's own ending stands
    assert "3 records stay pending in" in err and summary(tmp_path)["records"]["pending"] == 3


def test_a_drain_under_a_second_says_its_wait_rounded(tmp_path):
    env = run_env(f"http://127.0.0.1:{free_port()}/api", tmp_path)
    done = cli("run", "--drain-timeout", "1.5", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # the quiet second passed: under a second is left
    assert re.search(r"waiting up to (0\.[1-9]|1)s \(--drain-timeout", done.stderr), done.stderr
    done = cli("run", "--drain-timeout", "1", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=env, cwd=tmp_path)
    assert done.returncode == 0 and "waiting up to 0s" not in done.stderr, done.stderr  # the quiet second took it all


def test_a_bad_backend_url_exits_2_without_saying_records_are_journalled(tmp_path):
    env = run_env("ftp://127.0.0.1/api", tmp_path)
    done = cli("run", "--", sys.executable, "-c", "print('never')", env=env, cwd=tmp_path)
    assert done.returncode == 2 and "never" not in done.stdout
    assert "ANYLEARN_BACKEND_URL" in done.stderr and "journalled" not in done.stderr, done.stderr


def test_a_drain_that_delivers_at_once_is_not_announced(serve_process, tmp_path):
    server = serve_process()
    done = cli("run", "--", sys.executable, "-c", "print('ANYLEARN_METRIC 1')", env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [1.0]
    assert "waiting up to" not in done.stderr and "stay pending" not in done.stderr, done.stderr


def test_a_drain_that_waits_for_one_record_says_it_in_the_singular(serve_process, tmp_path):
    server = serve_process("--latency-ms", "2500")  # the last record takes longer than the quiet second
    script = write_script(tmp_path, "child.py", """
        import json, os, sys, time
        status = os.path.join(os.environ["ANYLEARN_REPORTER_RUN_DIR"], "status.json")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the running state is delivered: only the final one is left
            try:
                if json.load(open(status)).get("delivered", 0) >= 1:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
    """)
    done = cli("run", "--drain-timeout", "60", "--", sys.executable, script, env=run_env(server.base_url, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"to deliver 1 record to \S+; Ctrl-C stops waiting and leaves it for", done.stderr), done.stderr
