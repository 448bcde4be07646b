"""``anylearn-reporter run`` as a whole (the runner): a run from its directory to summary.json, against the local backend."""

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

from reporter.journal import count_pending, iter_records


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
