"""One process-tree RSS rule for the wrapper's peak and the sidecar's samples, measured on real processes."""

import subprocess
import sys

import pytest
from conftest import wait_until

from reporter.resources import PeakRss, ResourceSampler, rss_bytes, tree_rss_bytes

HOLD_MIB = 64
PARENT_OF_A_BIG_CHILD = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "import sys; block = bytearray({HOLD_MIB} << 20); block[::4096] = b'x' * len(block[::4096]); print('ready', flush=True); sys.stdin.read()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


@pytest.fixture
def parent_of_a_big_child():
    parent = subprocess.Popen([sys.executable, "-c", PARENT_OF_A_BIG_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    yield parent, child_pid
    parent.stdin.close()
    parent.wait(30)


def test_the_tree_rss_counts_the_descendants(parent_of_a_big_child):
    psutil = pytest.importorskip("psutil")
    parent, child_pid = parent_of_a_big_child
    root = psutil.Process(parent.pid)
    assert rss_bytes(root) < HOLD_MIB << 20  # the parent alone does not hold the block
    assert tree_rss_bytes(root) >= rss_bytes(root) + (HOLD_MIB << 20) * 0.9  # its child does


def test_the_wrappers_peak_and_the_sidecars_sample_use_the_same_sum(parent_of_a_big_child, tmp_path):
    pytest.importorskip("psutil")
    parent, _ = parent_of_a_big_child
    peak = PeakRss(parent.pid, interval_s=0.02)
    peak.start()
    try:
        wait_until(lambda: peak.peak_bytes >= HOLD_MIB << 20, timeout_s=20, what="the peak RSS of the tree")
    finally:
        peak.stop()
        peak.join(5)
    sample = ResourceSampler(str(tmp_path)).tree(parent.pid)
    assert sample["processes"] == 2 and sample["rss_bytes"] >= HOLD_MIB << 20
    assert abs(sample["rss_bytes"] - peak.peak_bytes) < 16 << 20  # the same tree, summed the same way


def test_a_vanished_process_counts_zero_and_a_gone_root_ends_the_sampler():
    psutil = pytest.importorskip("psutil")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    process = psutil.Process(gone.pid)
    gone.wait(30)
    assert rss_bytes(process) == 0
    peak = PeakRss(gone.pid, interval_s=0.01)
    peak.start()
    peak.join(10)
    assert not peak.is_alive() and peak.peak_bytes == 0
