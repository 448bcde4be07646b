"""``anylearn-reporter ui``: the JSON the page polls (pure), the server over loopback, the CLI, and the page
in a real headless Chromium (every metric's chart drawn, tick labels clear of the axes, nothing injected)."""

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import clean_environ
from test_emulator_page import find_chromium, read_png

from reporter.journal import JournalWriter
from reporter.runmeta import write_objective
from reporter.ui import model
from reporter.ui.model import Catalog
from reporter.ui.server import UiServer

EVIL = "<img src=x onerror=alert(1)>"


def make_run(root, name, losses, *, attempts=1, failure=None, evil=False):
    run_dir = root / name
    writer = JournalWriter(str(run_dir))
    ts = 1_700_000_000.0
    for attempt in range(attempts):
        if attempt:  # as the wrapper marks it, by a process that has ended since
            size = os.path.getsize(run_dir / "metrics.jsonl")
            with open(run_dir / "attempts.jsonl", "a") as f:
                f.write(json.dumps({"attempt": 1, "offset": 0}) + "\n" + json.dumps({"attempt": 2, "offset": size}) + "\n")
        writer.append("state", 1, None, None, ts=ts)
        for step, loss in enumerate(losses):
            ts += 1
            writer.append("intermediate", loss, None, step, ts=ts)
            writer.append("intermediate", 1 - loss, "val_acc", step, ts=ts)
            if evil:
                writer.append("intermediate", loss * 2, EVIL, step, ts=ts)
        writer.append("final", min(losses), None, None, ts=ts)
        writer.append("state", -2 if failure else 2, None, None, ts=ts)
    writer.close()
    write_objective(str(run_dir), "val_loss", "min", "test")
    (run_dir / "params.json").write_text(json.dumps({"lr": 0.01, "opt": {"name": EVIL}}))
    with open(run_dir / "resources.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"ts": ts + i, "system": {"cpu_percent": 10.0 * i, "memory_used_bytes": 2 << 30},
                                "process": {"cpu_percent": 50.0, "rss_bytes": (1 << 30) + i},
                                "gpus": [{"index": 0, "utilization_percent": 70, "memory_used_bytes": 3 << 30}]}) + "\n")
        f.write("not json\n")
    if failure:
        (run_dir / "summary.json").write_text(json.dumps({
            "state": -2, "started": 1_700_000_000.0, "ended": ts, "attempt": attempts,
            "failure": {"reason": failure, "stderr_tail": ["Traceback", f"RuntimeError: {EVIL}"]}}))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "TRAIa", [0.9, 0.5, 0.3, 0.4], attempts=2)
    make_run(root, "TRAIb", [0.8, 0.6, 0.7], failure="the command exited with code 3", evil=True)
    return root


def test_runs_json_lists_each_run_with_state_objective_best_and_final(runs):
    data = Catalog([str(runs)]).runs_json()
    by_name = {r["name"]: r for r in data["runs"]}
    a, b = by_name["TRAIa"], by_name["TRAIb"]
    assert (a["state_name"], a["objective"], a["mode"], a["best"], a["final"], a["attempts"]) == ("success", "val_loss", "min", 0.3, 0.3, 2)
    assert (b["state_name"], b["best"], b["failure"]) == ("fail", 0.6, "the command exited with code 3")
    assert a["duration_s"] == 4.0  # its last attempt: first record (state 1) to last, 4 s later
    assert set(data["metrics"]) == {"val_loss", "val_acc", EVIL}


def test_run_json_has_a_chart_per_metric_with_attempts_apart_resources_params_and_failure(runs):
    catalog = Catalog([str(runs)])
    ids = {r["name"]: r["id"] for r in catalog.runs_json()["runs"]}
    a = catalog.run_json(ids["TRAIa"])
    assert [c["name"] for c in a["charts"]] == ["val_loss", "val_acc"]
    loss_svg = a["charts"][0]["svg"]
    assert 'data-series="2"' in loss_svg and 'data-label="#1"' in loss_svg and 'data-label="#2"' in loss_svg
    assert 'class="final"' in loss_svg and "final 0.3" in loss_svg
    assert [r["number"] for r in a["attempt_rows"]] == [1, 2]
    assert {r["name"] for r in a["resources"]} == {"CPU", "memory", "GPU utilisation", "GPU memory"}
    assert ("lr", "0.01") in [tuple(p) for p in a["params"]]
    b = catalog.run_json(ids["TRAIb"])
    assert b["failure"] == "the command exited with code 3" and b["stderr_tail"][-1].endswith(EVIL)
    assert catalog.run_json("../../etc/passwd") is None and catalog.run_json("") is None


def test_every_user_text_is_escaped_in_the_charts(runs):
    catalog = Catalog([str(runs)])
    ids = {r["name"]: r["id"] for r in catalog.runs_json()["runs"]}
    svgs = [c["svg"] for c in catalog.run_json(ids["TRAIb"])["charts"]] + [catalog.compare_json(EVIL)["svg"]]
    assert all("<img" not in svg for svg in svgs)
    assert any("&lt;img src=x onerror=alert(1)&gt;" in svg for svg in svgs)


def test_compare_overlays_one_metric_of_every_run(runs):
    data = Catalog([str(runs)]).compare_json("val_acc")
    assert data["runs"] == 2 and 'data-label="TRAIa"' in data["svg"] and 'data-label="TRAIb"' in data["svg"]


def test_a_growing_journal_is_read_incrementally_and_a_replaced_one_again(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    writer = JournalWriter(str(run_dir))
    for step in range(10):
        writer.append("intermediate", float(step), "x", step)
    monkeypatch.setattr(model, "RECORDS_PER_POLL", 4)  # a huge journal comes in over several polls
    catalog = Catalog([str(run_dir)])
    first = catalog.runs_json()["runs"][0]
    assert first["records"] == 4 and first["loading"] is False or first["records"] == 4
    for _ in range(3):
        catalog.runs_json()
    assert catalog.runs_json()["runs"][0]["records"] == 10
    view = next(iter(catalog.views.values()))
    offset = view.offset
    writer.append("intermediate", 99.0, "x", 10)
    assert catalog.runs_json()["runs"][0]["records"] == 11 and view.offset > offset
    writer.close()
    os.unlink(run_dir / "metrics.jsonl")  # replaced (log rotation): read from the start
    fresh = JournalWriter(str(run_dir))
    fresh.append("intermediate", 1.0, "y", 0)
    fresh.close()
    data = catalog.runs_json()
    assert data["runs"][0]["records"] == 1 and data["metrics"] == ["y"]


def test_series_keep_a_bounded_number_of_points():
    points = model.Points(limit=100)
    for i in range(10_000):
        points.add(i, float(i))
    assert len(points.points) <= 101 and points.drawn()[-1] == (9999, 9999.0)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_server_answers_the_page_and_the_endpoints_over_loopback(runs):
    server = UiServer(Catalog([str(runs)]), port=0).start()
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        status, headers, body = _get(server.url)
        page = body.decode()
        assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
        assert "<img src=x" not in page and "<link" not in page and "<script src" not in page
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", page)  # nothing from elsewhere (the SVG namespace is a name)
        nonce = re.search(r'<script nonce="([^"]+)"', page).group(1)
        assert f"'nonce-{nonce}'" in headers["Content-Security-Policy"]
        status, _, body = _get(server.url + "api/runs")
        ids = [r["id"] for r in json.loads(body)["runs"]]
        assert status == 200 and len(ids) == 2
        assert _get(server.url + f"api/run?id={ids[0]}")[0] == 200
        assert _get(server.url + "api/run?id=..%2F..%2Fetc")[0] == 404
        assert _get(server.url + "api/compare?metric=val_acc")[0] == 200
        assert _get(server.url + "nothing")[0] == 404
    finally:
        server.stop()


def test_the_cli_serves_the_reporter_directory_and_refuses_a_missing_one(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "reporter", "ui", str(tmp_path / "nope")], env=clean_environ(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no directory" in done.stderr and "ANYLEARN_REPORTER_DIR" in done.stderr
    proc = subprocess.Popen([sys.executable, "-m", "reporter", "ui", "--port", "0"],
                            env=clean_environ(ANYLEARN_REPORTER_DIR=str(runs)), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert len(json.loads(_get(url + "api/runs")[2])["runs"]) == 2
        assert _get_as(url + "api/runs", "evil.example:" + url.rsplit(":", 1)[1].strip("/")) == 403
    finally:
        proc.terminate()
        proc.wait(10)


def _chromium(args, tmp_path, url):
    return subprocess.run(
        [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", *args, url],
        capture_output=True, text=True, timeout=150,
    )


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.timeout(240)
def test_the_page_in_headless_chromium_draws_every_chart_with_clear_labels(runs, tmp_path):
    server = UiServer(Catalog([str(runs)]), port=0).start()
    try:
        catalog = server.catalog
        ids = {r["name"]: r["id"] for r in catalog.runs_json()["runs"]}
        url = f"{server.url}?run={ids['TRAIb']}"
        dom = _chromium(["--dump-dom", "--virtual-time-budget=3000"], tmp_path, url).stdout
        body = re.search(r"<body[^>]*>", dom).group(0)
        assert 'data-labels-ok="true"' in body
        metrics = re.findall(r'data-metric="([^"]*)"', dom)
        assert {"val_loss", "val_acc", "&lt;img src=x onerror=alert(1)&gt;"} <= set(metrics)
        charts = int(re.search(r'data-charts="(\d+)"', body).group(1))
        assert charts == 3 + 4 + 1  # three metrics, four resource charts, the comparison
        assert "<img src" not in dom and "the command exited with code 3" in dom and "RuntimeError: &lt;img" in dom
        shot = tmp_path / "ui.png"
        _chromium([f"--screenshot={shot}", "--window-size=1280,1800"], tmp_path, url)
        assert shot.exists()
        pixels = [p for row in read_png(shot) for p in row]
        blue = sum(1 for r, g, b in pixels if abs(r - 0x25) < 40 and abs(g - 0x63) < 40 and abs(b - 0xEB) < 40)
        red = sum(1 for r, g, b in pixels if abs(r - 0xDC) < 40 and abs(g - 0x26) < 40 and abs(b - 0x26) < 40)
        assert blue > 1000, "the series are not drawn"
        assert red > 100, "the final metric or the failure is not marked"
    finally:
        server.stop()


def _journal(run_dir, records):
    writer = JournalWriter(str(run_dir))
    for i, (name, value, step) in enumerate(records):
        writer.append("intermediate", value, name, step, ts=1_700_000_000.0 + i)
    writer.close()


def test_best_and_last_of_a_named_objective_follow_the_send_rule(tmp_path):
    # ANYLEARN_OBJECTIVE_METRIC=loss with report_metrics({"loss": ...}): named records are the objective
    _journal(tmp_path / "runs" / "named", [("loss", 0.9, 0), ("acc", 0.1, 0), ("loss", 0.2, 1), ("loss", 0.5, 2)])
    write_objective(str(tmp_path / "runs" / "named"), "loss", "min", "ANYLEARN_OBJECTIVE_MODE")
    # the README's report_metrics({"metric": ...}): no objective.json, the default name is the objective
    _journal(tmp_path / "runs" / "default", [("metric", 0.3, 0), ("metric", 0.8, 1), ("metric", 0.6, 2)])
    # a tracker's objective (unnamed) beside a named repeat of it, both of the objective's series
    _journal(tmp_path / "runs" / "mixed", [(None, 0.7, 0), ("val_loss", 0.4, 1), (None, 0.6, 2)])
    write_objective(str(tmp_path / "runs" / "mixed"), "val_loss", "min", "mlflow")
    catalog = Catalog([str(tmp_path / "runs")])
    rows = {r["name"]: r for r in catalog.runs_json()["runs"]}
    assert (rows["named"]["objective"], rows["named"]["best"], rows["named"]["last"]) == ("loss", 0.2, 0.5)
    assert (rows["default"]["objective"], rows["default"]["best"], rows["default"]["last"]) == ("metric", 0.8, 0.6)
    assert (rows["mixed"]["best"], rows["mixed"]["last"], rows["mixed"]["metrics"]) == (0.4, 0.6, ["val_loss"])
    assert [a["best"] for a in catalog.run_json(rows["named"]["id"])["attempt_rows"]] == [0.2]
    [(_, points)] = catalog.views[str(tmp_path / "runs" / "mixed")].metric_series("val_loss")
    assert points.drawn() == [(0.0, 0.7), (1.0, 0.4), (2.0, 0.6)]
    # a run without objective.json under a ui started with ANYLEARN_OBJECTIVE_METRIC=loss
    _journal(tmp_path / "bare" / "run", [("loss", 0.9, 0), ("loss", 0.4, 1)])
    [row] = Catalog([str(tmp_path / "bare")], "min", "loss").runs_json()["runs"]
    assert (row["objective"], row["best"], row["last"]) == ("loss", 0.4, 0.4)


def _get_as(url, host):
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_server_answers_only_requests_naming_the_loopback_host(runs):
    # DNS rebinding: another site's name resolved to 127.0.0.1 must not read the runs
    server = UiServer(Catalog([str(runs)]), port=0).start()
    try:
        port = server.port
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}"):
            assert _get_as(server.url + "api/runs", host) == 403, host
            assert _get_as(server.url, host) == 403, host
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}"):
            assert _get_as(server.url + "api/runs", host) == 200, host
    finally:
        server.stop()


def test_the_compare_legend_shows_the_selected_run_first_names_apart_and_clear_of_the_title(tmp_path):
    from reporter.charts import CHAR_W

    names = [f"offline-20261205-2333{10 + i}-{i:06x}" for i in range(7)]
    for i, name in enumerate(names):
        _journal(tmp_path / name, [(None, 1.0 / (s + 1 + i), s) for s in range(5)])
    catalog = Catalog([str(tmp_path)])
    ids = {r["name"]: r["id"] for r in catalog.runs_json()["runs"]}
    picked = names[3]
    svg = catalog.compare_json("metric", ids[picked])["svg"]
    legend = svg[svg.index('<g class="legend">'):]
    texts = re.findall(r'<text x="([\d.]+)"[^>]*>([^<]+)</text>', legend)
    shown = [t for _, t in texts if not t.startswith("+")]
    assert shown[0].endswith(picked[-13:])  # the selected run's own line is in the legend, first (blue)
    assert len(set(shown)) == len(shown) and all(len(t) <= 22 for t in shown)  # told apart, not 7 alike prefixes
    assert re.search(r'>\+\d+ more</text>', legend)
    title = re.search(r'class="chart-title" x="(\d+)"[^>]*>([^<]+)<', svg)
    title_end = float(title.group(1)) + len(title.group(2)) * 7.6  # 13 px bold: at most 7.6 px a character
    lefts = [float(x) - 16 for x, t in texts if not t.startswith("+")]
    more = re.search(r'x="([\d.]+)"[^>]*text-anchor="end"[^>]*>(\+\d+ more)<', legend)
    lefts.append(float(more.group(1)) - len(more.group(2)) * CHAR_W)
    assert min(lefts) > title_end  # nothing of the legend is drawn over the title


def test_a_real_hook_run_with_a_named_objective_shows_its_best_last_and_final(tmp_path):
    from conftest import run_python

    code = ("import reporter\n"
            "for step, v in enumerate([0.9, 0.3, 0.5]):\n"
            "    reporter.report_metrics({'loss': v, 'acc': 1 - v}, step=step)\n"
            "reporter.report_metric(0.3, final=True)\n")
    env = clean_environ(ANYLEARN_OBJECTIVE_METRIC="loss", ANYLEARN_OBJECTIVE_MODE="min",
                        ANYLEARN_REPORTER_RUN_DIR=str(tmp_path / "runs" / "run"))
    done = run_python(code, env)
    assert done.returncode == 0, done.stderr
    [row] = Catalog([str(tmp_path / "runs")]).runs_json()["runs"]
    assert (row["objective"], row["mode"], row["best"], row["last"], row["final"]) == ("loss", "min", 0.3, 0.5, 0.3)
