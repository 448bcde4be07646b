"""User tools: sync, show, report, doctor, every command's --help, and the local backend's page."""

import json
import os
import signal
import struct
import subprocess
import sys
import zlib

import pytest
from conftest import (
    SECRET_KEY,
    TASK_ID,
    clean_environ,
    cli,
    free_port,
    task_env,
    wait_until,
)

from reporter.journal import JournalWriter, iter_records
from reporter.status import sparkline

COMMANDS = ["run", "sidecar", "sync", "report", "show", "status", "doctor", "serve"]


def offline_run(tmp_path, count, name="offline-20261125-101500-abc123"):
    run_dir = tmp_path / "runs" / name
    writer = JournalWriter(str(run_dir))
    writer.append("state", 1, None, None)
    for i in range(count):
        writer.append("intermediate", float(i), None, i)
    writer.append("final", float(count), None, None)
    writer.append("state", 2, None, None)
    writer.close()
    return run_dir


def sync_env(**extra):
    return clean_environ(ANYLEARN_SECRET_KEY=SECRET_KEY, **extra)


# --- sync --------------------------------------------------------------------------------------------


def test_sync_of_an_offline_run_interrupted_then_run_again_delivers_each_record_once(serve_process, tmp_path):
    server = serve_process("--latency-ms", "20")
    run_dir = offline_run(tmp_path, 60)
    args = [sys.executable, "-m", "reporter", "sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url]
    first = subprocess.Popen(args, env=sync_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(server.task()["intermediate_metrics"]) >= 10, 30, what="the first sync to deliver some")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert len(server.task()["intermediate_metrics"]) < 60
    second = subprocess.run(args, env=sync_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    task = server.task()
    assert task["intermediate_metrics"] == [float(i) for i in range(60)]
    assert task["final_metric"] == 60.0 and task["states"] == [1, 2]
    assert "0 pending" in second.stdout
    again = subprocess.run(args, env=sync_env(), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing pending" in again.stdout


def test_sync_reads_the_key_from_a_file_and_the_task_from_the_directory_name(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 3, name=TASK_ID)
    key_file = tmp_path / "key"
    key_file.write_text(SECRET_KEY + "\n")
    done = cli("sync", str(run_dir), "--backend-url", server.base_url, "--secret-key-file", str(key_file), env=clean_environ())
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 1.0, 2.0]
    assert f"{run_dir}: 6 records" in done.stderr or "records" in done.stderr  # plain progress lines off a terminal


def test_sync_with_a_wrong_key_leaves_records_pending_and_exits_3(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 3)
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url,
               env=clean_environ(ANYLEARN_SECRET_KEY="wrong-key-1234"))
    assert done.returncode == 3 and "refused the secret key" in done.stderr
    assert "wrong-key-1234" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--task-id", TASK_ID, "--backend-url", "http://127.0.0.1:9/api"], {}, "no secret key"),
        (["--backend-url", "http://127.0.0.1:9/api"], {"ANYLEARN_SECRET_KEY": "k"}, "offline run: say which task"),
        (["--task-id", TASK_ID, "--secret-key-file", "/nonexistent/key"], {}, "cannot read --secret-key-file"),
        (["--task-id", TASK_ID, "--secret-key", "k"], {}, "unrecognized arguments"),  # never a key in argv
    ],
)
def test_sync_usage_errors_exit_2(tmp_path, args, env, message):
    run_dir = offline_run(tmp_path, 1)
    done = cli("sync", str(run_dir), *args, env=clean_environ(**env))
    assert done.returncode == 2 and message in done.stderr


def test_sync_refuses_a_directory_that_is_not_a_run(tmp_path):
    done = cli("sync", str(tmp_path), "--task-id", TASK_ID, env=sync_env())
    assert done.returncode == 2 and "not a run directory" in done.stderr


def test_sync_refuses_another_tasks_run(tmp_path):
    run_dir = offline_run(tmp_path, 1, name="TRAIothertask")
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", "http://127.0.0.1:9/api", env=sync_env())
    assert done.returncode == 2 and "TRAIothertask" in done.stderr


HAND_EDITED = (
    b'{"kind": "intermediate", "value": "0.2x", "name": null, "step": 9}\n'
    b'{"kind": "intermediate", "value": 1e400, "step": 10}\n'
    b'{"kind": "bogus", "value": 1.0}\n'
    b'["not", "a", "record"]\n'
)


def test_sync_delivers_past_invalid_records_and_says_what_it_skipped(serve_process, tmp_path):
    server = serve_process()
    run_dir = offline_run(tmp_path, 2)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(HAND_EDITED)
    JournalWriter(str(run_dir)).append("intermediate", 0.75, "loss", 11)  # not the objective metric
    JournalWriter(str(run_dir)).append("intermediate", 0.5, None, 12)
    done = cli("sync", str(run_dir), "--task-id", TASK_ID, "--backend-url", server.base_url, env=sync_env())
    assert done.returncode == 0, done.stderr
    assert server.task()["intermediate_metrics"] == [0.0, 1.0, 0.5]
    assert (f"{run_dir}: 6 delivered, 5 skipped (1 invalid record (not a JSON object), 1 invalid record (unknown kind), "
            "1 invalid record (value is not a finite number), 1 invalid record (value is not a number), "
            "1 not the objective metric), 0 pending") in done.stdout
    status = cli("status", str(run_dir), env=clean_environ())
    assert "skipped:       5 (" in status.stdout and "value is not a number" in status.stdout, status.stdout

def test_sync_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from reporter.log import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = Progress("/runs/offline-x", 10, terminal)
    bar.update(5)
    bar.finish()
    assert terminal.getvalue() == "\roffline-x [###############...............] 5/10\n"
    plain = io.StringIO()
    lines = Progress("/runs/offline-x", 10, plain)
    lines.update(5)
    lines.update(6)  # a plain line only every 5 s of a long delivery
    lines.update(12, force=True)  # and the last one; records journalled meanwhile do not count
    assert plain.getvalue() == "/runs/offline-x: 10/10 records\n"


# --- show --------------------------------------------------------------------------------------------


def test_show_on_an_empty_reporter_directory(tmp_path):
    done = cli("show", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "none")))
    assert done.returncode == 0 and "no runs under" in done.stdout
    as_json = cli("show", "--json", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "none")))
    assert json.loads(as_json.stdout) == []


def test_show_lists_runs_newest_first_with_metrics_and_a_sparkline(tmp_path):
    older = offline_run(tmp_path, 5, name="offline-20261101-000000-aaaaaa")
    os.utime(older / "metrics.jsonl", (1, 1))
    newer = offline_run(tmp_path, 8, name="TRAInewer")
    done = cli("show", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")))
    assert done.returncode == 0
    header, first, second = done.stdout.splitlines()[:3]
    assert header.split()[:3] == ["run", "state", "start"]
    assert first.startswith("TRAInewer") and second.startswith("offline-20261101")
    assert "success" in first and "▁" in first and "█" in first
    data = json.loads(cli("show", "--json", str(newer), env=clean_environ()).stdout)
    (run,) = data
    assert (run["pending"], run["last_metric"], run["best_metric"], run["final_metric"]) == (11, 7.0, 7.0, 8.0)


def test_show_on_a_broken_run_directory_reports_the_problems_without_failing(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b"{not json\n")
    (run_dir / "status.json").write_text("{broken")
    (run_dir / "cursor").write_text("garbage")
    done = cli("show", str(run_dir), env=clean_environ())
    assert done.returncode == 0, done.stderr
    assert "(!)" in done.stdout and "torn or invalid" in done.stdout and "status.json is not valid JSON" in done.stdout
    missing = cli("show", str(tmp_path / "no-such-run"), env=clean_environ())
    assert missing.returncode == 0 and "not a directory" in missing.stdout


def test_show_status_and_summary_never_fail_on_invalid_records_or_hand_edited_files(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    writer = JournalWriter(str(run_dir))
    writer.append("intermediate", 1e308, None, 3)
    writer.append("intermediate", -1e308, None, 4)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(HAND_EDITED)
        f.write(b'{"kind": "state", "value": "running"}\n')  # the last state line: not an int
    (run_dir / "status.json").write_text(json.dumps({"task_id": 7, "delivered": "abc", "skipped": {"x": "y"},
                                                     "last_delivery_ts": "yesterday", "failing_since": 1e300}))
    (run_dir / "summary.json").write_text(json.dumps({"started": "x", "ended": [], "state": "done", "final_metric": "?"}))
    env = clean_environ()
    table = cli("show", str(run_dir), env=env)
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert "5 invalid journal records skipped" in table.stdout
    assert "▁" in table.stdout and "█" in table.stdout  # +-1e308 drawn
    (run,) = json.loads(cli("show", "--json", str(run_dir), env=env).stdout)
    assert run["metrics"] == [0.0, 1.0, 1e308, -1e308] and run["delivered"] == 0 and run["started"] is not None
    assert run["invalid"] == {"value is not a number": 1, "value is not a finite number": 1, "unknown kind": 1,
                              "not a JSON object": 1, "state value is not an integer": 1}
    metrics = cli("show", "--metrics", str(run_dir), env=env)
    assert metrics.returncode == 0 and len(metrics.stdout.splitlines()) == 2 + 7
    for args in (["status", str(run_dir)], ["status", "--json", str(run_dir)]):
        probe = cli(*args, env=env)
        assert probe.returncode in (0, 1) and "Traceback" not in probe.stderr, probe.stderr
    assert json.loads(cli("status", "--json", str(run_dir), env=env).stdout)["state_name"] == "success"

def test_show_metrics_lists_the_records(tmp_path):
    run_dir = offline_run(tmp_path, 2)
    done = cli("show", str(run_dir), "--metrics", env=clean_environ())
    lines = done.stdout.splitlines()
    assert lines[0] == f"# {run_dir}" and len(lines) == 2 + 5
    assert "intermediate" in lines[3] and lines[3].split()[-1] == "0.0"


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([]) == "" and len(sparkline(list(range(100)), width=20)) == 20
    assert sparkline([3, 3]) == "▅▅"


# --- report ------------------------------------------------------------------------------------------


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


# --- doctor ------------------------------------------------------------------------------------------


def test_doctor_passes_against_serve_with_the_right_key(server, tmp_path):
    done = cli("doctor", env=task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 0, done.stdout
    assert "accepted the secret key" in done.stdout and "ending in" in done.stdout
    assert SECRET_KEY not in done.stdout + done.stderr


def test_doctor_fails_against_serve_with_a_wrong_key(server, tmp_path):
    wrong = "Wrong-Key-abcdef99"
    done = cli("doctor", env=task_env(server.base_url, str(tmp_path / "run"), ANYLEARN_SECRET_KEY=wrong, ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert "refused the secret key" in done.stdout
    assert wrong not in done.stdout + done.stderr and "'99'" in done.stdout  # at most the last two characters


def test_doctor_fails_against_a_closed_port(tmp_path):
    port = free_port()
    done = cli("doctor", env=task_env(f"http://127.0.0.1:{port}/api", str(tmp_path / "run"), ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in done.stdout


def test_doctor_with_nothing_configured_says_what_to_set(tmp_path):
    done = cli("doctor", env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path)))
    assert done.returncode == 1
    assert "ANYLEARN_TASK_ID" in done.stdout and "ANYLEARN_SECRET_KEY" in done.stdout and "ANYLEARN_BACKEND_URL" in done.stdout


def test_doctor_reports_an_unwritable_reporter_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = cli("doctor", env=clean_environ(ANYLEARN_REPORTER_DIR=str(blocker / "runs")))
    assert done.returncode == 1 and "is not writable" in done.stdout


# --- every command -----------------------------------------------------------------------------------


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


# --- the local backend's page ------------------------------------------------------------------------


def test_page_lists_tasks_with_state_and_an_svg_chart(server):
    import requests

    for value in (0.2, 0.5, 0.4, 0.8):
        requests.post(f"{server.base_url}/train_task/intermediate_metric", data={"id": TASK_ID, "metric": value},
                      headers={"Secret-Key": SECRET_KEY}, timeout=10)
    requests.post(f"{server.base_url}/train_task/final_metric", data={"id": TASK_ID, "metric": 0.9},
                  headers={"Secret-Key": SECRET_KEY}, timeout=10)
    page = requests.get(f"http://{server.host}:{server.port}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.text
    assert TASK_ID in html and '<meta http-equiv="refresh"' in html and "<script" not in html
    assert html.count("<svg") == 1 and 'class="series"' in html and 'class="final"' in html and "final 0.9" in html


def read_png(path):
    """Decode an 8-bit RGB/RGBA non-interlaced PNG into rows of (r, g, b) tuples (standard library only)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else upper_left)) & 0xFF
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        previous = line
    return rows


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    return None


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.timeout(180)
def test_page_screenshot_in_headless_chromium_shows_the_chart(server, tmp_path):
    import requests

    for value in (0.1, 0.3, 0.2, 0.6, 0.7):
        requests.post(f"{server.base_url}/train_task/intermediate_metric", data={"id": TASK_ID, "metric": value},
                      headers={"Secret-Key": SECRET_KEY}, timeout=10)
    requests.post(f"{server.base_url}/train_task/final_metric", data={"id": TASK_ID, "metric": 0.75},
                  headers={"Secret-Key": SECRET_KEY}, timeout=10)
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=900,700",
         f"http://{server.host}:{server.port}/"],
        capture_output=True, text=True, timeout=150,
    )
    assert shot.exists(), done.stderr[-2000:]
    pixels = [p for row in read_png(shot) for p in row]
    series_blue = sum(1 for r, g, b in pixels if abs(r - 0x25) < 40 and abs(g - 0x63) < 40 and abs(b - 0xEB) < 40)
    final_red = sum(1 for r, g, b in pixels if abs(r - 0xDC) < 40 and abs(g - 0x26) < 40 and abs(b - 0x26) < 40)
    assert series_blue > 200, "the metric line is not drawn"
    assert final_red > 100, "the final metric is not marked"


def test_status_reads_the_state_from_the_journals_last_state_record(tmp_path):
    run_dir = offline_run(tmp_path, 3, name=TASK_ID)  # states 1 then 2, all pending, nobody delivering
    done = cli("status", str(run_dir), "--json", env=clean_environ())
    info = json.loads(done.stdout)
    assert (info["state_name"], info["journalled"], info["pending"]) == ("success", 6, 6)
    assert done.returncode == 1 and "no deliverer is running" in info["health"]
