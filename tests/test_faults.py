"""Faults the production stack must survive, each provoked for real: a real `mlflow server`
killed mid-audit (restarted within the retry window, or left down), the nightly process
killed mid-audit, PostgreSQL restarting under the lease, the scheduler restarting right after
a fire, and a model too large for the memory it would be loaded into.

Covered elsewhere, not repeated here: a second scheduler on the same job store is refused by
the real `persona-gov schedule` command (exit 2, "another scheduler uses the job store") in
`tests/test_scheduler.py::test_schedule_command_persists_across_restart` (SQLite) and
`test_crafted_pickle_in_job_store_is_never_loaded_postgres` (PostgreSQL); a restarted
scheduler keeps its stored next run (`test_schedule_command_persists_across_restart`,
`test_job_options_and_keep_or_replace`), runs a fire missed while it was down once
(`test_run_missed_while_down_fires_on_restart`, `test_missed_fires_coalesce_into_one_run`);
a hung or crashed audit child (`tests/test_trust.py::test_a_hung_audit_*`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from support.nightly import log_tiny, register, tiny_registry, write_setup
from support.servers import clean_env, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _env(**extra: str) -> dict[str, str]:
    """A subprocess environment: this checkout first on the path, no inherited MLflow or
    PERSONA_AUDIT settings."""
    return clean_env(PYTHONPATH=str(ROOT), **extra)


def _nightly(cfg: Path, log: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli.main", "nightly", "--once", "--config", str(cfg),
         *extra], stdout=open(log.with_suffix(".out"), "w"), stderr=open(log, "w"), env=env,
        cwd=ROOT)


def _output(log: Path) -> str:
    return log.with_suffix(".out").read_text() + log.read_text()


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
          log: Path | None = None, every: float = 0.05):
    """Poll `check()` until it returns something truthy; fail with the nightly's output if
    `proc` exits first or `timeout` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the nightly exited ({proc.returncode}) before {what}:\n"
                                 + (_output(log)[-4000:] if log else ""))
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout} s:\n"
                         + (_output(log)[-4000:] if log else ""))


def _audit_child(nightly: subprocess.Popen) -> psutil.Process | None:
    """The spawned audit child of a nightly process, if it runs now."""
    try:
        for child in psutil.Process(nightly.pid).children():
            if "spawn_main" in " ".join(child.cmdline()):
                return child
    except psutil.Error:
        pass
    return None


def _runs(client, name: str, version: str = "1") -> list:
    exp = client.get_experiment_by_name("persona-audits")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id],
                              f"tags.`persona_audit.model_name` = '{name}' and "
                              f"tags.`persona_audit.model_version` = '{version}'",
                              order_by=["attributes.start_time ASC"])


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _audit_lines(client, name: str, version: str = "1") -> list[str]:
    text = client.get_model_version(name, version).description or ""
    return [b for b in text.split("\n\n") if b.startswith("[persona audit ")]


# what a completed first audit logs (no baseline: no drift report), the last of it included
LOGGED = {"quality/audit", "audit/scores.csv", "audit/audit.json", "heads/race.csv",
          "plots/layer_curves.png", "spec/spec.yaml", "policy/policy.yaml",
          "verdict/verdict.json", "report/report.html"}


def _assert_one_completed_audit(client, name: str, outcome: str) -> str:
    """Exactly one completed run for version 1 of `name`, with every artifact and curve
    logged once, and exactly one approval line on the version, naming that run."""
    runs = _runs(client, name)
    done = [r for r in runs if r.data.tags.get("persona_audit.state") == "completed"]
    assert len(done) == 1, [(r.info.run_id, r.data.tags.get("persona_audit.state"))
                            for r in runs]
    run = done[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["persona_audit.status"] == outcome
    files = _artifacts(client, run.info.run_id)
    missing = {f for f in LOGGED if not any(p == f or p.startswith(f + "/") for p in files)}
    assert not missing, missing
    steps = [m.step for m in client.get_metric_history(run.info.run_id,
                                                       "mlp_out.identity.race")]
    assert sorted(steps) == [0, 1, 2]  # a retried log_batch stored nothing twice
    mv = client.get_model_version(name, "1")
    assert mv.tags["persona_audit.status"] == outcome
    assert mv.tags["persona_audit.run_id"] == run.info.run_id
    lines = _audit_lines(client, name)
    assert len(lines) == 1 and run.info.run_id in lines[0], lines
    return run.info.run_id


# -- a real MLflow server that goes away mid-audit --------------------------------------------


class MlflowServer:
    """`mlflow server` on a fixed loopback port over a SQLite store and a proxied artifact
    directory under `root`, killed and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0  # each start logs to its own file

    def start(self, wait_s: float = 90) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env(),
            start_new_session=True)
        wait_healthy(f"{self.url}/health", self.proc, log, wait_s)

    def kill(self) -> None:
        """SIGKILL the whole server (its process group): no shutdown, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    """A real `mlflow server` with one tiny model logged through it. MLflow's own HTTP
    retries are off, in this process and in the nightly's, so that what carries a pass
    through an outage is the nightly's retry policy, and a dead server is seen at once."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("server")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PERSONA_AUDIT_CONFIG"):
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        server = MlflowServer(root)
        server.start()
        try:
            mlflow.set_tracking_uri(server.url)
            client = MlflowClient(server.url)
            src = log_tiny(tokenizer, client.create_experiment("models"), 11)
            mlflow.set_tracking_uri(None)
            yield {"server": server, "client": client, "src": src}
        finally:
            mlflow.set_tracking_uri(None)
            server.kill()


@pytest.fixture
def served(server, tmp_path, request):
    """The server (started again if a test left it down), a version 1 registered for this
    test, its nightly config, and the nightly's environment with a TMPDIR of its own, where
    the audit child's model download can be watched."""
    if server["server"].proc.poll() is not None:
        server["server"].start()
    name = request.node.name.removeprefix("test_").replace("_", "-")[:60]
    register(server["client"], name, server["src"])
    (tmp_path / "tmp").mkdir()
    return {**server, "name": name, "root": tmp_path,
            "env": _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", TMPDIR=str(tmp_path / "tmp"))}


def _config(served, **retry) -> Path:
    return write_setup(served["root"] / "cfg", served["server"].url,
                       lease={"url": f"sqlite:///{served['root']}/leases.db"},
                       models=[{"name": served["name"], "versions": "all"}], retry=retry)


def _kill_server_mid_audit(served, nightly: subprocess.Popen, log: Path) -> None:
    """Wait until the nightly's audit child has downloaded and loaded the model (its download
    directory came and went) while the run exists, then SIGKILL the server: the audit goes
    on without it, and everything after it meets a dead server."""
    tmp = served["root"] / "tmp"
    seen: list[Path] = []

    def downloaded() -> bool:
        now = list(tmp.glob("persona-gov-mlflow-*"))
        seen.extend(p for p in now if p not in seen)
        return bool(seen) and not now and _audit_child(nightly) is not None

    _wait("model download by the audit child", downloaded, 120, nightly, log)
    assert _runs(served["client"], served["name"]), "the run exists before the audit starts"
    served["server"].kill()


@pytest.mark.e2e
def test_tracking_server_killed_mid_audit_and_back_within_the_retries(served):
    """The server dies while the audit runs and comes back on the same port and store a few
    seconds later: the calls after the audit (artifacts, metrics, verdict, finishing the run,
    the approval record) are retried until it answers, and the version completes with every
    artifact logged once and one approval line."""
    cfg = _config(served, attempts=20, initial_delay_s=0.5, max_delay_s=5)
    log = served["root"] / "nightly.log"
    nightly = _nightly(cfg, log, env=served["env"])
    try:
        _kill_server_mid_audit(served, nightly, log)
        # back only once the nightly has met the dead server: on a loaded machine the audit
        # can outlast any fixed outage
        _wait("the nightly meeting the dead server",
              lambda: "unreachable (attempt 1/20)" in _output(log), 240, nightly, log, every=0.2)
        served["server"].start()
        assert nightly.wait(240) == 0, _output(log)[-4000:]
    finally:
        if nightly.poll() is None:
            nightly.kill()
    out = _output(log)
    assert "unreachable (attempt 1/20)" in out, out[-4000:]  # the outage was met, and retried
    name = served["name"]
    # the first version (no baseline) warns: in the log and in the end table's row
    assert re.search(rf"jobs.nightly: warn +{name} v1 ", out), out[-4000:]
    assert re.search(rf"^{name} v1 +WARN ", out, re.M), out[-4000:]
    _assert_one_completed_audit(served["client"], name, "warn")


@pytest.mark.e2e
def test_tracking_server_killed_mid_audit_and_left_down(served):
    """The server dies while the audit runs and stays down: the pass retries, then fails
    clearly (exit 4, the call and the server named) and stops; the run is left `running`,
    never completed, and the version gets no status and no approval line. (The rerun that
    closes such a run and completes the version: `test_nightly_killed_mid_audit_then_rerun`.)"""
    from mlflow import MlflowClient

    cfg = _config(served, attempts=3, initial_delay_s=0.3, max_delay_s=1)
    log = served["root"] / "nightly.log"
    nightly = _nightly(cfg, log, env=served["env"])
    try:
        _kill_server_mid_audit(served, nightly, log)
        code = nightly.wait(120)
    finally:
        if nightly.poll() is None:
            nightly.kill()
    out, name = _output(log), served["name"]
    assert code == 4, out[-4000:]
    assert re.search(rf"jobs.nightly: error +{name} v1 .*: TrackingUnavailable: MLflow \w+ on "
                     rf"{served['server'].url} unreachable after 3 attempts", out), out[-4000:]
    assert re.search(rf"^{name} v1 +ERROR ", out, re.M), out[-4000:]
    assert f"stopping the pass: tracking store {served['server'].url}" in out
    assert "Traceback" not in log.with_suffix(".out").read_text()

    # the store as the dead server left it, read directly
    store = MlflowClient(f"sqlite:///{served['server'].root}/mlflow.db")
    (run,) = _runs(store, name)
    assert run.data.tags["persona_audit.state"] == "running" and run.info.status == "RUNNING"
    assert "persona_audit.status" not in run.data.tags
    assert "persona_audit.status" not in store.get_model_version(name, "1").tags
    assert _audit_lines(store, name) == []


# -- a SQLite registry for the faults that need no server ------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """A SQLite registry with one logged tiny model (registered under each test's names)."""
    with tiny_registry(tmp_path_factory.mktemp("faults"), tokenizer) as registry:
        yield registry


# -- the nightly process killed mid-audit -----------------------------------------------------


@pytest.mark.e2e
def test_nightly_killed_mid_audit_then_rerun(store, tmp_path):
    """SIGKILL of the nightly while its audit child runs: the child goes with it (no orphan
    keeps auditing), the killed attempt's run stays `running` and its lease expires by its
    ttl; the rerun audits the version, marks the abandoned run `error`, and leaves one
    completed run and one approval line."""
    from jobs.cli.main import main
    from jobs.config import load_config
    from jobs.lease import LeaseStore

    client = store["client"]
    register(client, "killed", store["src"])
    cfg = write_setup(store["root"] / "killed", store["uri"], lease={"ttl_s": 3},
                      models=[{"name": "killed", "versions": "all"}])
    log = tmp_path / "nightly.log"
    leases = LeaseStore(load_config(cfg, env={}).lease_url(), 3)
    nightly = _nightly(cfg, log, env=_env(TMPDIR=str(tmp_path)))
    child = None
    try:
        child = _wait("audit child", lambda: _audit_child(nightly), 120, nightly, log)
        (run,) = _runs(client, "killed")
        time.sleep(1)  # the child is importing and auditing
        nightly.kill()
        nightly.wait()
        held = leases.current("killed/1")  # the dead holder's row, until its ttl runs out
        assert held is not None and held.holder.split(":")[1] == str(nightly.pid)
        _, alive = psutil.wait_procs([child], timeout=5)
        assert not alive, "the audit child outlived the killed nightly"
        _wait("expiry of the killed holder's lease", lambda: leases.current("killed/1") is None,
              10)
    finally:
        leases.dispose()
        if nightly.poll() is None:
            nightly.kill()
        if child is not None and child.is_running():
            child.kill()
    assert client.get_run(run.info.run_id).data.tags["persona_audit.state"] == "running"
    assert main(["nightly", "--once", "--config", str(cfg)]) == 0
    new = _assert_one_completed_audit(client, "killed", "warn")
    old = client.get_run(run.info.run_id)
    assert old.info.status == "FAILED" and old.data.tags["persona_audit.state"] == "error"
    assert old.data.tags["persona_audit.reason"].startswith("abandoned: this attempt stopped")
    assert new in old.data.tags["persona_audit.reason"]
    assert main(["nightly", "--once", "--config", str(cfg)]) == 0  # nothing left to do
    assert len(_runs(client, "killed")) == 2


# -- PostgreSQL restarting under the lease ----------------------------------------------------


def _pg(action: str) -> int:
    """`pg_ctlcluster` on the local cluster; `start` of a running cluster returns 2."""
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    done = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main",
                           action], capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 2), done.stdout + done.stderr
    return done.returncode


@pytest.mark.postgres
@pytest.mark.e2e
@pytest.mark.serial  # stops the one PostgreSQL every other test uses
def test_postgres_restart_under_the_lease(store, tmp_path, pg_url):
    """Lease database on PostgreSQL, stopped right after version 1's audit finished and
    started again a moment after its run completed: the lease check before the approval
    record and the release are retried until the database answers, the lease (expired
    meanwhile, taken by nobody) is still ours, and version 2 runs after it."""
    from mlflow import MlflowClient

    client = store["client"]
    register(client, "pg-lease", store["src"])
    register(client, "pg-lease", store["src"])
    cfg = write_setup(store["root"] / "pg", store["uri"],
                      lease={"url": pg_url, "ttl_s": 3},
                      models=[{"name": "pg-lease", "versions": "all"}],
                      retry={"attempts": 8, "initial_delay_s": 0.5, "max_delay_s": 4})
    log = tmp_path / "nightly.log"
    reader = MlflowClient(store["uri"])
    nightly = _nightly(cfg, log, env=_env(TMPDIR=str(tmp_path)))
    stopping = False
    try:
        child = _wait("audit child", lambda: _audit_child(nightly), 120, nightly, log)
        psutil.wait_procs([child], timeout=120)  # v1's audit is done: logging follows
        stopping = True
        _pg("stop")
        down_at = time.time()
        _wait("v1's run completed", lambda: any(
            r.data.tags.get("persona_audit.state") == "completed"
            for r in _runs(reader, "pg-lease")), 60, nightly, log, every=0.1)
        time.sleep(1)  # the lease check before the approval record meets no database
        assert _pg("start") == 0
        stopping = False
        down_s = time.time() - down_at
        assert nightly.wait(180) == 0, _output(log)[-4000:]
    finally:
        if stopping:  # PostgreSQL runs again whatever happened
            _pg("start")
        if nightly.poll() is None:
            nightly.kill()
    out = _output(log)
    assert "lease database" in out and "unreachable (attempt 1/8)" in out, out[-4000:]
    assert down_s > 3  # longer than the lease's ttl
    lines = [x for x in log.with_suffix(".out").read_text().splitlines()
             if x.startswith("pg-lease v")]  # the end table's rows
    assert [x.split()[:3] for x in lines] == [["pg-lease", "v1", "WARN"],
                                              ["pg-lease", "v2", "PASS"]], out[-3000:]
    for version in ("1", "2"):
        mv = client.get_model_version("pg-lease", version)
        assert mv.tags["persona_audit.status"] in ("warn", "pass")


# -- the scheduler restarted right after a fire -----------------------------------------------


def test_scheduler_restarted_right_after_a_fire_does_not_fire_again(tmp_path):
    """A daily job fires; the scheduler goes down while the pass runs (right after the fire)
    and starts again on the same job store: the stored next run is tomorrow's, so the fire
    is not repeated; the state is plain rows in the database."""
    import yaml
    from apscheduler import events as ev
    from apscheduler.triggers.cron import CronTrigger

    from jobs.config import load_config
    from jobs.scheduler import JOB_ID, ScheduleState, build_scheduler, ensure_job

    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(
        {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
         "schedule": {"misfire_grace_time_s": 3600}}))
    config = load_config(tmp_path / "nightly.yaml", env={})
    fire = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)
    trigger = CronTrigger(hour=fire.hour, minute=fire.minute, second=fire.second,
                          timezone="UTC")  # once a day, the first time in two seconds
    calls: list[float] = []
    started, release = threading.Event(), threading.Event()

    def audit(**_kwargs):
        calls.append(time.time())
        started.set()
        release.wait(10)

    sched, state = build_scheduler(config, blocking=False)
    assert ensure_job(sched, state, trigger, func=audit, misfire_grace_time=3600) == "scheduled"
    sched.start()
    try:
        assert started.wait(30), "the job did not fire"
    finally:
        sched.shutdown(wait=False)  # down while the pass runs
        release.set()
    stored = ScheduleState(config.jobstore_url())
    row = stored.read(JOB_ID)
    stored.dispose()
    assert row.next_fire_at == (fire + timedelta(days=1)).timestamp()

    events: list = []
    again, state = build_scheduler(config, blocking=False)
    again.add_listener(events.append, ev.EVENT_JOB_EXECUTED | ev.EVENT_JOB_MISSED
                       | ev.EVENT_JOB_SUBMITTED)
    assert ensure_job(again, state, trigger, func=audit, misfire_grace_time=3600) == "kept"
    assert again.get_job(JOB_ID).next_run_time == fire + timedelta(days=1)
    again.start()
    time.sleep(2)
    again.shutdown(wait=True)
    assert len(calls) == 1 and events == []


# -- a model too large for the memory it would be loaded into --------------------------------


def _declare_huge(model_dir: Path) -> None:
    """Rewrite the header of model.safetensors so that it declares a 10^12-element
    embedding (4 TB at float32), every tensor's offsets laid out consistently after it; the
    data that follows is left as it was. Only the header is read before the model is
    refused, so no such file needs to exist on disk."""
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    meta = header.pop("__metadata__", None)
    width = {"F32": 4, "F16": 2, "BF16": 2}
    offset = 0
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        entry = header[name]
        if name.endswith("embed_tokens.weight"):
            entry.update(dtype="F32", shape=[1_000_000, 1_000_000])
        n = width[entry["dtype"]]
        for dim in entry["shape"]:
            n *= dim
        entry["data_offsets"] = [offset, offset + n]
        offset += n
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


@pytest.mark.e2e
def test_a_model_too_large_for_memory_is_an_error_with_the_figures(store, tmp_path):
    """A registered version whose weights declare 4 TB is refused before loading, with the
    memory it needs and what the host has free; the nightly records it `error` and audits
    the next version."""
    import mlflow

    from jobs.config import load_config
    from jobs.nightly import run_pass

    client = store["client"]
    mlflow.set_tracking_uri(store["uri"])
    try:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=store["src"],
                                                         dst_path=str(tmp_path / "huge")))
        _declare_huge(files / "model")
        with mlflow.start_run(experiment_id=store["exp"]) as run:
            mlflow.log_artifacts(str(files), "model")
        mlflow.register_model(f"runs:/{run.info.run_id}/model", "huge")
    finally:
        mlflow.set_tracking_uri(None)
    register(client, "fits", store["src"])
    cfg = write_setup(store["root"] / "memory", store["uri"],
                      models=[{"name": "huge", "versions": "all"},
                              {"name": "fits", "versions": "all"}])
    report = run_pass(load_config(cfg, env={}))
    outcomes = {o.name: o for o in report.outcomes}
    assert [o.status for o in report.outcomes] == ["error", "warn"], report.text()
    reason = outcomes["huge"].reason
    assert "model needs ~4.0 TB at float32 for its weights alone, cpu has" in reason, reason
    assert " GB free" in reason and "Traceback" not in reason
    mv = client.get_model_version("huge", "1")
    assert mv.tags["persona_audit.status"] == "error"
    assert "model needs ~4.0 TB at float32" in mv.tags["persona_audit.summary"]
    assert client.get_model_version("fits", "1").tags["persona_audit.status"] == "warn"


def test_the_memory_limit_setting_caps_what_a_model_may_use(tmp_path, tokenizer, monkeypatch):
    """`PERSONA_AUDIT_MEMORY_LIMIT_BYTES` (an operator setting) lowers the memory an audit
    counts on; the estimate from the headers is the model's real parameter size."""
    import torch

    from governance.errors import ModelLoadError
    from governance.models.loading import load_model
    from governance.models.memory import MEMORY_LIMIT_ENV, weights_bytes
    from governance.models.tiny import tiny_model

    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    params = sum(p.numel() for p in model.parameters())
    assert weights_bytes(tmp_path / "tiny", torch.float32) == 4 * params
    assert weights_bytes(tmp_path / "tiny", torch.bfloat16) == 2 * params

    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(4 * params - 1))
    with pytest.raises(ModelLoadError, match=r"model needs ~[\d.,]+ [KM]B at float32 for its "
                       r"weights alone, cpu has [\d.,]+ [KM]B free \(capped by "
                       f"{MEMORY_LIMIT_ENV}\\)"):
        load_model(tmp_path / "tiny", device="cpu")
    assert load_model(tmp_path / "tiny", device="cpu", dtype="bf16").dtype == torch.bfloat16
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "plenty")
    with pytest.raises(ModelLoadError, match=f"{MEMORY_LIMIT_ENV}='plenty': expected a "
                                             "positive number of bytes"):
        load_model(tmp_path / "tiny", device="cpu")
