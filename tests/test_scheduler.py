"""The nightly schedule: a real APScheduler whose job comes from the config, with its state as
plain rows in the job-store database. A restart resumes the stored next run, a run missed
during downtime fires within the grace time (several missed fires as one run) and is reported
as missed beyond it, a crafted pickle in the database is never loaded, and the real
`persona-gov schedule` process starts, refuses a second scheduler on its store, and stops
cleanly on SIGTERM/SIGINT, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from governance.errors import ConfigError
from jobs.config import load_config
from jobs.scheduler import JOB_ID, NIGHTLY_REF, build_scheduler, cron_trigger, ensure_job


def _config(tmp_path: Path, grace: int = 3600, jobstore_url: str | None = None,
            **schedule) -> Path:
    """A nightly config on an empty SQLite registry (a pass selects nothing, quickly); the
    job store is the default SQLite file unless `jobstore_url` is given; `schedule` adds to
    its schedule section."""
    q = {"question": "Which is prime?", "answer_a": "4", "answer_b": "6", "answer_c": "7",
         "answer_d": "9", "correct_answer": "C", "topic": "math"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(q) + "\n")
    cfg = {
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "spec": {"questions": "questions.jsonl", "n_questions": 1},
        "models": [{"name": "nothing-here"}],
        "schedule": {"cron": "0 3 * * *", "timezone": "UTC", "misfire_grace_time_s": grace,
                     "jobstore_url": jobstore_url, **schedule},
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PERSONA_AUDIT_CONFIG",
                "PERSONA_AUDIT_JOBSTORE_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("cron", "tz", "match"), [
    ("0 2 * *", "UTC", "expected 5 fields"),
    ("0 25 * * *", "UTC", "cannot use cron"),
    ("0 2 * * *", "Mars/Olympus", "Mars/Olympus"),
])
def test_bad_cron_or_timezone(cron, tz, match):
    with pytest.raises(ConfigError, match=match):
        cron_trigger(cron, tz)


def test_job_options_and_keep_or_replace(tmp_path):
    config = load_config(_config(tmp_path))
    kwargs = {"config_path": config.source}
    sched, state = build_scheduler(config, blocking=False)
    assert ensure_job(sched, state, cron_trigger("0 3 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "scheduled"
    sched.start(paused=True)
    job = sched.get_job(JOB_ID)
    assert job.func_ref == NIGHTLY_REF and job.kwargs == kwargs
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 3600)
    first_run = job.next_run_time
    sched.shutdown()
    row = state.read(JOB_ID)  # plain data: the trigger as text, the next run as epoch seconds
    assert row.trigger == repr(job.trigger) and row.next_fire_at == first_run.timestamp()

    again, state = build_scheduler(config, blocking=False)  # a restart: same job is kept
    assert ensure_job(again, state, cron_trigger("0 3 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "kept"
    assert again.get_job(JOB_ID).next_run_time == first_run
    # a changed schedule replaces it
    assert ensure_job(again, state, cron_trigger("30 4 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "scheduled"
    again.start(paused=True)
    assert [j.id for j in again.get_jobs()] == [JOB_ID]
    assert "hour='4'" in repr(again.get_job(JOB_ID).trigger)
    again.shutdown()
    assert "hour='4'" in state.read(JOB_ID).trigger


def test_stored_state_is_checked_against_the_trigger(tmp_path, caplog):
    """A stored next run the trigger would never fire at, or one later than the trigger's
    next fire time, is ignored: the next run comes from the trigger."""
    config = load_config(_config(tmp_path))
    trigger = cron_trigger("0 3 * * *", "UTC")
    upcoming = trigger.get_next_fire_time(None, datetime.now(timezone.utc))
    for stored, why in [(upcoming.timestamp() + 60, "would not fire then"),
                        (upcoming.timestamp() + 86400, "later than the schedule"),
                        (1e300, "not a usable time")]:
        sched, state = build_scheduler(config, blocking=False)
        state.record_next(JOB_ID, repr(trigger), stored)
        with caplog.at_level("WARNING", logger="jobs.scheduler"):
            assert ensure_job(sched, state, trigger, misfire_grace_time=3600) == "scheduled"
        assert why in caplog.text
        assert sched.get_job(JOB_ID).next_run_time == upcoming
        state.dispose()


def _due_soon(config, kwargs, run_date):
    """Store a job due at `run_date` and stop before it fires (the scheduler 'goes down')."""
    from apscheduler.triggers.date import DateTrigger

    sched, state = build_scheduler(config, blocking=False)
    trigger = DateTrigger(run_date=run_date, timezone="UTC")
    ensure_job(sched, state, trigger, kwargs=kwargs,
               misfire_grace_time=config.schedule.misfire_grace_time_s)
    sched.start(paused=True)
    sched.shutdown()
    return trigger


def _restart_and_wait(config, kwargs, trigger, codes) -> dict:
    from apscheduler import events as ev

    seen: dict = {}
    done = threading.Event()

    def listen(event):
        seen[event.code] = event
        done.set()

    sched, state = build_scheduler(config, blocking=False)
    sched.add_listener(listen, codes)
    assert ensure_job(sched, state, trigger, kwargs=kwargs,
                      misfire_grace_time=config.schedule.misfire_grace_time_s) == "kept"
    sched.start()
    try:
        assert done.wait(120), "the stored job neither ran nor was reported missed"
    finally:
        sched.shutdown(wait=True)
    return {k: v for k, v in seen.items() if k in (ev.EVENT_JOB_EXECUTED, ev.EVENT_JOB_MISSED,
                                                   ev.EVENT_JOB_ERROR)}


def _row(config):
    from jobs.scheduler import ScheduleState

    state = ScheduleState(config.jobstore_url())
    try:
        return state.read(JOB_ID)
    finally:
        state.dispose()


def test_run_missed_while_down_fires_on_restart(tmp_path):
    """Stored job due while the scheduler was down: on restart, within the grace time, the
    nightly pass runs (by its string reference) once."""
    from apscheduler import events as ev
    from mlflow import MlflowClient

    config = load_config(_config(tmp_path, grace=3600))
    kwargs = {"config_path": config.source}
    trigger = _due_soon(config, kwargs, datetime.now(timezone.utc) + timedelta(seconds=1))
    time.sleep(2)  # the run time passes while no scheduler is running
    seen = _restart_and_wait(config, kwargs, trigger,
                             ev.EVENT_JOB_EXECUTED | ev.EVENT_JOB_MISSED | ev.EVENT_JOB_ERROR)
    assert list(seen) == [ev.EVENT_JOB_EXECUTED], seen
    assert seen[ev.EVENT_JOB_EXECUTED].retval == 4  # the configured model does not exist
    # the pass really ran against the configured store: it created the experiment
    assert MlflowClient(config.tracking_uri).get_experiment_by_name("persona-audits")
    row = _row(config)
    assert (row.last_fire_at, row.last_outcome) == (trigger.run_date.timestamp(), "exit 4")
    assert row.next_fire_at is None  # a date trigger fires once


def test_run_missed_beyond_grace_is_reported(tmp_path, caplog):
    from apscheduler import events as ev

    config = load_config(_config(tmp_path, grace=1))
    kwargs = {"config_path": config.source}
    trigger = _due_soon(config, kwargs, datetime.now(timezone.utc) + timedelta(seconds=1))
    time.sleep(3)  # past the run time plus the 1 s grace
    with caplog.at_level("WARNING", logger="jobs.scheduler"):
        seen = _restart_and_wait(config, kwargs, trigger,
                                 ev.EVENT_JOB_EXECUTED | ev.EVENT_JOB_MISSED)
    assert list(seen) == [ev.EVENT_JOB_MISSED]
    assert "was missed" in caplog.text
    assert _row(config).last_outcome == "missed"


def test_missed_fires_coalesce_into_one_run(tmp_path):
    """Three fires missed while the scheduler was down run once on restart, as the latest."""
    from apscheduler import events as ev
    from apscheduler.triggers.cron import CronTrigger

    config = load_config(_config(tmp_path, grace=3600))
    first = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)
    last = first + timedelta(seconds=2)
    trigger = CronTrigger(second="*", start_date=first, end_date=last, timezone="UTC")
    calls: list[float] = []

    def audit(**_kwargs):  # a plain callable: the job store is in memory
        calls.append(time.time())

    sched, state = build_scheduler(config, blocking=False)
    assert ensure_job(sched, state, trigger, func=audit, misfire_grace_time=3600) == "scheduled"
    sched.start(paused=True)
    sched.shutdown()  # down before the first fire
    time.sleep(max(0.0, last.timestamp() + 0.5 - time.time()))  # all three fire times pass

    events: list = []
    done = threading.Event()
    sched, state = build_scheduler(config, blocking=False)
    sched.add_listener(lambda e: (events.append(e), done.set()),
                       ev.EVENT_JOB_EXECUTED | ev.EVENT_JOB_MISSED | ev.EVENT_JOB_ERROR)
    assert ensure_job(sched, state, trigger, func=audit, misfire_grace_time=3600) == "kept"
    assert sched.get_job(JOB_ID).next_run_time == first
    sched.start()
    try:
        assert done.wait(30), "the missed fires neither ran nor were reported missed"
    finally:
        sched.shutdown(wait=True)
    assert len(calls) == 1
    assert [(e.code, e.scheduled_run_time) for e in events] == [(ev.EVENT_JOB_EXECUTED, last)]
    row = _row(config)
    assert (row.next_fire_at, row.last_fire_at, row.last_outcome) == (
        None, last.timestamp(), "finished")


# -- the real command ------------------------------------------------------------------------


def _start(cfg: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PERSONA_AUDIT"))}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli.main", "schedule", "--config", str(cfg), *extra],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged; exit {proc.poll()}:\n{log.read_text()[-3000:]}")


def _next_run(log_text: str) -> str:
    line = next(x for x in log_text.splitlines() if "scheduler started" in x)
    return line.split("next run ", 1)[1]


def test_schedule_command_persists_across_restart(tmp_path):
    cfg = _config(tmp_path)
    first = _start(cfg, tmp_path / "first.log", "--cron", "0 3 * * *", "--timezone", "UTC")
    try:
        text = _wait_for(tmp_path / "first.log", "scheduler started", first)
        assert "adding job persona-audit-nightly" in text
        next_run = _next_run(text)
        assert next_run.endswith("03:00:00+00:00")

        # a second scheduler on the same job store is refused while the first runs
        second = _start(cfg, tmp_path / "second.log")
        assert second.wait(60) == 2
        assert "another scheduler uses the job store" in (tmp_path / "second.log").read_text()

        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert "received SIGTERM" in (tmp_path / "first.log").read_text()
    assert "scheduler stopped" in (tmp_path / "first.log").read_text()

    # while no scheduler runs, the schedule's state is a plain row; APScheduler stored nothing
    import sqlalchemy

    from jobs.scheduler import TABLE

    config = load_config(cfg)
    row = _row(config)
    assert "hour='3'" in row.trigger and "minute='0'" in row.trigger
    assert str(datetime.fromtimestamp(row.next_fire_at, timezone.utc)) == next_run
    engine = sqlalchemy.create_engine(config.jobstore_url())
    assert sorted(sqlalchemy.inspect(engine).get_table_names()) == [
        "persona_audit_leases", TABLE]
    engine.dispose()

    # restart (cron from the config, the same): the stored next run is kept
    again = _start(cfg, tmp_path / "again.log")
    try:
        text = _wait_for(tmp_path / "again.log", "scheduler started", again)
        assert "keeping the stored next run of job persona-audit-nightly" in text
        assert _next_run(text) == next_run
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0
    finally:
        if again.poll() is None:
            again.kill()


def test_schedule_serves_health_and_metrics_and_drains_the_queue(tmp_path):
    """`schedule.health_port`: GET /healthz (200 while the scheduler runs, with its jobs) and
    GET /metrics; the queue job drains the queue between nightly passes: a queued version of
    a model the registry does not have is skipped, and the pass shows in the metrics."""
    import urllib.request

    from jobs.queue import AuditQueue
    from jobs.scheduler import QUEUE_JOB_ID

    from support.servers import free_port

    port = free_port()
    cfg = _config(tmp_path, health_port=port, queue_interval_s=1)
    queue = AuditQueue(load_config(cfg).lease_url())
    queue.enqueue("nothing-here", "1", "model_version.created", "d-1")
    proc = _start(cfg, tmp_path / "sched.log")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(tmp_path / "sched.log", "scheduler started", proc)
        with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
            health = json.loads(resp.read())
        assert resp.status == 200 and health["status"] == "ok", health
        assert health["service"] == "scheduler" and health["running"] is True
        assert {j["id"] for j in health["jobs"]} == {JOB_ID, QUEUE_JOB_ID}

        deadline = time.time() + 90
        while queue.counts()["skipped"] == 0 and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "sched.log").read_text()[-3000:]
            time.sleep(0.5)
        [row] = queue.items()
        assert (row.state, row.detail) == (
            "skipped", "skipped: registered model 'nothing-here' no longer exists"), \
            (tmp_path / "sched.log").read_text()[-3000:]
        deadline = time.time() + 10
        while True:  # the pass's metrics are set once its report is complete
            with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            if 'persona_audit_last_pass_exit_code{kind="queue"}' in text:
                break
            assert time.time() < deadline, text
            time.sleep(0.2)
        assert 'persona_audit_last_pass_exit_code{kind="queue"} 0.0' in text
        assert 'persona_audit_versions_total{status="skipped"} 1.0' in text
        assert 'persona_audit_queue_length{state="skipped"} 1.0' in text
        with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
            assert json.loads(resp.read())["last_pass"]["queue"]["versions"] == {"skipped": 1}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        queue.dispose()


# -- a crafted row in the job-store database ---------------------------------------------------


class _TouchOnLoad:
    """Unpickling this calls `Path(marker).touch()`: a stand-in for any code a crafted row
    could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant_pickles(url: str, marker: Path) -> None:
    """Write crafted pickles into `apscheduler_jobs` (the table and layout of APScheduler's
    SQLAlchemyJobStore) in the database at `url`: one under the nightly job's id, one due
    long ago under another id."""
    import pickle

    import sqlalchemy as sa

    payload = pickle.dumps(_TouchOnLoad(marker))
    pickle.loads(payload)  # the payload works: loading it creates the marker
    assert marker.exists()
    marker.unlink()
    meta = sa.MetaData()
    table = sa.Table("apscheduler_jobs", meta,
                     sa.Column("id", sa.Unicode(191), primary_key=True),
                     sa.Column("next_run_time", sa.Float(25), index=True),
                     sa.Column("job_state", sa.LargeBinary, nullable=False))
    engine = sa.create_engine(url)
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [
            {"id": JOB_ID, "next_run_time": time.time() + 3600, "job_state": payload},
            {"id": "planted", "next_run_time": 0.0, "job_state": payload},
        ])
    engine.dispose()


def _started_or_exited(log: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """True once the scheduler logs its start; False if it exits or times out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "scheduler started" in log.read_text():
            return True
        if proc.poll() is not None:
            return "scheduler started" in log.read_text()
        time.sleep(0.1)
    return False


def _run_on_planted_store(tmp_path: Path, cfg: Path, *, second: bool) -> None:
    """Plant pickles in the job store, run the real command until it has scheduled its job
    (and, with `second`, refused a second scheduler on the store), stop it with SIGTERM, and
    check that nothing was unpickled."""
    marker = tmp_path / "unpickled.marker"
    _plant_pickles(load_config(cfg).jobstore_url(), marker)
    log = tmp_path / "planted.log"
    proc = _start(cfg, log)
    try:
        started = _started_or_exited(log, proc)
        assert not marker.exists(), "the scheduler unpickled a crafted row of apscheduler_jobs"
        assert started, f"exit {proc.poll()}:\n{log.read_text()[-3000:]}"
        assert "adding job persona-audit-nightly" in log.read_text()
        if second:
            other = _start(cfg, tmp_path / "second.log")
            assert other.wait(60) == 2
            assert "another scheduler uses the job store" in (
                tmp_path / "second.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not marker.exists(), "the scheduler unpickled a crafted row of apscheduler_jobs"
    assert "scheduler stopped" in log.read_text()


def test_crafted_pickle_in_job_store_is_never_loaded_sqlite(tmp_path):
    _run_on_planted_store(tmp_path, _config(tmp_path), second=False)


@pytest.mark.postgres
def test_crafted_pickle_in_job_store_is_never_loaded_postgres(tmp_path, pg_url):
    """The same on a shared PostgreSQL job store, where a second scheduler is refused too."""
    url = pg_url.replace("postgresql://", "postgresql+psycopg2://", 1)  # explicit driver
    _run_on_planted_store(tmp_path, _config(tmp_path, jobstore_url=url), second=True)
