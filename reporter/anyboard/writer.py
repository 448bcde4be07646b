"""The Anyboard writer: points into IoTDB in typed, batched inserts, bounded by a deadline.

It speaks the IoTDB client's generated Thrift service (``iotdb.thrift.rpc.IClientRPCService``) directly,
as the client's own ``Session`` does, rather than through ``Session``: importing ``iotdb.Session`` loads
pandas and numpy (about +58 MB of RSS and 0.27 s of CPU here) for query code we never call, while the
service and thrift cost about +4 MB (docs/benchmarks.md). The calls are the ones ``Session.open`` and
``Session.insert_tablets`` make: ``openSession``, ``insertTablets`` (one tablet per device and batch, its
columns packed big-endian as the client's ``Tablet`` packs them: INT64 ``walltime`` and ``step``, DOUBLE
``single_value``), ``closeSession``. No SQL is built. Tablets rather than ``insertRecords``: a point
then costs three packed numbers instead of a device path, three measurement names and a typed record, on
both sides of the wire (docs/benchmarks.md).

Errors are sorted in two: :class:`AnyboardUnavailable` (IoTDB down, a reset, a timeout, a failed call:
retry later) and :class:`AnyboardLoginRefused` (a refused login or a missing permission: retrying will
not help until the configuration changes). The password is never in a message: any text taken from the
client or the server has it replaced by ``***``.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError
from .config import AnyboardConfig
from .points import Point

try:  # the optional extra: without it, building a writer raises one line saying how to install it
    from iotdb.thrift.rpc.IClientRPCService import Client as _Client
    from iotdb.thrift.rpc.ttypes import (
        TSCloseSessionReq, TSInsertTabletsReq, TSOpenSessionReq, TSProtocolVersion,
    )
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
    from thrift.Thrift import TException
    from thrift.transport.TSocket import TSocket
    from thrift.transport.TTransport import TFramedTransport
    _IMPORT_PROBLEM: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test in a subprocess
    _IMPORT_PROBLEM = str(exc)
    TException = OSError  # type: ignore[assignment,misc]

MISSING_EXTRA = ("Anyboard needs the IoTDB client, which is not installed: "
                 "pip install 'anylearn-reporter[anyboard]'")
SUCCESS = 200
MULTIPLE_ERROR = 302
REDIRECTION_RECOMMEND = 400  # a cluster's hint: the write succeeded
AUTH_CODES = range(800, 900)  # IoTDB's authentication and authorization codes (801 wrong password, 803 ...)
NOT_LOGIN = 802  # on an insert: the server forgot our session (it restarted): log in again, a transient fault
MAX_POINTS_PER_CALL = 2048
MEASUREMENTS = ["walltime", "step", "single_value"]
MEASUREMENTS_NO_STEP = ["walltime", "single_value"]
_INT64, _DOUBLE = 2, 4  # TSDataType
TYPES = [_INT64, _INT64, _DOUBLE]
TYPES_NO_STEP = [_INT64, _DOUBLE]
REDACTED = "***"


_connecting = threading.local()


class _OurConnects(logging.Filter):
    """thrift's TSocket logs every failed connect at ERROR (a DNS failure with a traceback); ours are retried
    and said once by the sink, so the records logged while this thread opens our socket are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_connecting, "active", False)


_THRIFT_SOCKET_LOGGER = logging.getLogger("thrift.transport.TSocket")
if not any(isinstance(f, _OurConnects) for f in _THRIFT_SOCKET_LOGGER.filters):
    _THRIFT_SOCKET_LOGGER.addFilter(_OurConnects())


class AnyboardError(Exception):
    """A write to Anyboard failed; the message names Anyboard and never holds the password."""


class AnyboardUnavailable(AnyboardError):
    """IoTDB is down, reset the connection, timed out or failed the call: retry with backoff."""


class AnyboardLoginRefused(AnyboardError):
    """IoTDB refused the login or the permission to write: Anyboard pauses until its configuration changes."""


def check_client_installed() -> None:
    """Raise :class:`~reporter.config.ConfigError` in one line when the ``anyboard`` extra is missing."""
    if _IMPORT_PROBLEM is not None:
        raise ConfigError(MISSING_EXTRA)


def _tablets(points: Sequence[Point]) -> Dict[str, List[Any]]:
    """The columns of ``TSInsertTabletsReq``: one tablet per device (and per with/without step), its rows
    sorted by time as IoTDB expects of a tablet."""
    groups: Dict[Tuple[str, bool], List[Point]] = {}
    for point in points:
        groups.setdefault((point.device, point.step is not None), []).append(point)
    out: Dict[str, List[Any]] = {"prefixPaths": [], "measurementsList": [], "valuesList": [], "timestampsList": [],
                                 "typesList": [], "sizeList": []}
    for (device, stepped), rows in groups.items():
        rows.sort(key=lambda p: p.time)
        n = len(rows)
        walltimes, values = [p.walltime for p in rows], [p.value for p in rows]
        if stepped:
            packed = struct.pack(f">{n}q{n}q{n}d", *walltimes, *[p.step for p in rows], *values)
        else:
            packed = struct.pack(f">{n}q{n}d", *walltimes, *values)
        out["prefixPaths"].append(device)
        out["measurementsList"].append(MEASUREMENTS if stepped else MEASUREMENTS_NO_STEP)
        out["valuesList"].append(packed)
        out["timestampsList"].append(struct.pack(f">{n}q", *[p.time for p in rows]))
        out["typesList"].append(TYPES if stepped else TYPES_NO_STEP)
        out["sizeList"].append(n)
    return out


class AnyboardWriter:
    """One IoTDB session of one task, opened on the first write and reopened after a failure.

    Not thread-safe: one delivery lane owns it. Every socket operation (connect, each call) waits at most
    ``config.timeout_s``, so a hanging IoTDB costs one timeout, then :class:`AnyboardUnavailable`.
    """

    def __init__(self, config: AnyboardConfig, *, zone_id: str = "UTC") -> None:
        check_client_installed()
        self.config = config
        self.zone_id = zone_id
        self.calls = 0  # insert calls that succeeded
        self._socket: Any = None
        self._transport: Any = None
        self._client: Any = None
        self._session_id: Optional[int] = None

    @property
    def where(self) -> str:
        """``host:port``, for messages."""
        return f"{self.config.host}:{self.config.port}"

    def _scrub(self, text: str) -> str:
        secret = self.config.password.reveal()
        return text.replace(secret, REDACTED) if secret else text

    def _unavailable(self, what: str, exc: BaseException) -> AnyboardUnavailable:
        detail = self._scrub(str(exc) or type(exc).__name__)
        return AnyboardUnavailable(f"Anyboard (IoTDB at {self.where}): {what}: {detail}")

    def _refused(self, code: int, message: str) -> AnyboardLoginRefused:
        return AnyboardLoginRefused(
            f"Anyboard (IoTDB at {self.where}) refused user {self.config.user!r} (code {code}: "
            f"{self._scrub(message or 'no message')}); check ANYLEARN_ANYBOARD_IOTDB_USER and "
            f"ANYLEARN_ANYBOARD_IOTDB_PASSWORD (and that the user may write {self.config.device_prefix})")

    def _check(self, status: Any, what: str) -> None:
        code = status.code
        if code == MULTIPLE_ERROR and status.subStatus:
            failed = [s for s in status.subStatus if s.code not in (SUCCESS, REDIRECTION_RECOMMEND)]
            if not failed:
                return
            code, message = failed[0].code, f"{len(failed)} of {len(status.subStatus)} failed: {failed[0].message}"
        else:
            message = status.message or ""
        if code in (SUCCESS, REDIRECTION_RECOMMEND):
            return
        if code in AUTH_CODES and code != NOT_LOGIN:
            raise self._refused(code, message)
        raise AnyboardUnavailable(f"Anyboard (IoTDB at {self.where}): {what} failed with code {code}: "
                                  f"{self._scrub(message)}")

    def _open(self) -> None:
        sock = TSocket(self.config.host, self.config.port)
        sock.setTimeout(self.config.timeout_s * 1000.0)
        transport = TFramedTransport(sock)
        try:
            _connecting.active = True
            try:
                transport.open()
            finally:
                _connecting.active = False
            client = _Client(TBinaryProtocolAccelerated(transport))
            answer = client.openSession(TSOpenSessionReq(
                client_protocol=TSProtocolVersion.IOTDB_SERVICE_PROTOCOL_V3, zoneId=self.zone_id,
                username=self.config.user, password=self.config.password.reveal(),
                configuration={"version": "V_1_0", "sql_dialect": "tree"}))
            self._check(answer.status, "login")
        except AnyboardError:
            transport.close()
            raise
        except (TException, OSError, socket.timeout, EOFError) as exc:
            transport.close()
            raise self._unavailable("cannot open a session", exc) from None
        self._socket, self._transport, self._client, self._session_id = sock, transport, client, answer.sessionId

    def _drop(self) -> None:
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may fail in any way
                pass
        self._socket = self._transport = self._client = self._session_id = None

    def write(self, points: Sequence[Point], timeout_s: Optional[float] = None) -> None:
        """Insert ``points`` (each call at most :data:`MAX_POINTS_PER_CALL`), in order. Raises
        :class:`AnyboardUnavailable` or :class:`AnyboardLoginRefused`; points already written stay written
        (a re-sent point overwrites itself). ``timeout_s`` shortens each socket wait (what is left of a
        host's ``close(timeout)``)."""
        wait_s = self.config.timeout_s if timeout_s is None else max(0.05, min(timeout_s, self.config.timeout_s))
        if self._socket is not None:
            self._socket.setTimeout(wait_s * 1000.0)
        for start in range(0, len(points), MAX_POINTS_PER_CALL):
            self._insert(points[start:start + MAX_POINTS_PER_CALL])

    def _insert(self, points: Sequence[Point]) -> None:
        if not points:
            return
        if self._client is None:
            self._open()
        # not aligned, as the SDK's SQL inserts create them: a device shared with it stays compatible
        request = TSInsertTabletsReq(sessionId=self._session_id, isAligned=False, **_tablets(points))
        try:
            status = self._client.insertTablets(request)
        except (TException, OSError, socket.timeout, EOFError) as exc:
            self._drop()
            raise self._unavailable(f"insertTablets of {len(points)} points", exc) from None
        try:
            self._check(status, f"insertTablets of {len(points)} points")
        except AnyboardError:
            self._drop()  # a fresh session next time (the server may have dropped ours)
            raise
        self.calls += 1

    def close(self) -> None:
        """Close the session (best effort, bounded by the timeout) and the socket."""
        if self._client is not None and self._session_id is not None:
            try:
                self._client.closeSession(TSCloseSessionReq(self._session_id))
            except Exception:  # noqa: BLE001 - the server may be gone: closing must not raise
                pass
        self._drop()


__all__ = ["AnyboardWriter", "AnyboardError", "AnyboardUnavailable", "AnyboardLoginRefused",
           "check_client_installed", "MISSING_EXTRA", "MAX_POINTS_PER_CALL"]
