"""Anyboard's configuration, points and writer: the real IoTDB client's Thrift service against the local
Anyboard (reporter.emulator.anyboard_iotdb), a hanging server, a closed port and a refused login."""

import dataclasses
import logging
import math
import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reporter.anyboard import anyboard_config, clean_metric_name, device_path, point_time, series_name, to_points
from reporter.anyboard.points import OFFSET_SLOTS, SKIP_NOT_A_CURVE, Point
from reporter.config import ANYBOARD_ENV, ConfigError, Secret
from reporter.journal import JournalWriter
from reporter.policy import SKIP_NOT_A_NUMBER, SKIP_OTHER_RANK
from reporter.reader import JournalEntry, JournalReader
from reporter.record import KIND_FINAL, KIND_INTERMEDIATE, KIND_STATE, Record

ENV = {
    "ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_PORT": "6667",
    "ANYLEARN_ANYBOARD_IOTDB_USER": "root", "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "pw-Zq93-never-shown",
    "ANYLEARN_USER_ID": "USER1", "ANYLEARN_PROJECT_ID": "PROJ1", "ANYLEARN_TASK_ID": "TRAI1",
}
PREFIX = "root.USER1.PROJ1.TRAI1"


# --- configuration -------------------------------------------------------------------------------------

def test_all_six_variables_and_the_task_turn_anyboard_on_with_the_password_a_secret():
    config = anyboard_config(ENV)
    assert (config.host, config.port, config.user, config.device_prefix) == ("127.0.0.1", 6667, "root", PREFIX)
    assert isinstance(config.password, Secret) and config.password.reveal() == ENV["ANYLEARN_ANYBOARD_IOTDB_PASSWORD"]
    assert "pw-Zq93" not in repr(config)


def test_none_of_the_variables_leaves_anyboard_off_silently():
    assert anyboard_config({"ANYLEARN_TASK_ID": "TRAI1"}) is None


def test_some_variables_give_one_line_naming_what_is_missing_never_the_password():
    env = {k: v for k, v in ENV.items() if k not in ("ANYLEARN_USER_ID", "ANYLEARN_ANYBOARD_IOTDB_PORT")}
    with pytest.raises(ConfigError) as err:
        anyboard_config(env)
    text = str(err.value)
    assert "\n" not in text and "ANYLEARN_USER_ID" in text and "ANYLEARN_ANYBOARD_IOTDB_PORT" in text
    assert "pw-Zq93" not in text and "Anyboard" in text
    assert len(ANYBOARD_ENV) == 6


def test_an_id_that_would_break_the_device_path_is_named():
    with pytest.raises(ConfigError, match="ANYLEARN_PROJECT_ID='a.b'"):
        anyboard_config({**ENV, "ANYLEARN_PROJECT_ID": "a.b"})


def test_a_port_that_is_not_a_port_is_named():
    with pytest.raises(ConfigError, match="ANYLEARN_ANYBOARD_IOTDB_PORT"):
        anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": "70000"})


# --- names, devices, point times -----------------------------------------------------------------------

@pytest.mark.parametrize("name, cleaned", [
    ("loss", "loss"), ("train/loss", "train/loss"), ("/val/acc", "val/acc"), ("//x", "x"),
    ("a b(c)`d", "a_b_c__d"), ("lr-0.1", "lr-0.1"), ("准确率", "准确率"), ("/", "_"),
])
def test_names_are_cleaned_as_the_sdk_cleans_them(name, cleaned):
    assert clean_metric_name(name) == cleaned


@given(st.text(max_size=40))
def test_a_cleaned_name_matches_the_sdk_rule_and_never_holds_a_backquote(name):
    import re

    expected = re.sub(r"[^-/\w\.]", "_", name).lstrip("/") or "_"  # manager.py's _standardize
    assert clean_metric_name(name) == expected and "`" not in expected


def test_ranks_other_than_0_get_their_own_device():
    assert series_name("loss", 0) == "loss" and series_name("loss", 3) == "loss/rank3"
    assert device_path(PREFIX, series_name("a b", 1)) == f"{PREFIX}.scalar.`a_b/rank1`"


TS = st.floats(min_value=0, max_value=9.2e9, allow_nan=False)  # up to the year 2262
OFFSETS = st.integers(min_value=1, max_value=1 << 40)


@given(TS, OFFSETS)
def test_the_point_time_is_a_function_of_the_line_and_fits_a_signed_64_bit_time(ts, offset):
    assert point_time(ts, offset) == point_time(ts, offset)
    assert 0 <= point_time(ts, offset) < 1 << 63


@given(TS, OFFSETS, st.integers(min_value=1, max_value=OFFSET_SLOTS - 1), st.floats(min_value=0, max_value=1e6))
def test_two_lines_of_one_journal_never_share_a_time_and_keep_their_report_order(ts, offset, gap, later_s):
    """Two lines end at different offsets; lines within one millisecond are less than 1 MB apart."""
    first, second = point_time(ts, offset), point_time(ts + later_s, offset + gap)
    if int((ts + later_s) * 1000) == int(ts * 1000):
        assert first != second
    else:
        assert second > first


def test_a_tight_loop_of_one_name_gets_one_time_per_record(tmp_path):
    writer = JournalWriter(str(tmp_path))
    for i in range(3000):
        writer.append(KIND_INTERMEDIATE, float(i), "loss", i)
    writer.close()
    reader = JournalReader(str(tmp_path))
    entries = reader.read_available(10_000)
    reader.close()
    points, skipped = to_points(entries, PREFIX)
    assert len(points) == 3000 and not skipped
    assert len({p.time for p in points}) == 3000
    assert len({p.walltime for p in points}) < 3000  # the report times alone would have collided
    assert [p.value for p in sorted(points, key=lambda p: p.time)] == [float(i) for i in range(3000)]


def _entry(offset, kind=KIND_INTERMEDIATE, value=1.0, name="loss", rank=0, step=1, ts=1.7e9):
    return JournalEntry(offset, Record(kind, value, name, step, ts, rank))


def test_nan_finals_states_other_ranks_and_bad_lines_are_skipped_and_counted():
    entries = [_entry(10), _entry(20, value=None), _entry(30, value=math.inf), _entry(40, KIND_FINAL),
               _entry(50, KIND_STATE, 2), _entry(60, rank=1), JournalEntry(70, None, "not JSON"),
               _entry(80, name=None, step=None)]
    points, skipped = to_points(entries, PREFIX, unnamed="accuracy")
    assert [p.device for p in points] == [f"{PREFIX}.scalar.`loss`", f"{PREFIX}.scalar.`accuracy`"]
    assert points[1].step is None and points[0].walltime == 1_700_000_000_000
    assert skipped[SKIP_NOT_A_NUMBER] == 2 and skipped[SKIP_NOT_A_CURVE] == 2 and skipped[SKIP_OTHER_RANK] == 1
    assert sum(skipped.values()) == 6
    all_ranks, _ = to_points(entries, PREFIX, report_all_ranks=True)
    assert f"{PREFIX}.scalar.`loss/rank1`" in {p.device for p in all_ranks}


# --- the writer against the local Anyboard ---------------------------------------------------------------

iotdb_rpc = pytest.importorskip("iotdb.thrift.rpc.IClientRPCService", reason="the anyboard extra (apache-iotdb) is not installed")

from reporter.anyboard.writer import AnyboardLoginRefused, AnyboardUnavailable, AnyboardWriter  # noqa: E402
from reporter.emulator.anyboard import AnyboardStore, read_answer  # noqa: E402
from reporter.emulator.anyboard_iotdb import IoTDBServer  # noqa: E402


@pytest.fixture
def iotdb():
    server = IoTDBServer(AnyboardStore(), user="root", password=ENV["ANYLEARN_ANYBOARD_IOTDB_PASSWORD"]).start()
    yield server
    server.stop()
    server.store.close()


def _config(port, **env):
    config = anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port), **env})
    return config


def _series(store, name="loss"):
    status, body = read_answer(store, "/anyboard/PROJ1/metric/scalars",
                               {"scalar_metric_query_list": f'[{{"taskId": "TRAI1", "metricName": "{name}"}}]'})
    assert status == 200
    return body["scalarMetricList"][0]["scalarRecordList"]


def test_a_batch_lands_typed_once_and_a_resent_batch_overwrites_itself(iotdb):
    entries = [_entry(100 * (i + 1), value=i / 2, step=i, ts=1.7e9 + i / 1e4) for i in range(500)]
    points, _ = to_points(entries, PREFIX)
    writer = AnyboardWriter(_config(iotdb.port))
    writer.write(points)
    writer.write(points[250:])  # an outage after half: the lane sends the rest again
    writer.close()
    got = _series(iotdb.store)
    assert len(got) == 500 and iotdb.store.count() == 500
    assert got[7] == {"step": 7, "walltime": points[7].walltime, "value": 3.5}
    assert isinstance(got[7]["step"], int) and isinstance(got[7]["walltime"], int)


def test_a_refused_login_is_one_line_naming_anyboard_and_the_fix_never_the_password(iotdb, caplog):
    caplog.set_level(logging.DEBUG)
    writer = AnyboardWriter(_config(iotdb.port, ANYLEARN_ANYBOARD_IOTDB_PASSWORD="wrong-pw-Xk2"))
    with pytest.raises(AnyboardLoginRefused) as err:
        writer.write([Point(f"{PREFIX}.scalar.`loss`", 1, 1, 1, 1.0)])
    text = str(err.value)
    assert "Anyboard" in text and "ANYLEARN_ANYBOARD_IOTDB_PASSWORD" in text and "\n" not in text
    assert "wrong-pw-Xk2" not in text and "wrong-pw-Xk2" not in caplog.text
    assert iotdb.handler.logins_refused == 1 and iotdb.store.count() == 0


def test_iotdb_down_is_a_transient_fault_and_the_writer_recovers_when_it_is_back(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    writer = AnyboardWriter(_config(port))
    point = Point(f"{PREFIX}.scalar.`loss`", 5, 5, 5, 0.5)
    with pytest.raises(AnyboardUnavailable, match="Anyboard"):
        writer.write([point])
    server = IoTDBServer(AnyboardStore(), port=port, password=ENV["ANYLEARN_ANYBOARD_IOTDB_PASSWORD"]).start()
    try:
        writer.write([point])
        assert server.store.count() == 1
        server.stop()  # it goes away mid-session: the next write fails transiently, not for good
        with pytest.raises(AnyboardUnavailable):
            writer.write([point])
    finally:
        server.stop()
        writer.close()


def test_a_session_the_server_forgot_is_a_transient_fault_not_a_refused_login(iotdb):
    writer = AnyboardWriter(_config(iotdb.port))
    point = Point(f"{PREFIX}.scalar.`loss`", 1, 1, 1, 1.0)
    writer.write([point])
    iotdb.handler.closeSession(type("Req", (), {"sessionId": writer._session_id})())  # as after a server restart
    with pytest.raises(AnyboardUnavailable, match="802"):
        writer.write([point])
    writer.write([point])  # a new session
    writer.close()
    assert iotdb.store.count() == 1


def test_a_failed_connect_prints_nothing_but_our_own_exception(tmp_path):
    """thrift's TSocket logs every failed connect at ERROR; a host with no logging set up would print it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = ("from reporter.anyboard import anyboard_config, Point\nfrom reporter.anyboard.writer import AnyboardWriter, "
            "AnyboardUnavailable\n"
            f"w = AnyboardWriter(anyboard_config({{**{ENV!r}, 'ANYLEARN_ANYBOARD_IOTDB_PORT': '{port}'}}))\n"
            "for _ in range(3):\n    try:\n        w.write([Point('root.a.b.c.scalar.`x`', 1, 1, 1, 1.0)])\n"
            "    except AnyboardUnavailable:\n        pass\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""


def test_a_hanging_iotdb_costs_one_timeout_then_a_transient_fault():
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()  # accepts, never answers
    try:
        config = dataclasses.replace(_config(listener.getsockname()[1]), timeout_s=0.3)
        writer = AnyboardWriter(config)
        with pytest.raises(AnyboardUnavailable, match="cannot open a session"):
            writer.write([Point(f"{PREFIX}.scalar.`loss`", 1, 1, 1, 1.0)])
        assert "pw-Zq93" not in repr(writer.__dict__)
    finally:
        listener.close()
        for conn, _ in held:
            conn.close()


def test_the_password_is_scrubbed_from_any_text_the_client_or_server_gives():
    writer = AnyboardWriter(_config(1))
    exc = writer._unavailable("x", OSError(f"echo {ENV['ANYLEARN_ANYBOARD_IOTDB_PASSWORD']} back"))
    assert "pw-Zq93" not in str(exc) and "***" in str(exc)


def test_import_reporter_does_not_import_anyboard_or_the_iotdb_client():
    code = ("import sys, reporter; bad = [m for m in sys.modules if m.startswith(('reporter.anyboard', 'iotdb', "
            "'thrift'))]; print(bad); sys.exit(1 if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_without_the_extra_building_a_writer_says_the_pip_line(tmp_path):
    blocker = tmp_path / "iotdb"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    code = ("from reporter.anyboard import anyboard_config\nfrom reporter.anyboard.writer import AnyboardWriter\n"
            f"AnyboardWriter(anyboard_config({ENV!r}))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'anylearn-reporter[anyboard]'" in done.stderr.strip().splitlines()[-1]
