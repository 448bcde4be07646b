"""Hyper-parameter rendering: the table of the contract, artifacts, and argv without a shell."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.config import ConfigError
from reporter.params import artifact_paths, parse_params, render_params

EXAMPLE = {"lr": 0.01, "epochs": 3, "name": "a b"}


@pytest.mark.parametrize(
    "params, prefix, delimiter, argv",
    [
        (EXAMPLE, "--", " ", ["--lr", "0.01", "--epochs", "3", "--name", "a b"]),
        (EXAMPLE, "-", "=", ["-lr=0.01", "-epochs=3", "-name=a b"]),
        ({"wd": 1e-05, "big": 3.0}, "--", " ", ["--wd", "1e-05", "--big", "3.0"]),
        ({"flag": True, "off": False}, "--", " ", ["--flag", "true", "--off", "false"]),
        ({"layers": [64, 32]}, "--", " ", ["--layers", "64", "32"]),
        ({"layers": [64, 32]}, "--", "=", ["--layers=64,32"]),
        ({"verbose": None, "x": 1}, "--", " ", ["--verbose", "--x", "1"]),
        ({"cfg": {"a": 1}}, "--", " ", ["--cfg", '{"a":1}']),
        ({"danger": "$(touch x)", "semi": "a; rm -rf /"}, "--", " ", ["--danger", "$(touch x)", "--semi", "a; rm -rf /"]),
        ({"lr": 0.5}, "", ":", ["lr:0.5"]),
    ],
)
def test_rendering_table(params, prefix, delimiter, argv):
    assert render_params(params, prefix=prefix, delimiter=delimiter) == argv


@pytest.mark.parametrize("reference", ["$DATA1", "${DATA1}", '"$DATA1"', "'${DATA1}'"])
def test_artifact_references_become_their_paths(reference):
    artifacts = artifact_paths("DATA1, MODEL2", {"DATA1": "/data/mnist", "MODEL2": "/models/m"})
    assert render_params({"data": reference}, artifacts=artifacts) == ["--data", "/data/mnist"]


@pytest.mark.parametrize("value", ["$OTHER", "prefix$DATA1", "$DATA1/sub", "${DATA1"])
def test_values_that_are_not_exactly_a_listed_reference_stay_literal(value):
    artifacts = artifact_paths("DATA1", {"DATA1": "/data/mnist", "OTHER": "/x"})
    assert render_params({"data": value}, artifacts=artifacts) == ["--data", value]


def test_an_artifact_id_without_a_path_in_the_environment_is_not_substituted():
    assert artifact_paths("DATA1,DATA2", {"DATA1": "/d"}) == {"DATA1": "/d"}


def test_invalid_json_names_source_and_position():
    with pytest.raises(ConfigError, match=r"ANYLEARN_TRAIN_PARAMS is not valid JSON: .* line 1 column 10 \(char 9\)"):
        parse_params('{"lr": 1,}', "ANYLEARN_TRAIN_PARAMS")


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"lr"', "null"])
def test_a_json_value_that_is_not_an_object_is_refused(text):
    with pytest.raises(ConfigError, match="JSON object"):
        parse_params(text, "--params")


def test_key_order_is_kept():
    assert list(parse_params('{"z": 1, "a": 2, "m": 3}', "--params")) == ["z", "a", "m"]


argv_text = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)  # POSIX argv holds no NUL
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False), argv_text
)
json_values = st.one_of(json_scalars, st.lists(json_scalars.filter(lambda v: v is not None), max_size=4))


@settings(max_examples=30, deadline=None)
@given(params=st.dictionaries(st.text(alphabet="abcdefghij_", min_size=1, max_size=8), json_values, max_size=6))
def test_any_json_object_reaches_a_real_program_as_argv_without_a_shell(tmp_path_factory, params):
    """Every rendered element arrives unchanged in the program's sys.argv (no shell ever parses it)."""
    text = json.dumps(params)
    argv = render_params(parse_params(text, "--params"))
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    workdir = tmp_path_factory.mktemp("argv")
    seen = subprocess.run([sys.executable, "-c", echo, *argv], capture_output=True, text=True, check=True, cwd=workdir).stdout
    assert json.loads(seen) == argv
    assert list(workdir.iterdir()) == []  # nothing like $(touch x) ran


@pytest.mark.parametrize("how", ["--params", "--params-file", "ANYLEARN_TRAIN_PARAMS"])
def test_hyper_parameters_nested_thousands_deep_are_one_line_and_exit_2(tmp_path, how):
    from conftest import clean_environ

    deep = '{"a": ' + "[" * 60_000 + "]" * 60_000 + "}"  # an argv string stays under Linux's 128 KiB
    (tmp_path / "p.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    args = {"--params": ["--params", deep], "--params-file": ["--params-file", str(tmp_path / "p.json")]}.get(how, [])
    env = clean_environ(**({how: deep} if how.startswith("ANYLEARN") else {}))
    done = subprocess.run([sys.executable, "-m", "reporter", "run", "--dry-run", *args, "--", "true"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert "nested too deeply" in line and how in line
