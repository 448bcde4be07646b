"""A sink's ledger: counts by category and reason (the first time said), and its own account."""

from reporter.delivery_ledger import SKIPPED, DeliveryLedger, Ledger


def test_record_lost_counts_by_category_and_is_true_only_the_first_time_for_a_reason():
    ledger = Ledger()
    assert ledger.record_lost("ENOSPC") is True
    assert ledger.record_lost("ENOSPC", 2) is False
    assert ledger.record_lost("torn", category="invalid") is True
    assert ledger.snapshot() == {"lost": {"ENOSPC": 3}, "invalid": {"torn": 1}}
    ledger.category("empty")
    assert "empty" not in ledger.snapshot()


def test_a_delivery_ledger_carries_counts_on_and_keeps_what_this_process_did_apart():
    ledger = DeliveryLedger()
    ledger.carry_on({"delivered": 5, "skipped": {"another rank": 2, "bad": -1, "odd": "x"}})
    assert (ledger.delivered, ledger.skipped) == (5, {"another rank": 2})
    ledger.record_delivered()
    assert ledger.record_skipped("another rank") is False and ledger.record_lost("nan", category=SKIPPED) is True
    assert (ledger.delivered, ledger.delivered_now) == (6, 1) and ledger.last_delivery_ts is not None
    assert ledger.skipped == {"another rank": 3, "nan": 1} and ledger.skipped_now == {"another rank": 1, "nan": 1}


def test_failing_is_said_once_per_run_of_failures_and_a_pause_keeps_its_error():
    ledger = DeliveryLedger()
    assert ledger.resumed() is None
    assert ledger.failing() is True and ledger.failing() is False
    assert ledger.resumed() is not None and ledger.failing_since is None
    assert ledger.failing() is True
    ledger.pause("auth: HTTP 401", "HTTP 401: no")
    assert (ledger.paused_reason, ledger.last_error) == ("auth: HTTP 401", "HTTP 401: no") and ledger.last_error_ts
