"""Anyboard as a sink of the journal: every intermediate record once through an outage and a re-send, a
refused login pausing it, and the configuration that turns it on (issue 17's lane drives it the same way)."""

import socket
import threading

import pytest

pytest.importorskip("iotdb.thrift.rpc.IClientRPCService", reason="the anyboard extra (apache-iotdb) is not installed")

from reporter.anyboard.config import anyboard_config  # noqa: E402
from reporter.anyboard.sink import AnyboardSink, anyboard_from_config  # noqa: E402
from reporter.config import load_config  # noqa: E402
from reporter.emulator.anyboard import AnyboardStore  # noqa: E402
from reporter.emulator.anyboard_iotdb import IoTDBServer  # noqa: E402
from reporter.journal import JournalWriter  # noqa: E402
from reporter.reader import JournalReader  # noqa: E402
from reporter.record import KIND_FINAL, KIND_INTERMEDIATE  # noqa: E402

ENV = {
    "ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_USER": "root",
    "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "root", "ANYLEARN_USER_ID": "USER1", "ANYLEARN_PROJECT_ID": "PROJ1",
    "ANYLEARN_TASK_ID": "TRAI1",
}


class Handoff:
    def __init__(self):
        self.stop = threading.Event()
        self.acked = 0

    def remaining_s(self):
        return None

    def hold(self, record):
        pass

    def acknowledge(self, end_offset):
        assert end_offset > self.acked
        self.acked = end_offset

    def checkpoint(self):
        pass


def journal(run_dir, count):
    writer = JournalWriter(str(run_dir))
    for i in range(count):
        writer.append(KIND_INTERMEDIATE, i / 10, "loss", i)
        writer.append(KIND_INTERMEDIATE, 0.1, "lr", i)
        writer.append(KIND_INTERMEDIATE, float("nan"), "grad_norm", i)
    writer.append(KIND_FINAL, 1.0, None, None)
    writer.close()


def deliver_all(sink, run_dir, handoff, offset=0, batch=256):
    """A lane in miniature: batches after ``offset`` until the journal's end or the sink says no."""
    reader = JournalReader(str(run_dir), offset)
    try:
        while True:
            entries = reader.read_available(batch)
            if not entries or not sink.deliver(entries, handoff):
                return handoff.acked
    finally:
        reader.close()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_point_lands_once_through_an_outage_and_a_resend_after_a_crash(tmp_path):
    journal(tmp_path, 400)
    port = free_port()
    servers = []

    def sleep(seconds):  # the engine's backoff: IoTDB comes up during the second wait
        if len(servers) == 0 and sink.attempts_failed >= 2:
            servers.append(IoTDBServer(AnyboardStore(), port=port).start())

    sink = AnyboardSink(anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port)}), retry_sleep=sleep)
    try:
        handoff = Handoff()
        end = deliver_all(sink, tmp_path, handoff)
        store = servers[0].store
        assert end == (tmp_path / "metrics.jsonl").stat().st_size
        assert store.count() == 800 and sink.delivered == 800 and sink.attempts_failed == 2
        assert sink.skipped == {"not a finite number": 400, "not an intermediate metric (a final metric or a state)": 1}
        # a kill -9 before the cursor was saved: the next host sends everything again, and nothing doubles
        again = AnyboardSink(anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port)}))
        deliver_all(again, tmp_path, Handoff(), batch=100)
        again.close()
        assert store.count() == 800 and len(store.scalars("PROJ1", "TRAI1", "loss")) == 400
        assert [p["step"] for p in store.scalars("PROJ1", "TRAI1", "loss")] == list(range(400))
        assert sink.status()["failing_since"] is None and sink.status()["last_error"].startswith("Anyboard")
    finally:
        sink.close()
        for server in servers:
            server.stop()


def test_a_refused_login_pauses_the_sink_with_one_line_and_acknowledges_nothing(tmp_path, capfd):
    journal(tmp_path, 5)
    server = IoTDBServer(AnyboardStore(), password="the-right-one").start()
    sink = AnyboardSink(anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(server.port),
                                         "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "wrong-Pw-77"}))
    try:
        handoff = Handoff()
        assert deliver_all(sink, tmp_path, handoff) == 0
        assert deliver_all(sink, tmp_path, handoff) == 0  # paused: it does not knock again
        assert server.handler.logins_refused == 1 and server.store.count() == 0
        paused = sink.status()["paused"]
        assert "Anyboard" in paused and "ANYLEARN_ANYBOARD_IOTDB_PASSWORD" in paused and "wrong-Pw-77" not in paused
        said = capfd.readouterr().err
        assert "wrong-Pw-77" not in said and said.count("Anyboard is paused") == 1 and len(said.splitlines()) == 1
    finally:
        sink.close()
        server.stop()


def test_a_stop_during_the_backoff_leaves_the_batch_pending(tmp_path):
    journal(tmp_path, 3)
    sink = AnyboardSink(anyboard_config({**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": str(free_port())}), initial_backoff_s=0.01, max_backoff_s=0.02)
    handoff = Handoff()
    threading.Timer(0.2, handoff.stop.set).start()
    assert deliver_all(sink, tmp_path, handoff) == 0
    assert sink.delivered == 0 and sink.attempts_failed >= 1 and sink.paused_reason is None


def test_the_configuration_turns_the_sink_on_off_or_says_what_is_missing(tmp_path, capfd):
    config, _ = load_config({"ANYLEARN_TASK_ID": "TRAI1", "ANYLEARN_REPORT_RANKS": "all"})
    assert anyboard_from_config(config, str(tmp_path), env={"ANYLEARN_TASK_ID": "TRAI1"}) is None
    assert anyboard_from_config(config, str(tmp_path), env={**ENV}) is None
    said = capfd.readouterr().err
    assert "ANYLEARN_ANYBOARD_IOTDB_PORT" in said and "Anyboard is off" in said and len(said.splitlines()) == 1
    sink = anyboard_from_config(config, str(tmp_path), env={**ENV, "ANYLEARN_ANYBOARD_IOTDB_PORT": "6667"})
    assert sink.config.report_all_ranks and sink.config.device_prefix == "root.USER1.PROJ1.TRAI1"
    assert (sink.name, sink.cursor_file, sink.lock_file) == ("anyboard", "cursor.anyboard", "deliver.anyboard.lock")
    sink.open({"delivered": 7, "skipped": {"not a finite number": 2}})
    assert sink.status()["delivered"] == 7 and sink.status()["skipped"] == {"not a finite number": 2}
