"""The local Anyboard's store and read API (``serve --anyboard-port``): points in sqlite, and the
platform's ``/api/anyboard/{project}/metric/...`` answers that the SDK's ``CloudReader`` reads.

Standard library only; the IoTDB wire is in :mod:`.anyboard_iotdb` (it needs the ``anyboard`` extra).
One row per device and time, as in IoTDB: a point written again at the same time overwrites it, and an
insert of some measurements leaves the others of that point as they were.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

SCALAR_DEVICE = re.compile(r"^root\.([^.`]+)\.([^.`]+)\.([^.`]+)\.scalar\.(?:`([^`]*)`|([^.`]+))$")
MEASUREMENT_COLUMNS = {"walltime": "walltime", "step": "step", "single_value": "value"}
MAX_LIMIT = 100_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS anyboard_series (device TEXT PRIMARY KEY, user_id TEXT, project_id TEXT, task_id TEXT,
    name TEXT);
CREATE INDEX IF NOT EXISTS anyboard_series_by_name ON anyboard_series (project_id, task_id, name);
CREATE TABLE IF NOT EXISTS anyboard_point (device TEXT NOT NULL, time INTEGER NOT NULL, walltime INTEGER,
    step INTEGER, value REAL, PRIMARY KEY (device, time)) WITHOUT ROWID;
"""
_JOINED = "anyboard_series AS s JOIN anyboard_point AS p ON p.device = s.device"


def parse_device(device: str) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
    """(user id, project id, task id, metric name) of a scalar device path, or four Nones."""
    match = SCALAR_DEVICE.match(device)
    if not match:
        return None, None, None, None
    return match.group(1), match.group(2), match.group(3), match.group(4) if match.group(4) is not None else match.group(5)


class AnyboardStore:
    """Points by device and time, behind one lock (sqlite connection of its own)."""

    def __init__(self, db_path: str = ":memory:") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.executescript(_SCHEMA)
        self._devices = set()  # devices already in anyboard_series
        self.inserts = 0  # insert calls (each of one or many points)

    def insert(self, rows: Iterable[Tuple[str, int, Mapping[str, Any]]]) -> int:
        """Write ``(device, time, {measurement: value})`` rows in one transaction; unknown measurements are
        ignored. Returns the number of rows."""
        batch: Dict[Tuple[str, ...], List[Tuple[Any, ...]]] = {}
        for device, time_, values in rows:
            columns = tuple(MEASUREMENT_COLUMNS[m] for m in values if m in MEASUREMENT_COLUMNS)
            known = [v for m, v in values.items() if m in MEASUREMENT_COLUMNS]
            batch.setdefault(columns, []).append((device, time_, *known))
        return self._write(batch)

    def insert_tablets(self, tablets: Iterable[Tuple[str, Sequence[str], Sequence[int], Sequence[Sequence[Any]]]]) -> int:
        """Write tablets ``(device, measurements, times, columns)`` in one transaction (column by column,
        no row objects: the path of the client's ``insertTablets``). Returns the number of rows."""
        batch: Dict[Tuple[str, ...], List[Tuple[Any, ...]]] = {}
        for device, measurements, times, columns in tablets:
            keep = [i for i, m in enumerate(measurements) if m in MEASUREMENT_COLUMNS]
            names = tuple(MEASUREMENT_COLUMNS[measurements[i]] for i in keep)
            rows = batch.setdefault(names, [])
            rows.extend((device, t, *values) for t, *values in zip(times, *(columns[i] for i in keep)))
        return self._write(batch)

    def _write(self, batch: Mapping[Tuple[str, ...], List[Tuple[Any, ...]]]) -> int:
        count = 0
        with self._lock:
            self._db.execute("BEGIN")
            try:
                new = {row[0] for rows in batch.values() for row in rows} - self._devices
                self._db.executemany("INSERT OR IGNORE INTO anyboard_series VALUES (?, ?, ?, ?, ?)",
                                     [(device, *parse_device(device)) for device in new])
                for columns, values_list in batch.items():
                    names = ", ".join(("device", "time") + columns)
                    marks = ", ".join("?" * (2 + len(columns)))
                    update = ", ".join(f"{c} = excluded.{c}" for c in columns) or "device = excluded.device"
                    self._db.executemany(
                        f"INSERT INTO anyboard_point ({names}) VALUES ({marks}) "
                        f"ON CONFLICT (device, time) DO UPDATE SET {update}", values_list)
                    count += len(values_list)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._devices |= new
            self.inserts += 1
        return count

    def meta(self, project_id: str) -> List[Dict[str, Any]]:
        """``metricMetaList`` of a project: one entry per task and name."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT s.task_id, s.name, COUNT(*) FROM {_JOINED} WHERE s.project_id = ? AND s.name IS NOT NULL "
                "GROUP BY s.task_id, s.name ORDER BY s.task_id, s.name", (project_id,)).fetchall()
        return [{"taskId": t, "name": n, "type": "scalar", "count": c} for t, n, c in rows]

    def scalars(self, project_id: str, task_id: str, name: str, offset: int = 0, limit: int = MAX_LIMIT) -> List[Dict[str, Any]]:
        """One series in time order: ``[{"step", "walltime", "value"}]``."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT p.step, p.walltime, p.value FROM {_JOINED} WHERE s.project_id = ? AND s.task_id = ? AND s.name = ? "
                "ORDER BY p.time LIMIT ? OFFSET ?", (project_id, task_id, name, limit, offset)).fetchall()
        return [{"step": s, "walltime": w, "value": v} for s, w, v in rows]

    def series(self) -> List[Tuple[str, str, str, List[Tuple[float, float]]]]:
        """Every series, for the page: (project, task, name, [(step or index, value)])."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT s.project_id, s.task_id, s.name, p.step, p.value FROM {_JOINED} WHERE s.name IS NOT NULL "
                "ORDER BY s.project_id, s.task_id, s.name, p.time").fetchall()
        out: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}
        for project, task, name, step, value in rows:
            points = out.setdefault((project, task, name), [])
            points.append((float(len(points) if step is None else step), value))
        return [(p, t, n, pts) for (p, t, n), pts in out.items()]

    def count(self) -> int:
        """How many points are stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM anyboard_point").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _queries(text: str) -> Optional[List[Dict[str, Any]]]:
    try:
        queries = json.loads(text)
    except ValueError:
        return None
    if not isinstance(queries, list) or not all(isinstance(q, dict) for q in queries):
        return None
    return queries


def read_answer(store: AnyboardStore, path: str, query: Mapping[str, str]) -> Tuple[int, Any]:
    """The answer (status, JSON body) to ``GET /anyboard/{project}/metric/meta|scalars`` (path without /api)."""
    parts = path.strip("/").split("/")
    if len(parts) != 4 or parts[0] != "anyboard" or parts[2] != "metric":
        return 404, {"msg": f"no such endpoint: GET {path}"}
    project, what = parts[1], parts[3]
    if what == "meta":
        return 200, {"metricMetaList": store.meta(project)}
    if what != "scalars":
        return 404, {"msg": f"only scalar metrics are kept here, not {what}"}
    queries = _queries(query.get("scalar_metric_query_list", ""))
    if queries is None:
        return 400, {"msg": "scalar_metric_query_list must be a JSON list of {taskId, metricName, offset, limit}"}
    result = []
    for q in queries:
        try:
            offset, limit = max(0, int(q.get("offset", 0))), min(MAX_LIMIT, max(0, int(q.get("limit", MAX_LIMIT))))
        except (TypeError, ValueError):
            return 400, {"msg": "offset and limit must be whole numbers"}
        task, name = str(q.get("taskId", "")), str(q.get("metricName", ""))
        result.append({"taskId": task, "metricName": name,
                       "scalarRecordList": store.scalars(project, task, name, offset, limit)})
    return 200, {"scalarMetricList": result}


def render_page(series: Sequence[Tuple[str, str, str, List[Tuple[float, float]]]]) -> str:
    """The local Anyboard's page: a chart per series, grouped by task."""
    from html import escape

    from ..charts import Series, line_chart

    parts = ["<!doctype html><meta charset='utf-8'><title>Anyboard (local)</title>",
             "<body style='font-family:sans-serif'><h1>Anyboard (local)</h1>"]
    if not series:
        parts.append("<p>No points yet.</p>")
    current = None
    for project, task, name, points in series:
        if (project, task) != current:
            current = (project, task)
            parts.append(f"<h2>project {escape(project or '?')} &middot; task {escape(task or '?')}</h2>")
        parts.append(f"<figure>{line_chart([Series(name, points)], title=f'{name} ({len(points)} points)')}</figure>")
    parts.append("</body>")
    return "".join(parts)


def handle_get(handler: Any, path: str, query: Mapping[str, str]) -> None:
    """Answer a GET under ``/anyboard`` for the emulator's HTTP handler: the page, or the read API (which
    takes a bearer token, as the platform's does; see ``serve --token``)."""
    store: AnyboardStore = handler.anyboard
    if path == "/anyboard":
        return handler._send(200, render_page(store.series()).encode(), content_type="text/html; charset=utf-8")
    auth = handler.headers.get("Authorization", "")
    if auth[:7].lower() != "bearer " or not handler.backend.bearer_accepted(auth[7:].strip()):
        return handler._answer(401, {"msg": "a bearer token is required"})
    status, body = read_answer(store, path, query)
    return handler._answer(status, body)


def start_local_anyboard(db_path: str, *, host: str = "127.0.0.1", port: int = 0, user: str = "root",
                         password: str = "root") -> Any:
    """Start the IoTDB wire on ``host:port`` over a store in ``db_path``; the returned server has ``store``,
    ``port`` and ``stop()``. :class:`~reporter.config.ConfigError` in one line when the extra is missing or
    the port is taken."""
    from ..config import ConfigError

    try:
        from .anyboard_iotdb import IoTDBServer
    except ImportError:
        raise ConfigError("the local Anyboard needs the IoTDB client: pip install 'anylearn-reporter[anyboard]'") from None
    store = AnyboardStore(db_path)
    try:
        return IoTDBServer(store, host=host, port=port, user=user, password=password).start()
    except OSError as exc:
        store.close()
        raise ConfigError(f"cannot listen on {host}:{port} for Anyboard: {exc.strerror}; choose another --anyboard-port") from None


__all__ = ["AnyboardStore", "parse_device", "read_answer", "render_page", "handle_get", "start_local_anyboard"]
