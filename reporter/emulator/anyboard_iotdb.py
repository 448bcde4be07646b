"""The local Anyboard's IoTDB wire: the client library's generated ``IClientRPCService`` served over
thrift, on a loopback port, into an :class:`~reporter.emulator.anyboard.AnyboardStore`.

It answers what the client calls to open and close a session (``openSession``, ``requestStatementId``,
``setTimeZone``, ``getTimeZone``, ``closeSession``), to insert (``insertRecord(s)``, ``insertTablet(s)``,
aligned or not), and the one SQL form the SDK's ``IotdbWriter`` sends (``insert into <device>(...)
values(...)``, through ``executeUpdateStatement(V2)``/``executeStatement(V2)``). Anything else gets
"unsupported". Needs the ``anyboard`` extra (``apache-iotdb``, which brings thrift).
"""

from __future__ import annotations

import hmac
import itertools
import re
import socket
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from iotdb.thrift.common.ttypes import TSStatus
from iotdb.thrift.rpc import IClientRPCService
from iotdb.thrift.rpc.ttypes import TSExecuteStatementResp, TSGetTimeZoneResp, TSOpenSessionResp, TSProtocolVersion
from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
from thrift.Thrift import TException
from thrift.transport.TSocket import TSocket
from thrift.transport.TTransport import TFramedTransport

from .anyboard import AnyboardStore

SUCCESS, WRONG_LOGIN, NOT_LOGIN, UNSUPPORTED, INTERNAL = 200, 801, 802, 701, 500
_FORMATS = {0: "?", 1: "i", 2: "q", 3: "f", 4: "d", 8: "q"}  # TSDataType -> struct code (TEXT: length-prefixed)
_INSERT_SQL = re.compile(r"^\s*insert\s+into\s+((?:[^(`\s]|`[^`]*`)+)\s*\(([^)]*)\)\s*values\s*\((.*)\)\s*;?\s*$",
                         re.IGNORECASE | re.DOTALL)


def _status(code: int = SUCCESS, message: str = "") -> TSStatus:
    return TSStatus(code=code, message=message or None)


def _record_values(types_and_values: bytes) -> List[Any]:
    """The values of one record as the client packs them: a type byte, then the big-endian value."""
    out: List[Any] = []
    pos = 0
    while pos < len(types_and_values):
        kind = types_and_values[pos]
        pos += 1
        if kind == 5 or kind == 11:  # TEXT, STRING: int32 length, bytes
            (length,) = struct.unpack_from(">i", types_and_values, pos)
            out.append(types_and_values[pos + 4:pos + 4 + length].decode("utf-8", "replace"))
            pos += 4 + length
            continue
        code = ">" + _FORMATS[kind]
        out.append(struct.unpack_from(code, types_and_values, pos)[0])
        pos += struct.calcsize(code)
    return out


def _tablet_columns(values: bytes, types: List[int], rows: int) -> List[List[Any]]:
    columns: List[List[Any]] = []
    pos = 0
    for kind in types:
        if kind in (5, 11):
            column = []
            for _ in range(rows):
                (length,) = struct.unpack_from(">i", values, pos)
                column.append(values[pos + 4:pos + 4 + length].decode("utf-8", "replace"))
                pos += 4 + length
            columns.append(column)
            continue
        code = f">{rows}{_FORMATS[kind]}"
        columns.append(list(struct.unpack_from(code, values, pos)))
        pos += struct.calcsize(code)
    return columns  # bitmaps (nulls) follow; the emulator keeps the packed placeholder values


def _sql_value(text: str) -> Any:
    text = text.strip()
    if text[:1] in ("'", '"'):
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return float(text)


class IoTDBHandler(IClientRPCService.Iface):
    """The calls of ``IClientRPCService`` the client needs, over an :class:`AnyboardStore`."""

    def __init__(self, store: AnyboardStore, user: str = "root", password: str = "root") -> None:
        self.store = store
        self._user, self._password = user, password
        self._sessions: Dict[int, str] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.logins_refused = 0
        self.sql_inserts = 0

    def _known(self, session_id: Optional[int]) -> bool:
        with self._lock:
            return session_id in self._sessions

    def openSession(self, req: Any) -> TSOpenSessionResp:  # noqa: N802 (the service's names)
        good = (hmac.compare_digest(str(req.username or "").encode(), self._user.encode())
                and hmac.compare_digest(str(req.password or "").encode(), self._password.encode()))
        if not good:
            self.logins_refused += 1
            return TSOpenSessionResp(status=_status(WRONG_LOGIN, "Authentication failed."),
                                     serverProtocolVersion=TSProtocolVersion.IOTDB_SERVICE_PROTOCOL_V3)
        session_id = next(self._ids)
        with self._lock:
            self._sessions[session_id] = req.zoneId or "UTC"
        return TSOpenSessionResp(status=_status(), serverProtocolVersion=TSProtocolVersion.IOTDB_SERVICE_PROTOCOL_V3,
                                 sessionId=session_id, configuration={"timestamp_precision": "ms"})

    def closeSession(self, req: Any) -> TSStatus:  # noqa: N802
        with self._lock:
            self._sessions.pop(req.sessionId, None)
        return _status()

    def requestStatementId(self, sessionId: int) -> int:  # noqa: N802,N803
        return next(self._ids)

    def setTimeZone(self, req: Any) -> TSStatus:  # noqa: N802
        with self._lock:
            if req.sessionId in self._sessions:
                self._sessions[req.sessionId] = req.timeZone
        return _status()

    def getTimeZone(self, sessionId: int) -> TSGetTimeZoneResp:  # noqa: N802,N803
        with self._lock:
            zone = self._sessions.get(sessionId, "UTC")
        return TSGetTimeZoneResp(status=_status(), timeZone=zone)

    def _insert(self, session_id: int, rows: List[Tuple[str, int, Dict[str, Any]]]) -> TSStatus:
        if not self._known(session_id):
            return _status(NOT_LOGIN, "Log in failed. Either you are not authorized or the session has timed out.")
        self.store.insert(rows)
        return _status()

    def _insert_tablets(self, session_id: int, tablets: List[Tuple[str, List[str], bytes, bytes, List[int], int]]) -> TSStatus:
        if not self._known(session_id):
            return _status(NOT_LOGIN, "Log in failed. Either you are not authorized or the session has timed out.")
        self.store.insert_tablets(
            (device, measurements, struct.unpack_from(f">{size}q", timestamps), _tablet_columns(values, types, size))
            for device, measurements, values, timestamps, types, size in tablets)
        return _status()

    def insertRecord(self, req: Any) -> TSStatus:  # noqa: N802
        values = _record_values(req.values)
        return self._insert(req.sessionId, [(req.prefixPath, req.timestamp, dict(zip(req.measurements, values)))])

    def insertRecords(self, req: Any) -> TSStatus:  # noqa: N802
        rows = [(device, t, dict(zip(measurements, _record_values(values))))
                for device, measurements, values, t in zip(req.prefixPaths, req.measurementsList, req.valuesList, req.timestamps)]
        return self._insert(req.sessionId, rows)

    def insertTablet(self, req: Any) -> TSStatus:  # noqa: N802
        return self._insert_tablets(req.sessionId, [(req.prefixPath, req.measurements, req.values, req.timestamps,
                                                     req.types, req.size)])

    def insertTablets(self, req: Any) -> TSStatus:  # noqa: N802
        return self._insert_tablets(req.sessionId, list(zip(req.prefixPaths, req.measurementsList, req.valuesList,
                                                            req.timestampsList, req.typesList, req.sizeList)))

    def _statement(self, req: Any) -> TSExecuteStatementResp:
        match = _INSERT_SQL.match(req.statement or "")
        if not match:
            return TSExecuteStatementResp(status=_status(UNSUPPORTED, "the local Anyboard runs only 'insert into'"))
        device, columns, values = match.group(1), [c.strip() for c in match.group(2).split(",")], match.group(3).split(",")
        row = {c: _sql_value(v) for c, v in zip(columns, values)}
        stamp = row.pop("time", None) or row.pop("timestamp", None) or int(time.time() * 1000)
        self.sql_inserts += 1
        return TSExecuteStatementResp(status=self._insert(req.sessionId, [(device, int(stamp), row)]))

    executeStatement = executeStatementV2 = _statement  # noqa: N815
    executeUpdateStatement = executeUpdateStatementV2 = _statement  # noqa: N815


class IoTDBServer:
    """The handler on a loopback port: a thread accepts, a thread per connection serves framed binary thrift."""

    def __init__(self, store: AnyboardStore, *, host: str = "127.0.0.1", port: int = 0, user: str = "root",
                 password: str = "root") -> None:
        self.store = store
        self.handler = IoTDBHandler(store, user, password)
        self._processor = IClientRPCService.Processor(self.handler)
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self._closing = threading.Event()
        self._connections: List[socket.socket] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "IoTDBServer":
        self._thread = threading.Thread(target=self._accept, name="anyboard-iotdb", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="anyboard-iotdb-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = TSocket()
        sock.handle = conn
        transport = TFramedTransport(sock)
        protocol = TBinaryProtocolAccelerated(transport)
        try:
            while not self._closing.is_set():
                self._processor.process(protocol, protocol)
        except (TException, OSError, EOFError):
            pass  # the client hung up
        finally:
            transport.close()
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def stop(self) -> None:
        """Stop accepting and drop every connection."""
        self._closing.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["IoTDBHandler", "IoTDBServer"]
