"""Which records are sent: one rule (``policy.skip_reason``) for the deliverer and for what ``show`` and
``summary.json`` report, so the numbers shown are the numbers sent."""

import json

import pytest
from conftest import clean_environ, cli
from fakes import FakeClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reporter.deliver import Deliverer, DeliveryOptions
from reporter.journal import JournalWriter
from reporter.policy import SendRule, skip_reason
from reporter.record import Record
from reporter.runinfo import read_run

RULE = SendRule(objective_metric="acc")


@pytest.mark.parametrize("record, rule, reason", [
    (Record("intermediate", 0.5), RULE, None),
    (Record("intermediate", 0.5, name="acc"), RULE, None),
    (Record("final", 0.5, name="loss"), RULE, "not the objective metric"),
    (Record("intermediate", None), RULE, "not a finite number"),
    (Record("intermediate", 0.5, rank=2), RULE, "from a rank other than 0"),
    (Record("intermediate", 0.5, rank=2), SendRule("acc", report_all_ranks=True), None),
    (Record("state", 1, rank=2), SendRule("acc", report_all_ranks=True), "from a rank other than 0"),
    (Record("state", 1), RULE, None),
])
def test_skip_reason_says_why_a_record_is_not_sent(record, rule, reason):
    assert skip_reason(record, rule) == reason


def test_state_records_are_skipped_once_the_backend_has_no_state_endpoint():
    assert skip_reason(Record("state", 2), RULE, state_reporting=False) == "state reporting is off"


RECORDS = st.lists(st.tuples(
    st.sampled_from(["intermediate", "final"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5).map(float)),
    st.sampled_from([None, "acc", "loss"]),
    st.integers(0, 3),
), max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=RECORDS, all_ranks=st.booleans())
def test_show_reports_exactly_the_metrics_the_deliverer_sent(tmp_path_factory, records, all_ranks):
    run_dir = tmp_path_factory.mktemp("agree")
    for kind, value, name, rank in records:
        JournalWriter(str(run_dir), rank=rank).append(kind, value, name, None)
    rule = SendRule("acc", report_all_ranks=all_ranks)
    client = FakeClient()
    deliverer = Deliverer(str(run_dir), client, DeliveryOptions(rule=rule, poll_interval_s=0.02)).start()
    assert deliverer.flush(10)
    deliverer.close(5)
    info = read_run(str(run_dir), rule)
    assert info.metrics == [r.value for r in client.sent if r.kind == "intermediate"]
    finals = [r.value for r in client.sent if r.kind == "final"]
    assert info.final_metric == (finals[-1] if finals else None)


def test_show_counts_other_ranks_metrics_under_report_ranks_all(tmp_path):
    run_dir = tmp_path / "runs" / "TRAIranks"
    JournalWriter(str(run_dir), rank=0).append("intermediate", 0.25, None, 1)
    JournalWriter(str(run_dir), rank=3).append("intermediate", 0.75, None, 1)
    JournalWriter(str(run_dir), rank=3).append("final", 0.9, None, None)
    shown = {
        ranks: json.loads(cli("show", "--json", str(run_dir), env=clean_environ(ANYLEARN_REPORT_RANKS=ranks)).stdout)[0]
        for ranks in ("0", "all")
    }
    assert (shown["0"]["metrics"], shown["0"]["final_metric"]) == ([0.25], None)
    assert (shown["all"]["metrics"], shown["all"]["final_metric"]) == ([0.25, 0.75], 0.9)
