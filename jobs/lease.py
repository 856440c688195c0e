"""A cross-process lease: one row per model version, so two nightly passes never audit the
same version at once.

    leases = LeaseStore("sqlite:///leases.db", ttl_s=900)
    with leases.hold("my-llm/3") as lease:
        if lease.acquired:
            ...                      # audit; a heartbeat thread renews the row every ttl/3
        else:
            print(lease.holder)      # who has it, until when

Acquiring is one atomic statement either way: an INSERT of the row (the primary key makes
a second insert fail), else an UPDATE that takes the row over only where it has expired.
Both are single statements the database serialises, on SQLite (a file lock) and on
PostgreSQL (a row lock, the WHERE re-checked after the lock). A holder that dies leaves a
row that expires after `ttl_s`. Expiry uses the clients' clocks (UTC epoch seconds): keep
hosts in NTP sync and the ttl far above any skew.

A database that restarts or drops the connection is survived: the engine checks pooled
connections before use (`pool_pre_ping`), a missed heartbeat is tried again at the next beat,
and with `retry` (the nightly's `retry` options) taking, checking and releasing a lease are
retried with backoff before `LeaseUnavailable` is raised. Whether a lease is still ours is
answered by renewing it: a row that expired while the database was down but that nobody took
meanwhile still names us, and is ours again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, MetaData, String, Table, create_engine, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from governance.errors import Unavailable
from governance.redaction import redact
from jobs.config import RetryOptions, sqlalchemy_url
from jobs.connection import database_gone, with_retries

log = logging.getLogger(__name__)

TABLE = "persona_audit_leases"
_metadata = MetaData()
leases = Table(
    TABLE,
    _metadata,
    Column("key", String(512), primary_key=True),
    Column("holder", String(255), nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)


class LeaseUnavailable(Unavailable):
    """The lease database could not be reached after the configured retries."""


def default_holder() -> str:
    """host:pid:random, so a restarted process never mistakes an old row for its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Holder:
    """Who holds a key and until when (epoch seconds)."""

    key: str
    holder: str
    expires_at: float

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return f"held by {self.holder} for {max(left, 0):.0f} s more"


def make_engine(url: str, *, busy_timeout_s: float = 30.0) -> Engine:
    """An engine for the lease table (and the others in its database); SQLite waits up to
    `busy_timeout_s` for a competing writer."""
    if url.startswith("sqlite"):
        return create_engine(url, connect_args={"timeout": busy_timeout_s})
    return create_engine(sqlalchemy_url(url), pool_pre_ping=True)


def create_tables(engine: Engine, metadata: MetaData, what: str, url: str,
                  error: type[Exception] = RuntimeError) -> None:
    """Create `metadata`'s tables if missing. Two processes creating them at once: one loses
    the race and tries again; the third failure raises `error` naming `what` and the
    (redacted) database."""
    for attempt in range(3):
        try:
            metadata.create_all(engine, checkfirst=True)
            return
        except (IntegrityError, OperationalError, ProgrammingError) as exc:
            if attempt == 2:
                raise error(redact(f"cannot create the {what} in {url}: {exc}")) from exc
            time.sleep(0.2 * (attempt + 1))


class LeaseStore:
    """Leases in table `persona_audit_leases` of the database at `url`."""

    def __init__(self, url: str, ttl_s: float = 900.0, holder: str | None = None, *,
                 retry: RetryOptions | None = None):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.ttl_s = float(ttl_s)
        self.holder = holder or default_holder()
        self.retry = retry or RetryOptions(attempts=1)
        self.engine = make_engine(url)
        create_tables(self.engine, _metadata, f"lease table {TABLE}", url)

    def retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """`fn()`, retried with backoff while the database cannot be reached."""
        r = self.retry
        return with_retries(f"lease database {redact(self.url)} ({what})", fn, r.attempts,
                            r.initial_delay_s, r.max_delay_s, retry_if=database_gone,
                            error=LeaseUnavailable)

    def try_acquire(self, key: str) -> bool:
        """Take `key` if nobody holds it or its holder's lease expired (or it is ours)."""
        now = time.time()
        row = {"key": key, "holder": self.holder, "acquired_at": now,
               "expires_at": now + self.ttl_s}
        try:
            with self.engine.begin() as conn:
                conn.execute(leases.insert().values(**row))
            return True
        except IntegrityError:
            pass
        stmt = (
            update(leases)
            .where(leases.c.key == key)
            .where((leases.c.expires_at < now) | (leases.c.holder == self.holder))
            .values(holder=self.holder, acquired_at=now, expires_at=now + self.ttl_s)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def renew(self, key: str) -> bool:
        """Extend our lease on `key`; False when it is no longer ours."""
        stmt = (
            update(leases)
            .where(leases.c.key == key, leases.c.holder == self.holder)
            .values(expires_at=time.time() + self.ttl_s)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def release(self, key: str) -> None:
        """Drop our lease on `key` (someone else's row is left alone)."""
        with self.engine.begin() as conn:
            conn.execute(delete(leases).where(leases.c.key == key,
                                              leases.c.holder == self.holder))

    def current(self, key: str) -> Holder | None:
        """The live holder of `key`, or None when free or expired."""
        with self.engine.connect() as conn:
            row = conn.execute(select(leases).where(leases.c.key == key)).first()
        if row is None or row.expires_at < time.time():
            return None
        return Holder(row.key, row.holder, row.expires_at)

    @contextmanager
    def hold(self, key: str) -> Iterator[Lease]:
        """Try to take `key` for the duration of the block; renewed in the background."""
        lease = Lease(self, key, self.retrying(f"taking {key}", lambda: self.try_acquire(key)))
        if not lease.acquired:
            lease.holder = self.retrying(f"reading {key}", lambda: self.current(key))
            yield lease
            return
        lease.start_heartbeat()
        try:
            yield lease
        finally:
            lease.stop_heartbeat()
            try:
                self.retrying(f"releasing {key}", lambda: self.release(key))
            except Exception as exc:  # it expires on its own; say so and move on
                log.warning("could not release lease %s (it expires in %.0f s): %s", key,
                            self.ttl_s, redact(exc))

    def dispose(self) -> None:
        self.engine.dispose()


class Lease:
    """One attempt at a key: `acquired`, and while held, `lost` if a renewal failed."""

    def __init__(self, store: LeaseStore, key: str, acquired: bool):
        self.store, self.key, self.acquired = store, key, acquired
        self.holder: Holder | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease:{self.key}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.store.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.store.renew(self.key):
                    self.lost = True
                    log.error("lease %s was taken over by another process", self.key)
                    return
            except Exception as exc:  # a transient database error: try again next beat
                log.warning("could not renew lease %s: %s", self.key, redact(exc))

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def still_ours(self) -> bool:
        """True while this process holds the key, checked by renewing the row (retried while
        the database cannot be reached): False once another process has taken it."""
        if not self.acquired or self.lost:
            return False
        ours = bool(self.store.retrying(f"renewing {self.key}",
                                        lambda: self.store.renew(self.key)))
        self.lost = not ours
        return ours
