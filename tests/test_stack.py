"""The production stack as `docker/compose.yaml` wires it, run as real processes on loopback:
PostgreSQL, an `mlflow server` on it serving the artifacts, the webhook receiver and the
scheduler. One new model version goes from its registration to its approval record with no
one starting an audit by hand: MLflow calls the receiver, the receiver queues the version,
the scheduler's queue job audits it in a child process and writes the record.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.nightly import ENABLED, log_tiny, register, write_setup
from support.servers import clean_env, free_port, mlflow_server, wait_healthy

SECRET = "whsec-" + uuid.uuid4().hex


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli.main", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.postgres
@pytest.mark.e2e
def test_a_registered_version_reaches_its_approval_record_through_the_stack(
        pg_url, tmp_path, tokenizer):
    import mlflow
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient

    store = pg_url.replace("postgresql://", "postgresql+psycopg2://")
    server_env = clean_env(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
                           MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
                           MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode(),
                           MLFLOW_WEBHOOK_CACHE_TTL="1")
    args = ["--backend-store-uri", store, "--artifacts-destination", str(tmp_path / "art"),
            "--serve-artifacts"]
    procs: list[subprocess.Popen] = []
    with mlflow_server(tmp_path, args, server_env, 120) as url:
        try:
            hook_port, health_port = free_port(), free_port()
            config = write_setup(
                tmp_path / "cfg", url, lease={"url": store},
                schedule={"cron": "0 3 1 1 *", "jobstore_url": store, "queue_interval_s": 1,
                          "health_port": health_port})
            env = clean_env(PERSONA_AUDIT_WEBHOOK_SECRET=SECRET)
            hook = _start(["webhook", "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(hook_port)], tmp_path / "webhook.log", env)
            procs.append(hook)
            scheduler = _start(["schedule", "--config", str(config)],
                               tmp_path / "scheduler.log", env)
            procs.append(scheduler)
            wait_healthy(f"http://127.0.0.1:{hook_port}/healthz", hook,
                         tmp_path / "webhook.log", 90)
            wait_healthy(f"http://127.0.0.1:{health_port}/healthz", scheduler,
                         tmp_path / "scheduler.log", 90)

            client = MlflowClient(url)
            client.create_webhook(name="persona-audit", secret=SECRET,
                                  url=f"http://127.0.0.1:{hook_port}/webhook",
                                  events=["model_version.created"])
            mlflow.set_tracking_uri(url)
            try:
                source = log_tiny(tokenizer, client.create_experiment("models"), 21)
                version = register(client, "stack-model", source, ENABLED)
            finally:
                mlflow.set_tracking_uri(None)

            def recorded() -> bool:  # the tags come first, the description line last
                mv = client.get_model_version("stack-model", version)
                return ("persona_audit.status" in mv.tags
                        and "[persona audit " in (mv.description or ""))

            deadline = time.time() + 300
            while not recorded():
                for proc, log in ((hook, "webhook.log"), (scheduler, "scheduler.log")):
                    assert proc.poll() is None, (tmp_path / log).read_text()[-3000:]
                assert time.time() < deadline, (tmp_path / "scheduler.log").read_text()[-4000:]
                time.sleep(1)
            mv = client.get_model_version("stack-model", version)
            run = client.get_run(mv.tags["persona_audit.run_id"])
            assert mv.tags["persona_audit.status"] in ("pass", "warn", "fail")
            assert run.data.tags["persona_audit.state"] == "completed"
            assert run.info.status == "FINISHED"
            names = {f.path for f in client.list_artifacts(run.info.run_id, "audit")}
            assert "audit/scores.csv" in names  # served by the tracking server
            assert "[persona audit " in mv.description
        finally:
            for proc in procs:
                _stop(proc)
