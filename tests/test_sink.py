"""The Sink door: a destination besides AnyLearn plugs in with one registry entry and no host change."""

import json

import pytest
from conftest import SECRET_KEY, TASK_ID, clean_environ, offline_run

import reporter
from reporter import sink
from reporter.cursor import load_cursor
from reporter.record import read_line
from reporter.sink import SinkEntry
from reporter.sync import sync_command


class ListSink:
    """An in-memory destination with its own cursor and lock; ``pause_after`` lines, it pauses for good."""

    name = "list"
    cursor_file = "cursor.list"
    lock_file = "deliver.list.lock"

    def __init__(self, pause_after=None):
        self.keys = []
        self.previous = "not opened"
        self.pause_after = pause_after
        self.paused = False
        self.closed = False

    def open(self, previous):
        self.previous = previous

    def deliver(self, entries, handoff):
        for entry in entries:
            if self.pause_after is not None and len(self.keys) >= self.pause_after:
                self.paused = True
                return False
            self.keys.append(entry.record.key)
            handoff.acknowledge(entry.end_offset)
        return True

    def status(self):
        return {"delivered": len(self.keys), "paused": "list: paused" if self.paused else None}

    def close(self):
        self.closed = True


def register(monkeypatch, *sinks, in_training_process=False):
    built = []

    def build(config, run_dir):
        one = sinks[len(built)]
        built.append((config.task_id, run_dir))
        return one

    monkeypatch.setattr(sink, "SINKS", [SinkEntry("list", in_training_process, build)])
    return built


def journal_keys(run_dir):
    with open(run_dir / "metrics.jsonl", "rb") as f:
        return [read_line(line)[0].key for line in f]


def sync(run_dir, server):
    return sync_command([str(run_dir)], task_id=TASK_ID, backend_url=server.base_url, secret_key_file=None,
                        timeout_s=60, env=clean_environ(ANYLEARN_SECRET_KEY=SECRET_KEY))


def test_a_second_sink_gets_every_record_once_with_its_own_cursor_and_no_host_changes(server, tmp_path, monkeypatch, capsys):
    run_dir = offline_run(tmp_path, 20)
    first, second = ListSink(), ListSink()
    built = register(monkeypatch, first, second)
    assert sync(run_dir, server) == 0
    assert built == [(TASK_ID, str(run_dir))]
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [float(i) for i in range(20)] and task["final_metric"] == 20.0
    assert first.keys == journal_keys(run_dir)  # every line, in order
    assert first.previous is None and first.closed
    end = (run_dir / "metrics.jsonl").stat().st_size
    assert load_cursor(str(run_dir)).offset == end and load_cursor(str(run_dir), "cursor.list").offset == end
    status = json.loads((run_dir / "status.json").read_text())
    assert status["delivered"] == 23 and status["sinks"]["list"] == {"delivered": 23, "paused": None, "cursor": end}
    posts = server.backend.stats()["posts"]
    assert sync(run_dir, server) == 0  # a second sync: nothing pending, nothing sent again
    assert server.backend.stats()["posts"] == posts and second.keys == []
    assert "nothing pending" in capsys.readouterr().out


def test_a_paused_sink_leaves_the_anylearn_lane_unaffected(server, tmp_path, monkeypatch):
    run_dir = offline_run(tmp_path, 20)
    pausing = ListSink(pause_after=5)
    register(monkeypatch, pausing)
    assert sync(run_dir, server) == 0  # AnyLearn delivered everything; the paused sink is not waited for
    (task,) = server.backend.tasks()
    assert task["intermediate_metrics"] == [float(i) for i in range(20)]
    assert pausing.paused and pausing.keys == journal_keys(run_dir)[:5]
    assert load_cursor(str(run_dir)).offset == (run_dir / "metrics.jsonl").stat().st_size
    with open(run_dir / "metrics.jsonl", "rb") as f:
        fifth_end = len(b"".join(f.readlines()[:5]))
    assert load_cursor(str(run_dir), "cursor.list").offset == fifth_end  # the rest stays pending for that sink
    status = json.loads((run_dir / "status.json").read_text())
    assert status["paused"] is None and status["sinks"]["list"]["paused"] == "list: paused"


def test_the_in_process_hook_leaves_an_out_of_process_sink_to_other_hosts(server, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    for name, value in (("ANYLEARN_BACKEND_URL", server.base_url), ("ANYLEARN_TASK_ID", TASK_ID),
                        ("ANYLEARN_SECRET_KEY", SECRET_KEY), ("ANYLEARN_REPORTER_RUN_DIR", str(run_dir))):
        monkeypatch.setenv(name, value)
    out_of_process = register(monkeypatch, ListSink())
    reporter.report_metric(0.5, step=1)
    assert reporter.flush(30)
    assert server.backend.tasks()[0]["intermediate_metrics"] == [0.5]
    assert out_of_process == []  # never built in the training process (its client never imported there)
    assert not (run_dir / "cursor.list").exists()


def test_a_sink_for_the_training_process_is_fed_by_the_in_process_hook(server, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    for name, value in (("ANYLEARN_BACKEND_URL", server.base_url), ("ANYLEARN_TASK_ID", TASK_ID),
                        ("ANYLEARN_SECRET_KEY", SECRET_KEY), ("ANYLEARN_REPORTER_RUN_DIR", str(run_dir))):
        monkeypatch.setenv(name, value)
    in_process = ListSink()
    register(monkeypatch, in_process, in_training_process=True)
    reporter.report_metric(0.5, step=1)
    reporter.report_metric(0.7, step=2)
    assert reporter.flush(30)  # flush waits for every running lane
    assert in_process.keys == journal_keys(run_dir)


def test_a_sink_that_cannot_be_built_is_said_and_left_off(server, tmp_path, monkeypatch, capsys):
    run_dir = offline_run(tmp_path, 3)

    def broken(config, run_dir):
        raise RuntimeError("secret-ish detail")

    monkeypatch.setattr(sink, "SINKS", [SinkEntry("broken", False, broken)])
    assert sync(run_dir, server) == 0
    err = capsys.readouterr().err
    assert "cannot set up the broken destination (RuntimeError)" in err and "secret-ish" not in err


class PointsWriter:
    """Stands in for Anyboard's IoTDB writer: keeps the points it is given."""

    def __init__(self):
        self.points = []
        self.closed = False

    def write(self, points, timeout_s=None):
        self.points.extend(points)

    def close(self):
        self.closed = True


def test_issue_18s_anyboard_sink_runs_in_a_lane_of_its_own(tmp_path):
    from fakes import FakeClient

    from reporter.anyboard.config import AnyboardConfig
    from reporter.anyboard.sink import AnyboardSink
    from reporter.config import Secret
    from reporter.deliver import Deliverer, DeliveryOptions
    from reporter.journal import JournalWriter

    writer = JournalWriter(str(tmp_path))
    for i in range(5):
        writer.append("intermediate", i / 10, None, i)  # unnamed: the objective, sent to AnyLearn too
    writer.close()
    config = AnyboardConfig(host="127.0.0.1", port=6667, user="root", password=Secret("root"), user_id="USER1",
                            project_id="PROJ1", task_id=TASK_ID)
    points = PointsWriter()
    options = DeliveryOptions(poll_interval_s=0.05, lock_poll_interval_s=0.05)
    deliverer = Deliverer(str(tmp_path), FakeClient(task_id=TASK_ID), options,
                          more_sinks=[AnyboardSink(config, writer=points)]).start()
    assert deliverer.flush(20)  # waits for both lanes
    deliverer.close(5)
    assert deliverer.client.values() == [i / 10 for i in range(5)] and len(points.points) == 5 and points.closed
    end = (tmp_path / "metrics.jsonl").stat().st_size
    assert load_cursor(str(tmp_path), "cursor.anyboard").offset == end
    section = json.loads((tmp_path / "status.json").read_text())["sinks"]["anyboard"]
    assert section["delivered"] == 5 and section["cursor"] == end
    again = AnyboardSink(config, writer=PointsWriter())  # the next deliverer carries Anyboard's count on
    Deliverer(str(tmp_path), FakeClient(task_id=TASK_ID), options, more_sinks=[again]).start().close(5)
    assert again.delivered == 5 and again.writer.points == []
