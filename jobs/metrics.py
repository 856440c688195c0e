"""Prometheus metrics of the nightly, the queue and the webhook receiver (prometheus-client).

The pass metrics live in this process (`REGISTRY`): a scheduler serves those of the passes it
ran, a webhook receiver those of the deliveries it answered. The queue length is read from
the queue's database at every scrape (`QueueCollector`), so every process reports the same.

    persona_audit_last_pass_end_timestamp_seconds{kind}   when the last pass ended
    persona_audit_last_pass_duration_seconds{kind}        how long it took
    persona_audit_last_pass_exit_code{kind}               0 ok, 4 a version errored
    persona_audit_versions_total{status}                  outcomes: pass warn fail error
                                                          up-to-date skipped
    persona_audit_duration_seconds{status}                per audited version (histogram)
    persona_audit_queue_length{state}                     rows per queue state
    persona_audit_queue_up                                1 if the queue database answered
    persona_audit_webhook_requests_total{outcome}         deliveries by how they were answered
    persona_audit_webhook_request_duration_seconds        time to answer (histogram)

`kind` is `nightly` (a full pass) or `queue` (the queue drained alone; a check that found
the queue empty is not a pass).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from governance.redaction import redact

if TYPE_CHECKING:
    from jobs.queue import AuditQueue

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no `*_created` series beside each counter and histogram
REGISTRY = CollectorRegistry(auto_describe=True)

LAST_PASS_END = Gauge("persona_audit_last_pass_end_timestamp_seconds",
                      "When the last pass ended (epoch seconds).", ["kind"], registry=REGISTRY)
LAST_PASS_DURATION = Gauge("persona_audit_last_pass_duration_seconds",
                           "Wall time of the last pass.", ["kind"], registry=REGISTRY)
LAST_PASS_EXIT = Gauge("persona_audit_last_pass_exit_code",
                       "Exit code of the last pass: 0 every version has a completed audit, "
                       "4 a version errored or the tracking store was unreachable.",
                       ["kind"], registry=REGISTRY)
VERSIONS = Counter("persona_audit_versions", "Model versions handled, by outcome.",
                   ["status"], registry=REGISTRY)
DURATION = Histogram("persona_audit_duration_seconds",
                     "Wall time of one version's audit (load, audit, judge, log).", ["status"],
                     buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                              21600, float("inf")),
                     registry=REGISTRY)
WEBHOOK_REQUESTS = Counter("persona_audit_webhook_requests",
                           "Webhook deliveries by how they were answered.", ["outcome"],
                           registry=REGISTRY)
WEBHOOK_SECONDS = Histogram("persona_audit_webhook_request_duration_seconds",
                            "Time the receiver took to answer a delivery.",
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                     float("inf")),
                            registry=REGISTRY)

_last: dict[str, dict[str, Any]] = {}
_last_lock = threading.Lock()


def record_version(status: str, seconds: float | None) -> None:
    """Count one version's outcome; `seconds` for a version that was audited."""
    VERSIONS.labels(status=status).inc()
    if seconds is not None:
        DURATION.labels(status=status).observe(seconds)


def record_pass(kind: str, started_at: float, finished_at: float, exit_code: int,
                statuses: Iterable[str]) -> None:
    """The last pass of `kind`: gauges, and what /healthz reports."""
    LAST_PASS_END.labels(kind=kind).set(finished_at)
    LAST_PASS_DURATION.labels(kind=kind).set(finished_at - started_at)
    LAST_PASS_EXIT.labels(kind=kind).set(exit_code)
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    with _last_lock:
        _last[kind] = {"finished_at": finished_at, "duration_s": round(finished_at - started_at,
                                                                       3),
                       "exit_code": exit_code, "versions": counts}


def last_passes() -> dict[str, dict[str, Any]]:
    """The last pass of each kind run in this process (for /healthz)."""
    with _last_lock:
        return {k: dict(v) for k, v in _last.items()}


class QueueCollector(Collector):
    """`persona_audit_queue_length{state}` read from the queue's database at each scrape."""

    def __init__(self, queue: AuditQueue):
        self.queue = queue

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("persona_audit_queue_up",
                               "1 if the queue database answered this scrape.")
        try:
            counts = self.queue.counts()
        except Exception as exc:
            log.warning("metrics: cannot read the queue: %s", redact(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        length = GaugeMetricFamily("persona_audit_queue_length", "Queue rows per state.",
                                   labels=["state"])
        for state, n in counts.items():
            length.add_metric([state], n)
        yield length


class _Chain(Collector):
    """Everything `REGISTRY` holds, inside another registry."""

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def registry_for(queue: AuditQueue | None) -> CollectorRegistry:
    """A registry serving this process's metrics and, with `queue`, its length."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Chain())
    if queue is not None:
        registry.register(QueueCollector(queue))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of `registry`."""
    return generate_latest(registry)
