"""``status.json``: one dataclass as its schema, written by the engine and read back field by field."""

import json

import pytest

from reporter.runstatus import DeliveryStatus, read_status, write_status


def test_a_status_round_trips_through_status_json(tmp_path):
    status = DeliveryStatus(task_id="TRAIx", deliverer_pid=42, cursor=120, delivered=3, skipped={"not a finite number": 1},
                            counters={"lost": {"ENOSPC": 2}}, paused="auth: HTTP 401", last_delivery_ts=1.7e9, running=True,
                            sinks={"anyboard": {"delivered": 7, "paused": None, "cursor": 120}})
    write_status(str(tmp_path), status)
    assert read_status(str(tmp_path)) == (status, None)
    assert set(json.loads((tmp_path / "status.json").read_text())) == set(DeliveryStatus().to_json())


@pytest.mark.parametrize("field, bad", [
    ("delivered", "abc"), ("delivered", -1), ("delivered", True), ("cursor", 1.5), ("task_id", 7),
    ("skipped", ["x"]), ("last_delivery_ts", "yesterday"), ("failing_since", 1e300), ("running", "yes"),
    ("deliverer_pid", 0), ("counters", {"lost": "many"}), ("sinks", ["anyboard"]), ("sinks", "anyboard"),
])
def test_a_field_of_the_wrong_type_keeps_its_default_and_the_rest_reads(tmp_path, field, bad):
    (tmp_path / "status.json").write_text(json.dumps({"task_id": "TRAIx", "delivered": 5, "cursor": 9, field: bad}))
    status, problem = read_status(str(tmp_path))
    assert problem is None
    expected = {"task_id": "TRAIx", "delivered": 5, "cursor": 9}
    expected[field] = getattr(DeliveryStatus(), field)
    assert {k: getattr(status, k) for k in expected} == expected


def test_a_missing_or_broken_file_is_told_apart(tmp_path):
    assert read_status(str(tmp_path)) == (None, None)
    (tmp_path / "status.json").write_text("{broken")
    assert read_status(str(tmp_path)) == (None, "status.json is not valid JSON")
    (tmp_path / "status.json").write_text("[1]")
    assert read_status(str(tmp_path)) == (None, "status.json is not a JSON object")


def test_another_sinks_section_is_read_only_when_it_is_an_object(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"sinks": {"anyboard": {"delivered": 2}, "list": 3, "7": []}}))
    status, _ = read_status(str(tmp_path))
    assert status.sinks == {"anyboard": {"delivered": 2}}
