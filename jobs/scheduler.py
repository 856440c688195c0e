"""The nightly schedule: one APScheduler 3 scheduler with a persistent SQLAlchemy job store.

    persona-gov schedule --config nightly.yaml --cron "0 2 * * *" --timezone Europe/Paris

The job is stored by reference (`jobs.nightly:scheduled_pass`, kwargs: the config path), so
the store holds no pickled code. Job options are deliberate: `coalesce=True` (runs missed
while the scheduler was down collapse into one), `max_instances=1` (a pass still running when
the next is due is not doubled), and `misfire_grace_time` from the config (default 6 h: a
02:00 run missed by a restart at 05:00 still happens; APScheduler's own default of 1 s would
drop it). On start an identical stored job is kept as it is, with its pending run time, so a
run missed during downtime fires on restart; a changed schedule replaces it
(`replace_existing`). Listeners log errors, misses and skipped overlaps. SIGTERM/SIGINT stop
the scheduler cleanly: no new pass starts, a running pass finishes its current version.

Only one scheduler may use a job store (two would run every job twice): a lease row in the
job-store database, renewed while the scheduler lives, refuses a second one.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from governance.errors import ConfigError
from governance.redaction import redact
from jobs.config import NightlyConfig

log = logging.getLogger(__name__)

JOB_ID = "persona-audit-nightly"
NIGHTLY_REF = "jobs.nightly:scheduled_pass"


def cron_trigger(cron: str, timezone: str) -> Any:
    """A CronTrigger from a 5-field crontab line; a bad line or zone is a ConfigError."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        return CronTrigger.from_crontab(cron, timezone=timezone)
    except Exception as exc:
        raise ConfigError(f"schedule: cannot use cron {cron!r} with timezone {timezone!r}: "
                          f"{exc} (expected 5 fields 'minute hour day month weekday' and an "
                          "IANA zone such as 'UTC' or 'Europe/Paris')") from exc


def build_scheduler(config: NightlyConfig, *, blocking: bool = True,
                    timezone: str | None = None) -> tuple[Any, Any]:
    """A scheduler on the config's job store, with job defaults and listeners set, and the
    job store itself (for `ensure_job`)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    cls = BlockingScheduler if blocking else BackgroundScheduler
    store = SQLAlchemyJobStore(url=config.jobstore_url())
    scheduler = cls(
        jobstores={"default": store},
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": config.schedule.misfire_grace_time_s},
        timezone=timezone or config.schedule.timezone,
    )
    add_listeners(scheduler)
    return scheduler, store


def add_listeners(scheduler: Any) -> None:
    """Log job errors, misses, overlaps and non-zero exit codes."""
    from apscheduler import events as ev

    def on_event(event: Any) -> None:
        if event.code == ev.EVENT_JOB_ERROR:
            log.error("job %s (due %s) raised: %s", event.job_id, event.scheduled_run_time,
                      redact(event.exception))
        elif event.code == ev.EVENT_JOB_MISSED:
            log.warning("job %s due %s was missed: the scheduler was down longer than its "
                        "misfire_grace_time", event.job_id, event.scheduled_run_time)
        elif event.code == ev.EVENT_JOB_MAX_INSTANCES:
            log.warning("job %s due %s skipped: the previous run is still going",
                        event.job_id, event.scheduled_run_time)
        elif event.code == ev.EVENT_JOB_EXECUTED:
            if event.retval:
                log.warning("job %s finished with exit code %s (see the pass report above)",
                            event.job_id, event.retval)
            else:
                log.info("job %s finished", event.job_id)

    scheduler.add_listener(on_event, ev.EVENT_JOB_ERROR | ev.EVENT_JOB_MISSED
                           | ev.EVENT_JOB_MAX_INSTANCES | ev.EVENT_JOB_EXECUTED)


def _same(job: Any, func: str, trigger: Any, kwargs: dict[str, Any], grace: int) -> bool:
    return (job.func_ref == func and repr(job.trigger) == repr(trigger)
            and dict(job.kwargs) == kwargs and job.misfire_grace_time == grace
            and job.coalesce and job.max_instances == 1)


def ensure_job(scheduler: Any, store: Any, trigger: Any, *, misfire_grace_time: int,
               func: str = NIGHTLY_REF, kwargs: dict[str, Any] | None = None,
               job_id: str = JOB_ID) -> str:
    """Keep an identical stored job (and its pending run), else add or replace it.
    Call before `start()`; `store` is the scheduler's default job store. Returns "kept" or
    "scheduled"."""
    kwargs = kwargs or {}
    grace = misfire_grace_time
    store.start(scheduler, "default")  # create the table and read it before the scheduler runs
    existing = store.lookup_job(job_id)
    if existing is not None and _same(existing, func, trigger, kwargs, grace):
        log.info("keeping stored job %s (%s), next run %s", job_id, trigger,
                 existing.next_run_time)
        return "kept"
    scheduler.add_job(func, trigger, id=job_id, name="persona audit nightly pass",
                      kwargs=kwargs, replace_existing=True, coalesce=True, max_instances=1,
                      misfire_grace_time=grace)
    log.info("%s job %s: %s calling %s", "replacing" if existing else "adding", job_id,
             trigger, func)
    return "scheduled"


def run_scheduler(config: NightlyConfig, *, cron: str | None = None,
                  timezone: str | None = None) -> int:
    """Run the blocking scheduler until SIGTERM/SIGINT; returns 0 after a clean stop."""
    from jobs.lease import LeaseStore
    from jobs.nightly import request_stop

    tz = timezone or config.schedule.timezone
    trigger = cron_trigger(cron or config.schedule.cron, tz)
    url = config.jobstore_url()
    scheduler, store = build_scheduler(config, timezone=tz)
    kwargs = {"config_path": str(Path(config.source).resolve())} if config.source else {}
    guard = LeaseStore(url, ttl_s=60)
    with guard.hold(f"scheduler:{JOB_ID}") as lease:
        if not lease.acquired:
            raise ConfigError(f"another scheduler uses the job store {redact(url)} "
                              f"({lease.holder.describe() if lease.holder else 'running'}): "
                              "run one scheduler per job store")
        ensure_job(scheduler, store, trigger, kwargs=kwargs,
                   misfire_grace_time=config.schedule.misfire_grace_time_s)

        def stop(signum: int, _frame: Any) -> None:
            log.info("received %s: stopping (a running pass finishes its current version)",
                     signal.Signals(signum).name)
            request_stop()
            if scheduler.running:
                scheduler.shutdown(wait=False)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            from apscheduler.events import EVENT_SCHEDULER_STARTED

            def started(_event: Any) -> None:
                job = scheduler.get_job(JOB_ID)
                log.info("scheduler started (job store %s): job %s next run %s",
                         redact(url), JOB_ID, getattr(job, "next_run_time", None))

            scheduler.add_listener(started, EVENT_SCHEDULER_STARTED)
            scheduler.start()  # blocks until stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    guard.dispose()
    log.info("scheduler stopped")
    return 0
