"""Operations endpoints over HTTP (stdlib `http.server`): `GET /healthz` (JSON) and
`GET /metrics` (Prometheus text format), for the scheduler and the webhook receiver.

    server = OpsServer(("127.0.0.1", 9400), OpsHandler, service="scheduler",
                       health=lambda: (True, {"jobs": [...]}), registry=registry_for(queue))
    server.start()           # a daemon thread
    ...
    server.stop()

`/healthz` answers 200 `{"status": "ok", "service": ..., "uptime_s": ..., ...}` while the
service is alive and its database answers, else 503 `{"status": "unavailable", ...}`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from governance.redaction import redact
from jobs.metrics import CONTENT_TYPE, exposition

log = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, dict[str, Any]]]


class OpsServer(ThreadingHTTPServer):
    """A threading HTTP server with a health callable and a metrics registry."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 service: str, health: Health, registry: Any):
        self.service = service
        self.health = health
        self.registry = registry
        self.started_at = time.time()
        self._thread: threading.Thread | None = None
        super().__init__(address, handler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; returns it."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"{self.service}-http", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop serving and close the socket (from another thread than the serving one)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
        self.server_close()

    def health_body(self) -> tuple[int, dict[str, Any]]:
        try:
            ok, details = self.health()
        except Exception as exc:  # the health check itself failed: not healthy
            ok, details = False, {"reason": redact(f"{type(exc).__name__}: {exc}")}
        body = {"status": "ok" if ok else "unavailable", "service": self.service,
                "uptime_s": round(time.time() - self.started_at, 3), **details}
        return (200 if ok else 503), body


class OpsHandler(BaseHTTPRequestHandler):
    """GET /healthz and GET /metrics; 404 elsewhere."""

    server: OpsServer
    protocol_version = "HTTP/1.1"
    server_version = "persona-gov"
    sys_version = ""
    timeout = 10  # seconds a connection may sit idle or send slowly

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        if path == "/healthz":
            code, body = self.server.health_body()
            self.send_json(code, body)
        elif path == "/metrics":
            self.send_bytes(200, exposition(self.server.registry), CONTENT_TYPE)
        else:
            self.send_json(404, {"error": f"no such path: GET {path}"})

    def send_json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                  close: bool = False) -> None:
        self.send_bytes(code, json.dumps(body).encode(), "application/json", headers, close)

    def send_bytes(self, code: int, data: bytes, content_type: str,
                   headers: dict[str, str] | None = None, close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:  # a request body left unread would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("%s %s: %s", self.server.service, self.address_string(), format % args)
