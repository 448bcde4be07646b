"""Configuration: where task, key and backend come from, offline mode, validation, redaction."""

import os
import pickle
import re

import pytest

from reporter.config import ConfigError, Secret, load_config, load_config_strict

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
    from reporter.config import parse_number

    assert parse_number(text, "--x", 7, **kwargs) == expected


@pytest.mark.parametrize(
    "text, kwargs, message",
    [("soon", {}, "a number"), ("1.5", {"integer": True}, "a whole number"), ("nan", {}, "at least 0"),
     ("-1", {}, "at least 0"), ("0", {"positive": True}, "more than 0"), ("0", {"integer": True, "minimum": 1}, "at least 1")],
)
def test_parse_number_names_what_is_wrong(text, kwargs, message):
    from reporter.config import parse_number

    with pytest.raises(ConfigError, match=f"^--x must be {message}, not"):
        parse_number(text, "--x", 7, **kwargs)
