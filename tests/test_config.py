"""Configuration: where task, key and backend come from, offline mode, validation, redaction."""

import os
import pickle
import re
import subprocess
import sys

import pytest
from conftest import TASK_ID, clean_environ, free_port

from reporter.config import (
    ConfigError,
    Secret,
    check_secret_key,
    load_config,
    load_config_strict,
    secret_key_problem,
)

KEY = "the-secret-value-123"


def test_anylearn_names_win_over_platform_lower_case_names():
    config, problems = load_config({"ANYLEARN_TASK_ID": "TRAIa", "task_id": "TRAIb", "ANYLEARN_SECRET_KEY": KEY, "secret_key": "x"})
    assert (config.task_id, config.secret_key.reveal(), problems) == ("TRAIa", KEY, [])


def test_platform_lower_case_names_are_read_and_give_anylearn_default_backend():
    config, _ = load_config({"task_id": "TRAIb", "secret_key": KEY})
    assert config.task_id == "TRAIb"
    assert config.backend_url == "http://anylearn-backend.STANDALONE/api"
    assert not config.offline


def test_backend_namespace_builds_the_backend_url():
    config, _ = load_config({"BACKEND_NAMESPACE": "prod", "task_id": "TRAIb"})
    assert config.backend_url == "http://anylearn-backend.prod/api"
    assert config.backend_url_source == "BACKEND_NAMESPACE"


def test_explicit_backend_url_wins_and_loses_its_trailing_slash():
    config, _ = load_config({"ANYLEARN_BACKEND_URL": "http://127.0.0.1:9/api/", "BACKEND_NAMESPACE": "prod", "task_id": "T"})
    assert config.backend_url == "http://127.0.0.1:9/api"


def test_nothing_configured_is_offline_with_an_offline_run_directory(tmp_path):
    config, problems = load_config({"ANYLEARN_REPORTER_DIR": str(tmp_path)})
    assert config.offline and problems == []
    assert os.path.dirname(config.run_dir) == str(tmp_path)
    assert re.fullmatch(r"offline-\d{8}-\d{6}-[0-9a-f]{6}", os.path.basename(config.run_dir))


def test_run_directory_defaults_to_the_task_id_under_the_reporter_dir(tmp_path):
    config, _ = load_config({"ANYLEARN_REPORTER_DIR": str(tmp_path), "task_id": "TRAIz", "secret_key": KEY})
    assert config.run_dir == str(tmp_path / "TRAIz")


def test_explicit_run_directory_must_be_absolute():
    config, problems = load_config({"ANYLEARN_REPORTER_RUN_DIR": "relative/dir", "task_id": "TRAIz"})
    assert any("ANYLEARN_REPORTER_RUN_DIR" in p and "absolute" in p for p in problems)
    assert os.path.isabs(config.run_dir)


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"ANYLEARN_REPORT_RANKS": "some"}, "ANYLEARN_REPORT_RANKS"),
        ({"ANYLEARN_FLUSH_TIMEOUT": "soon"}, "ANYLEARN_FLUSH_TIMEOUT"),
        ({"ANYLEARN_FLUSH_TIMEOUT": "-1"}, "ANYLEARN_FLUSH_TIMEOUT"),
        ({"ANYLEARN_BACKEND_URL": "127.0.0.1:8080"}, "ANYLEARN_BACKEND_URL"),
        ({"RANK": "zero"}, "RANK"),
        ({"ANYLEARN_REQUEST_TIMEOUT": "0"}, "ANYLEARN_REQUEST_TIMEOUT"),
    ],
)
def test_invalid_values_fall_back_to_defaults_and_are_named(env, variable):
    config, problems = load_config(env)
    assert len(problems) == 1 and variable in problems[0]
    with pytest.raises(ConfigError, match=variable):
        load_config_strict(env)


def test_report_ranks_all_and_rank_and_objective_are_read():
    config, _ = load_config({"ANYLEARN_REPORT_RANKS": "ALL", "RANK": "3", "ANYLEARN_OBJECTIVE_METRIC": "acc"})
    assert (config.report_all_ranks, config.rank, config.objective_metric) == (True, 3, "acc")


def test_secret_never_shows_in_repr_str_or_pickle():
    config, _ = load_config({"task_id": "TRAIb", "secret_key": KEY})
    for text in (repr(config), str(config), repr(config.secret_key), str(config.secret_key), f"{config.secret_key}"):
        assert KEY not in text
    with pytest.raises(TypeError):
        pickle.dumps(config.secret_key)


def test_secret_hint_shows_length_and_at_most_two_characters():
    assert Secret(KEY).hint() == f"{len(KEY)} characters, ending in '23'"
    assert "ab" not in Secret("abc").hint()


@pytest.mark.parametrize(
    "text, kwargs, expected",
    [(None, {}, 7), ("", {}, 7), ("2.5", {}, 2.5), ("3", {"integer": True}, 3), ("0", {}, 0.0)],
)
def test_parse_number_reads_or_defaults(text, kwargs, expected):
    from reporter.checks import parse_number

    assert parse_number(text, "--x", 7, **kwargs) == expected


@pytest.mark.parametrize(
    "text, kwargs, message",
    [("soon", {}, "a number"), ("1.5", {"integer": True}, "a whole number"), ("nan", {}, "at least 0"),
     ("-1", {}, "at least 0"), ("0", {"positive": True}, "more than 0"), ("0", {"integer": True, "minimum": 1}, "at least 1")],
)
def test_parse_number_names_what_is_wrong(text, kwargs, message):
    from reporter.checks import parse_number

    with pytest.raises(ConfigError, match=f"^--x must be {message}, not"):
        parse_number(text, "--x", 7, **kwargs)


# --- a key an HTTP header cannot carry (issue 10, item 9) -------------------------------------------


BAD_KEYS = ["clé-ünïcødé-€uro-99", "key\u4e2d\u6587x", "line\nbreak", "tab\x00nul"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_key_that_cannot_travel_in_a_header_is_a_configuration_error(key):
    config, problems = load_config({"ANYLEARN_TASK_ID": "TRAIx", "ANYLEARN_SECRET_KEY": key, "ANYLEARN_BACKEND_URL": "http://127.0.0.1:1/api"})
    (problem,) = problems
    assert "ANYLEARN_SECRET_KEY" in problem and "header" in problem and key not in problem and key[:4] not in problem
    assert config.secret_key is None and config.offline  # journal only: nothing that would crash a request
    with pytest.raises(ConfigError):
        check_secret_key({"secret_key": key})
    assert secret_key_problem("plain-latin-1-ÿ-key") is None


def _key_env(tmp_path, key, **extra):
    return clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY=key, ANYLEARN_BACKEND_URL=f"http://127.0.0.1:{free_port()}/api",
                         ANYLEARN_REPORTER_DIR=str(tmp_path), **extra)


def _reporter(*args, env):
    return subprocess.run([sys.executable, "-m", "reporter", *args], env=env, capture_output=True, text=True, timeout=60)


def test_report_sync_and_doctor_refuse_a_key_that_cannot_be_sent(tmp_path):
    key = BAD_KEYS[0]
    env = _key_env(tmp_path, key)
    report = _reporter("report", "0.5", env=env)
    assert report.returncode == 2 and "ANYLEARN_SECRET_KEY" in report.stderr and len(report.stderr.strip().splitlines()) == 1
    run_dir = tmp_path / TASK_ID
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind":"intermediate","value":0.5,"name":null,"step":1,"ts":1.0,"rank":0,"pid":1,"key":"a-1"}\n')
    sync = _reporter("sync", str(run_dir), env=env)
    assert sync.returncode == 2 and "header" in sync.stderr and "Traceback" not in sync.stderr
    (tmp_path / "keyfile").write_text(key + "\n", encoding="utf-8")
    from_file = _reporter("sync", str(run_dir), "--secret-key-file", str(tmp_path / "keyfile"), env=_key_env(tmp_path, "fine-key"))
    assert from_file.returncode == 2 and "--secret-key-file" in from_file.stderr
    doctor = _reporter("doctor", env=env)
    assert doctor.returncode == 1
    (line,) = [x for x in doctor.stdout.splitlines() if x.split()[1:3] == ["secret", "key"]]
    assert line.startswith("FAIL") and "header" in line
    for done in (report, sync, from_file, doctor):
        assert key not in done.stdout + done.stderr and "UnicodeEncodeError" not in done.stdout + done.stderr


def test_the_in_process_hook_says_it_once_and_journals(tmp_path):
    key = BAD_KEYS[1]
    env = _key_env(tmp_path, key)
    done = subprocess.run(
        [sys.executable, "-c", "import reporter\nfor i in range(5): reporter.report_metric(i / 10, step=i)\nprint(reporter.flush(2))"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert done.stderr.count("ANYLEARN_SECRET_KEY") == 1 and key not in done.stderr
    assert len((tmp_path / TASK_ID / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("content", [b"\xff\xfe{\x00}\x00", b'{"lr": 0.1, "x": "\xe9t\xe9"}'], ids=["utf16-bom", "latin1"])
def test_a_params_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path, content):
    params = tmp_path / "params.json"
    params.write_bytes(content)
    done = _reporter("run", "--params-file", str(params), "--", sys.executable, "-c", "pass",
                     env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert str(params) in done.stderr and "not UTF-8" in done.stderr


def test_a_key_file_that_is_not_utf8_is_one_line_exit_2_and_never_shows_the_key(tmp_path):
    run_dir = tmp_path / TASK_ID
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind":"intermediate","value":0.5,"name":null,"step":1,"ts":1.0,"rank":0,"pid":1,"key":"a-1"}\n')
    key_file = tmp_path / "keyfile"
    key_file.write_bytes(b"k3y-\xe9-s3cr3t\n")
    done = _reporter("sync", str(run_dir), "--secret-key-file", str(key_file), env=_key_env(tmp_path, "fine-key"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert str(key_file) in done.stderr and "not UTF-8" in done.stderr
    assert "s3cr3t" not in done.stderr and "k3y" not in done.stderr and "0xe9" not in done.stderr


BAD_TASK_IDS = ["ab\ncd", "a\tb", "a\x7fb", "a/b", "a\\b", ".hidden", "x\udcff", "t" * 256]


@pytest.mark.parametrize("task_id", BAD_TASK_IDS)
def test_a_task_id_that_cannot_name_a_run_directory_is_a_configuration_problem(tmp_path, task_id):
    config, problems = load_config({"ANYLEARN_TASK_ID": task_id, "ANYLEARN_SECRET_KEY": KEY, "ANYLEARN_REPORTER_DIR": str(tmp_path)})
    assert config.task_id is None and config.offline and len(problems) == 1
    assert "ANYLEARN_TASK_ID" in problems[0] and "\n" not in problems[0]
    assert os.path.dirname(config.run_dir) == str(tmp_path) and os.path.basename(config.run_dir).startswith("offline-")
    assert load_config({"ANYLEARN_TASK_ID": "TRAI" + "0" * 251, "ANYLEARN_SECRET_KEY": KEY})[1] == []  # 255 bytes: fine


@pytest.mark.parametrize("command", [("run", "--", sys.executable, "-c", "pass"), ("report", "0.5"), ("sidecar",)])
def test_the_cli_refuses_a_task_id_with_a_newline_in_one_line_with_exit_2(tmp_path, command):
    env = _key_env(tmp_path, KEY)
    env["ANYLEARN_TASK_ID"] = "TRAIab\ncd"
    done = _reporter(*command, env=env)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "ANYLEARN_TASK_ID='TRAIab\\ncd' cannot be a task id" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory made


def test_the_hook_says_a_bad_task_id_once_and_journals_locally(tmp_path):
    env = _key_env(tmp_path, KEY)
    env["ANYLEARN_TASK_ID"] = "TRAIab\ncd"
    done = subprocess.run([sys.executable, "-c", "import reporter\nfor i in range(3): reporter.report_metric(i / 10, step=i)"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.count("cannot be a task id") == 1, done.stderr
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("offline-") and (run_dir / "metrics.jsonl").read_text().count("\n") == 3


def test_offline_reason_names_the_missing_variable_and_a_close_misspelling():
    from reporter.advice import offline_reason

    misspelt = offline_reason({"ANYLEARN_TASKID": "TRAIx", "ANYLEARN_SECRET_KEY": "k"})
    assert misspelt == "ANYLEARN_TASK_ID (or task_id) is not set (ANYLEARN_TASKID is set: did you mean ANYLEARN_TASK_ID?)"
    assert offline_reason({"ANYLEARN_TASK_ID": "TRAIx"}) == "ANYLEARN_SECRET_KEY (or secret_key) is not set"
    assert "did you mean secret_key?" in offline_reason({"task_id": "TRAIx", "secretkey": "k"})
    assert "did you mean" not in offline_reason({"task_id": "TRAIx", "HOME": "/root", "ANYLEARN_SOMETHING_ELSE_ENTIRELY": "1"})


@pytest.mark.parametrize("name", ["ANYLEARN_AUTH_TOKEN", "ANYLEARN_TOKEN"])
def test_a_users_token_is_read_as_a_secret_under_the_sdks_name_or_the_old_one(name):
    config, problems = load_config({name: "tok-123456", "ANYLEARN_TASK_ID": "TRAIx", "ANYLEARN_BACKEND_URL": "http://127.0.0.1:1/api"})
    assert problems == [] and config.auth_token.reveal() == "tok-123456"
    assert "tok-123456" not in repr(config) + str(config.auth_token)


def test_a_token_that_cannot_travel_in_a_header_is_one_problem_that_never_shows_it():
    config, problems = load_config({"ANYLEARN_AUTH_TOKEN": "tök€n-secret"})
    assert config.auth_token is None and len(problems) == 1
    assert "ANYLEARN_AUTH_TOKEN" in problems[0] and "tök€n" not in problems[0]


# --- durations: one rule for every variable and option (issue 16) -----------------------------------


@pytest.mark.parametrize("command, env", [
    (["sync", "--timeout=-5", "RUN"], {}),
    (["sync", "--timeout", "nan", "RUN"], {}),
    (["status", "--stale-after", "nan", "RUN"], {}),
    (["status", "--stale-after", "-1", "RUN"], {}),
    (["run", "--dry-run", "--", "true"], {"ANYLEARN_GRACE_PERIOD": "-5"}),
    (["run", "--dry-run", "--grace-period", "nan", "--", "true"], {}),
    (["run", "--dry-run", "--drain-timeout=-inf", "--", "true"], {}),
    (["run", "--dry-run", "--", "true"], {"ANYLEARN_REQUEST_TIMEOUT": "nan"}),
    (["run", "--dry-run", "--", "true"], {"ANYLEARN_REQUEST_TIMEOUT": "inf"}),
    (["run", "--dry-run", "--", "true"], {"ANYLEARN_FLUSH_TIMEOUT": "-1"}),
    (["report", "1"], {"ANYLEARN_FLUSH_TIMEOUT": "nan"}),
    (["sidecar", "--heartbeat", "nan"], {"ANYLEARN_TASK_ID": TASK_ID, "ANYLEARN_SECRET_KEY": "k3y-k3y-k3y", "ANYLEARN_BACKEND_URL": "http://127.0.0.1:1/api"}),
])
def test_a_negative_nan_or_unbounded_duration_is_refused_in_one_line_with_exit_2(tmp_path, command, env):
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "metrics.jsonl").write_text("")
    done = subprocess.run([sys.executable, "-m", "reporter", *command], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"), **env))
    assert done.returncode == 2, done.stderr
    error = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "must be a number of seconds" in error[0] and "Traceback" not in done.stderr


def test_parse_duration_caps_no_limit_and_refuses_the_rest():
    from reporter.checks import MAX_DURATION_S, parse_duration

    assert parse_duration("inf", "--x", 1.0) == parse_duration("1e308", "--x", 1.0) == MAX_DURATION_S
    assert parse_duration(" 2.5 ", "--x", 1.0) == 2.5 and parse_duration("", "--x", 1.0) == 1.0
    for text, kwargs in [("nan", {}), ("-1", {}), ("0", {"positive": True}), ("inf", {"unlimited": False}), ("x", {})]:
        with pytest.raises(ConfigError, match="^--x must be a number of seconds"):
            parse_duration(text, "--x", 1.0, **kwargs)


@pytest.mark.parametrize("how", ["--drain-timeout inf", "--drain-timeout 1e308", "ANYLEARN_FLUSH_TIMEOUT=inf"])
def test_no_limit_durations_work_end_to_end_without_overflow(server, tmp_path, how):
    from conftest import task_env

    run_dir = tmp_path / "run"
    name, _, value = how.partition("=") if "=" in how else ("", "", "")
    env = task_env(server.base_url, str(run_dir), **({name: value} if name else {}))
    if name:  # the in-process hook's flush at exit
        done = subprocess.run([sys.executable, "-c", "import reporter; reporter.report_metric(0.5)"],
                              capture_output=True, text=True, timeout=60, env=env)
    else:
        done = subprocess.run([sys.executable, "-m", "reporter", "run", *how.split(), "--", sys.executable, "-c",
                               "print('ANYLEARN_METRIC 0.5')"], capture_output=True, text=True, timeout=60, env=env,
                              cwd=tmp_path)
        assert (run_dir / "summary.json").exists()
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "out of range" not in done.stderr and "failed" not in done.stderr
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5]


# --- a backend URL that cannot work (issue 16) -------------------------------------------------------

BAD_URLS = {
    "http://127.0.0.1:99999/api": "out of range",
    "http://127.0.0.1:abc/api": "integer",
    "http://[::1/api": "IPv6",
    "http://127.0.0.1:8080/my api": "space",
    "http://127.0.0.1:8080/\u00e4pi": "non-ASCII",
    "http://user:pa55w0rd@127.0.0.1:8080/api": "user name or password",
    "http://127.0.0.1:8080/api?tenant=3": "query",
    "http://127.0.0.1:8080/api#x": "query or fragment",
}


@pytest.mark.parametrize("url", list(BAD_URLS))
@pytest.mark.parametrize("command", [["doctor"], ["report", "1"], ["run", "--", "true"], ["sync", "RUN"]])
def test_a_backend_url_that_cannot_work_is_one_line_and_exit_2_before_anything_runs(tmp_path, url, command):
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "metrics.jsonl").write_text("")
    env = clean_environ(ANYLEARN_BACKEND_URL=url, ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_SECRET_KEY="k3y-k3y-k3y",
                        ANYLEARN_REPORTER_DIR=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-m", "reporter", *command], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "ANYLEARN_BACKEND_URL" in line and BAD_URLS[url] in line and "pa55w0rd" not in line
    assert not (tmp_path / "runs").exists()  # nothing ran: no run directory, no journal


def test_the_hook_says_a_bad_backend_url_once_and_journals_only(tmp_path):
    env = clean_environ(ANYLEARN_BACKEND_URL="http://u:pa55w0rd@127.0.0.1:1/api", ANYLEARN_TASK_ID=TASK_ID,
                        ANYLEARN_SECRET_KEY="k3y-k3y-k3y", ANYLEARN_REPORTER_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import reporter\nfor i in range(3): reporter.report_metric(i)"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0
    assert done.stderr.count("ANYLEARN_BACKEND_URL") == 1 and "pa55w0rd" not in done.stderr
    assert len((tmp_path / TASK_ID / "metrics.jsonl").read_text().splitlines()) >= 3


def test_a_token_without_the_key_or_a_backend_url_guesses_no_host_and_starts_no_agent(tmp_path):
    from reporter.logship import local_agent

    config, problems = load_config(clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_AUTH_TOKEN="tok-0042",
                                                 ANYLEARN_REPORTER_RUN_DIR=str(tmp_path)))
    assert problems == [] and config.backend_url is None and config.offline
    assert local_agent(config, str(tmp_path)) is None
    from reporter.advice import offline_reason

    assert offline_reason(clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_AUTH_TOKEN="tok-0042")).startswith(
        "no backend is named (ANYLEARN_BACKEND_URL or BACKEND_NAMESPACE)")
    with_url, _ = load_config(clean_environ(ANYLEARN_TASK_ID=TASK_ID, ANYLEARN_AUTH_TOKEN="tok-0042",
                                            ANYLEARN_BACKEND_URL="http://127.0.0.1:9/api"))
    assert with_url.backend_url == "http://127.0.0.1:9/api" and not with_url.offline  # named: the agent ships there


@pytest.mark.parametrize("name", ["ANYLEARN_SECRETKEY", "ANYLEARN_SECRET", "secretkey", "Secret_Key", "ANYLEARN_SECRET_KY"])
def test_a_refusal_without_a_key_names_the_misspelt_key_variable(name):
    from reporter.advice import refusal

    text = refusal(TASK_ID, False, {name: "k"})
    assert text.startswith("no secret key is set (ANYLEARN_SECRET_KEY or secret_key)") and f"{name} is set: did you mean" in text


def test_a_refusal_of_a_sent_key_names_both_the_task_id_and_the_key():
    from reporter.advice import refusal

    text = refusal(TASK_ID, True, {})
    assert f"refused the task id or the secret key for task {TASK_ID} (it cannot say which)" in text
    assert "ANYLEARN_TASK_ID" in text and "ANYLEARN_SECRET_KEY" in text
