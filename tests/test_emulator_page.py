"""The local backend's page: tasks, states and an SVG chart, seen by a real browser where one is installed."""

import os
import re
import struct
import subprocess
import zlib

import pytest
import requests
from conftest import SECRET_KEY, TASK_ID


def post(server, endpoint, metric):
    return requests.post(f"{server.base_url}/train_task/{endpoint}", data={"id": TASK_ID, "metric": metric},
                         headers={"Secret-Key": SECRET_KEY}, timeout=10)


def test_page_lists_tasks_with_state_and_an_svg_chart(server):
    for value in (0.2, 0.5, 0.4, 0.8):
        post(server, "intermediate_metric", value)
    post(server, "final_metric", 0.9)
    page = requests.get(f"http://{server.host}:{server.port}/", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.text
    assert TASK_ID in html and '<meta http-equiv="refresh"' in html and "<script" not in html
    assert html.count("<svg") == 1 and 'class="series"' in html and 'class="final"' in html and "final 0.9" in html


def test_page_shows_a_local_tasks_log_tail_escaped(server):
    server.backend.add_logs(TASK_ID, "epoch 1 <b>loss</b> é\nTask finished with code 0\n")
    html = requests.get(f"http://{server.host}:{server.port}/", timeout=10).text
    assert '<pre class="log">epoch 1 &lt;b&gt;loss&lt;/b&gt; é\nTask finished with code 0</pre>' in html


def read_png(path):
    """Decode an 8-bit RGB/RGBA non-interlaced PNG into rows of (r, g, b) tuples (standard library only)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else upper_left)) & 0xFF
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        previous = line
    return rows


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    return None


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
@pytest.mark.timeout(180)
def test_page_screenshot_in_headless_chromium_shows_the_chart(server, tmp_path):
    import requests

    for value in (0.1, 0.3, 0.2, 0.6, 0.7):
        requests.post(f"{server.base_url}/train_task/intermediate_metric", data={"id": TASK_ID, "metric": value},
                      headers={"Secret-Key": SECRET_KEY}, timeout=10)
    requests.post(f"{server.base_url}/train_task/final_metric", data={"id": TASK_ID, "metric": 0.75},
                  headers={"Secret-Key": SECRET_KEY}, timeout=10)
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=900,700",
         f"http://{server.host}:{server.port}/"],
        capture_output=True, text=True, timeout=150,
    )
    assert shot.exists(), done.stderr[-2000:]
    pixels = [p for row in read_png(shot) for p in row]
    series_blue = sum(1 for r, g, b in pixels if abs(r - 0x25) < 40 and abs(g - 0x63) < 40 and abs(b - 0xEB) < 40)
    final_red = sum(1 for r, g, b in pixels if abs(r - 0xDC) < 40 and abs(g - 0x26) < 40 and abs(b - 0x26) < 40)
    assert series_blue > 200, "the metric line is not drawn"
    assert final_red > 100, "the final metric is not marked"


def test_the_page_draws_metrics_of_plus_minus_1e308_without_nan_coordinates(server):
    for metric in ("1e308", "-1e308", "1.7976931348623157e308", "0"):
        assert post(server, "intermediate_metric", metric).status_code == 200
    assert post(server, "final_metric", "-1.7976931348623157e308").status_code == 200
    page = requests.get(f"http://{server.host}:{server.port}/", timeout=10).text
    (points,) = re.findall(r'<polyline class="series"[^>]* points="([^"]+)"', page)
    coordinates = [float(c) for pair in points.split() for c in pair.split(",")]
    assert len(coordinates) == 8 and all(0 <= c <= 600 for c in coordinates)
    (final_y,) = re.findall(r'<line class="final"[^>]* y1="([^"]+)"', page)
    assert 0 <= float(final_y) <= 200
