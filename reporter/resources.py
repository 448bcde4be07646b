"""Resource samples: the system, a watched process tree, and GPUs through NVML.

The sidecar's :class:`ResourceSampler` writes ``resources.jsonl``; the wrapper's :class:`PeakRss` keeps the
peak RSS of the command's tree for ``summary.json``. Both count a tree the same way: the process and all its
descendants (:func:`tree_members`), each member's RSS or 0 when it vanished meanwhile (:func:`rss_bytes`).

psutil is imported when a sampler runs, never by ``import reporter``. NVML is optional (the ``gpu`` extra):
without it, or without a GPU, GPU sampling is skipped without an error.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional

from .config import RESOURCES_FILE
from .log import get_logger


def tree_members(root: Any) -> List[Any]:
    """``root`` (a ``psutil.Process``) and all its descendants; raises ``psutil.Error`` when root is gone."""
    return [root] + root.children(recursive=True)


def rss_bytes(process: Any) -> int:
    """The resident set size of one ``psutil.Process``, 0 when it vanished or cannot be read."""
    try:
        return int(process.memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil.Error, or a process gone between listing and reading
        return 0


def tree_rss_bytes(root: Any) -> int:
    """The RSS of ``root``'s whole tree, summed; raises ``psutil.Error`` when root is gone."""
    return sum(rss_bytes(member) for member in tree_members(root))


class PeakRss(threading.Thread):
    """Samples the RSS of a process tree every ``interval_s`` until :meth:`stop`; keeps the peak.

    Without psutil, or when the process is already gone, the peak stays 0.
    """

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(name="anylearn-reporter-rss", daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            try:
                total = tree_rss_bytes(root)
            except psutil.Error:
                break
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()


class GpuSampler:
    """Utilisation and memory per device through NVML, or nothing when NVML or a GPU is missing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.count = 0
        try:
            import pynvml  # the `gpu` extra: nvidia-ml-py

            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no device: all mean "no GPU to sample"
            get_logger().debug("GPU sampling is off: %s", exc)

    def sample(self) -> List[Dict[str, Any]]:
        if self._nvml is None:
            return []
        devices = []
        for index in range(self.count):
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                utilisation = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                devices.append({
                    "index": index,
                    "utilization_percent": utilisation.gpu,
                    "memory_used_bytes": memory.used,
                    "memory_total_bytes": memory.total,
                })
            except Exception as exc:
                devices.append({"index": index, "error": str(exc)[:200]})
        return devices


class ResourceSampler:
    """Appends one sample a call to ``resources.jsonl``: system CPU and memory, the watched process tree, GPUs."""

    def __init__(self, run_dir: str) -> None:
        import psutil

        self._psutil = psutil
        self.path = os.path.join(run_dir, RESOURCES_FILE)
        self.gpus = GpuSampler()
        self._processes: Dict[int, Any] = {}
        psutil.cpu_percent(None)  # prime: the first real sample then covers the interval since now

    def _process(self, pid: int) -> Any:
        process = self._processes.get(pid)
        if process is None:
            process = self._processes[pid] = self._psutil.Process(pid)
            process.cpu_percent(None)
        return process

    def tree(self, pid: int) -> Optional[Dict[str, Any]]:
        """CPU %, RSS, threads and open files of ``pid`` and its descendants (None when it is gone)."""
        psutil = self._psutil
        try:
            members = tree_members(self._process(pid))
        except psutil.Error:
            self._processes.pop(pid, None)
            return None
        totals = {"pid": pid, "processes": 0, "cpu_percent": 0.0, "rss_bytes": 0, "threads": 0, "open_files": 0}
        alive = set()
        for member in members:
            try:
                process = self._process(member.pid)
                with process.oneshot():
                    totals["cpu_percent"] += process.cpu_percent(None)
                    totals["rss_bytes"] += rss_bytes(process)
                    totals["threads"] += process.num_threads()
                    totals["open_files"] += process.num_fds()
                totals["processes"] += 1
                alive.add(member.pid)
            except psutil.Error:
                continue
        for gone in set(self._processes) - alive - {pid}:
            del self._processes[gone]
        totals["cpu_percent"] = round(totals["cpu_percent"], 1)
        return totals

    def sample(self, pid: Optional[int]) -> Dict[str, Any]:
        """Take one sample and append it to ``resources.jsonl``; returns it."""
        memory = self._psutil.virtual_memory()
        sample: Dict[str, Any] = {
            "ts": time.time(),
            "system": {
                "cpu_percent": self._psutil.cpu_percent(None),
                "memory_used_bytes": memory.total - memory.available,
                "memory_total_bytes": memory.total,
            },
            "process": self.tree(pid) if pid else None,
        }
        gpus = self.gpus.sample()
        if gpus:
            sample["gpus"] = gpus
        with open(self.path, "a") as f:
            f.write(json.dumps(sample) + "\n")
        return sample
