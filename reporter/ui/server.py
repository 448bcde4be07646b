"""``anylearn-reporter ui``: the page of every curve, served on 127.0.0.1 from run directories.

Only requests whose ``Host`` is 127.0.0.1, localhost or [::1] are answered (403 otherwise), so that a
web page whose name was rebound to 127.0.0.1 cannot read the runs. Routes: ``/`` (the page, :mod:`.page`), ``/api/runs``, ``/api/run?id=``, ``/api/compare?metric=&run=`` (JSON,
:class:`~.model.Catalog`). One lock serialises the catalog (its caches are read incrementally). Every
answer forbids loading anything from elsewhere (``Content-Security-Policy``); an unknown id or path is a
404, a failure inside a request a 500 with one line, and the server goes on.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Sequence
from urllib.parse import parse_qs, urlsplit

from ..config import DEFAULT_UI_PORT, ENV_OBJECTIVE_METRIC
from ..log import get_logger
from .model import Catalog
from .page import render_page

DEFAULT_PORT = DEFAULT_UI_PORT
HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class UiServer:
    """The page's HTTP server on ``127.0.0.1:port`` (0: any free port) over a :class:`Catalog`."""

    def __init__(self, catalog: Catalog, port: int = DEFAULT_PORT) -> None:
        self.catalog = catalog
        self.lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            ui = owner

        self.httpd = ThreadingHTTPServer((HOST, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self._thread: Optional[threading.Thread] = None

    def initial(self, run_id: str = "", metric: str = "") -> Dict[str, Any]:
        """The first answers, embedded in the page: the runs, the run ``run_id`` (else the newest), the
        comparison of ``metric`` (else of the first metric)."""
        with self.lock:
            runs = self.catalog.runs_json()
            run = self.catalog.run_json(run_id) if run_id else None
            if run is None and runs["runs"]:
                run = self.catalog.run_json(runs["runs"][0]["id"])
            selected = run["id"] if run else ""
            if metric in runs["metrics"]:
                return {"runs": runs, "run": run, "compare": self.catalog.compare_json(metric, selected)}
            compare = self.catalog.compare_json(runs["metrics"][0], selected) if runs["metrics"] else None
        return {"runs": runs, "run": run, "compare": compare}

    def start(self) -> "UiServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="anylearn-reporter-ui", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    ui: UiServer
    server_version = "anylearn-reporter-ui"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def _send(self, status: int, body: bytes, content_type: str, nonce: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        source = f"'nonce-{nonce}'" if nonce else "'none'"
        self.send_header("Content-Security-Policy",
                         f"default-src 'none'; script-src {source}; style-src {source}; connect-src 'self'; img-src data:")
        self.end_headers()
        self.wfile.write(body)

    def _host_is_loopback(self) -> bool:
        """Whether the request's ``Host`` names this machine's loopback (with or without our port)."""
        host = (self.headers.get("Host") or "").strip().lower()
        port = f":{self.ui.port}"
        if host.endswith(port):
            host = host[: -len(port)]
        return host in LOOPBACK_HOSTS

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, allow_nan=False, default=str).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._host_is_loopback():  # a page of another site reaching us by DNS rebinding
            return self._json(403, {"error": "this page answers only as 127.0.0.1, localhost or [::1]"})
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if parts.path == "/":
                nonce = secrets.token_urlsafe(16)
                page = render_page(self.ui.initial(query.get("run", ""), query.get("metric", "")), nonce)
                return self._send(200, page.encode("utf-8", "surrogateescape"), "text/html; charset=utf-8", nonce)
            with self.ui.lock:
                if parts.path == "/api/runs":
                    return self._json(200, self.ui.catalog.runs_json())
                if parts.path == "/api/run":
                    run = self.ui.catalog.run_json(query.get("id", ""))
                    if run is None:
                        return self._json(404, {"error": "no such run: reload the page"})
                    return self._json(200, run)
                if parts.path == "/api/compare":
                    return self._json(200, self.ui.catalog.compare_json(query.get("metric", ""), query.get("run", "")))
            self._json(404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # one bad run directory must not take the page down
            get_logger().warning("ui: %s failed: %s: %s", parts.path, type(exc).__name__, exc)
            try:
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"[:300]})
            except OSError:
                pass


def ui_command(paths: Sequence[str], *, port: int = DEFAULT_PORT, default_mode: Optional[str] = None) -> int:
    """Serve the page until interrupted; 2 when the port cannot be bound."""
    try:
        # The objective of a run without objective.json: the one this shell names, as the run's own would.
        default_metric = os.environ.get(ENV_OBJECTIVE_METRIC, "").strip() or None
        server = UiServer(Catalog(paths, default_mode, default_metric), port)
    except OSError as exc:
        print(f"anylearn-reporter: cannot listen on {HOST}:{port} ({exc.strerror}); choose another with --port", file=sys.stderr)
        return 2
    print(f"AnyLearn reporter ui at {server.url} (runs under {', '.join(server.catalog.paths)}); Ctrl-C stops it", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


__all__ = ["UiServer", "ui_command", "DEFAULT_PORT"]
