"""What a fresh clone promises: the README's two commands, CI running the second, entrypoint.sh, the Dockerfile."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import SECRET_KEY, TASK_ID, clean_environ, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    match = re.match(r"# [^\n]+\n\n```sh\n(.*?)\n```", text, re.S)
    assert match, "the README must open with a sh code block"
    return match.group(1).splitlines()


def test_readme_opens_with_exactly_two_set_up_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert install_and_run.startswith("python3 -m pip install . && anylearn-reporter run")
    assert "[test]" in install_and_test and "pytest" in install_and_test
    assert install_and_test in open(os.path.join(ROOT, ".ci", "run")).read()


def test_readme_first_command_runs_the_example_under_the_wrapper(tmp_path):
    run_part = readme_commands()[0].split(" && ", 1)[1]
    argv = shlex.split(run_part)
    assert argv[0] == "anylearn-reporter"
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    done = subprocess.run([sys.executable, "-m", "reporter", *argv[1:]], cwd=tmp_path, env=clean_environ(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "offline mode" in done.stderr and "ANYLEARN_FINAL_METRIC" in done.stdout
    (run_dir,) = (tmp_path / "anylearn-runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == 2 and summary["final_metric"] > 0.9
    assert (tmp_path / "output" / "model.json").exists()


def test_entrypoint_sh_execs_the_wrapper_with_its_arguments(tmp_path):
    env = clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if shutil.which("anylearn-reporter", path=env["PATH"]) is None:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        shim = bindir / "anylearn-reporter"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m reporter \"$@\"\n")
        shim.chmod(0o755)
        env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    code = "import os, sys; print('parent', os.getppid()); sys.exit(5)"
    proc = subprocess.Popen(["sh", os.path.join(ROOT, "entrypoint.sh"), "--", sys.executable, "-c", code],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    # The wrapper replaced the shell (exec), so the child's parent is the process sh started as.
    assert f"parent {proc.pid}" in out


def test_entrypoint_sh_is_strict_posix_sh():
    text = open(os.path.join(ROOT, "entrypoint.sh")).read()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text and 'exec anylearn-reporter run "$@"' in text
    assert os.access(os.path.join(ROOT, "entrypoint.sh"), os.X_OK)


def test_dockerfile_entrypoint_and_copies_match_the_tree():
    lines = [line.strip() for line in open(os.path.join(ROOT, "Dockerfile")) if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM python:") and "slim" in lines[0]
    assert 'ENTRYPOINT ["/entrypoint.sh"]' in lines
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    assert ["entrypoint.sh"] in copies
    for sources in copies:
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] != "USER root"
    assert any("pip install ." in line for line in lines)


def test_kubernetes_example_is_a_native_sidecar_sharing_the_reporter_volume():
    yaml = __import__("pytest").importorskip("yaml", reason="PyYAML is not installed")
    pod = yaml.safe_load(open(os.path.join(ROOT, "examples", "kubernetes", "pod.yaml")))
    (sidecar,) = pod["spec"]["initContainers"]
    (train,) = pod["spec"]["containers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"] == ["anylearn-reporter", "sidecar"]
    assert sidecar["livenessProbe"]["exec"]["command"][:2] == ["anylearn-reporter", "status"]

    def env(container):
        return {e["name"]: e for e in container["env"]}

    assert env(sidecar)["ANYLEARN_REPORTER_DIR"]["value"] == env(train)["ANYLEARN_REPORTER_DIR"]["value"]
    assert env(sidecar)["task_id"]["value"] == env(train)["task_id"]["value"]
    assert "secret_key" in env(sidecar) and "secret_key" not in env(train)  # only the sidecar holds the key
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts == {m["name"]: m["mountPath"] for m in train["volumeMounts"]}
    assert mounts["reporter"] == env(train)["ANYLEARN_REPORTER_DIR"]["value"]


def readme_table(heading_row):
    """The rows of the README's table whose header row is ``heading_row``, as lists of cells."""
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    start = lines.index(heading_row) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_readme_names_every_environment_variable_the_agent_reads():
    from reporter.config import known_variables

    text = open(os.path.join(ROOT, "README.md")).read()
    missing = [name for name in known_variables() if f"`{name}`" not in text]
    assert not missing, f"README.md does not name {missing}"


def test_readme_commands_table_matches_the_parser_and_each_help():
    from reporter.cli import build_parser

    rows = readme_table("| command | what it does |")
    listed = [re.match(r"`anylearn-reporter (\w+)", row[0]).group(1) for row in rows]
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert sorted(listed) == sorted(sub.choices)
    for row, command in zip(rows, listed):
        helped = cli(command, "--help", env=clean_environ())
        assert helped.returncode == 0
        for option in re.findall(r"(--[a-z][a-z-]*)", row[0]):
            assert option in helped.stdout, f"README says `{command} {option}`; its --help does not"


def test_readme_run_directory_table_names_every_file_a_run_makes(server, tmp_path):
    names = [name for row in readme_table("| file | what |") for name in re.findall(r"`([^`]+)`", row[0])]
    patterns = [re.compile(re.sub(r"<\w+>", r"\\d+", re.escape(name)) + "$") for name in names]  # <pid>, <n>
    source = "".join(open(os.path.join(dirpath, f)).read() for dirpath, _, files in os.walk(os.path.join(ROOT, "reporter"))
                     for f in files if f.endswith(".py"))
    for name in names:  # and the table names nothing the code does not make
        assert f'"{name.split("<")[0]}' in source, name
    env = clean_environ(ANYLEARN_BACKEND_URL=server.base_url, ANYLEARN_TASK_ID=TASK_ID,
                        ANYLEARN_SECRET_KEY=SECRET_KEY, ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    code = "import reporter; reporter.report_metric(1.0); print('ANYLEARN_METRIC 2')"
    done = cli("run", "--", sys.executable, "-c", code, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    made = sorted(os.listdir(run_dir))
    assert {"metrics.jsonl", "summary.json", "child.pid", "status.json"} <= set(made)
    unlisted = [f for f in made if not any(p.match(f) for p in patterns)]
    assert not unlisted, f"README's run-directory table does not name {unlisted}"


def test_kubernetes_example_pulls_a_local_image_probes_after_start_and_leaves_time_for_both_drains():
    yaml = __import__("pytest").importorskip("yaml", reason="PyYAML is not installed")
    pod = yaml.safe_load(open(os.path.join(ROOT, "examples", "kubernetes", "pod.yaml")))
    (sidecar,) = pod["spec"]["initContainers"]
    (train,) = pod["spec"]["containers"]
    for container in (sidecar, train):  # ":latest" would mean imagePullPolicy Always: a local image fails to pull
        assert not container["image"].endswith(":latest") and container["imagePullPolicy"] == "IfNotPresent"
    assert sidecar["startupProbe"]["exec"]["command"][:2] == ["anylearn-reporter", "status"]
    assert sidecar["startupProbe"]["periodSeconds"] * sidecar["startupProbe"]["failureThreshold"] >= 600
    args = sidecar["args"]
    sidecar_drain = float(args[args.index("--drain-timeout") + 1])
    wrapper_grace_and_drain = 30 + 60  # the wrapper's defaults: ANYLEARN_GRACE_PERIOD, ANYLEARN_DRAIN_TIMEOUT
    assert pod["spec"]["terminationGracePeriodSeconds"] > wrapper_grace_and_drain + sidecar_drain
    assert pod["spec"]["restartPolicy"] == "Never" and sidecar["restartPolicy"] == "Always"


def test_dockerfile_leaves_no_build_tree_and_its_example_keeps_the_run_directory():
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    assert re.search(r"pip install \. && rm -rf /opt/anylearn-reporter(\s|$)", text)  # no egg-info, no build/
    (example,) = [line for line in text.splitlines() if line.startswith("#") and "docker run" in line]
    assert "--rm" not in example or "-v " in example  # the journal its sync hint names must outlive the container
    assert "/workspace/anylearn-runs" in example
