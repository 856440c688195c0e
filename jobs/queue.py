"""The audit queue: model versions the registry announced (through its webhooks), waiting for a
nightly worker.

    queue = AuditQueue(config.lease_url())
    queue.enqueue("my-llm", "3", "model_version.created", delivery_id)   # the webhook receiver
    item = queue.take("host:pid:abcd")                                   # a worker
    ... audit item.model_name, item.version through the nightly's per-version path ...
    queue.finish(item, "done", "pass: ...")

Plain rows in table `persona_audit_queue` of the lease database (SQLite beside the tracking
store by default, or PostgreSQL), written with SQLAlchemy Core: nothing is pickled. Each row
is one delivery: (id, model_name, version, event, delivery_id, received_at, state, taken_by,
updated_at, detail). `delivery_id` is unique, so a replayed delivery is refused by the
database itself, across processes and restarts.

States: `queued` (waiting), `taken` (a worker has it), then `done` (audited or already
up to date), `error` (the audit or the registry failed) or `skipped` (the config does not
select the version, or its lease was held elsewhere); `detail` says why. A worker takes a
row with one conditional UPDATE (`... WHERE id = :id AND state = 'queued'`) and owns it only
when that statement changed exactly one row: two workers never take the same row, on SQLite
(one writer at a time) or PostgreSQL (the WHERE is re-checked after the row lock). A worker
that dies leaves its row `taken`; `reclaim` puts rows taken longer ago than a time limit
back in the queue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from governance.redaction import redact

log = logging.getLogger(__name__)

TABLE = "persona_audit_queue"
STATES = ("queued", "taken", "done", "error", "skipped")
FINAL_STATES = ("done", "error", "skipped")
_DETAIL_MAX = 2000

_metadata = MetaData()
queue_rows = Table(
    TABLE,
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(512), nullable=False),
    Column("version", String(64), nullable=False),
    Column("event", String(64), nullable=False),
    Column("delivery_id", String(255), nullable=False, unique=True),
    Column("received_at", Float, nullable=False),  # epoch seconds
    Column("state", String(16), nullable=False, index=True),
    Column("taken_by", String(255), nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("detail", String(_DETAIL_MAX), nullable=True),
)


@dataclass(frozen=True)
class QueueItem:
    """One queued delivery, as plain data."""

    id: int
    model_name: str
    version: str
    event: str
    delivery_id: str
    received_at: float
    state: str
    taken_by: str | None
    updated_at: float
    detail: str | None

    @property
    def label(self) -> str:
        return f"{self.model_name} v{self.version}"


def _item(row: object) -> QueueItem:
    m = row._mapping  # type: ignore[attr-defined]
    return QueueItem(id=int(m["id"]), model_name=str(m["model_name"]),
                     version=str(m["version"]), event=str(m["event"]),
                     delivery_id=str(m["delivery_id"]), received_at=float(m["received_at"]),
                     state=str(m["state"]), taken_by=m["taken_by"],
                     updated_at=float(m["updated_at"]), detail=m["detail"])


class Duplicate(Exception):
    """The delivery id is already in the queue (a replayed or repeated delivery)."""


class AuditQueue:
    """The queue in table `persona_audit_queue` of the database at `url`. `busy_timeout_s`
    is how long a SQLite write waits for a competing writer (the webhook receiver keeps it
    short: it must answer within a second)."""

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0):
        from jobs.lease import create_tables, make_engine

        self.url = url
        self.engine: Engine = make_engine(url, busy_timeout_s=busy_timeout_s)
        create_tables(self.engine, _metadata, f"queue table {TABLE}", url)

    # -- the receiver's side --------------------------------------------------------------

    def enqueue(self, model_name: str, version: str, event: str, delivery_id: str,
                received_at: float | None = None) -> int:
        """Add a row in state `queued`; returns its id. Raises `Duplicate` when the delivery
        id is already there."""
        now = time.time()
        values = {"model_name": model_name, "version": version, "event": event,
                  "delivery_id": delivery_id, "received_at": received_at or now,
                  "state": "queued", "updated_at": now}
        try:
            with self.engine.begin() as conn:
                result = conn.execute(queue_rows.insert().values(**values))
        except IntegrityError as exc:
            raise Duplicate(delivery_id) from exc
        return int(result.inserted_primary_key[0])

    def has_delivery(self, delivery_id: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(select(queue_rows.c.id).where(
                queue_rows.c.delivery_id == delivery_id)).first()
        return found is not None

    # -- the workers' side ----------------------------------------------------------------

    def take(self, worker: str) -> QueueItem | None:
        """The oldest queued row, now `taken` by `worker`; None when nothing is queued. Two
        workers never get the same row (see the module docstring)."""
        for _ in range(1000):  # each miss means another worker took that row: try the next
            with self.engine.connect() as conn:
                row = conn.execute(select(queue_rows.c.id)
                                   .where(queue_rows.c.state == "queued")
                                   .order_by(queue_rows.c.id).limit(1)).first()
            if row is None:
                return None
            now = time.time()
            with self.engine.begin() as conn:
                taken = conn.execute(
                    update(queue_rows)
                    .where(queue_rows.c.id == row.id, queue_rows.c.state == "queued")
                    .values(state="taken", taken_by=worker, updated_at=now)).rowcount == 1
                if taken:
                    got = conn.execute(select(queue_rows)
                                       .where(queue_rows.c.id == row.id)).first()
                    return _item(got)
        raise RuntimeError(f"could not take a row of {TABLE}: 1000 attempts lost to others")

    def finish(self, item: QueueItem, state: str, detail: str) -> bool:
        """Mark a row we took `done`, `error` or `skipped`, with the reason; False when the
        row is no longer ours (reclaimed and taken by another worker)."""
        if state not in FINAL_STATES:
            raise ValueError(f"a finished row is one of {FINAL_STATES}, not {state!r}")
        return self._set(item, state, redact(detail)[:_DETAIL_MAX])

    def release(self, item: QueueItem, detail: str = "") -> bool:
        """Put a row we took back in the queue (the worker is stopping before it finished)."""
        return self._set(item, "queued", redact(detail)[:_DETAIL_MAX] or None, taken_by=None)

    def _set(self, item: QueueItem, state: str, detail: str | None, **extra: object) -> bool:
        stmt = (update(queue_rows)
                .where(queue_rows.c.id == item.id, queue_rows.c.state == "taken",
                       queue_rows.c.taken_by == item.taken_by)
                .values(state=state, detail=detail, updated_at=time.time(), **extra))
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def reclaim(self, older_than_s: float) -> int:
        """Put rows taken more than `older_than_s` ago back in the queue (their worker died);
        returns how many."""
        now = time.time()
        stmt = (update(queue_rows)
                .where(queue_rows.c.state == "taken",
                       queue_rows.c.updated_at < now - older_than_s)
                .values(state="queued", taken_by=None, updated_at=now,
                        detail=f"reclaimed: taken more than {older_than_s:.0f} s ago"))
        with self.engine.begin() as conn:
            n = conn.execute(stmt).rowcount
        if n:
            log.warning("put %d queue rows back: their worker took them more than %.0f s ago "
                        "and never finished them", n, older_than_s)
        return n

    # -- reading ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per state (every state present, zero where none)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(queue_rows.c.state, func.count())
                                .group_by(queue_rows.c.state)).all()
        out = dict.fromkeys(STATES, 0)
        out.update({str(state): int(n) for state, n in rows})
        return out

    def items(self, state: str | None = None) -> list[QueueItem]:
        """Every row (in `state`), oldest first."""
        stmt = select(queue_rows).order_by(queue_rows.c.id)
        if state is not None:
            stmt = stmt.where(queue_rows.c.state == state)
        with self.engine.connect() as conn:
            return [_item(r) for r in conn.execute(stmt).all()]

    def dispose(self) -> None:
        self.engine.dispose()
