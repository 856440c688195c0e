"""The nightly schedule: a real APScheduler with a persistent SQLite job store. The stored job
survives restarts (kept with its pending run), a run missed during downtime fires within the
grace time and is reported as missed beyond it, and the real `persona-gov schedule` process
starts, refuses a second scheduler on its store, and stops cleanly on SIGTERM/SIGINT."""

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


def _config(tmp_path: Path, grace: int = 3600) -> Path:
    """A nightly config on an empty SQLite registry (a pass selects nothing, quickly)."""
    q = {"question": "Which is prime?", "answer_a": "4", "answer_b": "6", "answer_c": "7",
         "answer_d": "9", "correct_answer": "C", "topic": "math"}
    (tmp_path / "questions.jsonl").write_text(json.dumps(q) + "\n")
    cfg = {
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "spec": {"questions": "questions.jsonl", "n_questions": 1},
        "models": [{"name": "nothing-here"}],
        "schedule": {"cron": "0 3 * * *", "timezone": "UTC", "misfire_grace_time_s": grace},
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
    sched, store = build_scheduler(config, blocking=False)
    assert ensure_job(sched, store, cron_trigger("0 3 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "scheduled"
    sched.start(paused=True)
    job = sched.get_job(JOB_ID)
    assert job.func_ref == NIGHTLY_REF and job.kwargs == kwargs
    assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 3600)
    first_run = job.next_run_time
    sched.shutdown()

    again, store = build_scheduler(config, blocking=False)  # a restart: same job is kept
    assert ensure_job(again, store, cron_trigger("0 3 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "kept"
    assert store.lookup_job(JOB_ID).next_run_time == first_run
    # a changed schedule replaces it
    assert ensure_job(again, store, cron_trigger("30 4 * * *", "UTC"), kwargs=kwargs,
                      misfire_grace_time=3600) == "scheduled"
    again.start(paused=True)
    assert [j.id for j in again.get_jobs()] == [JOB_ID]
    assert "hour='4'" in repr(again.get_job(JOB_ID).trigger)
    again.shutdown()


def _due_soon(config, kwargs, run_date):
    """Store a job due at `run_date` and stop before it fires (the scheduler 'goes down')."""
    from apscheduler.triggers.date import DateTrigger

    sched, store = build_scheduler(config, blocking=False)
    trigger = DateTrigger(run_date=run_date, timezone="UTC")
    ensure_job(sched, store, trigger, kwargs=kwargs,
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

    sched, store = build_scheduler(config, blocking=False)
    sched.add_listener(listen, codes)
    assert ensure_job(sched, store, trigger, kwargs=kwargs,
                      misfire_grace_time=config.schedule.misfire_grace_time_s) == "kept"
    sched.start()
    try:
        assert done.wait(120), "the stored job neither ran nor was reported missed"
    finally:
        sched.shutdown(wait=True)
    return {k: v for k, v in seen.items() if k in (ev.EVENT_JOB_EXECUTED, ev.EVENT_JOB_MISSED,
                                                   ev.EVENT_JOB_ERROR)}


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

    # the job is in the store while no scheduler runs
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    store = SQLAlchemyJobStore(url=load_config(cfg).jobstore_url())
    store.start(BackgroundScheduler(), "default")
    [job] = store.get_all_jobs()
    assert job.id == JOB_ID and job.func_ref == NIGHTLY_REF
    assert job.kwargs == {"config_path": str(cfg.resolve())}
    assert str(job.next_run_time) == next_run
    store.shutdown()

    # restart (cron from the config, the same): the stored job is kept with its next run
    again = _start(cfg, tmp_path / "again.log")
    try:
        text = _wait_for(tmp_path / "again.log", "scheduler started", again)
        assert "keeping stored job persona-audit-nightly" in text
        assert _next_run(text) == next_run
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0
    finally:
        if again.poll() is None:
            again.kill()
