"""One nightly pass: audit every selected model version that has no completed audit for the
current spec + policy + toolkit version, log it to MLflow, and record the outcome on the
version.

    report = run_pass(load_config("nightly.yaml"))          # persona-gov nightly --once
    print(report.text()); sys.exit(report.exit_code)

Per version, in order: take the version's lease (skip if another process holds it), check
again that it still needs an audit, open an MLflow run, load the model, run the audit, log
curves, tables and figures (`governance.tracking.runs.log_audit`), resolve the policy's baseline
(its latest completed audit under the same spec), decide the verdict (`jobs.verdict`), log
the verdict, drift and report, mark the run completed, and only then write the approval
record on the version. Any exception on the way marks the run and the version `error` with
the reason; the other versions still run. Exit code: 0 when every selected version has a
completed audit (pass, warn or fail), 4 when any version errored.

The queue (`jobs.queue`: versions the registry announced through its webhooks) is drained
first, through the same per-version path and leases: each row is taken by one worker, its
version audited if the config selects it (`jobs.discovery.select_version`) and needs it,
and the row marked `done`, `error` or `skipped` with the outcome. A queued version the
config does not select is never audited: its row is `skipped: not selected by the config`.
Then comes the normal selection, without the versions the queue already handled.
`run_pass(config, queue="only")` drains the queue alone (`persona-gov nightly --once
--queue`, and the scheduler's queue job); a pass limited to `models` leaves the queue alone.
One pass at a time per process (`_pass_lock`); across processes the leases decide.

With `executor: ray` (`persona-gov nightly --executor ray`) each version's audit runs as Ray
tasks, one per question shard (`jobs.ray_executor`), up to `ray.parallel_versions` versions
at once; everything else above happens here, in the driver, one version at a time.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from governance.errors import ConfigError, GovernanceError
from governance.redaction import redact
from jobs import console
from jobs.baseline import resolve_baseline
from jobs.cli.exits import EXIT_INCOMPLETE, EXIT_OK
from jobs.config import NightlyConfig, load_config
from jobs.connection import TrackingUnavailable, connect, mlflow_uris, probe, with_retries
from jobs.isolation import AuditFailed, AuditJob, audit_in_child
from jobs.spec import load_spec

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from governance.audit.result import AuditResult
    from jobs.discovery import Target
    from jobs.lease import Lease, LeaseStore
    from jobs.queue import AuditQueue, QueueItem
    from jobs.verdict import PolicyRef


log = logging.getLogger(__name__)

_stop = threading.Event()
_pass_lock = threading.Lock()
QueueMode = Literal["first", "only", "off"]


def request_stop() -> None:
    """Ask a running pass to stop after the version in progress (the scheduler's SIGTERM)."""
    _stop.set()


# -- outcomes -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one version in a pass."""

    name: str
    version: str | None
    status: str  # pass | warn | fail | error | up-to-date | skipped
    reason: str = ""
    run_id: str | None = None
    queued_by: str | None = None  # the registry event that queued it, for a queued version
    verdict: str | None = None  # pass | warn | fail of the audit run (also when up to date)
    policy: str = ""  # "name sha256[:12]" of the policy that judged it
    first: tuple[str, str] = ("", "")  # the first failing rule with scope, and its evidence
    report: str = ""  # where its report page is: a local file, a UI URL or a runs:/ URI

    def line(self) -> str:
        v = f" v{self.version}" if self.version else ""
        run = f" (run {self.run_id})" if self.run_id else ""
        via = f" [queued: {self.queued_by}]" if self.queued_by else ""
        return f"  {self.status:<10} {self.name}{v}{run}{via}: {self.reason}"


@dataclass
class PassReport:
    """Every outcome of one pass."""

    outcomes: list[Outcome] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    kind: str = "nightly"  # nightly | queue (the queue drained alone)

    @property
    def exit_code(self) -> int:
        failed = any(o.status == "error" for o in self.outcomes)
        return EXIT_INCOMPLETE if failed else EXIT_OK

    def text(self) -> str:
        took = (self.finished_at or time.time()) - self.started_at
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        head = (f"{self.kind} pass: {len(self.outcomes)} versions in {took:.1f} s ("
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
        return "\n".join([head, *(o.line() for o in self.outcomes)])

    def headline(self) -> str:
        return self.text().splitlines()[0]

    def table(self) -> str:
        """The pass as the compact end table (`jobs.summary_table`): one row per version."""
        from jobs.summary_table import Row, render

        rows = []
        for o in self.outcomes:
            version = f"{o.name} v{o.version}" if o.version else o.name
            verdict = o.verdict or o.status
            note = {"up-to-date": "up to date: audited earlier under this spec and policy",
                    "error": o.reason, "skipped": o.reason}.get(o.status, "")
            if o.queued_by:
                note = f"queued by {o.queued_by}" + (f"; {note}" if note else "")
            rows.append(Row(version, verdict, o.policy, o.first[0], o.first[1],
                            o.report or (f"run {o.run_id}" if o.run_id else ""), note))
        return render(rows)


# -- the pass -------------------------------------------------------------------------------


@dataclass
class _Context:
    config: NightlyConfig
    client: Any
    experiment_id: str
    spec: Any
    spec_text: str | None
    spec_sha: str
    policies: list[Any]
    toolkit: str
    executor: Any = None  # RayExecutor with `executor: ray`, else None


def run_pass(config: NightlyConfig, *, models: list[str] | None = None,
             force: bool = False, queue: QueueMode = "first") -> PassReport:
    """Audit what needs auditing; see the module docstring. `queue`: drain the audit queue
    `first` (the default; not when `models` limits the pass), `only`, or leave it (`off`)."""
    with _pass_lock:
        return _run_pass(config, models=models, force=force, queue=queue)


def _run_pass(config: NightlyConfig, *, models: list[str] | None, force: bool,
              queue: QueueMode) -> PassReport:
    from jobs.lease import LeaseStore
    from jobs.queue import AuditQueue

    _stop.clear()
    mode = "off" if models and queue == "first" else queue
    report = PassReport(kind="queue" if mode == "only" else "nightly")
    leases = pending = ctx = None
    raised, empty = True, False  # empty: the queue alone, and nothing in it (not a pass)
    try:
        if mode != "off":
            pending = AuditQueue(config.lease_url())
            pending.reclaim(_stale_after_s(config))
            if mode == "only" and not pending.counts()["queued"]:
                raised, empty = False, True
                return report  # nothing to do: no connection to the tracking store needed
        ctx = _open(config)
        leases = LeaseStore(config.lease_url(), config.lease.ttl_s, retry=config.retry)
        handled: set[tuple[str, str | None]] = set()
        if pending is not None:
            handled = _drain(ctx, leases, pending, report)
        if mode != "only" and not _stop.is_set():
            _selection(ctx, leases, models, force, report, handled)
        raised = False
    finally:
        for store in (leases, pending):
            if store is not None:
                store.dispose()
        if ctx is not None and ctx.executor is not None:
            ctx.executor.close()
        report.finished_at = time.time()
        if not empty:
            from jobs import metrics

            metrics.record_pass(report.kind, report.started_at, report.finished_at,
                                EXIT_INCOMPLETE if raised else report.exit_code,
                                (o.status for o in report.outcomes))
    return report


def _open(config: NightlyConfig) -> _Context:
    """Connect to the tracking store and load the spec and policies (errors raise)."""
    from governance import __version__
    from governance.tracking.runs import get_or_create_experiment
    from jobs.verdict import load_policies

    client = connect(config)
    spec, spec_text, spec_sha = load_spec(config)
    policies = load_policies(config.policy_paths())
    experiment_id = get_or_create_experiment(client, config.experiment,
                                             config.experiment_artifact_location())
    if config.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("executor: ray needs Ray, which is not installed: pip "
                              "install 'persona-governance[ray]'")
    return _Context(config, client, experiment_id, spec, spec_text, spec_sha, policies,
                    __version__)


def _ray(ctx: _Context) -> Any:
    """The pass's Ray executor, started with the first version it audits (a pass with
    nothing to audit never starts or joins Ray)."""
    if ctx.executor is None:
        from jobs.ray_executor import RayExecutor

        ctx.executor = RayExecutor(ctx.config.ray, should_abort=_abort.is_set)
    return ctx.executor


def _stale_after_s(config: NightlyConfig) -> float:
    """How long a queue row may stay `taken` before it is presumed abandoned: longer than
    any audit may take, plus two lease lifetimes."""
    return (config.audit.timeout_s or 6 * 3600.0) + 2 * config.lease.ttl_s


def _timed(ctx: _Context, leases: LeaseStore, target: Target, force: bool) -> Outcome:
    """`_one_version`, with an exception before any run recorded as `error`, and counted in
    the metrics (the duration only for versions actually audited)."""
    from jobs import metrics

    t0 = time.perf_counter()
    try:
        outcome = _one_version(ctx, leases, target, force)
    except Exception as exc:  # registry or lease database trouble before any run
        outcome = Outcome(target.name, target.version, "error",
                          redact(f"{type(exc).__name__}: {exc}"))
    metrics.record_version(outcome.status,
                           time.perf_counter() - t0 if outcome.run_id else None)
    log.info("%s", outcome.line().strip())
    return outcome


def _selection(ctx: _Context, leases: LeaseStore, models: list[str] | None, force: bool,
               report: PassReport, handled: set[tuple[str, str | None]]) -> None:
    """The config's selection (or `models`), less the versions the queue handled."""
    from jobs import metrics
    from jobs.discovery import discover

    config = ctx.config
    targets, problems = discover(ctx.client, config, models)
    for p in problems:
        report.outcomes.append(Outcome(p.name, p.version, "error", redact(p.reason)))
        metrics.record_version("error", None)
    if not targets and not problems:
        log.warning("no model version matched the config's selectors (%s)",
                    config.source or "<defaults>")
    targets = [t for t in targets if (t.name, t.version) not in handled]
    log.info("nightly pass: %d versions selected in %s, experiment %r, spec %s",
             len(targets), redact(config.tracking_uri), config.experiment, ctx.spec_sha[:12])
    on_ray = config.executor == "ray"
    if on_ray:
        _in_parallel(ctx, leases, targets, force, report)
    for target in [] if on_ray else targets:
        if _stop.is_set():
            log.info("stop requested: no further versions in this pass")
            break
        outcome = _timed(ctx, leases, target, force)
        report.outcomes.append(outcome)
        if outcome.status == "error" and not _still_reachable(config):
            break
    done = {(o.name, o.version) for o in report.outcomes}
    for target in targets:  # left over after a stop request or a lost tracking server
        if (target.name, target.version) not in done:
            report.outcomes.append(Outcome(target.name, target.version, "skipped",
                                           "the pass stopped before this version"))


# With `executor: ray`, up to `ray.parallel_versions` versions are in flight at once, each in
# its own driver thread. A thread holds `_driver` for all of its own work (lease, registry,
# MLflow logging, verdict) and lets go of it only while its Ray tasks run: the driver's
# writes happen one version at a time, exactly as in a sequential pass.
_driver = threading.Lock()
_holds_driver = threading.local()
_abort = threading.Event()  # Ctrl-C/SIGTERM during a parallel pass: cancel the Ray tasks


def _in_parallel(ctx: _Context, leases: LeaseStore, targets: list[Target], force: bool,
                 report: PassReport) -> None:
    """`_timed` for every target, `ray.parallel_versions` at a time; outcomes in target order.
    A lost tracking store or a stop request skips the versions not yet begun."""
    from concurrent.futures import ThreadPoolExecutor

    halt = threading.Event()

    def one(target: Target) -> Outcome | None:
        with _driver:
            if halt.is_set() or _stop.is_set() or _abort.is_set():
                return None
            _holds_driver.yes = True
            try:
                outcome = _timed(ctx, leases, target, force)
            finally:
                _holds_driver.yes = False
            if outcome.status == "error" and not _still_reachable(ctx.config):
                halt.set()
            return outcome

    _abort.clear()
    pool = ThreadPoolExecutor(ctx.config.ray.parallel_versions, thread_name_prefix="version")
    try:
        futures = [pool.submit(one, t) for t in targets]
        for future in futures:
            outcome = future.result()
            if outcome is not None:
                report.outcomes.append(outcome)
    except BaseException:
        _abort.set()  # the threads' Ray waits raise KeyboardInterrupt: each records `error`
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _off_driver() -> Iterator[None]:
    """While a version's Ray tasks run, let the other versions' threads do driver work."""
    held = getattr(_holds_driver, "yes", False)
    if held:
        _driver.release()
    try:
        yield
    finally:
        if held:
            _driver.acquire()


_ROW_STATE = {"pass": "done", "warn": "done", "fail": "done", "up-to-date": "done",
              "error": "error", "skipped": "skipped"}


def _drain(ctx: _Context, leases: LeaseStore, pending: AuditQueue,
           report: PassReport) -> set[tuple[str, str | None]]:
    """Take queued rows one at a time until none is left (or a stop request): audit each
    version through `_one_version` when the config selects it, then mark the row. Returns
    the versions handled. A version queued by several events is audited once per pass."""
    from jobs import metrics
    from jobs.discovery import select_version

    worker = leases.holder
    handled: dict[tuple[str, str | None], Outcome] = {}
    while not _stop.is_set():
        item = pending.take(worker)
        if item is None:
            break
        key = (item.model_name, item.version)
        if key in handled:
            first = handled[key]
            _finish(pending, item, first.status, f"{first.status}: handled earlier in this "
                    f"pass{f' (run {first.run_id})' if first.run_id else ''}")
            continue
        try:
            target, why = select_version(ctx.client, ctx.config, item.model_name, item.version)
            if target is None:
                outcome = Outcome(item.model_name, item.version, "skipped", why)
                metrics.record_version("skipped", None)
                log.info("%s", outcome.line().strip())
            else:
                outcome = _timed(ctx, leases, target, force=False)
        except Exception as exc:  # the registry could not be read
            outcome = Outcome(item.model_name, item.version, "error",
                              redact(f"{type(exc).__name__}: {exc}"))
            metrics.record_version("error", None)
        except BaseException:  # interrupted: the row goes back to the queue
            pending.release(item, "the worker was interrupted before the audit finished")
            raise
        outcome.queued_by = item.event
        handled[key] = outcome
        report.outcomes.append(outcome)
        _finish(pending, item, outcome.status, f"{outcome.status}: {outcome.reason}"
                + (f" (run {outcome.run_id})" if outcome.run_id else ""))
        if outcome.status == "error" and not _still_reachable(ctx.config):
            break
    return set(handled)


def _finish(pending: AuditQueue, item: QueueItem, status: str, detail: str) -> None:
    try:
        if not pending.finish(item, _ROW_STATE.get(status, "error"), detail):
            log.warning("queue row %d (%s) was reclaimed by another worker before this one "
                        "finished it", item.id, item.label)
    except Exception as exc:  # the row stays `taken` and is reclaimed later
        log.error("could not mark queue row %d (%s) %s: %s", item.id, item.label, status,
                  redact(exc))


def _still_reachable(config: NightlyConfig) -> bool:
    """After a failed version: is the tracking store still there (with backoff)? If not,
    the pass stops instead of failing every remaining version slowly."""
    r = config.retry
    try:
        with_retries(f"tracking store {redact(config.tracking_uri)}",
                     lambda: probe(config.tracking_uri, r.timeout_s), r.attempts,
                     r.initial_delay_s, r.max_delay_s)
    except TrackingUnavailable as exc:
        log.error("stopping the pass: %s", exc)
        return False
    return True


def _model_tags(client: MlflowClient, target: Target) -> dict[str, str]:
    """The registered model's tags: what a policy's `applies_to` matches. A version's own tags
    are written by whoever registered it, the audited party, so they never choose a policy."""
    return dict(client.get_registered_model(target.name).tags or {})


def _one_version(ctx: _Context, leases: Any, target: Target, force: bool) -> Outcome:
    from governance.tracking.runs import find_audit_run
    from jobs.verdict import pick_policy

    try:
        tags = _model_tags(ctx.client, target)
        policy = pick_policy(ctx.policies, target.name, tags)
    except GovernanceError as exc:  # no policy applies to this model
        return Outcome(target.name, target.version, "error", redact(exc))

    def done() -> Any:
        return None if force else find_audit_run(
            ctx.client, [ctx.experiment_id], target.name, target.version,
            spec_sha256=ctx.spec_sha, policy_sha256=policy.sha256, toolkit_version=ctx.toolkit)

    if (run := done()) is not None:
        return _earlier(ctx, target, policy, run, "audited by run")
    with leases.hold(f"{target.name}/{target.version}") as lease:
        if not lease.acquired:
            who = lease.holder.describe() if lease.holder else "held by another process"
            return Outcome(target.name, target.version, "skipped", f"lease {who}")
        if (run := done()) is not None:  # finished by another process since the first check
            return _earlier(ctx, target, policy, run, "audited meanwhile by run")
        return _audit_version(ctx, target, policy, tags, lease)


def _earlier(ctx: _Context, target: Target, policy: PolicyRef, run: Any, how: str) -> Outcome:
    """The outcome of a version already audited under the current spec and policy."""
    from governance.tracking import runs as tr
    from jobs.summary_table import first_from_summary, report_location

    status = run.data.tags.get(tr.T_STATUS)
    return Outcome(target.name, target.version, "up-to-date",
                   f"{how} {run.info.run_id} ({status or '?'})",
                   verdict=status, policy=_policy_label(policy),
                   first=first_from_summary(run.data.tags.get(tr.T_SUMMARY, "")),
                   report=report_location(run.info.artifact_uri, ctx.config.tracking_uri,
                                          ctx.experiment_id, run.info.run_id))


def _policy_label(policy: PolicyRef) -> str:
    return f"{policy.name} {policy.sha256[:12]}"


def _audit_version(ctx: _Context, target: Target, policy: PolicyRef, tags: dict[str, str],
                   lease: Lease) -> Outcome:
    from governance.tracking import runs as tr
    from governance.tracking.registry import record_approval
    from jobs.summary_table import first_finding

    cfg = ctx.config
    run_tags = {
        tr.T_MODEL: target.name, tr.T_VERSION: target.version, tr.T_SPEC: ctx.spec_sha,
        tr.T_POLICY: policy.sha256, tr.T_POLICY_NAME: policy.name, tr.T_TOOLKIT: ctx.toolkit,
        tr.T_KEY: tr.audit_key(ctx.spec_sha, policy.sha256, ctx.toolkit),
        "mlflow.source.name": "persona-gov nightly",
        "mlflow.source.type": "JOB",
    }
    if target.model_id:
        run_tags[tr.T_MODEL_ID] = target.model_id
    if target.aliases:
        run_tags[tr.PREFIX + "aliases"] = ",".join(target.aliases)
    run_id = tr.start_audit_run(ctx.client, ctx.experiment_id, run_tags,
                                run_name=f"{target.name}-v{target.version}")
    log.info("auditing %s in run %s", target.label, run_id)
    _close_abandoned(ctx, target, run_id)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="persona-gov-nightly-") as tmp:
            work = Path(tmp)
            with _system_metrics(cfg, run_id):
                result = _run_audit(ctx, target, work)
                _check_quality(ctx, run_id, result, work / "quality")
                tr.log_audit(ctx.client, run_id, result, spec_text=ctx.spec_text,
                             policy_text=policy.text, policy_resolved=policy.resolved(),
                             model_id=target.model_id)
                baseline, note = resolve_baseline(ctx.client, [ctx.experiment_id], target,
                                                  policy, ctx.spec_sha, run_id, work / "base",
                                                  current=result)
                decision = _decide(policy, result, baseline, work, target, tags)
                if note:
                    decision.notes.insert(0, note)
                tr.log_extra(ctx.client, run_id, decision.artifacts)
            summary = decision.summary + "".join(f"; note: {n}" for n in decision.notes[:2])
            tr.log_metrics(ctx.client, run_id,
                           [("nightly_wall_time_s", time.perf_counter() - t0, 0)])
            tr.finish_audit_run(ctx.client, run_id, decision.status, summary)
        if not lease.still_ours():
            return Outcome(target.name, target.version, "error",
                           "the lease expired during the audit and another process took it: "
                           "the run is complete but no approval record was written", run_id)
        record_approval(ctx.client, target.name, target.version, status=decision.status,
                           run_id=run_id, spec_sha256=ctx.spec_sha,
                           policy_sha256=policy.sha256, policy_name=policy.name,
                           experiment_id=ctx.experiment_id,
                           summary=summary)
        return Outcome(target.name, target.version, decision.status, tr.one_line(summary),
                       run_id, verdict=decision.status, policy=_policy_label(policy),
                       first=first_finding(decision.verdict.findings),
                       report=_report_of(ctx, run_id))
    except BaseException as exc:  # noqa: BLE001 - recorded as error, re-raised if fatal
        if isinstance(exc, AuditFailed):  # the child's own error, already named
            reason = redact(str(exc))
        else:
            reason = redact(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted (SIGINT/SIGTERM) before the audit finished"
        log.error("audit of %s failed: %s", target.label, reason)
        _record_error(ctx, target, policy, run_id, reason, redact(traceback.format_exc()))
        if not isinstance(exc, Exception):
            raise
        return Outcome(target.name, target.version, "error", reason, run_id,
                       policy=_policy_label(policy))


def _report_of(ctx: _Context, run_id: str) -> str:
    """Where the run's report page is, for the end table; a runs:/ URI if the run cannot be
    read (a display detail never fails the version)."""
    from jobs.summary_table import NEXT_REPORT, report_location

    try:
        artifact_uri = ctx.client.get_run(run_id).info.artifact_uri
    except Exception as exc:  # noqa: BLE001 - the audit is recorded; only the path is lost
        log.debug("cannot read run %s for its report path: %s", run_id, exc)
        return f"runs:/{run_id}/{NEXT_REPORT}"
    return report_location(artifact_uri, ctx.config.tracking_uri, ctx.experiment_id, run_id)


def _close_abandoned(ctx: _Context, target: Target, run_id: str) -> None:
    """Earlier attempts of this version still `running` (we hold its lease) stopped without
    recording their end: their process died, or lost the tracking server. Mark them `error`,
    so no run stays `running` for ever; the version's approval record is left as it was.
    Never raises."""
    from governance.tracking.runs import abandon_running

    reason = (f"abandoned: this attempt stopped before it finished (its process died or lost "
              f"the tracking server); audited again in run {run_id}")
    try:
        for stale in abandon_running(ctx.client, [ctx.experiment_id], target.name,
                                     target.version, exclude_run_id=run_id, reason=reason):
            log.warning("run %s of %s was abandoned by its process: marked error", stale,
                        target.label)
    except Exception as exc:
        log.warning("could not close abandoned runs of %s: %s", target.label, redact(exc))


def _run_audit(ctx: _Context, target: Target, work: Path) -> AuditResult:
    """Load and audit one version: in a child process under the time limit (the default),
    inline, or as Ray tasks (`executor: ray`). Only models the config trusts by name may
    bring their own code."""
    from governance.audit.run import run_audit
    from governance.models.loading import load_model

    opts = ctx.config.audit
    trusted = opts.trusts(target.name)
    job = AuditJob(
        model_uri=target.uri, spec=ctx.spec.model_dump(mode="json"),
        tracking_uri=ctx.config.tracking_uri, registry_uri=ctx.config.registry_uri,
        device=opts.device, dtype=opts.dtype, chunk_rows=opts.chunk_rows,
        torch_threads=opts.torch_threads, trust_remote_code=trusted, allow_pickle=trusted,
        registered_name=target.name, registered_version=target.version,
        console=console.settings())
    if ctx.config.executor == "ray":  # Ray tasks, merged here; the rest is the same
        executor = _ray(ctx)
        with _off_driver():
            result = executor.audit(job, timeout_s=opts.timeout_s)
    elif opts.isolation == "process":
        result = audit_in_child(job, timeout_s=opts.timeout_s, work_dir=work / "child")
    else:
        with mlflow_uris(ctx.config):
            loaded = load_model(target.uri, device=opts.device, dtype=opts.dtype,
                                trust_remote_code=trusted, allow_pickle=trusted)
        loaded.identity["registered_name"] = target.name
        loaded.identity["registered_version"] = target.version
        with _torch_threads(opts.torch_threads):
            result = run_audit(loaded, ctx.spec, chunk_rows=opts.chunk_rows, progress=False)
    got = result.meta.get("spec_sha256")
    if got != ctx.spec_sha:
        raise GovernanceError(
            f"the spec hash changed during the pass (expected {ctx.spec_sha[:12]}, the audit "
            f"computed {str(got)[:12]}): was the question file or persona catalogue edited?")
    return result


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count for the block (a shared host: fewer threads than cores
    avoids OpenMP threads spinning against each other), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_quality(ctx: _Context, run_id: str, result: AuditResult, out: Path) -> None:
    """Great Expectations on the question sample and the audit tables, logged as evidence
    under `quality/`. A failed check stops the version before anything is published: it is
    recorded as `error`, never given a verdict."""
    from governance.audit.spec import sampled_questions
    from governance.judge.quality import validate_audit, validate_questions

    checks = {"questions": validate_questions(sampled_questions(ctx.spec)),
              "audit": validate_audit(result)}
    for name, check in checks.items():
        check.save(out / name)
    ctx.client.log_artifacts(run_id, str(out), "quality")
    failed = [f"{name}: {check.summary()}" for name, check in checks.items() if not check.success]
    if failed:
        raise GovernanceError("data quality checks failed, verdict not published; "
                              + " | ".join(failed))


def _decide(policy: PolicyRef, result: AuditResult, baseline: AuditResult | None, work: Path,
            target: Target, tags: dict[str, str]) -> Any:
    from jobs.verdict import decide

    return decide(policy, result, baseline, work, model_name=target.name, model_tags=tags)


class _system_metrics:
    """MLflow's system-metrics monitor around the audit (CPU, memory, disk, network, GPU)."""

    def __init__(self, config: NightlyConfig, run_id: str):
        self.monitor = None
        if config.audit.system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(
                    run_id, sampling_interval=config.audit.system_metrics_interval_s,
                    tracking_uri=config.tracking_uri)
            except Exception as exc:  # psutil missing, or no permission: audit anyway
                log.warning("system metrics unavailable: %s", redact(exc))

    def __enter__(self) -> None:
        if self.monitor is not None:
            self.monitor.start()

    def __exit__(self, *exc: object) -> None:
        if self.monitor is not None:
            self.monitor.finish()


def _record_error(ctx: _Context, target: Target, policy: PolicyRef, run_id: str, reason: str,
                  trace: str) -> None:
    """Mark the run FAILED (state error) and the version `error`; never raises."""
    from governance.tracking import runs as tr
    from governance.tracking.registry import record_approval

    try:
        with tempfile.TemporaryDirectory(prefix="persona-gov-error-") as tmp:
            path = Path(tmp) / "error.txt"
            path.write_text(redact(f"{reason}\n\n{trace}"))
            ctx.client.log_artifact(run_id, str(path))
    except Exception as exc:
        log.warning("could not log error.txt for run %s: %s", run_id, redact(exc))
    try:
        tr.finish_audit_run(ctx.client, run_id, "error", f"error: {reason}", reason=reason)
    except Exception as exc:
        log.error("could not mark run %s as failed: %s", run_id, redact(exc))
    try:
        record_approval(ctx.client, target.name, target.version, status="error",
                           run_id=run_id, spec_sha256=ctx.spec_sha,
                           policy_sha256=policy.sha256, policy_name=policy.name,
                           experiment_id=ctx.experiment_id,
                           summary=f"error: {reason}")
    except Exception as exc:
        log.error("could not record the error on %s: %s", target.label, redact(exc))


# -- entry points ---------------------------------------------------------------------------


def scheduled_pass(config_path: str | None = None) -> int:
    """What the scheduler calls (by the reference `jobs.nightly:scheduled_pass`): one pass
    with the config file, logged; returns the pass's exit code. An unreachable tracking
    server raises, so the scheduler's error listener reports it."""
    config = load_config(config_path)
    report = run_pass(config)
    _log_report(report)
    return report.exit_code


def scheduled_drain(config_path: str | None = None) -> int:
    """What the scheduler's queue job calls (`jobs.nightly:scheduled_drain`): the queue
    drained alone, unless a pass is running in this process (it drains the queue itself, or
    audits those versions anyway): then nothing. Returns the pass's exit code."""
    if not _pass_lock.acquire(blocking=False):
        log.debug("queue job: a pass is running, nothing to do")
        return 0
    try:
        report = _run_pass(load_config(config_path), models=None, force=False, queue="only")
    finally:
        _pass_lock.release()
    if report.outcomes:
        _log_report(report)
    return report.exit_code


def _log_report(report: PassReport) -> None:
    for line in report.text().splitlines():
        log.info("%s", line)
    if report.exit_code:
        log.error("%s pass finished with errors (%d versions errored)", report.kind,
                  sum(o.status == "error" for o in report.outcomes))
