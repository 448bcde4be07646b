"""The local Anyboard (serve --anyboard-port): the real IoTDB client's Session and the SDK's own IotdbWriter
write into it, and the released SDK's CloudReader reads the curves back from serve's HTTP port."""

import json
import re

import pytest
import requests

pytest.importorskip("iotdb.thrift.rpc.IClientRPCService", reason="the anyboard extra (apache-iotdb) is not installed")

from reporter.anyboard import anyboard_config, to_points  # noqa: E402
from reporter.anyboard.writer import AnyboardWriter  # noqa: E402
from reporter.emulator.anyboard import AnyboardStore  # noqa: E402
from reporter.emulator.anyboard_iotdb import IoTDBServer  # noqa: E402
from reporter.emulator.server import make_server  # noqa: E402
from reporter.reader import JournalEntry  # noqa: E402
from reporter.record import KIND_INTERMEDIATE, Record  # noqa: E402

TOKEN = "reader-token"
DEVICE = "root.USER1.PROJ1.TRAI1.scalar"
MEASUREMENTS = ["walltime", "step", "single_value"]
INT64, DOUBLE = 2, 4


@pytest.fixture
def anyboard():
    store = AnyboardStore()
    iotdb = IoTDBServer(store).start()
    http = make_server({}, token=TOKEN, anyboard=store).start()
    yield iotdb, http
    http.stop()
    iotdb.stop()
    store.close()


def _scalars(http, *names, token=TOKEN):
    queries = json.dumps([{"taskId": "TRAI1", "metricName": n, "offset": 0, "limit": 1000} for n in names])
    answer = requests.get(f"{http.base_url}/anyboard/PROJ1/metric/scalars", params={"scalar_metric_query_list": queries},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
    return answer


def test_the_real_session_inserts_records_and_tablets_aligned_or_not(anyboard):
    from iotdb.Session import Session
    from iotdb.utils.Tablet import Tablet

    iotdb, http = anyboard
    session = Session("127.0.0.1", iotdb.port, "root", "root", zone_id="UTC+8")
    session.open(False)
    session.insert_records([f"{DEVICE}.`acc`"] * 2, [10, 20], [MEASUREMENTS] * 2, [[INT64, INT64, DOUBLE]] * 2,
                           [[1000, 1, 0.5], [2000, 2, 0.75]])
    session.insert_tablet(Tablet(f"{DEVICE}.`lr`", MEASUREMENTS, [INT64, INT64, DOUBLE], [[1, 1, 0.1], [2, 2, 0.01]], [5, 6]))
    session.insert_aligned_tablet(Tablet(f"{DEVICE}.`lr2`", MEASUREMENTS, [INT64, INT64, DOUBLE], [[3, 3, 0.3]], [7]))
    session.insert_records([f"{DEVICE}.`acc`"], [20], [MEASUREMENTS], [[INT64, INT64, DOUBLE]], [[2000, 2, 0.8]])  # same time: overwrite
    session.close()
    body = _scalars(http, "acc", "lr", "lr2").json()["scalarMetricList"]
    assert [m["metricName"] for m in body] == ["acc", "lr", "lr2"]
    assert body[0]["scalarRecordList"] == [{"step": 1, "walltime": 1000, "value": 0.5}, {"step": 2, "walltime": 2000, "value": 0.8}]
    assert body[1]["scalarRecordList"][1] == {"step": 2, "walltime": 2, "value": 0.01}
    assert body[2]["scalarRecordList"] == [{"step": 3, "walltime": 3, "value": 0.3}]


def test_a_wrong_login_is_refused_to_the_real_session(anyboard):
    from iotdb.Session import Session

    session = Session("127.0.0.1", anyboard[0].port, "root", "not-root")
    with pytest.raises(Exception, match="801"):
        session.open(False)


def test_the_read_api_wants_a_bearer_token(anyboard):
    assert _scalars(anyboard[1], "acc", token="wrong").status_code == 401
    answer = requests.get(f"{anyboard[1].base_url}/anyboard/PROJ1/metric/scalars", params={"scalar_metric_query_list": "{"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert answer.status_code == 400 and "scalar_metric_query_list" in answer.json()["msg"]


def test_the_page_charts_every_series_of_a_task(anyboard):
    iotdb, http = anyboard
    iotdb.store.insert([(f"{DEVICE}.`loss`", t, {"walltime": t, "step": t, "single_value": 1.0 / t}) for t in range(1, 30)]
                       + [(f"{DEVICE}.`lr`", 1, {"walltime": 1, "step": 1, "single_value": 0.1})])
    url = f"http://{http.host}:{http.port}/anyboard"
    assert requests.get(url, timeout=10).status_code == 401  # serve has a token: its pages need it, as "/" does
    page = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    assert page.count("<svg") == 2 and "loss (29 points)" in page and "TRAI1" in page


@pytest.fixture(scope="module")
def sdk():
    return pytest.importorskip("anylearn.anyboard.reader.cloud_reader", reason="the AnyLearn SDK (anylearn==0.20.7) is not importable")


def test_the_sdks_own_iotdb_writer_lands_through_its_sql(anyboard, sdk, monkeypatch):
    from anylearn.anyboard.writer.summary import ScalarValue, Summary
    from anylearn.anyboard.writer.writers.iotdb_writer import IotdbWriter

    iotdb, http = anyboard
    env = {"ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_PORT": str(iotdb.port),
           "ANYLEARN_ANYBOARD_IOTDB_USER": "root", "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "root",
           "ANYLEARN_USER_ID": "USER1", "ANYLEARN_PROJECT_ID": "PROJ1", "ANYLEARN_TASK_ID": "TRAI1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    writer = IotdbWriter()
    writer.start()
    for step in range(3):
        writer.add(Summary("sdk_loss", ScalarValue(1.5 - step), step, 1_700_000_000_000 + step))
    writer.end()
    records = _scalars(http, "sdk_loss").json()["scalarMetricList"][0]["scalarRecordList"]
    # its inserts carry no time: IoTDB stamps each with its clock in ms, so points of one millisecond overwrite
    # each other (as on a real IoTDB), which is why ours carry their own time
    assert iotdb.handler.sql_inserts == 3 and 1 <= len(records) <= 3 and records[-1]["value"] == -0.5


def test_the_released_sdks_reader_reads_our_curves_back_from_serve(serve_process, sdk):
    from anylearn.anyboard.reader.metric import MetricQuery, MetricType

    srv = serve_process("--anyboard-port", "0", "--token", TOKEN)
    line = srv.proc.stdout.readline()
    port = int(re.search(r"IoTDB at [\d.]+:(\d+)", line).group(1))
    env = {"ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_PORT": str(port),
           "ANYLEARN_ANYBOARD_IOTDB_USER": "root", "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "root",
           "ANYLEARN_USER_ID": "USER1", "ANYLEARN_PROJECT_ID": "PROJ1", "ANYLEARN_TASK_ID": "TRAI1"}
    entries = [JournalEntry(80 * (i + 1), Record(KIND_INTERMEDIATE, 2.0 / (i + 1), name, i, 1.7e9 + i))
               for i in range(40) for name in ("train/loss", "lr")]
    points, _ = to_points(entries, anyboard_config(env).device_prefix)
    writer = AnyboardWriter(anyboard_config(env))
    writer.write(points)
    writer.close()
    reader = sdk.CloudReader(cluster_address=srv.root, token=TOKEN)
    meta = {(m.task_id, m.name): m.count for m in reader.get_metric_meta("PROJ1")}
    assert meta == {("TRAI1", "train/loss"): 40, ("TRAI1", "lr"): 40}
    (loss,) = reader.get_metric(MetricType.SCALAR, "PROJ1", [MetricQuery("TRAI1", "train/loss", 0, 100)])
    assert [r.step for r in loss.record_list] == list(range(40))
    assert loss.get_min() == 2.0 / 40 and loss.get_last() == 2.0 / 40 and loss.meta.count == 40
    assert loss.record_list[0].walltime == 1_700_000_000_000


def test_serve_takes_the_local_anyboards_login_from_the_containers_variable(serve_process):
    from reporter.anyboard.writer import AnyboardLoginRefused

    srv = serve_process("--anyboard-port", "0", env={"ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "from-the-env"})
    port = re.search(r"IoTDB at [\d.]+:(\d+)", srv.proc.stdout.readline()).group(1)
    env = {"ANYLEARN_ANYBOARD_IOTDB_HOST": "127.0.0.1", "ANYLEARN_ANYBOARD_IOTDB_PORT": port,
           "ANYLEARN_ANYBOARD_IOTDB_USER": "root", "ANYLEARN_USER_ID": "U", "ANYLEARN_PROJECT_ID": "P",
           "ANYLEARN_TASK_ID": "T"}
    (point,) = to_points([JournalEntry(10, Record(KIND_INTERMEDIATE, 1.0, "x", 1, 1.7e9))], "root.U.P.T")[0]
    with pytest.raises(AnyboardLoginRefused):
        AnyboardWriter(anyboard_config({**env, "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "root"})).write([point])
    writer = AnyboardWriter(anyboard_config({**env, "ANYLEARN_ANYBOARD_IOTDB_PASSWORD": "from-the-env"}))
    writer.write([point])
    writer.close()


def test_serve_without_the_extra_says_the_pip_line_and_exits_2(tmp_path):
    from conftest import cli, clean_environ

    blocker = tmp_path / "block" / "iotdb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    import os

    env = clean_environ(PYTHONPATH=f"{tmp_path / 'block'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = cli("serve", "--port", "0", "--anyboard-port", "0", env=env, timeout_s=60)
    assert done.returncode == 2
    assert "pip install 'anylearn-reporter[anyboard]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
