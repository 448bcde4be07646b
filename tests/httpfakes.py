"""Misbehaving HTTP servers on loopback for the client's hardening tests: one that redirects, one that
answers with a fixed status and headers, one that dribbles its answer a byte at a time, and a recorder
that notes every request it sees (the redirect target that must see none)."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle + delayed-ACK 40 ms stalls

    def _answer(self) -> None:
        fake: "FakeServer" = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with fake.lock:
            fake.requests.append((self.command, self.path, dict(self.headers.items()), body))
            fake.peers.append(self.client_address)
        status, headers, payload = fake.next_answer(self.path)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        if fake.close_after_answer:
            self.close_connection = True  # without saying so: as a server closing an idle keep-alive connection

    do_GET = do_POST = do_PATCH = _answer


Answer = Tuple[int, Dict[str, str], bytes]


class FakeServer:
    """Answers every request with (status, headers, body) and records each request as (method, path,
    headers, body). ``answers`` are given out in order, the last one repeating; ``by_path`` answers the
    requests whose path ends with a key (e.g. ``"train_task/state"``) instead."""

    def __init__(self, status: int = 200, headers: Optional[Dict[str, str]] = None, body: bytes = b'{"msg": "ok"}', *,
                 answers: Optional[List[Answer]] = None, by_path: Optional[Dict[str, Answer]] = None,
                 close_after_answer: bool = False) -> None:
        self.answers: List[Answer] = list(answers or [(status, dict(headers or {}), body)])
        self.by_path = dict(by_path or {})
        self.requests: List[Tuple[str, str, Dict[str, str], bytes]] = []
        self.peers: List[Tuple[str, int]] = []  # the client's address of each request
        self.close_after_answer = close_after_answer
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/api"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def next_answer(self, path: str) -> Answer:
        for suffix, answer in self.by_path.items():
            if path.split("?")[0].endswith(suffix):
                return answer
        with self.lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def last(self) -> Tuple[str, str, Dict[str, str], bytes]:
        with self.lock:
            return self.requests[-1]

    def start(self) -> "FakeServer":
        self._thread.start()
        return self

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class DribblingServer:
    """Reads a request, then sends a valid-looking answer one byte every ``interval_s``, never finishing
    within any sensible time. Counts the connections it accepted."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.connections = 0
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/api"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> "DribblingServer":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n" + b"X-Pad: " + b"a" * 100000
        try:
            conn.settimeout(2)
            conn.recv(65536)
            for i in range(len(answer)):
                if self._stop.is_set():
                    break
                conn.sendall(answer[i:i + 1])
                time.sleep(self.interval_s)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
