"""The operator's HTTP endpoint: /metrics, /healthz, /readyz, /status.

Plain ``http.server`` on its own thread: four read-only GET routes do not
justify a web framework, and the daemon must keep serving them while its main
loop waits on Redis or Postgres (that is exactly when operators look).

The server reads the daemon only through :class:`OpsView`, so this module does not import
``cdcd.daemon`` (which imports it to start the server): no import cycle, and any object with
these four members (a test double, another process's state) can be served.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdcd.metrics import Metrics


class OpsView(Protocol):
    """What the HTTP endpoint reads from a daemon; :class:`cdcd.daemon.Daemon` implements it."""

    @property
    def metrics(self) -> Metrics:
        """The registry /metrics renders."""

    def liveness(self) -> tuple[bool, str]:
        """/healthz: alive, and why not."""

    def readiness(self) -> tuple[bool, list[str]]:
        """/readyz: ready, and the reasons it is not."""

    def status(self) -> dict[str, Any]:
        """/status: a JSON-serialisable summary."""


class _Handler(BaseHTTPRequestHandler):
    daemon_ref: OpsView  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the daemon's own log

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, default=str).encode())

    def do_GET(self) -> None:
        d = self.daemon_ref
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(d.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive, why = d.liveness()
            self._json(200 if alive else 503, {"alive": alive, "reason": why})
        elif path == "/readyz":
            ready, reasons = d.readiness()
            self._json(200 if ready else 503, {"ready": ready, "reasons": reasons})
        elif path == "/status":
            self._json(200, d.status())
        else:
            self._json(404, {"error": "not found", "routes": ["/metrics", "/healthz", "/readyz", "/status"]})


class OpsServer:
    def __init__(self, daemon: OpsView, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"daemon_ref": daemon})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="cdcd-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> OpsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
