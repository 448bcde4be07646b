"""The local backend emulator: the contract's answers, auth, idempotency, faults, persistence."""

import re

import pytest
import requests
from conftest import SECRET_KEY, TASK_ID, clean_environ, cli

from reporter.devserver import Faults, make_server

AUTH = {"Secret-Key": SECRET_KEY}


def post(server, endpoint, form, headers=AUTH):
    return requests.post(f"{server.base_url}/train_task/{endpoint}", data=form, headers=headers, timeout=10)


def test_answer_shapes_follow_the_contract(server):
    assert post(server, "intermediate_metric", {"id": TASK_ID, "metric": "90.0"}).json()["msg"]
    assert post(server, "final_metric", {"id": TASK_ID, "metric": "662.8"}).json()["msg"]
    listed = requests.get(
        f"{server.base_url}/train_task/intermediate_metric",
        params={"id": TASK_ID, "last_timestamp": "1970-01-01 00:00:00"}, headers=AUTH, timeout=10,
    ).json()
    (item,) = listed
    assert set(item) == {"id", "metric", "train_task_id", "reported_at"}
    assert re.fullmatch(r"METR[a-z0-9]{28}", item["id"]) and item["metric"] == 90.0 and item["train_task_id"] == TASK_ID
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", item["reported_at"])
    later = requests.get(
        f"{server.base_url}/train_task/intermediate_metric",
        params={"id": TASK_ID, "last_timestamp": "2999-01-01 00:00:00"}, headers=AUTH, timeout=10,
    ).json()
    assert later == []
    final = requests.get(f"{server.base_url}/train_task/final_metric", params={"id": TASK_ID}, headers=AUTH, timeout=10).json()
    assert final["final_metric"] == 662.8 and final["id"] == TASK_ID and "name" in final


def test_state_is_recorded_and_validated(server):
    assert post(server, "state", {"id": TASK_ID, "state": "1"}).status_code == 200
    assert post(server, "state", {"id": TASK_ID, "state": "9"}).status_code == 400
    assert server.backend.tasks()[0]["state"] == 1


@pytest.mark.parametrize("headers, task", [({}, TASK_ID), ({"Secret-Key": "wrong"}, TASK_ID), (AUTH, "TRAIunknown")])
def test_wrong_or_missing_key_and_unknown_task_get_401(server, headers, task):
    assert post(server, "intermediate_metric", {"id": task, "metric": "1"}, headers).status_code == 401
    assert requests.get(f"{server.base_url}/train_task/final_metric", params={"id": task}, headers=headers, timeout=10).status_code == 401


def test_bad_metric_is_a_400(server):
    assert post(server, "intermediate_metric", {"id": TASK_ID, "metric": "abc"}).status_code == 400
    assert post(server, "intermediate_metric", {"metric": "1"}).status_code == 400


def test_idempotency_key_deduplicates(server):
    headers = {**AUTH, "Idempotency-Key": "same-key"}
    first = post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}, headers)
    second = post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}, headers)
    assert first.json() == second.json()
    assert server.backend.tasks()[0]["intermediate_metrics"] == [1.0]
    assert server.backend.stats()["duplicates"] == 1


def test_fault_injection_fail_first_then_retry_after():
    with make_server({TASK_ID: SECRET_KEY}, faults=Faults(fail_first=2, retry_after_s=3)) as server:
        answers = [post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}) for _ in range(3)]
        assert [a.status_code for a in answers] == [429, 429, 200]
        assert answers[0].headers["Retry-After"] == "3"


def test_fault_injection_fail_rate_is_seeded():
    with make_server({TASK_ID: SECRET_KEY}, faults=Faults(fail_rate=0.5, seed=1)) as server:
        codes = [post(server, "intermediate_metric", {"id": TASK_ID, "metric": "1"}).status_code for _ in range(40)]
    assert 5 < codes.count(503) < 35 and codes.count(200) + codes.count(503) == 40


def test_database_file_persists_across_restarts(tmp_path):
    db = str(tmp_path / "backend.sqlite3")
    with make_server({TASK_ID: SECRET_KEY}, db_path=db) as server:
        post(server, "intermediate_metric", {"id": TASK_ID, "metric": "4"})
    with make_server({}, db_path=db) as server:
        assert server.backend.tasks()[0]["intermediate_metrics"] == [4.0]


def test_serve_task_without_a_key_anywhere_is_a_usage_error():
    done = cli("serve", "--port", "0", "--task", TASK_ID, env=clean_environ())
    assert done.returncode == 2 and "ANYLEARN_SECRET_KEY" in done.stderr
