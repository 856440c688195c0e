"""`persona-gov webhook`: the receiver of MLflow's model-registry webhooks. It queues an audit
of the version an event names and answers at once; the nightly workers drain the queue
(`jobs.queue`, `persona-gov nightly --once --queue`, the scheduler's queue job).

    export PERSONA_AUDIT_WEBHOOK_SECRET=...          # the secret given to create_webhook
    persona-gov webhook --config nightly.yaml --host 127.0.0.1 --port 8080

What MLflow 3.17 sends (`mlflow/webhooks/delivery.py`): a POST of the JSON body
`{"entity": "model_version", "action": "created", "timestamp": ISO-8601, "data": {"name",
"version", ...}}` with the headers `X-MLflow-Delivery-Id` (a UUID), `X-MLflow-Timestamp`
(Unix seconds) and, when the webhook has a secret, `X-MLflow-Signature: v1,<base64>`: the
HMAC-SHA256 under the secret of `<delivery id>.<timestamp>.<body>` (the Standard Webhooks
scheme). It retries on 429 and 5xx, not on other answers.

A delivery is queued only when all of this holds, else it is refused and nothing is queued:
- its body is at most `webhook.max_body_bytes` (413) and has a Content-Length (411);
- it is signed, and the signature matches the secret from `PERSONA_AUDIT_WEBHOOK_SECRET`
  (compared with `hmac.compare_digest`; never read from the config file) (401);
- its timestamp is within `webhook.tolerance_s` (default 300 s) of now, either way (401);
- its delivery id was not seen before: the queue's unique column, and for deliveries that
  were acknowledged without queuing, a memory of the last 2 x tolerance (409);
- its body is JSON naming an event and a registered model version (400).
Signed events the config does not list, and `model_version_tag.set` events of the audit's own
approval record (tags `persona_audit.*`, which the nightly writes), are acknowledged (200)
and not queued. A queued delivery is answered 202 with the row id; a queue database that
does not answer within half a second, 503 (MLflow retries).

The request thread only verifies and inserts one row: no MLflow call, no audit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from governance.errors import ConfigError
from governance.redaction import redact, register_secret
from jobs import metrics
from jobs.config import NightlyConfig
from jobs.ops import OpsHandler, OpsServer
from jobs.queue import AuditQueue, Duplicate

log = logging.getLogger(__name__)

SECRET_ENV = "PERSONA_AUDIT_WEBHOOK_SECRET"
MIN_SECRET_LENGTH = 16
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
OWN_TAG_PREFIX = "persona_audit."
QUEUE_BUSY_TIMEOUT_S = 0.5

_DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")
_VERSION = re.compile(r"^[0-9]{1,18}$")


# -- the signature --------------------------------------------------------------------------


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature header value for this delivery: `v1,<base64 HMAC-SHA256>`."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_matches(secret: str, delivery_id: str, timestamp: str, body: bytes,
                      header: str) -> bool:
    """Whether one of the space-separated `v1,<base64>` signatures in `header` is this
    delivery's (constant-time comparison of the digests)."""
    expected = base64.b64decode(sign(secret, delivery_id, timestamp, body).split(",", 1)[1])
    matched = False
    for part in header.split():
        version, _, value = part.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        matched |= hmac.compare_digest(given, expected)
    return matched


# -- one delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """How a delivery is answered: HTTP status, the outcome label (metrics, logs), a body."""

    code: int
    outcome: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        key = "error" if self.code >= 400 else "status"
        value = self.message if self.code >= 400 else self.outcome
        return {key: value, **self.extra}


class _Seen:
    """Delivery ids answered 2xx in the last `keep_s` seconds (a replay of one that was not
    queued would otherwise go unnoticed: the queue only knows the ids it stored)."""

    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def __contains__(self, delivery_id: str) -> bool:
        now = time.time()
        with self._lock:
            return self._ids.get(delivery_id, 0.0) > now

    def add(self, delivery_id: str) -> None:
        now = time.time()
        with self._lock:
            if len(self._ids) > 10_000:
                self._ids = {k: t for k, t in self._ids.items() if t > now}
            self._ids[delivery_id] = now + self.keep_s


class Receiver:
    """The webhook logic without the HTTP plumbing: `answer(headers, body)`."""

    def __init__(self, config: NightlyConfig, secret: str, queue: AuditQueue):
        self.options = config.webhook
        self.secret = secret
        self.queue = queue
        self.seen = _Seen(2 * self.options.tolerance_s)

    def answer(self, headers: Mapping[str, str], body: bytes,
               now: float | None = None) -> Reply:
        now = time.time() if now is None else now
        signature = headers.get(SIGNATURE_HEADER)
        delivery_id = headers.get(DELIVERY_ID_HEADER) or ""
        timestamp = headers.get(TIMESTAMP_HEADER) or ""
        if not signature:
            return Reply(401, "unsigned", f"unsigned delivery: no {SIGNATURE_HEADER} header")
        if not _DELIVERY_ID.match(delivery_id):
            return Reply(401, "bad_headers", f"missing or malformed {DELIVERY_ID_HEADER} header")
        if not timestamp.isdigit() or len(timestamp) > 12:
            return Reply(401, "bad_headers", f"missing or malformed {TIMESTAMP_HEADER} header")
        if not signature_matches(self.secret, delivery_id, timestamp, body, signature):
            return Reply(401, "bad_signature", "signature does not match")
        skew = now - int(timestamp)
        if abs(skew) > self.options.tolerance_s:
            return Reply(401, "stale", f"timestamp {timestamp} is {skew:+.0f} s from now "
                                       f"(tolerance {self.options.tolerance_s:g} s)")
        if delivery_id in self.seen:
            return Reply(409, "replayed", f"delivery {delivery_id} was already received")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Reply(400, "bad_request", f"body is not JSON: {exc}")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
            return Reply(400, "bad_request", "body has no `data` object")
        event = f"{payload.get('entity')}.{payload.get('action')}"
        data = payload["data"]
        if event not in self.options.events:
            self.seen.add(delivery_id)
            return Reply(200, "ignored", "", {"reason": f"event {event} does not queue audits"})
        if event == "model_version_tag.set" and str(data.get("key", "")).startswith(
                OWN_TAG_PREFIX):
            self.seen.add(delivery_id)
            return Reply(200, "ignored", "", {"reason": "the audit's own approval record"})
        name, version = data.get("name"), data.get("version")
        if (not isinstance(name, str) or not name or len(name) > 512
                or any(ord(c) < 32 or ord(c) == 127 for c in name)):
            return Reply(400, "bad_request", "data.name is not a registered model name")
        version = str(version) if isinstance(version, (str, int)) else ""
        if not _VERSION.match(version):
            return Reply(400, "bad_request", "data.version is not a model version number")
        try:
            row = self.queue.enqueue(name, version, event, delivery_id, received_at=now)
        except Duplicate:
            return Reply(409, "replayed", f"delivery {delivery_id} is already in the queue")
        except Exception as exc:  # the database is busy or down: MLflow retries 503
            log.error("cannot queue %s v%s: %s", name, version, redact(exc))
            return Reply(503, "unavailable", "the queue database did not answer",
                         {"retry_after_s": 5})
        self.seen.add(delivery_id)
        log.info("queued %s v%s (%s, delivery %s) as row %d", name, version, event,
                 delivery_id, row)
        return Reply(202, "queued", "", {"id": row, "model_name": name, "version": version,
                                         "event": event})


class _Handler(OpsHandler):
    """GET /healthz, GET /metrics, POST <webhook.path>."""

    server: WebhookServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        t0 = time.perf_counter()
        reply, unread = self._reply()
        headers = {"Retry-After": "5"} if reply.code == 503 else None
        self.send_json(reply.code, reply.body(), headers, close=unread)
        seconds = time.perf_counter() - t0
        metrics.WEBHOOK_REQUESTS.labels(outcome=reply.outcome).inc()
        metrics.WEBHOOK_SECONDS.observe(seconds)
        if reply.code >= 400:
            log.warning("refused a delivery from %s with %d (%s): %s", self.client_address[0],
                        reply.code, reply.outcome, reply.message)

    def _reply(self) -> tuple[Reply, bool]:
        """The reply, and whether the body was left unread."""
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        if path != receiver.options.path:
            return Reply(404, "not_found", f"no such path: POST {path}"), True
        length = self.headers.get("Content-Length")
        if length is None:
            return Reply(411, "bad_request", "a Content-Length header is required"), True
        try:
            n = int(length)
        except ValueError:
            return Reply(400, "bad_request", "malformed Content-Length"), True
        if n < 0:
            return Reply(400, "bad_request", "malformed Content-Length"), True
        if n > receiver.options.max_body_bytes:
            return Reply(413, "too_large", f"body of {n} bytes is over the limit of "
                                           f"{receiver.options.max_body_bytes}"), True
        try:
            body = self.rfile.read(n)
        except (TimeoutError, OSError):
            return Reply(400, "bad_request", "the body did not arrive in time"), True
        if len(body) != n:
            return Reply(400, "bad_request", "the body is shorter than its Content-Length"), True
        return receiver.answer(self.headers, body), False


class WebhookServer(OpsServer):
    """The receiver's HTTP server: the webhook path, /healthz and /metrics."""

    def __init__(self, address: tuple[str, int], receiver: Receiver):
        self.receiver = receiver
        super().__init__(address, _Handler, service="webhook", health=self._health,
                         registry=metrics.registry_for(receiver.queue))

    @property
    def url(self) -> str:
        """Where MLflow posts: give this to `create_webhook(url=...)`."""
        return self.base_url + self.receiver.options.path

    def _health(self) -> tuple[bool, dict[str, Any]]:
        try:
            counts = self.receiver.queue.counts()
        except Exception as exc:
            return False, {"reason": redact(f"the queue database does not answer: {exc}")}
        return True, {"queue": counts, "path": self.receiver.options.path}


def secret_from_env(env: Mapping[str, str] | None = None) -> str:
    """The HMAC secret from `PERSONA_AUDIT_WEBHOOK_SECRET`; a ConfigError when unset or
    shorter than 16 characters."""
    secret = (os.environ if env is None else env).get(SECRET_ENV, "")
    if not secret:
        raise ConfigError(f"{SECRET_ENV} is not set: the receiver refuses to run without the "
                          "secret it checks MLflow's signatures with (the secret given to "
                          "MlflowClient.create_webhook)")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{SECRET_ENV} is shorter than {MIN_SECRET_LENGTH} characters: use a "
                          "random secret, e.g. `python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'`")
    register_secret(secret)
    return secret


def make_server(config: NightlyConfig, secret: str, *, host: str | None = None,
                port: int | None = None, queue: AuditQueue | None = None) -> WebhookServer:
    """The receiver's server, bound (port 0: a free port) but not serving yet."""
    queue = queue or AuditQueue(config.lease_url(), busy_timeout_s=QUEUE_BUSY_TIMEOUT_S)
    address = (host or config.webhook.host,
               config.webhook.port if port is None else port)
    try:
        return WebhookServer(address, Receiver(config, secret, queue))
    except OSError as exc:
        queue.dispose()
        raise ConfigError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from exc


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_webhook(config: NightlyConfig, *, host: str | None = None,
                port: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean stop."""
    secret = secret_from_env()
    server = make_server(config, secret, host=host, port=port)
    bound = server.server_address[0]
    if not _loopback(str(bound)):
        log.warning("the webhook receiver listens on %s, not on loopback: put a TLS proxy in "
                    "front of it (MLflow posts only to https URLs unless "
                    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES says otherwise)", bound)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping the webhook receiver", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        log.info("webhook receiver listening on %s (events: %s; queue: table %s in %s); "
                 "GET /healthz, GET /metrics", server.url, ", ".join(config.webhook.events),
                 "persona_audit_queue", redact(server.receiver.queue.url))
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()
        server.receiver.queue.dispose()
    log.info("webhook receiver stopped")
    return 0
