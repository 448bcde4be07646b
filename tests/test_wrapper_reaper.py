"""The command's process tree: orphans reaped (as PID 1 and as subreaper), leftovers stopped and counted, and the
wrapper unreadable to the command (--isolate-secret)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import TASK_ID, clean_environ, cli, task_env, wait_until

from reporter.wrapper.reaper import reap_orphans


def process_state(pid):
    """The state letter of ``pid`` (``Z`` for a zombie), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()[0]


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return int(text[text.rfind(")") + 2:].split()[1])


def offline_env(tmp_path):
    return clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))


def the_summary(tmp_path):
    (run_dir,) = (tmp_path / "runs").iterdir()
    return json.loads((run_dir / "summary.json").read_text())


def test_an_orphaned_grandchild_comes_to_the_wrapper_and_leaves_no_zombie(tmp_path):
    go, done_file = tmp_path / "go", tmp_path / "done"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        middle = os.fork()
        if middle == 0:
            grandchild = os.fork()
            if grandchild == 0:
                while not os.path.exists({str(go)!r}):
                    time.sleep(0.01)
                os._exit(0)
            print(grandchild, flush=True)
            os._exit(0)  # the grandchild is an orphan now
        os.waitpid(middle, 0)
        while not os.path.exists({str(done_file)!r}):
            time.sleep(0.01)
        sys.exit(4)
    """))
    wrapper = subprocess.Popen([sys.executable, "-m", "reporter", "run", "--", sys.executable, str(script)],
                               env=offline_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        grandchild = int(wrapper.stdout.readline())
        wait_until(lambda: parent_of(grandchild) == wrapper.pid, timeout_s=10, what="the orphan re-parented to the wrapper")
        go.touch()
        wait_until(lambda: process_state(grandchild) is None, timeout_s=10, what="the orphan reaped, not left a zombie")
        done_file.touch()
        wrapper.communicate(timeout=60)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert wrapper.returncode == 4  # reaping orphans did not steal the command's own exit status


def _unshare_works():
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_as_pid_1_every_orphan_is_reaped_and_the_commands_status_kept(tmp_path):
    if not _unshare_works():
        pytest.skip("cannot make a PID namespace here (unshare --pid --fork --mount-proc needs root)")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        orphans = []
        for _ in range(3):
            middle = os.fork()
            if middle == 0:
                if os.fork() == 0:
                    os._exit(0)  # the grandchild exits at once, an orphan of PID 1
                os._exit(0)
            os.waitpid(middle, 0)
        print("PID OF THE WRAPPER", os.getppid(), flush=True)
        deadline = time.monotonic() + 15
        def zombies():
            found = []
            for name in os.listdir("/proc"):
                try:
                    with open(f"/proc/{name}/stat") as f:
                        text = f.read()
                except OSError:
                    continue
                if text[text.rfind(")") + 2:].split()[0] == "Z":
                    found.append(int(name))
            return found
        while zombies() and time.monotonic() < deadline:
            time.sleep(0.02)
        print("ZOMBIES", zombies(), flush=True)
        sys.exit(3)
    """))
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "reporter", "run", "--",
                           sys.executable, str(script)], env=offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "PID OF THE WRAPPER 1" in done.stdout, done.stdout + done.stderr
    assert "ZOMBIES []" in done.stdout, done.stdout
    assert done.returncode == 3, done.stderr  # the command's status, not an orphan's
    assert the_summary(tmp_path)["process_tree"]["orphans_reaped"] >= 3


def test_a_stray_process_left_in_the_group_is_stopped_and_counted(tmp_path):
    pid_file = tmp_path / "stray.pid"
    code = ("import subprocess, sys\n"
            "stray = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL)\n"
            f"open({str(pid_file)!r}, 'w').write(str(stray.pid))\n")
    try:
        done = cli("run", "--", sys.executable, "-c", code, env=offline_env(tmp_path), cwd=tmp_path, timeout_s=60)
        stray = int(pid_file.read_text())
        assert done.returncode == 0, done.stderr
        assert process_state(stray) is None  # stopped and reaped before the wrapper ended
        assert "stopped 1 process(es) the command left running (0 needed SIGKILL" in done.stderr
        tree = the_summary(tmp_path)["process_tree"]
        assert tree["leftovers_stopped"] == 1 and tree["leftovers_killed"] == 0
    finally:
        if pid_file.exists() and process_state(int(pid_file.read_text())) not in (None, "Z"):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_stray_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    pid_file = tmp_path / "stray.pid"
    code = ("import subprocess, sys\n"
            "stray = subprocess.Popen(['sh', '-c', 'trap \"\" TERM; echo ready; exec sleep 300'], stdout=subprocess.PIPE)\n"
            "stray.stdout.readline()\n"
            f"open({str(pid_file)!r}, 'w').write(str(stray.pid))\n")
    try:
        done = cli("run", "--grace-period", "0.5", "--", sys.executable, "-c", code, env=offline_env(tmp_path), cwd=tmp_path, timeout_s=60)
        stray = int(pid_file.read_text())
        assert done.returncode == 0, done.stderr
        assert process_state(stray) is None
        tree = the_summary(tmp_path)["process_tree"]
        assert tree["leftovers_stopped"] == 1 and tree["leftovers_killed"] == 1
    finally:
        if pid_file.exists() and process_state(int(pid_file.read_text())) not in (None, "Z"):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("how", ["start_new_session", "setsid"])
def test_a_stray_in_its_own_session_is_stopped_with_everything_it_started(tmp_path, how):
    pid_file = tmp_path / "sleep.pid"
    inner = f"sleep 311 & echo $! > {pid_file}; wait"
    if how == "setsid":  # the shell in the background of another shell, in a new session: not our child
        outer = 'setsid sh -c "' + inner.replace("$", "\\$") + '" &'
        code = f"import subprocess\nsubprocess.Popen(['sh', '-c', {outer!r}])\n"
    else:
        code = f"import subprocess\nsubprocess.Popen(['sh', '-c', {inner!r}], start_new_session=True)\n"
    code += ("import os, time\ndeadline = time.monotonic() + 20\n"
             f"while time.monotonic() < deadline and not (os.path.exists({str(pid_file)!r}) and open({str(pid_file)!r}).read().strip()):\n"
             "    time.sleep(0.01)\n")
    try:
        done = cli("run", "--", sys.executable, "-c", code, env=offline_env(tmp_path), cwd=tmp_path, timeout_s=60)
        sleeper = int(pid_file.read_text())
        assert done.returncode == 0, done.stderr
        assert process_state(sleeper) is None, done.stderr  # the shell's child, in the shell's new group, stopped too
        tree = the_summary(tmp_path)["process_tree"]
        assert tree["leftovers_stopped"] >= 2 and tree["leftovers_killed"] == 0, tree  # the shell and its sleep
    finally:
        if pid_file.exists() and pid_file.read_text().strip() and process_state(int(pid_file.read_text())) not in (None, "Z"):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_reaping_leaves_the_kept_childs_status_for_its_owner():
    kept = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    wait_until(lambda: process_state(kept.pid) == "Z", timeout_s=20, what="the kept child finished")
    assert reap_orphans(kept.pid) == 0
    assert kept.wait(10) == 7  # its status was not stolen
    other = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = other.pid
    wait_until(lambda: process_state(pid) == "Z", timeout_s=20, what="the other child finished")
    assert reap_orphans(None) >= 1 and process_state(pid) is None
    other.returncode = 0  # reaped by us: tell Popen so it does not wait for it


# --- --isolate-secret: the wrapper is not dumpable -------------------------------------------------

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
        for name in ("certifi", "tenacity", "psutil"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            shutil.copytree(os.path.dirname(module.__file__), os.path.join(site, name), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        candidates.append((system, os.pathsep.join(p for p in (here, site) if p)))
    for exe, path in candidates:
        try:
            probe = subprocess.run([exe, "-c", "import reporter.deliver, tenacity"], env={**clean_environ(), "PYTHONPATH": path},
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

    from reporter.emulator.server import make_server

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
