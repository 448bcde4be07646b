"""A local task's agent (reporter/logship.py): heartbeat and log shipping in the SDK agent's shape, against
``serve`` and real wrapper processes; the shipped log is read back with the released SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest

from conftest import SECRET_KEY, TASK_ID, clean_environ, free_port, wait_until

from reporter.config import load_config
from reporter.emulator.server import Faults, make_server
from reporter.logship import SLICE_BYTES, LocalAgent, end_line, utf8_boundary

TOKEN = "usr-T0ken-never-logged-91c2e7"

CHILD = """
import os, sys, time
def wait(name):
    while not os.path.exists(name):
        time.sleep(0.02)
def phase(tag, count):
    for i in range(count):
        print(f"out {tag} {i:04d} héllo 世界 ✓")
        print(f"err {tag} {i:04d} ünïcödé 🙂", file=sys.stderr)
    sys.stdout.flush(); sys.stderr.flush()
phase("a", 150)
open("phase1", "w").close(); wait("go")
phase("b", 150)
open("phase2", "w").close(); wait("go2")
phase("c", 150)
sys.exit(3)
"""


def expected(stream: str, tags: str, count: int = 150) -> list:
    if stream == "out":
        return [f"out {t} {i:04d} héllo 世界 ✓" for t in tags for i in range(count)]
    return [f"err {t} {i:04d} ünïcödé 🙂" for t in tags for i in range(count)]


def local_env(base_url: str, run_dir, **extra: str) -> dict:
    return clean_environ(ANYLEARN_BACKEND_URL=base_url, ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY=SECRET_KEY,
                         ANYLEARN_REPORTER_RUN_DIR=str(run_dir), **extra)


def wrapper(env: dict, code: str, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reporter", "run", "--", sys.executable, "-c", code], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def collect(stream, into: bytearray) -> threading.Thread:
    """Read ``stream`` into ``into`` from a thread, so a test can wait on what a process says."""
    def read() -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            into.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def read_back(root: str) -> list:
    """Every log line of the task as the released SDK reads it (``get_full_log``, checked against its
    ``get_last_log``); without the SDK, through the same endpoint in the same way."""
    try:
        from anylearn.interfaces import train_task
    except ImportError:
        return read_back_without_sdk(root)
    from anylearn.config import AnylearnConfig

    AnylearnConfig.cluster_address, AnylearnConfig.token, AnylearnConfig.refresh_token = root, TOKEN, None
    task = train_task.TrainTask(id=TASK_ID)
    lines = [line.split("] ", 1)[1] for line in task.get_full_log(debug=True)]
    last = [line.split("] ", 1)[1] for line in task.get_last_log(limit=3, debug=True)]
    assert last == lines[-3:]  # newest first from the backend, put back in order by the SDK
    return lines


def read_back_without_sdk(root: str) -> list:
    lines, offset_index = [], -1
    while True:
        url = f"{root}/api/train_task/logs?id={TASK_ID}&limit=100&direction=back&index=0&offset_index={offset_index}"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10) as answer:
            rows = json.loads(answer.read())
        if not rows:
            return lines
        lines += [r["text"] for r in rows if r["text"].strip()]
        offset_index = rows[-1]["offset_index"]


def held_offsets(root: str) -> dict:
    request = urllib.request.Request(f"{root}/api/train_task/local_task_catch?id={TASK_ID}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def assert_no_secret_in(run_dir, *texts: bytes) -> None:
    for base, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(base, name), "rb") as f:
                texts += (f.read(),)
    for text in texts:
        assert TOKEN.encode() not in text and SECRET_KEY.encode() not in text


@pytest.mark.parametrize("data, cut", [
    (b"", 0), (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0), (b"a" + "世".encode()[:2], 1),
    (b"ab" + "🙂".encode()[:3], 2), ("🙂".encode(), 4), (b"\xff\xfe", 2), (b"\x80\x80\x80\x80\x80", 5),
])
def test_utf8_boundary_never_cuts_inside_a_character(data, cut):
    assert utf8_boundary(data) == cut


def test_a_long_line_goes_in_bounded_slices_of_whole_characters(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = "é" * 70000 + "世" * 30000 + "\n"  # 230 000 bytes, no newline before the end
    (run_dir / "stdout.log").write_text(text, encoding="utf-8")
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        config, _ = load_config(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir)).start()
        agent.finish(0)
        assert agent.close(30)
        rows = [r["text"] for r in reversed(server.backend.logs(TASK_ID, 100, "init", -1))]
        offsets = server.backend.catch(TASK_ID)
    finally:
        server.stop()
    assert rows[-1] == end_line(0) and "".join(rows[:-1]) == text[:-1]
    assert len(rows) - 1 >= 230000 // SLICE_BYTES and all(len(r.encode()) <= SLICE_BYTES for r in rows)
    assert "\ufffd" not in "".join(rows)
    assert offsets == {"output_cache_pointer": len(text.encode()), "error_cache_pointer": 0}


def test_output_left_at_the_end_goes_in_whole_lines(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [f"line {i:05d} " + "é世" * 20 for i in range(3000)]  # 200 KB: several slices after the command ended
    (run_dir / "stderr.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        config, _ = load_config(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir)).start()
        agent.finish(1)
        assert agent.close(30)
        rows = [r["text"] for r in server.backend.logs(TASK_ID, 10000, "back", -1)]
    finally:
        server.stop()
    assert rows == lines + ["Task failed with code 1"]


def test_outage_in_the_middle_every_byte_arrives_once_in_order_read_back_with_the_sdk(serve_process, tmp_path):
    pytest.importorskip("anylearn.interfaces.train_task", reason="the released AnyLearn SDK (anylearn==0.20.7) is not installed")
    port, db = free_port(), str(tmp_path / "backend.db")
    server = serve_process("--db", db, port=port, env={"ANYLEARN_AUTH_TOKEN": TOKEN})
    run_dir, work = tmp_path / "run", tmp_path / "work"
    work.mkdir()
    proc = wrapper(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN), CHILD, work)
    out, err = bytearray(), bytearray()
    readers = [collect(proc.stdout, out), collect(proc.stderr, err)]
    try:
        wait_until(lambda: (work / "phase1").exists(), 60, what="the first output")
        argvs = [open(f"/proc/{pid}/cmdline", "rb").read() for pid in (proc.pid, int((run_dir / "child.pid").read_text()))]
        sizes = lambda: {"output_cache_pointer": os.path.getsize(run_dir / "stdout.log"),
                         "error_cache_pointer": os.path.getsize(run_dir / "stderr.log")}
        wait_until(lambda: held_offsets(server.root) == sizes(), 60, what="the first output shipped")
        server.stop()  # the backend goes down while the command writes more
        (work / "go").touch()
        wait_until(lambda: (work / "phase2").exists(), 60, what="the output written during the outage")
        wait_until(lambda: b"shipping the command's output failed" in err, 60, what="the wrapper to meet the outage")
        server = serve_process("--db", db, port=port, env={"ANYLEARN_AUTH_TOKEN": TOKEN})
        (work / "go2").touch()
        proc.wait(120)
        for reader in readers:
            reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err.decode(errors="replace")
    lines = read_back(server.root)
    assert [line for line in lines if line.startswith("out ")] == expected("out", "abc")
    assert [line for line in lines if line.startswith("err ")] == expected("err", "abc")
    assert lines[-1] == "Task failed with code 3" and len(lines) == 2 * 450 + 1
    assert held_offsets(server.root) == sizes()
    assert server.task()["heartbeats"] >= 1
    assert_no_secret_in(run_dir, bytes(out), bytes(err), *argvs)
    assert err.count(b"shipping the command's output failed") == 1  # said once per failing streak


def test_a_resumed_task_goes_on_from_the_offsets_the_backend_holds_through_refusals(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stdout.log").write_bytes("old out 1 ä\nold out 2 ö\n".encode())
    (run_dir / "stderr.log").write_bytes("old err 1 ü\n".encode())
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN, faults=Faults(fail_first=6)).start()
    try:
        server.backend.add_logs(TASK_ID, "old out 1 ä\nold out 2 ö\n")  # shipped by the run before
        server.backend.set_catch(TASK_ID, "output_cache_pointer", os.path.getsize(run_dir / "stdout.log"))
        code = "import sys\nprint('new out é')\nprint('new err 🙂', file=sys.stderr)"
        proc = wrapper(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN), code, tmp_path)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode(errors="replace")
        lines = read_back(server.base_url[: -len("/api")])
        offsets = server.backend.catch(TASK_ID)
        assert server.backend.stats()["injected_failures"] == 6
    finally:
        server.stop()
    assert [line for line in lines if "out" in line] == ["old out 1 ä", "old out 2 ö", "new out é"]
    assert [line for line in lines if "err" in line] == ["old err 1 ü", "new err 🙂"]
    assert lines[-1] == "Task finished with code 0"
    assert offsets == {"output_cache_pointer": os.path.getsize(run_dir / "stdout.log"),
                       "error_cache_pointer": os.path.getsize(run_dir / "stderr.log")}
    assert_no_secret_in(run_dir, out, err)


def test_without_a_token_nothing_is_shipped_and_nothing_said(tmp_path):
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        proc = wrapper(local_env(server.base_url, tmp_path / "run"), "print('hello é')", tmp_path)
        out, err = proc.communicate(timeout=60)
        (task,) = server.backend.tasks()
        held = server.backend.catch(TASK_ID)
    finally:
        server.stop()
    assert proc.returncode == 0 and out == "hello é\n".encode()
    assert task["log_tail"] == [] and task["heartbeats"] == 0 and task["states"] == [1, 2]
    assert held == {"output_cache_pointer": 0, "error_cache_pointer": 0}
    text = err.decode().lower()
    assert not any(word in text for word in ("ship", "heartbeat", "token", "log"))


def test_a_backend_without_local_task_endpoints_turns_shipping_off_once(tmp_path):
    run_dir = tmp_path / "run"
    closed, agent, requests = _ship_one_line_against(run_dir, 404, b'{"msg": "no"}', close_s=10)
    assert not closed and not agent.shipping
    methods = [(m, p.split("?")[0]) for m, p, _, _ in requests]
    assert ("GET", "/api/train_task/local_task_catch") in methods and ("PATCH", "/api/train_task/local_logs") not in methods
    assert methods.count(("PATCH", "/api/train_task/heartbeat")) == 1  # said once, then off
    from reporter.status import heartbeat_state

    assert heartbeat_state(str(run_dir))["heartbeats"] == "off"  # `status` shows it
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h, _ in requests)


def test_the_sdks_stream_log_follows_a_running_local_task_to_its_end_line(tmp_path):
    train_task = pytest.importorskip("anylearn.interfaces.train_task", reason="the released AnyLearn SDK (anylearn==0.20.7) is not installed")
    from anylearn.config import AnylearnConfig

    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    AnylearnConfig.cluster_address, AnylearnConfig.token, AnylearnConfig.refresh_token = server.base_url[: -len("/api")], TOKEN, None
    code = ("import os, time\nprint('first é', flush=True)\nwhile not os.path.exists('go'):\n    time.sleep(0.02)\n"
            "print('second 世界')")
    streamed = []
    try:
        proc = wrapper(local_env(server.base_url, tmp_path / "run", ANYLEARN_AUTH_TOKEN=TOKEN), code, tmp_path)
        wait_until(lambda: server.backend.logs(TASK_ID, 1, "init", -1), 30, what="the first line shipped")
        follower = threading.Thread(target=lambda: streamed.extend(train_task.TrainTask(id=TASK_ID, state=1).stream_log(polling=0.2)))
        follower.start()
        wait_until(lambda: streamed, 30, what="stream_log's first line")
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
        follower.join(30)
    finally:
        server.stop()
    assert proc.returncode == 0, err.decode(errors="replace")
    assert not follower.is_alive()  # it saw the task finish
    assert [line.split("] ", 1)[1] for line in streamed] == ["first é", "second 世界", "Task finished with code 0"]


def test_a_refused_token_turns_shipping_off_once_and_the_run_ends_with_its_final_state(tmp_path):
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        env = local_env(server.base_url, tmp_path / "run", ANYLEARN_AUTH_TOKEN="stale-token-0042")
        proc = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--drain-timeout", "inf", "--", sys.executable,
                                 "-c", "print('done')"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)  # ends by itself: a refusal is not retried to the deadline
        (task,) = server.backend.tasks()
    finally:
        server.stop()
    text = err.decode()
    assert proc.returncode == 0 and out == b"done\n", text
    assert text.count("the backend refuses the token") == 1 and "will try again" not in text
    assert task["states"] == [1, 2] and task["log_tail"] == []
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["state"] == 2
    assert b"stale-token-0042" not in err


def test_a_stop_signal_after_the_command_ended_stops_the_waiting_with_the_final_state_written(tmp_path):
    import signal

    from httpfakes import DribblingServer

    from reporter.reader import iter_records

    hanging = DribblingServer(interval_s=1.0).start()  # never a whole answer: logs, offsets and records hang
    run_dir = tmp_path / "run"
    try:
        env = local_env(hanging.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN)
        proc = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--drain-timeout", "inf", "--", sys.executable,
                                 "-c", "print('done')"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = bytearray(), bytearray()
        readers = [collect(proc.stdout, out), collect(proc.stderr, err)]
        try:
            states = lambda: [r.value for _, r in iter_records(str(run_dir)) if r.kind == "state"]
            wait_until(lambda: states() == [1, 2], 60, what="the final state journalled while the backend hangs")
            wait_until(lambda: b"waiting without a time limit (--drain-timeout" in err, 60, what="the drain")
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)  # not for ever: the signal stopped the waiting
            for reader in readers:
                reader.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        hanging.stop()
    text = err.decode()
    assert "1e+06" not in text
    assert proc.returncode == 0, text
    assert "interrupted (SIGTERM): stopped waiting for delivery" in text
    assert json.loads((run_dir / "summary.json").read_text())["state"] == 2
    assert_no_secret_in(run_dir, bytes(out), bytes(err))


def test_close_cuts_off_a_request_that_hangs(tmp_path, monkeypatch):
    import reporter.logship as logship
    from httpfakes import DribblingServer

    monkeypatch.setattr(logship, "REQUEST_TIMEOUT_S", 600.0)  # only cutting the request off ends it soon
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stdout.log").write_text("x\n")
    hanging = DribblingServer(interval_s=1.0).start()
    try:
        config, _ = load_config(local_env(hanging.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN, ANYLEARN_REQUEST_TIMEOUT="600"))
        agent = LocalAgent(config, str(run_dir)).start()
        wait_until(lambda: hanging.connections >= 2, 30, what="the agent's requests in flight")
        agent.finish(0)
        closing = threading.Thread(target=agent.close, args=(0.2,), daemon=True)
        closing.start()
        closing.join(60)
        assert not closing.is_alive()
        assert not any(t.is_alive() for t in agent._threads)
    finally:
        hanging.stop()


def test_a_backend_offset_beyond_this_runs_fresh_file_ships_it_from_its_start(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        server.backend.set_catch(TASK_ID, "output_cache_pointer", 12)  # an earlier run's, in another run directory
        config, _ = load_config(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir))  # the wrapper makes it before the command writes
        (run_dir / "stdout.log").write_text("first line of this run\nsecond\n")
        agent.start()
        agent.finish(0)
        assert agent.close(30)
        rows = [r["text"] for r in server.backend.logs(TASK_ID, 100, "back", -1)]
    finally:
        server.stop()
    assert rows == ["first line of this run", "second", "Task finished with code 0"]
    assert "the backend holds 12 bytes of stdout.log but this run's file had 0" in capsys.readouterr().err


def test_a_log_truncated_mid_run_is_shipped_again_from_its_start_and_said(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "stdout.log"
    log.write_text("before truncation\n")
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        config, _ = load_config(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir)).start()
        wait_until(lambda: server.backend.catch(TASK_ID)["output_cache_pointer"] == 18, 30, what="the first line shipped")
        log.write_text("after\n")  # truncate -s 0, then the command writes on
        agent.finish(0)
        assert agent.close(30)
        rows = [r["text"] for r in server.backend.logs(TASK_ID, 100, "back", -1)]
    finally:
        server.stop()
    assert rows == ["before truncation", "after", "Task finished with code 0"]
    assert "stdout.log was truncated (6 bytes, 18 shipped): shipping it from its start" in capsys.readouterr().err


def test_the_key_and_the_token_in_the_commands_output_are_masked_in_what_is_shipped(tmp_path):
    from urllib.parse import quote

    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    code = ("import json, os, sys\nfrom urllib.parse import quote\n"
            "for s in (os.environ['ANYLEARN_SECRET_KEY'], sys.argv[1]):\n"
            "    print('raw', s, 'quoted', quote(s, safe=''), 'json', json.dumps({'k': s}))\n"
            "    print('err', s, file=sys.stderr)\n")
    try:
        env = local_env(server.base_url, tmp_path / "run", ANYLEARN_AUTH_TOKEN=TOKEN)
        proc = subprocess.run([sys.executable, "-m", "reporter", "run", "--", sys.executable, "-c", code, TOKEN + "/é"],
                              env=env, cwd=tmp_path, capture_output=True, timeout=60)
        rows = [r["text"] for r in server.backend.logs(TASK_ID, 100, "back", -1)]
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    shipped = "\n".join(rows)
    assert len(rows) == 5 and shipped.count("***") >= 8, shipped
    for secret in (SECRET_KEY, TOKEN, quote(TOKEN + "/é", safe="")):
        assert secret not in shipped


def test_offsets_that_are_not_a_json_object_ship_from_the_start_said_plainly(tmp_path, capsys):
    run_dir = tmp_path / "run"
    closed, _, requests = _ship_one_line_against(run_dir, 200, b"[]", close_s=30)
    assert closed
    err = capsys.readouterr().err
    assert "the backend's log offsets are not a JSON object (HTTP 200); shipping the output from its start" in err
    assert "has no attribute" not in err
    logs = [body for m, p, _, body in requests if m == "PATCH" and p.endswith("local_logs")]
    assert logs[0] == b"id=" + TASK_ID.encode() + b"&logs=x%0A"


def test_output_shipped_without_its_end_line_is_said_so_not_as_zero_bytes_left(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stdout.log").write_text("all of it\n")
    server = make_server({TASK_ID: SECRET_KEY}, token=TOKEN).start()
    try:
        config, _ = load_config(local_env(server.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir)).start()
        wait_until(lambda: server.backend.catch(TASK_ID)["output_cache_pointer"] == 10, 30, what="the output shipped")
        assert not agent.close(0)  # the command's end never came: no end line
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "was shipped but not its end line" in err and "0 bytes left" not in err


def _ship_one_line_against(run_dir, status: int, body: bytes, close_s: float):
    """A local agent shipping one line of ``run_dir``'s stdout.log to a fake backend answering every request
    with ``status`` and ``body``: what its ``close`` said (True: everything shipped), the agent, and the
    requests the backend saw."""
    from httpfakes import FakeServer

    run_dir.mkdir()
    (run_dir / "stdout.log").write_text("x\n")
    fake = FakeServer(status, {}, body).start()
    try:
        config, _ = load_config(local_env(fake.base_url, run_dir, ANYLEARN_AUTH_TOKEN=TOKEN))
        agent = LocalAgent(config, str(run_dir)).start()
        agent.finish(0)
        return agent.close(close_s), agent, fake.requests
    finally:
        fake.stop()
