"""The emulator's state and rules, independent of HTTP: the tasks in sqlite, idempotency, and the faults it
injects (latency, 503s, 429 with ``Retry-After``)."""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import STATE_NAMES

LOG_TAIL_LINES = 20  # a task's log lines the page shows
CATCH_KEYS = ("output_cache_pointer", "error_cache_pointer")  # a local task's log offsets (bytes)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS task (id TEXT PRIMARY KEY, secret_key TEXT NOT NULL, state INTEGER NOT NULL DEFAULT 0,
                                 final_metric REAL, final_reported_at TEXT, last_heartbeat REAL);
CREATE TABLE IF NOT EXISTS intermediate_metric (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
                                 train_task_id TEXT NOT NULL, metric REAL NOT NULL, reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state_change (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 state INTEGER NOT NULL, reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeat (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 reported_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS task_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, train_task_id TEXT NOT NULL,
                                 offset_ms INTEGER NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS local_task_catch (train_task_id TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
                                 PRIMARY KEY (train_task_id, key));
CREATE TABLE IF NOT EXISTS idempotency (key TEXT NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
                                 body TEXT NOT NULL, PRIMARY KEY (key, endpoint));
"""


@dataclass
class Faults:
    """Fault injection, applied to POST requests in arrival order."""

    latency_ms: float = 0.0
    fail_first: int = 0
    fail_rate: float = 0.0
    retry_after_s: Optional[float] = None  # injected failures become 429 with this Retry-After
    seed: Optional[int] = None


def _now_text(ts: Optional[float] = None) -> str:
    return _dt.datetime.fromtimestamp(time.time() if ts is None else ts).strftime("%Y-%m-%d %H:%M:%S.%f")


def _public_time(text: str) -> str:
    return text[:19]


def _new_id(prefix: str) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(28))


def _task_summary(db: sqlite3.Connection, task_id: str, state: int, final_metric: Optional[float],
                  last_heartbeat: Optional[float]) -> Dict[str, Any]:
    """One task of :meth:`Backend.tasks` (the caller holds the lock)."""
    metrics = db.execute(
        "SELECT metric, reported_at FROM intermediate_metric WHERE train_task_id = ? ORDER BY seq",
        (task_id,),
    ).fetchall()
    states = db.execute(
        "SELECT state FROM state_change WHERE train_task_id = ? ORDER BY seq", (task_id,)
    ).fetchall()
    beats = db.execute(
        "SELECT COUNT(*) FROM heartbeat WHERE train_task_id = ?", (task_id,)
    ).fetchone()[0]
    log_tail = db.execute(
        "SELECT text FROM task_log WHERE train_task_id = ? ORDER BY seq DESC LIMIT ?", (task_id, LOG_TAIL_LINES)
    ).fetchall()
    return {
        "id": task_id,
        "state": state,
        "state_name": STATE_NAMES.get(state, str(state)),
        "final_metric": final_metric,
        "intermediate_metrics": [m for m, _ in metrics],
        "reported_at": [_public_time(t) for _, t in metrics],
        "states": [s for (s,) in states],
        "heartbeats": beats,
        "last_heartbeat": last_heartbeat,
        "log_tail": [t for (t,) in reversed(log_tail)],
    }


class Backend:
    """The emulator's state and rules, independent of HTTP (one sqlite connection behind a lock)."""

    def __init__(self, tasks: Mapping[str, str], db_path: str = ":memory:", faults: Optional[Faults] = None,
                 token: Optional[str] = None):
        self.faults = faults or Faults()
        self.token = token  # None: reads accept any bearer token
        self._random = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        for task_id, key in tasks.items():
            self._db.execute(
                "INSERT INTO task (id, secret_key) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET secret_key = excluded.secret_key",
                (task_id, key),
            )
        self.posts_seen = 0
        self.post_times: List[float] = []  # arrival times of the last 1000 POSTs
        self.counters: Dict[str, int] = {
            "connections": 0, "requests": 0, "duplicates": 0, "injected_failures": 0, "unauthorized": 0,
        }

    # --- faults and auth -----------------------------------------------------------------------------

    def note_post(self) -> int:
        """Count a POST to an endpoint (before its body is read); returns its arrival number."""
        with self._lock:
            self.posts_seen += 1
            self.post_times.append(time.time())
            del self.post_times[:-1000]
            return self.posts_seen

    def injected_failure(self, arrival: int) -> Optional[Tuple[int, Dict[str, Any], Dict[str, str]]]:
        """Decide whether the POST that arrived ``arrival``-th fails on purpose; (status, body, headers) if so."""
        with self._lock:
            fail = arrival <= self.faults.fail_first or (
                self.faults.fail_rate > 0 and self._random.random() < self.faults.fail_rate
            )
            if fail:
                self.counters["injected_failures"] += 1
        if not fail:
            return None
        if self.faults.retry_after_s is not None:
            return 429, {"msg": "too many requests (injected)"}, {"Retry-After": f"{self.faults.retry_after_s:g}"}
        return 503, {"msg": "service unavailable (injected)"}, {}

    def count(self, counter: str) -> None:
        with self._lock:
            self.counters[counter] += 1

    def authorized(self, task_id: str, key: str) -> bool:
        """Whether ``key`` is the Secret-Key of ``task_id``."""
        with self._lock:
            row = self._db.execute("SELECT secret_key FROM task WHERE id = ?", (task_id,)).fetchone()
        ok = row is not None and hmac.compare_digest(row[0].encode(), key.encode())
        if not ok:
            self.count("unauthorized")
        return ok

    def known_key(self, key: str) -> bool:
        """Whether ``key`` is some task's Secret-Key (checked before a request body is read)."""
        with self._lock:
            keys = [k for (k,) in self._db.execute("SELECT secret_key FROM task").fetchall()]
        ok = bool(key) and any(hmac.compare_digest(k.encode(), key.encode()) for k in keys)
        if not ok:
            self.count("unauthorized")
        return ok

    def bearer_accepted(self, token: str) -> bool:
        """Whether a read's ``Authorization: Bearer`` token is accepted (any, when no token is set)."""
        if not token:
            return False
        return self.token is None or hmac.compare_digest(self.token.encode(), token.encode())

    # --- idempotency ---------------------------------------------------------------------------------

    def replay(self, key: str, endpoint: str) -> Optional[Tuple[int, Dict[str, Any]]]:
        if not key:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT status, body FROM idempotency WHERE key = ? AND endpoint = ?", (key, endpoint)
            ).fetchone()
            if row is not None:
                self.counters["duplicates"] += 1
        return None if row is None else (row[0], json.loads(row[1]))

    def _remember(self, key: str, endpoint: str, status: int, body: Dict[str, Any]) -> None:
        if key:
            self._db.execute(
                "INSERT OR IGNORE INTO idempotency (key, endpoint, status, body) VALUES (?, ?, ?, ?)",
                (key, endpoint, status, json.dumps(body)),
            )

    # --- writes --------------------------------------------------------------------------------------

    def add_intermediate(self, task_id: str, metric: float, key: str) -> Dict[str, Any]:
        body = {"msg": "intermediate metric reported"}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO intermediate_metric (id, train_task_id, metric, reported_at) VALUES (?, ?, ?, ?)",
                (_new_id("METR"), task_id, metric, _now_text()),
            )
            self._remember(key, "intermediate_metric", 200, body)
            self._db.execute("COMMIT")
        return body

    def set_final(self, task_id: str, metric: float, key: str) -> Dict[str, Any]:
        body = {"msg": "final metric reported"}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "UPDATE task SET final_metric = ?, final_reported_at = ? WHERE id = ?", (metric, _now_text(), task_id)
            )
            self._remember(key, "final_metric", 200, body)
            self._db.execute("COMMIT")
        return body

    def set_state(self, task_id: str, state: int, key: str) -> Dict[str, Any]:
        body = {"msg": "state updated", "state": state}
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE task SET state = ? WHERE id = ?", (state, task_id))
            self._db.execute(
                "INSERT INTO state_change (train_task_id, state, reported_at) VALUES (?, ?, ?)",
                (task_id, state, _now_text()),
            )
            self._remember(key, "state", 200, body)
            self._db.execute("COMMIT")
        return body

    def heartbeat(self, task_id: str) -> Dict[str, Any]:
        now = time.time()
        with self._lock:
            self._db.execute("UPDATE task SET last_heartbeat = ? WHERE id = ?", (now, task_id))
            self._db.execute("INSERT INTO heartbeat (train_task_id, reported_at) VALUES (?, ?)", (task_id, _now_text(now)))
        return {"msg": "alive"}

    def known_task(self, task_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM task WHERE id = ?", (task_id,)).fetchone() is not None

    def add_logs(self, task_id: str, text: str) -> Dict[str, Any]:
        """A local task's shipped output: each line of ``text`` becomes a log row (a last line without its
        newline too, as the platform stores each upload)."""
        lines = text.split("\n")
        if lines and lines[-1] == "" and len(lines) > 1:
            lines.pop()
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO task_log (train_task_id, offset_ms, text) VALUES (?, ?, ?)",
                                 [(task_id, now_ms, line) for line in lines])
            self._db.execute("COMMIT")
        return {"msg": "logs uploaded"}

    def set_catch(self, task_id: str, key: str, value: int) -> Dict[str, Any]:
        with self._lock:
            self._db.execute(
                "INSERT INTO local_task_catch (train_task_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(train_task_id, key) DO UPDATE SET value = excluded.value", (task_id, key, value))
        return {"msg": "catch updated", key: value}

    def catch(self, task_id: str) -> Dict[str, Any]:
        """A local task's log offsets: ``{"output_cache_pointer": n, "error_cache_pointer": n}`` (0 when unset)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM local_task_catch WHERE train_task_id = ?", (task_id,)).fetchall())
        return {key: int(rows.get(key, 0)) for key in CATCH_KEYS}

    def detail(self, task_id: str) -> List[Dict[str, Any]]:
        """``GET /train_task/query``'s answer as the SDK's ``TrainTask.get_detail`` reads it (its ``stream_log``
        polls it to learn the task ended); the fields the emulator does not keep are empty, the key is never sent."""
        with self._lock:
            row = self._db.execute("SELECT state FROM task WHERE id = ?", (task_id,)).fetchone()
        empty = ("description", "creator_id", "project_id", "algorithm_id", "algorithm_git_ref", "files", "results_id",
                 "secret_key", "create_time", "finish_time", "entrypoint", "output", "mirror_id", "envs")
        return [{"id": task_id, "name": task_id, "state": row[0] if row else None, "args": "{}", "is_local": 1,
                 "resource_request": "[]", **dict.fromkeys(empty)}]

    def logs(self, task_id: str, limit: int, direction: str, offset_index: int) -> List[Dict[str, Any]]:
        """The SDK's ``get_log`` answer: ``init`` gives the newest ``limit`` lines newest first, ``back`` the
        lines after the row ``offset_index`` oldest first."""
        with self._lock:
            if direction == "back":
                rows = self._db.execute(
                    "SELECT seq, offset_ms, text FROM task_log WHERE train_task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (task_id, offset_index, limit)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT seq, offset_ms, text FROM task_log WHERE train_task_id = ? ORDER BY seq DESC LIMIT ?",
                    (task_id, limit)).fetchall()
        return [{"offset": ms, "offset_index": seq, "text": text} for seq, ms, text in rows]

    # --- reads ---------------------------------------------------------------------------------------

    def intermediate(self, task_id: str, last_timestamp: str = "") -> List[Dict[str, Any]]:
        """The contract's list answer, in arrival order, after ``last_timestamp``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, metric, train_task_id, reported_at FROM intermediate_metric "
                "WHERE train_task_id = ? AND reported_at > ? ORDER BY seq",
                (task_id, last_timestamp or ""),
            ).fetchall()
        return [{"id": r[0], "metric": r[1], "train_task_id": r[2], "reported_at": _public_time(r[3])} for r in rows]

    def final(self, task_id: str) -> Dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT final_metric FROM task WHERE id = ?", (task_id,)).fetchone()
        return {"final_metric": row[0] if row else None, "id": task_id, "name": task_id}

    def tasks(self) -> List[Dict[str, Any]]:
        """Every task with its state, metrics, state history and heartbeats (the page and tests read it)."""
        with self._lock:
            tasks = self._db.execute(
                "SELECT id, state, final_metric, last_heartbeat FROM task ORDER BY id"
            ).fetchall()
            return [_task_summary(self._db, *task) for task in tasks]

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {**self.counters, "posts": self.posts_seen, "post_times": list(self.post_times)}

    def close(self) -> None:
        with self._lock:
            self._db.close()
