"""The nightly schedule: one APScheduler 3 scheduler whose job comes from the config.

    persona-gov schedule --config nightly.yaml --cron "0 2 * * *" --timezone Europe/Paris

The job lives in APScheduler's MemoryJobStore and is built from the config at every start
(`jobs.nightly:scheduled_pass`, kwargs: the config path). Nothing is unpickled or otherwise
turned into objects from the database: what survives a restart is plain data in the table
`persona_audit_schedule` of the job-store database (`schedule.jobstore_url`), one row per
job: the trigger it belongs to (as text), the next fire time and the last handled fire time
(epoch seconds), and that fire's outcome. The job store writes the row whenever APScheduler
moves the job's next run time.

On start, a row written for the same trigger gives the job its pending run time, so a run
missed while the scheduler was down fires on restart; the row is trusted only as far as the
trigger allows (a time the trigger would fire at, no later than its next fire time from now),
otherwise the next run comes from the trigger alone. Job options are deliberate:
`coalesce=True` (runs missed while the scheduler was down collapse into one, the latest),
`max_instances=1` (a pass still running when the next is due is not doubled), and
`misfire_grace_time` from the config (default 6 h: a 02:00 run missed by a restart at 05:00
still happens; later than that it is reported as missed). Listeners log errors, misses and
skipped overlaps. SIGTERM/SIGINT stop the scheduler cleanly: no new pass starts, a running
pass finishes its current version.

Only one scheduler may use a job-store database (two would run every job twice): a lease row
in that database, renewed while the scheduler lives, refuses a second one.

A second job, `persona-audit-queue` (`jobs.nightly:scheduled_drain`), drains the audit queue
(versions announced by the registry's webhooks) every `schedule.queue_interval_s` seconds
(0: only the nightly pass drains it); it does nothing while a pass runs. With
`schedule.health_port` (or PERSONA_AUDIT_HEALTH_PORT) the scheduler serves `GET /healthz`
(200 while the scheduler runs) and `GET /metrics` (Prometheus) on `schedule.health_host`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, select, update
from sqlalchemy.exc import IntegrityError

from governance.errors import ConfigError
from governance.redaction import redact
from jobs.config import NightlyConfig

log = logging.getLogger(__name__)

JOB_ID = "persona-audit-nightly"
NIGHTLY_REF = "jobs.nightly:scheduled_pass"
QUEUE_JOB_ID = "persona-audit-queue"
QUEUE_JOB_NAME = "persona audit queue"
QUEUE_REF = "jobs.nightly:scheduled_drain"

TABLE = "persona_audit_schedule"
_metadata = MetaData()
schedule_rows = Table(
    TABLE,
    _metadata,
    Column("name", String(255), primary_key=True),  # the job id
    Column("trigger", String(1024), nullable=False),  # repr(trigger): compared, never parsed
    Column("next_fire_at", Float, nullable=True),  # epoch seconds; NULL: no further fire time
    Column("last_fire_at", Float, nullable=True),  # scheduled time of the last fire handled
    Column("last_outcome", String(64), nullable=True),  # finished, exit N, error, missed, skipped
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(255), nullable=False),
)


@dataclass(frozen=True)
class ScheduleRow:
    """One job's persisted state; the times are epoch seconds (None when unset or unusable)."""

    name: str
    trigger: str
    next_fire_at: float | None
    last_fire_at: float | None
    last_outcome: str | None
    updated_at: float | None
    updated_by: str


def _seconds(value: Any) -> float | None:
    """A finite number of seconds, else None (SQLite keeps whatever type was written)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _epoch(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


class ScheduleState:
    """The plain-data schedule state in table `persona_audit_schedule` of the database at
    `url`: read with `read(name)`, written by `record_next` and `record_fire`."""

    def __init__(self, url: str, writer: str | None = None):
        from jobs.lease import create_tables, default_holder, make_engine

        self.url = url
        self.writer = writer or default_holder()
        self.engine = make_engine(url)
        create_tables(self.engine, _metadata, f"schedule table {TABLE}", url, ConfigError)

    def read(self, name: str) -> ScheduleRow | None:
        """The row of job `name`, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(schedule_rows).where(schedule_rows.c.name == name)).first()
        if row is None:
            return None
        outcome = row.last_outcome if isinstance(row.last_outcome, str) else None
        return ScheduleRow(name=name, trigger=str(row.trigger),
                           next_fire_at=_seconds(row.next_fire_at),
                           last_fire_at=_seconds(row.last_fire_at), last_outcome=outcome,
                           updated_at=_seconds(row.updated_at), updated_by=str(row.updated_by))

    def record_next(self, name: str, trigger: str, next_fire_at: float | None) -> None:
        """Write job `name`'s trigger and next fire time, creating its row if needed."""
        values = {"trigger": trigger, "next_fire_at": next_fire_at, "updated_at": time.time(),
                  "updated_by": self.writer}
        stmt = update(schedule_rows).where(schedule_rows.c.name == name).values(**values)
        with self.engine.begin() as conn:
            if conn.execute(stmt).rowcount == 1:
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(schedule_rows.insert().values(name=name, **values))
        except IntegrityError:  # created meanwhile
            with self.engine.begin() as conn:
                conn.execute(stmt)

    def record_fire(self, name: str, fire_at: float, outcome: str) -> None:
        """Note how the fire of job `name` scheduled at `fire_at` ended."""
        stmt = (update(schedule_rows).where(schedule_rows.c.name == name)
                .values(last_fire_at=fire_at, last_outcome=outcome[:64], updated_at=time.time(),
                        updated_by=self.writer))
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def dispose(self) -> None:
        self.engine.dispose()


def _recording_store(state: ScheduleState) -> Any:
    """A MemoryJobStore that writes each job's next run time to `state` whenever it changes."""
    from apscheduler.jobstores.memory import MemoryJobStore

    class RecordingJobStore(MemoryJobStore):
        def add_job(self, job: Any) -> None:
            super().add_job(job)
            self._record(job.id, repr(job.trigger), _epoch(job.next_run_time))

        def update_job(self, job: Any) -> None:
            super().update_job(job)
            self._record(job.id, repr(job.trigger), _epoch(job.next_run_time))

        def remove_job(self, job_id: str) -> None:
            job = self.lookup_job(job_id)
            super().remove_job(job_id)
            if job is not None:
                self._record(job_id, repr(job.trigger), None)

        def shutdown(self) -> None:
            super().shutdown()
            state.dispose()

        @staticmethod
        def _record(job_id: str, trigger: str, next_fire_at: float | None) -> None:
            try:
                state.record_next(job_id, trigger, next_fire_at)
            except Exception as exc:  # the scheduler keeps running on its in-memory state
                log.error("could not record the next run of job %s in %s (a restart before "
                          "the next successful write may repeat or skip a run): %s", job_id,
                          redact(state.url), redact(exc))

    return RecordingJobStore()


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
                    timezone: str | None = None) -> tuple[Any, ScheduleState]:
    """A scheduler with an in-memory job store that records its state in the config's
    job-store database, with job defaults and listeners set, and that state (for
    `ensure_job`)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    cls = BlockingScheduler if blocking else BackgroundScheduler
    state = ScheduleState(config.jobstore_url())
    scheduler = cls(
        jobstores={"default": _recording_store(state)},
        # three threads: a nightly pass, a queue drain, and a second queue-job instance
        # that finds a pass running and returns at once (instead of waiting behind it and
        # being reported skipped at every interval)
        executors={"default": ThreadPoolExecutor(max_workers=3)},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": config.schedule.misfire_grace_time_s},
        timezone=timezone or config.schedule.timezone,
    )
    add_listeners(scheduler, state)
    return scheduler, state


def add_listeners(scheduler: Any, state: ScheduleState | None = None) -> None:
    """Log job errors, misses, overlaps and non-zero exit codes; record each outcome in
    `state`."""
    from apscheduler import events as ev

    def on_event(event: Any) -> None:
        outcome = None
        if event.code == ev.EVENT_JOB_ERROR:
            log.error("job %s (due %s) raised: %s", event.job_id, event.scheduled_run_time,
                      redact(event.exception))
            outcome = "error"
        elif event.code == ev.EVENT_JOB_MISSED:
            log.warning("job %s due %s was missed: the scheduler was down longer than its "
                        "misfire_grace_time", event.job_id, event.scheduled_run_time)
            outcome = "missed"
        elif event.code == ev.EVENT_JOB_MAX_INSTANCES and event.job_id == QUEUE_JOB_ID:
            log.debug("job %s due %s skipped: two drains are running", event.job_id,
                      event.scheduled_run_times[-1])
        elif event.code == ev.EVENT_JOB_MAX_INSTANCES:
            log.warning("job %s due %s skipped: the previous run is still going",
                        event.job_id, event.scheduled_run_times[-1])
            outcome = "skipped"
        elif event.code == ev.EVENT_JOB_EXECUTED:
            if event.job_id == QUEUE_JOB_ID and not event.retval:
                log.debug("job %s finished", event.job_id)  # every interval: no noise
                outcome = "finished"
            elif event.retval:
                log.warning("job %s finished with exit code %s (see the pass report above)",
                            event.job_id, event.retval)
                outcome = f"exit {event.retval}"
            else:
                log.info("job %s finished", event.job_id)
                outcome = "finished"
        if state is None or outcome is None:
            return
        due = getattr(event, "scheduled_run_time", None)
        due = due if due is not None else event.scheduled_run_times[-1]
        try:
            state.record_fire(event.job_id, due.timestamp(), outcome)
        except Exception as exc:
            log.error("could not record the outcome of job %s (due %s) in %s: %s",
                      event.job_id, due, redact(state.url), redact(exc))

    scheduler.add_listener(on_event, ev.EVENT_JOB_ERROR | ev.EVENT_JOB_MISSED
                           | ev.EVENT_JOB_MAX_INSTANCES | ev.EVENT_JOB_EXECUTED)


def _pending_run(row: ScheduleRow | None, trigger: Any, upcoming: datetime | None,
                 tz: Any) -> datetime | None:
    """The stored next fire time when the row belongs to `trigger`, the trigger would fire
    at that time, and it is no later than `upcoming` (the trigger's next fire time from now);
    else None."""
    if row is None or row.trigger != repr(trigger) or row.next_fire_at is None:
        return None
    try:
        stored = datetime.fromtimestamp(row.next_fire_at, tz)
        fire = trigger.get_next_fire_time(None, stored - timedelta(milliseconds=1))
    except (OverflowError, OSError, ValueError):
        log.warning("job %s: ignoring the stored next run %s: not a usable time", row.name,
                    row.next_fire_at)
        return None
    if fire is None or abs((fire - stored).total_seconds()) > 1e-3:
        log.warning("job %s: ignoring the stored next run %s: %s would not fire then",
                    row.name, row.next_fire_at, trigger)
        return None
    if upcoming is not None and fire > upcoming:
        log.warning("job %s: ignoring the stored next run %s: later than the schedule's next "
                    "fire time %s", row.name, fire, upcoming)
        return None
    return fire


def ensure_job(scheduler: Any, state: ScheduleState, trigger: Any, *, misfire_grace_time: int,
               func: str | Callable[..., Any] = NIGHTLY_REF,
               kwargs: dict[str, Any] | None = None, job_id: str = JOB_ID,
               name: str = "persona audit nightly pass", max_instances: int = 1) -> str:
    """Add the job with `trigger`; its first run is the stored next run when `state` holds one
    for this trigger (a run missed while the scheduler was down is then due at once), else
    the trigger's next fire time. Call before `start()`. Returns "kept" (the stored next run)
    or "scheduled" (from the trigger)."""
    tz = getattr(trigger, "timezone", None) or scheduler.timezone
    upcoming = trigger.get_next_fire_time(None, datetime.now(tz))
    row = state.read(job_id)
    pending = _pending_run(row, trigger, upcoming, tz)
    scheduler.add_job(func, trigger, id=job_id, name=name,
                      kwargs=kwargs or {}, replace_existing=True, coalesce=True,
                      max_instances=max_instances, misfire_grace_time=misfire_grace_time,
                      next_run_time=pending or upcoming)
    if pending is not None:
        late = pending < datetime.now(tz)
        log.info("keeping the stored next run of job %s (%s): %s%s", job_id, trigger, pending,
                 " (missed while the scheduler was down: it runs now if within "
                 f"misfire_grace_time ({misfire_grace_time} s), else is reported missed)"
                 if late else "")
        return "kept"
    log.info("%s job %s: %s calling %s, next run %s",
             "replacing" if row is not None and row.trigger != repr(trigger) else "adding",
             job_id, trigger, func if isinstance(func, str) else getattr(func, "__name__", func),
             upcoming)
    return "scheduled"


def run_scheduler(config: NightlyConfig, *, cron: str | None = None,
                  timezone: str | None = None) -> int:
    """Run the blocking scheduler until SIGTERM/SIGINT; returns 0 after a clean stop."""
    from jobs.lease import LeaseStore
    from jobs.nightly import request_stop

    tz = timezone or config.schedule.timezone
    trigger = cron_trigger(cron or config.schedule.cron, tz)
    url = config.jobstore_url()
    guard = LeaseStore(url, ttl_s=60)
    with guard.hold(f"scheduler:{JOB_ID}") as lease:
        if not lease.acquired:
            raise ConfigError(f"another scheduler uses the job store {redact(url)} "
                              f"({lease.holder.describe() if lease.holder else 'running'}): "
                              "run one scheduler per job store")
        scheduler, state = build_scheduler(config, timezone=tz)
        kwargs = {"config_path": str(Path(config.source).resolve())} if config.source else {}
        ensure_job(scheduler, state, trigger, kwargs=kwargs,
                   misfire_grace_time=config.schedule.misfire_grace_time_s)
        if config.schedule.queue_interval_s:
            from apscheduler.triggers.interval import IntervalTrigger

            every = config.schedule.queue_interval_s
            anchor = datetime(2000, 1, 1, tzinfo=dt_timezone.utc)  # the same trigger every start
            ensure_job(scheduler, state,
                       IntervalTrigger(seconds=every, start_date=anchor, timezone=tz),
                       func=QUEUE_REF, kwargs=kwargs, job_id=QUEUE_JOB_ID,
                       name=QUEUE_JOB_NAME, max_instances=2,
                       misfire_grace_time=max(every, 60))
            _quiet_queue_job()
        health = _health_server(config, scheduler)

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
                log.info("scheduler started (schedule state in %s, table %s): job %s next "
                         "run %s", redact(url), TABLE, JOB_ID,
                         getattr(job, "next_run_time", None))

            scheduler.add_listener(started, EVENT_SCHEDULER_STARTED)
            scheduler.start()  # blocks until stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if health is not None:
                health.stop()
                health.queue.dispose()
    guard.dispose()
    log.info("scheduler stopped")
    return 0


def _health_server(config: NightlyConfig, scheduler: Any) -> Any:
    """GET /healthz and /metrics on `schedule.health_port`, serving from a daemon thread;
    None when no port is configured. Healthy while the scheduler runs."""
    port = config.schedule.health_port
    if port is None:
        return None
    from jobs import metrics
    from jobs.ops import OpsHandler, OpsServer
    from jobs.queue import AuditQueue

    queue = AuditQueue(config.lease_url())

    def health() -> tuple[bool, dict[str, Any]]:
        jobs = [{"id": job.id, "next_run": job.next_run_time.isoformat()
                 if job.next_run_time else None} for job in scheduler.get_jobs()]
        details: dict[str, Any] = {"running": bool(scheduler.running), "jobs": jobs,
                                   "last_pass": metrics.last_passes()}
        try:
            details["queue"] = queue.counts()
        except Exception as exc:
            details["queue_error"] = redact(f"{type(exc).__name__}: {exc}")
        return bool(scheduler.running), details

    try:
        server = OpsServer((config.schedule.health_host, port), OpsHandler,
                           service="scheduler", health=health,
                           registry=metrics.registry_for(queue))
    except OSError as exc:
        queue.dispose()
        raise ConfigError(f"schedule.health_port: cannot listen on "
                          f"{config.schedule.health_host}:{port}: {exc}") from exc
    server.queue = queue  # type: ignore[attr-defined]
    server.start()
    log.info("health and metrics on %s/healthz and %s/metrics", server.base_url,
             server.base_url)
    return server


class _QueueJobChatter(logging.Filter):
    """Drops APScheduler's INFO lines about the queue job ("Running job ...", "executed
    successfully"), which would come twice a minute; its warnings and errors stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (
            f'"{QUEUE_JOB_NAME} (trigger: ' not in record.getMessage())


def _quiet_queue_job() -> None:
    for name in ("apscheduler.executors.default", "apscheduler.scheduler"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QueueJobChatter) for f in logger.filters):
            logger.addFilter(_QueueJobChatter())
