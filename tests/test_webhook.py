"""Audits triggered by the registry: the webhook receiver (a real server on a free loopback
port, signed as MLflow 3.17 signs), the durable queue (two processes racing on it, SQLite and
PostgreSQL), a real `mlflow server` calling the receiver, the queue drained by a nightly
pass, and the receiver's /healthz and /metrics."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from governance.errors import ConfigError
from jobs.config import load_config
from jobs.queue import AuditQueue

from support.nightly import ENABLED, log_tiny, register, write_setup
from support.servers import clean_env, free_port, mlflow_server

SECRET = "whsec-" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PERSONA_AUDIT_CONFIG",
                "PERSONA_AUDIT_LEASE_URL", "PERSONA_AUDIT_WEBHOOK_SECRET"):
        monkeypatch.delenv(var, raising=False)


def _config(tmp_path: Path, **overrides):
    return load_config(None, env={}, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                       **{"lease.url": f"sqlite:///{tmp_path}/queue.db", **overrides})


@pytest.fixture
def receiver(tmp_path):
    """A receiver serving from a thread on a free loopback port, its queue in SQLite."""
    from jobs.webhook import make_server

    config = _config(tmp_path, **{"webhook.max_body_bytes": 4096})
    server = make_server(config, SECRET, port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.receiver.queue.dispose()


def mlflow_delivery(data: dict, entity: str = "model_version", action: str = "created",
                    secret: str = SECRET, delivery_id: str | None = None,
                    timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A body and headers exactly as MLflow 3.17 sends them (its own signing function)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps({"entity": entity, "action": action,
                          "timestamp": "2026-12-01T00:00:00+00:00", "data": data})
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return payload.encode(), {
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, ts, payload)}


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, float]:
    """POST over a fresh connection: status, JSON reply, seconds to the answer."""
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    t0 = time.perf_counter()
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data or b"{}"), time.perf_counter() - t0
    finally:
        conn.close()


def get(url: str) -> tuple[int, str, str]:
    host, port, path = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
    finally:
        conn.close()


def _split(url: str) -> tuple[str, int, str]:
    m = re.match(r"^http://([^:/]+):(\d+)(/.*)?$", url)
    assert m, url
    return m[1], int(m[2]), m[3] or "/"


def rows(server) -> list:
    return server.receiver.queue.items()


# -- 1. the signature, against a real running receiver -------------------------------------


def test_a_delivery_signed_like_mlflow_is_queued_within_a_second(receiver):
    body, headers = mlflow_delivery({"name": "my-llm", "version": "3", "source": "models:/m-1",
                                     "run_id": None, "tags": {}, "description": None})
    code, reply, took = post(receiver.url, body, headers)
    assert code == 202, reply
    assert took < 1.0
    [row] = rows(receiver)
    assert (row.model_name, row.version, row.event, row.delivery_id, row.state) == (
        "my-llm", "3", "model_version.created", headers["X-MLflow-Delivery-Id"], "queued")
    assert reply == {"status": "queued", "id": row.id, "model_name": "my-llm", "version": "3",
                     "event": "model_version.created"}


def _unsigned(body, headers):
    del headers["X-MLflow-Signature"]
    return body, headers


def _tampered(body, headers):
    return body.replace(b'"version": "3"', b'"version": "4"'), headers


def _wrong_secret(body, headers):
    _, other = mlflow_delivery({"name": "my-llm", "version": "3"}, secret="not-the-secret",
                               delivery_id=headers["X-MLflow-Delivery-Id"],
                               timestamp=int(headers["X-MLflow-Timestamp"]))
    return body, {**headers, "X-MLflow-Signature": other["X-MLflow-Signature"]}


def _resigned_at(offset_s):
    def change(body, _headers):
        return mlflow_delivery({"name": "my-llm", "version": "3"},
                               timestamp=int(time.time()) + offset_s)
    return change


def _other_timestamp(body, headers):  # the signature covers the timestamp
    return body, {**headers, "X-MLflow-Timestamp": str(int(headers["X-MLflow-Timestamp"]) - 1)}


def _other_delivery_id(body, headers):  # ... and the delivery id
    return body, {**headers, "X-MLflow-Delivery-Id": str(uuid.uuid4())}


def _garbage_signature(body, headers):
    return body, {**headers, "X-MLflow-Signature": "v1,%%%not-base64"}


def _unknown_scheme(body, headers):
    return body, {**headers, "X-MLflow-Signature": headers["X-MLflow-Signature"].replace(
        "v1,", "v2,")}


@pytest.mark.parametrize(("change", "code", "says"), [
    (_unsigned, 401, "unsigned"),
    (_wrong_secret, 401, "signature does not match"),
    (_tampered, 401, "signature does not match"),
    (_other_timestamp, 401, "signature does not match"),
    (_other_delivery_id, 401, "signature does not match"),
    (_garbage_signature, 401, "signature does not match"),
    (_unknown_scheme, 401, "signature does not match"),
    (_resigned_at(-301), 401, "tolerance 300 s"),   # stale, correctly signed
    (_resigned_at(+301), 401, "tolerance 300 s"),   # from the future
], ids=["unsigned", "wrong-secret", "tampered-body", "other-timestamp", "other-delivery-id",
        "garbage-signature", "unknown-scheme", "stale", "future"])
def test_refused_deliveries_queue_nothing(receiver, change, code, says):
    body, headers = change(*mlflow_delivery({"name": "my-llm", "version": "3"}))
    status, reply, took = post(receiver.url, body, headers)
    assert (status, rows(receiver)) == (code, [])
    assert says in reply["error"]
    assert took < 1.0


def test_a_replayed_delivery_is_refused(receiver, tmp_path):
    from jobs.webhook import make_server

    body, headers = mlflow_delivery({"name": "my-llm", "version": "3"})
    assert post(receiver.url, body, headers)[0] == 202
    code, reply, _ = post(receiver.url, body, headers)
    assert code == 409 and "already received" in reply["error"]
    assert len(rows(receiver)) == 1
    # a restarted receiver (no memory) still refuses it: the queue's delivery ids are unique
    again = make_server(_config(tmp_path), SECRET, port=0)
    again.start()
    try:
        code, reply, _ = post(again.url, body, headers)
    finally:
        again.stop()
        again.receiver.queue.dispose()
    assert code == 409 and "already in the queue" in reply["error"]
    assert len(rows(receiver)) == 1


def test_size_limits_and_bad_bodies(receiver):
    body, headers = mlflow_delivery({"name": "m" * 5000, "version": "3"})
    assert post(receiver.url, body, headers)[:1] == (413,)  # over webhook.max_body_bytes
    # no Content-Length (chunked): refused without reading a body of unknown size
    host, port, path = _split(receiver.url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    for data in ({"name": "my-llm"}, {"name": "my-llm", "version": "3; drop"}, {"version": "1"}):
        assert post(receiver.url, *mlflow_delivery(data))[0] == 400
    payload, headers = mlflow_delivery({"name": "my-llm", "version": "3"})
    assert post(receiver.url + "x", payload, headers)[0] == 404
    assert rows(receiver) == []


def test_alias_and_tag_events_queue_their_version_but_not_the_audit_s_own_tags(receiver):
    deliveries = [
        (mlflow_delivery({"name": "my-llm", "alias": "champion", "version": "2"},
                         "model_version_alias", "created"), 202),
        (mlflow_delivery({"name": "my-llm", "version": "2", "key": "stage", "value": "review"},
                         "model_version_tag", "set"), 202),
        # the nightly's approval record fires these: acknowledged, never queued (no loop)
        (mlflow_delivery({"name": "my-llm", "version": "2", "key": "persona_audit.status",
                          "value": "pass"}, "model_version_tag", "set"), 200),
        (mlflow_delivery({"name": "my-llm", "tags": {}, "description": None},
                         "registered_model", "created"), 200),
    ]
    for (body, headers), code in deliveries:
        status, reply, _ = post(receiver.url, body, headers)
        assert status == code, reply
    assert [(r.version, r.event) for r in rows(receiver)] == [
        ("2", "model_version_alias.created"), ("2", "model_version_tag.set")]
    body, headers = deliveries[2][0]  # an acknowledged delivery replayed
    assert post(receiver.url, body, headers)[0] == 409


def test_the_secret_comes_only_from_the_environment(tmp_path):
    from jobs.webhook import secret_from_env

    (tmp_path / "nightly.yaml").write_text("webhook:\n  secret: in-the-file-0123456789\n")
    with pytest.raises(ConfigError, match="PERSONA_AUDIT_WEBHOOK_SECRET"):
        load_config(tmp_path / "nightly.yaml", env={})
    with pytest.raises(ConfigError, match="is not set"):
        secret_from_env({})
    with pytest.raises(ConfigError, match="shorter than 16"):
        secret_from_env({"PERSONA_AUDIT_WEBHOOK_SECRET": "short"})
    assert secret_from_env({"PERSONA_AUDIT_WEBHOOK_SECRET": SECRET}) == SECRET


def test_queue_mode_takes_no_model_selection(capsys):
    from jobs.cli.main import main

    for args in (["--once", "--queue", "--model", "x"], ["--once", "--queue", "--force"],
                 ["--queue"]):
        assert main(["nightly", *args]) == 2
        assert "--queue drains the queue once" in capsys.readouterr().err


# -- 4. health and metrics on the receiver -------------------------------------------------


def test_receiver_health_and_metrics(receiver, tmp_path):
    post(receiver.url, *mlflow_delivery({"name": "my-llm", "version": "5"}))
    post(receiver.url, *_unsigned(*mlflow_delivery({"name": "my-llm", "version": "5"})))
    code, ctype, text = get(receiver.base_url + "/healthz")
    health = json.loads(text)
    assert (code, ctype, health["status"], health["service"]) == (
        200, "application/json", "ok", "webhook")
    assert health["queue"]["queued"] == 1
    code, ctype, text = get(receiver.base_url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    assert 'persona_audit_queue_length{state="queued"} 1.0' in text
    assert "persona_audit_queue_up 1.0" in text
    assert re.search(r'persona_audit_webhook_requests_total\{outcome="queued"\} [1-9]', text)
    assert re.search(r'persona_audit_webhook_requests_total\{outcome="unsigned"\} [1-9]', text)
    assert "persona_audit_webhook_request_duration_seconds_bucket" in text
    assert get(receiver.base_url + "/nope")[0] == 404
    # the queue table gone: not healthy
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/queue.db")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE persona_audit_queue"))
    engine.dispose()
    code, _, text = get(receiver.base_url + "/healthz")
    assert code == 503 and json.loads(text)["status"] == "unavailable"
    assert "persona_audit_queue_up 0.0" in get(receiver.base_url + "/metrics")[2]


def test_the_command_logs_json_lines_and_never_the_secret(tmp_path):
    """`persona-gov --log-json webhook` as a process: it answers, stops on SIGTERM, and each
    log line is a JSON object without the secret."""
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(f"tracking_uri: sqlite:///{tmp_path}/mlflow.db\n"
                   f"lease: {{url: 'sqlite:///{tmp_path}/queue.db'}}\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli.main", "--log-json", "webhook", "--config", str(cfg),
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=clean_env(PERSONA_AUDIT_WEBHOOK_SECRET=SECRET))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        body, headers = mlflow_delivery({"name": "my-llm", "version": "7"})
        assert post(base + "/webhook", body, headers)[0] == 202
        assert post(base + "/webhook", body, {**headers, "X-MLflow-Signature": "v1,AAAA"}
                    )[0] == 401
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    messages = " | ".join(r["message"] for r in records)
    assert "listening on http://127.0.0.1" in messages and "queued my-llm v7" in messages
    assert "refused a delivery" in messages and "webhook receiver stopped" in messages
    assert SECRET not in out + err


# -- the queue: two workers never take the same row --------------------------------------------

WORKER = r"""
import json, sys, time
from jobs.queue import AuditQueue
url, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
queue = AuditQueue(url)
while time.time() < start:
    time.sleep(0.001)
took = []
while (item := queue.take(name)) is not None:
    took.append(item.id)
    assert queue.finish(item, "done", f"by {name}")
print(json.dumps(took))
"""


def _race(url: str, n_rows: int = 60, n_workers: int = 3) -> None:
    queue = AuditQueue(url)
    ids = [queue.enqueue("m", str(i), "model_version.created", f"d-{i}")
           for i in range(n_rows)]
    start = time.time() + 4  # every worker imported and connected before the race
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"w{i}", str(start)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=clean_env()) for i in range(n_workers)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n_workers, [e for _, e in results]
    taken = [json.loads(out) for out, _ in results]
    flat = [i for t in taken for i in t]
    assert sorted(flat) == ids  # every row taken, none twice
    assert sum(1 for t in taken if t) >= 2, taken  # a real race: several workers got rows
    by_row = {r.id: r for r in queue.items()}
    for w, got in enumerate(taken):
        for i in got:
            assert (by_row[i].state, by_row[i].taken_by, by_row[i].detail) == (
                "done", f"w{w}", f"by w{w}")
    queue.dispose()


def test_two_workers_never_take_the_same_row_sqlite(tmp_path):
    _race(f"sqlite:///{tmp_path}/queue.db")


@pytest.mark.postgres
def test_two_workers_never_take_the_same_row_postgres(pg_url):
    _race(pg_url)


def test_a_dead_worker_s_row_is_reclaimed(tmp_path):
    queue = AuditQueue(f"sqlite:///{tmp_path}/queue.db")
    queue.enqueue("m", "1", "model_version.created", "d-1")
    first = queue.take("dead-worker")
    assert queue.take("other") is None  # taken rows are not handed out again
    assert queue.reclaim(older_than_s=3600) == 0
    assert queue.reclaim(older_than_s=0) == 1
    second = queue.take("other")
    assert second.id == first.id and second.taken_by == "other"
    assert not queue.finish(first, "done", "late")  # no longer the dead worker's row
    assert queue.finish(second, "done", "ok")
    assert queue.counts() == {"queued": 0, "taken": 0, "done": 1, "error": 0, "skipped": 0}
    queue.dispose()


# -- 2 and 3. a real MLflow server calls the receiver; a nightly pass drains the queue -------------


def _wait_rows(server, n: int, timeout: float = 10) -> list:
    deadline = time.time() + timeout
    while len(rows(server)) < n and time.time() < deadline:
        time.sleep(0.1)
    return rows(server)


def _count(metric: str, **labels: str) -> float:
    from jobs.metrics import REGISTRY

    return REGISTRY.get_sample_value(metric, labels) or 0.0


@pytest.fixture(scope="module")
def registry_with_webhook(tmp_path_factory, tokenizer):
    """A SQLite-backed `mlflow server` whose webhook (created with MlflowClient.create_webhook)
    posts to a receiver on loopback; the nightly config selects models tagged
    persona_audit.enabled=true."""
    import mlflow
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient

    from jobs.webhook import make_server

    root = tmp_path_factory.mktemp("webhook")
    lease_url = f"sqlite:///{root}/leases.db"
    hook = make_server(load_config(None, env={}, **{"lease.url": lease_url}), SECRET, port=0)
    hook.start()
    # what a loopback http receiver needs on the MLflow server: http allowed, private IPs
    # allowed; a fixed key so stored webhook secrets survive a server restart; no 60 s cache
    env = clean_env(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
                    MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
                    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode(),
                    MLFLOW_WEBHOOK_CACHE_TTL="1")
    try:
        with mlflow_server(root, ["--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                                  "--default-artifact-root", str(root / "artifacts")],
                           env, 90) as url:
            with pytest.MonkeyPatch.context() as mp:
                for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
                    mp.delenv(var, raising=False)
                mlflow.set_tracking_uri(url)
                client = MlflowClient(url)
                client.create_webhook(
                    name="persona-audit", url=hook.url, secret=SECRET,
                    events=["model_version.created", "model_version_alias.created",
                            "model_version_tag.set"])
                src = log_tiny(tokenizer, client.create_experiment("models"), 11)
                mlflow.set_tracking_uri(None)
                cfg = write_setup(root / "cfg", url, lease={"url": lease_url})
                yield {"url": url, "client": client, "hook": hook, "config": cfg, "src": src,
                       "root": root}
    finally:
        mlflow.set_tracking_uri(None)
        hook.stop()
        hook.receiver.queue.dispose()


@pytest.mark.e2e
def test_mlflow_calls_the_receiver_and_the_nightly_drains_the_queue(registry_with_webhook,
                                                                     capsys):
    from jobs.cli.main import main

    env = registry_with_webhook
    client, hook = env["client"], env["hook"]
    fast_before = _count("persona_audit_webhook_request_duration_seconds_bucket", le="1.0")
    all_before = _count("persona_audit_webhook_request_duration_seconds_count")

    # 2. creating a version makes MLflow call the receiver, which queues it
    register(client, "tiny-hook", env["src"], ENABLED)
    register(client, "not-enabled", env["src"])  # no persona_audit.enabled tag
    queued = _wait_rows(hook, 2)
    assert sorted((r.model_name, r.version, r.event, r.state) for r in queued) == [
        ("not-enabled", "1", "model_version.created", "queued"),
        ("tiny-hook", "1", "model_version.created", "queued")]
    answered = _count("persona_audit_webhook_request_duration_seconds_count") - all_before
    fast = _count("persona_audit_webhook_request_duration_seconds_bucket", le="1.0")
    assert answered >= 2 and fast - fast_before == answered  # every answer within 1 s
    assert _count("persona_audit_webhook_requests_total", outcome="queued") >= 2

    # 3. a nightly pass drains it: the selected version is audited, the other skipped
    ignored_before = _count("persona_audit_webhook_requests_total", outcome="ignored")
    code = main(["nightly", "--once", "--queue", "--config", str(env["config"])])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "queue pass: 2 versions" in out
    state = {r.model_name: r for r in rows(hook)}
    assert state["tiny-hook"].state == "done" and state["tiny-hook"].detail.startswith("warn")
    assert state["not-enabled"].state == "skipped"
    assert state["not-enabled"].detail == "skipped: not selected by the config"
    mv = client.get_model_version("tiny-hook", "1")
    assert mv.tags["persona_audit.status"] == "warn"  # first version: no baseline
    assert mv.tags["persona_audit.run_id"] in state["tiny-hook"].detail
    assert "persona_audit.status" not in client.get_model_version("not-enabled", "1").tags
    assert _count("persona_audit_last_pass_exit_code", kind="queue") == 0

    # the approval record's tag events reach the receiver and are not queued (no loop)
    deadline = time.time() + 10
    while (_count("persona_audit_webhook_requests_total", outcome="ignored") == ignored_before
           and time.time() < deadline):
        time.sleep(0.1)
    assert _count("persona_audit_webhook_requests_total", outcome="ignored") > ignored_before
    assert len(rows(hook)) == 2

    # an alias set on the audited version queues it again; a full nightly pass drains the
    # queue first (already audited: nothing rerun), then its selection without that version
    runs_before = len(client.search_runs(
        [client.get_experiment_by_name("persona-audits").experiment_id]))
    client.set_registered_model_alias("tiny-hook", "champion", "1")
    [row] = [r for r in _wait_rows(hook, 3) if r.event == "model_version_alias.created"]
    assert main(["nightly", "--once", "--config", str(env["config"])]) == 0
    out = capsys.readouterr().out
    assert "nightly pass: 1 versions" in out, out
    assert "(1 up-to-date)" in out, out
    assert "note: queued by model_version_alias.created; up to date" in out, out
    assert [r.state for r in rows(hook) if r.id == row.id] == ["done"]
    assert len(client.search_runs(
        [client.get_experiment_by_name("persona-audits").experiment_id])) == runs_before
