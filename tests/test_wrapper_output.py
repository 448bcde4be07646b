"""The output: pass-through, logs and metric lines, whatever the command prints and whatever the disk does."""

import json
import os
import sys

import pytest
from conftest import (
    clean_environ,
    cli,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from wrapperkit import run_env, summary, write_script

from reporter.reader import iter_records
from reporter.wrapper.launch import compile_metric_patterns
from reporter.wrapper.output import MetricLineParser, ParsedMetric


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


def test_metric_patterns_from_the_environment_one_per_line(server, tmp_path):
    patterns = r"loss=(?P<value>[\d.]+) step=(?P<step>\d+)" + "\n" + r"(?P<name>acc)uracy: (?P<value>[\d.]+)"
    code = "print('loss=0.5 step=1')\nprint('accuracy: 0.9')"
    env = run_env(server.base_url, tmp_path, ANYLEARN_METRIC_PATTERNS=patterns, ANYLEARN_OBJECTIVE_METRIC="acc")
    done = cli("run", "--", sys.executable, "-c", code, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [(r.name, r.value, r.step) for _, r in iter_records(str(tmp_path / "run")) if r.kind == "intermediate"]
    assert records == [(None, 0.5, 1), ("acc", 0.9, None)]
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5, 0.9]  # unnamed and the objective are sent


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
    assert repr(parser.parse(line.decode("utf-8", "replace"))) == repr(result)  # repr: a NaN equals itself there


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


def test_a_step_beyond_64_bits_on_a_metric_line_is_journalled_as_null_like_the_hooks(tmp_path):
    code = ("import reporter\n"
            "print('ANYLEARN_METRIC {\"value\": 0.5, \"step\": 1e300}', flush=True)\n"
            "print('ANYLEARN_METRIC {\"value\": 0.25, \"step\": 9223372036854775807}', flush=True)\n"
            "reporter.report_metric(0.125, step=10**300)\n")
    done = cli("run", "--", sys.executable, "-c", code, env=clean_environ(ANYLEARN_REPORTER_DIR=str(tmp_path / "runs")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    steps = sorted(((r.value, r.step) for _, r in iter_records(str(run_dir)) if r.kind == "intermediate"))
    assert steps == [(0.125, None), (0.25, 2**63 - 1), (0.5, None)]
    assert "beyond a 64-bit integer was journalled as null" in done.stderr
