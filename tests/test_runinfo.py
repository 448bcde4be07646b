"""runinfo: what a run directory holds, read without ever failing (the reader behind show, status and summary.json)."""

import json
import os
import time

from fakes import FakeClient

from reporter.deliver import Deliverer, DeliveryOptions
from reporter.journal import COUNTER_LOST, HostCounters, JournalWriter
from reporter.policy import SendRule
from reporter.runinfo import find_runs, read_run


def journal_lines(run_dir, *lines):
    with open(os.path.join(run_dir, "metrics.jsonl"), "ab") as f:
        for line in lines:
            f.write(line + b"\n")


def test_a_delivered_run_counts_journalled_delivered_and_pending_and_reads_its_metrics(tmp_path):
    run_dir = str(tmp_path / "TRAIdelivered")
    writer = JournalWriter(run_dir)
    writer.append("state", 1, None, None)
    for step, value in enumerate([0.25, 0.5, 0.75]):
        writer.append("intermediate", value, None, step)
    writer.append("final", 0.75, None, None)
    writer.append("state", 2, None, None)
    deliverer = Deliverer(run_dir, FakeClient(task_id="TRAIdelivered"), DeliveryOptions(poll_interval_s=0.02)).start()
    assert deliverer.flush(10)
    deliverer.close(5)
    writer.append("intermediate", 0.9, None, 3)  # journalled after the deliverer stopped: pending
    writer.close()

    info = read_run(run_dir)
    assert (info.journalled, info.delivered, info.pending) == (7, 6, 1)
    assert info.metrics == [0.25, 0.5, 0.75, 0.9] and info.final_metric == 0.75
    assert info.state == 2 and info.state_name == "success"
    assert info.task_id == "TRAIdelivered" and info.problems == []

    probe = read_run(run_dir, with_metrics=False)  # the status probe: counts lines, reads the last state
    assert (probe.journalled, probe.pending, probe.state) == (7, 1, 2) and probe.metrics == []


def test_invalid_lines_and_lost_records_are_counted_and_named_as_problems(tmp_path):
    run_dir = str(tmp_path / "run")
    JournalWriter(run_dir).append("intermediate", 0.5, None, 1)
    journal_lines(run_dir, b'{"kind": "intermediate", "value": "0.2x", "ts": 1.0}', b"[1, 2, 3]")
    JournalWriter(run_dir).append("intermediate", 0.6, None, 2)
    counters = HostCounters(run_dir)
    counters.record_lost("disk full", 3, category=COUNTER_LOST)
    counters.save()

    info = read_run(run_dir)
    assert info.metrics == [0.5, 0.6]
    assert sum(info.invalid.values()) + info.torn_lines == 2
    assert info.lost == {"disk full": 3}
    problems = " | ".join(info.problems)
    assert "invalid" in problems or "torn" in problems
    assert "could not be journalled" in problems


def test_the_rule_decides_the_metrics_as_it_decides_what_is_sent(tmp_path):
    run_dir = str(tmp_path / "run")
    JournalWriter(run_dir, rank=0).append("intermediate", 0.1, "acc", 1)
    JournalWriter(run_dir, rank=0).append("intermediate", 9.0, "loss", 1)  # not the objective: journalled only
    JournalWriter(run_dir, rank=1).append("intermediate", 0.2, "acc", 1)  # another rank
    assert read_run(run_dir, SendRule("acc")).metrics == [0.1]
    assert read_run(run_dir, SendRule("acc", report_all_ranks=True)).metrics == [0.1, 0.2]


def test_a_summary_gives_the_ending_and_a_broken_one_is_a_problem_not_an_error(tmp_path):
    run_dir = tmp_path / "run"
    JournalWriter(str(run_dir)).append("intermediate", 0.5, None, 1)
    (run_dir / "summary.json").write_text(json.dumps({"state": -2, "exit_code": 3, "started": 10.0, "ended": 12.5}))
    info = read_run(str(run_dir))
    assert (info.state_name, info.exit_code, info.duration_s) == ("fail", 3, 2.5)

    (run_dir / "summary.json").write_text("{not json")
    (run_dir / "status.json").write_text('{"delivered": "many"}')
    info = read_run(str(run_dir))
    assert info.exit_code is None and info.delivered == 0
    assert any("summary.json" in p for p in info.problems)


def test_a_missing_or_odd_directory_reads_as_problems(tmp_path):
    assert read_run(str(tmp_path / "nowhere")).problems == ["not a directory"]
    (tmp_path / "empty").mkdir()
    assert read_run(str(tmp_path / "empty")).problems == ["no metrics.jsonl"]


def test_find_runs_lists_run_directories_newest_first_and_nothing_else(tmp_path):
    for name, age_s in (("old", 100), ("new", 0)):
        JournalWriter(str(tmp_path / name)).append("intermediate", 0.5, None, 1)
        stamp = time.time() - age_s
        os.utime(tmp_path / name / "metrics.jsonl", (stamp, stamp))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "a-file").write_text("x")
    assert [os.path.basename(p) for p in find_runs(str(tmp_path))] == ["new", "old"]
    assert find_runs(str(tmp_path / "missing")) == []
