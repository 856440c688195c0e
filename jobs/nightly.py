"""One nightly pass: audit every selected model version that has no completed audit for the
current spec + policy + toolkit version, log it to MLflow, and record the outcome on the
version.

    report = run_pass(load_config("nightly.yaml"))          # persona-gov nightly --once
    print(report.text()); sys.exit(report.exit_code)

Per version, in order: take the version's lease (skip if another process holds it), check
again that it still needs an audit, open an MLflow run, load the model, run the audit, log
curves, tables and figures (`governance.tracking.log_audit`), resolve the policy's baseline
(its latest completed audit under the same spec), decide the verdict (`jobs.verdict`), log
the verdict, drift and report, mark the run completed, and only then write the approval
record on the version. Any exception on the way marks the run and the version `error` with
the reason; the other versions still run. Exit code: 0 when every selected version has a
completed audit (pass, warn or fail), 1 when any version errored.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError, GovernanceError
from jobs.config import (
    NightlyConfig,
    display_uri,
    load_config,
    redact,
    sqlalchemy_url,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from governance.audit import AuditResult, AuditSpec
    from jobs.discovery import Target
    from jobs.lease import Lease
    from jobs.verdict import PolicyRef

log = logging.getLogger(__name__)

_stop = threading.Event()


def request_stop() -> None:
    """Ask a running pass to stop after the version in progress (the scheduler's SIGTERM)."""
    _stop.set()


class TrackingUnavailable(GovernanceError):
    """The tracking server or database could not be reached after the configured retries."""


# -- connecting -----------------------------------------------------------------------------


def probe(uri: str, timeout_s: float) -> None:
    """Raise if the tracking store at `uri` does not answer (no MLflow retries involved)."""
    if uri.startswith(("http://", "https://")):
        import requests

        resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        if resp.status_code >= 500:
            raise ConnectionError(f"{uri} answered /health with HTTP {resp.status_code}")
        return
    db = sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise ConfigError(f"tracking store {uri}: directory {db.parent} does not exist")
        return
    if "://" in uri and not uri.startswith(("file:", "databricks")):
        from sqlalchemy import create_engine, text

        args = {"connect_timeout": int(max(1, timeout_s))} if uri.startswith("postgres") else {}
        engine = create_engine(sqlalchemy_url(uri), connect_args=args)
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        finally:
            engine.dispose()


def with_retries(what: str, fn: Callable[[], Any], attempts: int, initial_delay_s: float,
                 max_delay_s: float, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Call `fn` up to `attempts` times, doubling the delay between tries; configuration
    errors are not retried. The last error is raised as TrackingUnavailable."""
    delay = initial_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ConfigError:
            raise
        except Exception as exc:
            message = redact(f"{type(exc).__name__}: {exc}")
            if attempt == attempts:
                raise TrackingUnavailable(
                    f"{what} unreachable after {attempts} attempts: {message}") from None
            log.warning("%s unreachable (attempt %d/%d): %s; retrying in %.1f s", what, attempt,
                        attempts, message, delay)
            sleep(delay)
            delay = min(max(delay * 2, 0.1), max_delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def mlflow_uris(config: NightlyConfig) -> Iterator[None]:
    """Point `mlflow`'s process-wide URIs at the config's stores for the block (model
    loading from `models:/...` reads them), then restore what was there. MLflow keeps them
    in MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI, which are also our env overrides."""
    import mlflow

    before = {v: os.environ.get(v) for v in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.registry_uri or config.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])  # None does not clear the env
        for var, value in before.items():
            if value is None:
                os.environ.pop(var, None)


def connect(config: NightlyConfig) -> MlflowClient:
    """An MlflowClient for the config's stores, after checking they answer (with backoff)."""
    from mlflow import MlflowClient

    r = config.retry
    shown = display_uri(config.tracking_uri)
    with_retries(f"tracking store {shown}", lambda: probe(config.tracking_uri, r.timeout_s),
                 r.attempts, r.initial_delay_s, r.max_delay_s)
    if config.registry_uri and config.registry_uri != config.tracking_uri:
        with_retries(f"registry {display_uri(config.registry_uri)}",
                     lambda: probe(config.registry_uri or "", r.timeout_s),
                     r.attempts, r.initial_delay_s, r.max_delay_s)
    client = MlflowClient(config.tracking_uri, config.registry_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        status = getattr(exc, "get_http_status_code", lambda: None)()
        if status in (401, 403):  # not retried: the same credentials are refused again
            raise TrackingUnavailable(_refusal(shown, status)) from None
        raise TrackingUnavailable(
            f"tracking store {shown} answered but refused a request: {redact(exc)}") from None
    return client


def _refusal(shown: str, status: int) -> str:
    """Why an HTTP tracking server refused us, and how to fix it; names the user, never the
    password. MLflow sends the credentials of MLFLOW_TRACKING_USERNAME/_PASSWORD (or of
    ~/.mlflow/credentials) as HTTP basic auth, or MLFLOW_TRACKING_TOKEN as a bearer token."""
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username
    how = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
           "in the environment of `persona-gov nightly`")
    if status == 403:
        return (f"tracking store {shown} refused the credentials of user {user!r} "
                f"(HTTP 403 permission denied): grant that user access on the server, or {how}")
    if user is None and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return (f"tracking store {shown} refused the request without credentials (HTTP 401; "
                f"the server enforces authentication): {how}")
    who = f"user {user!r}" if user else "MLFLOW_TRACKING_TOKEN"
    return (f"tracking store {shown} refused the credentials of {who} (HTTP 401): check the "
            f"password, or {how}")


# -- the spec -------------------------------------------------------------------------------


def load_spec(config: NightlyConfig) -> tuple[AuditSpec, str | None, str]:
    """The audit spec, its file text, and its hash (spec + catalogue + question file)."""
    import yaml
    from pydantic import ValidationError

    from governance.assets import resolve
    from governance.audit import AuditSpec, spec_hash
    from governance.errors import format_validation_error
    from governance.personas import load_catalogue
    from governance.questions import file_sha256

    where = f"nightly config {config.source or '<defaults>'}"
    path, inline = config.spec_path(), config.inline_spec()
    if path:
        spec, text = AuditSpec.from_yaml(path), Path(path).read_text()
    elif inline is not None:
        try:
            spec = AuditSpec.model_validate(inline)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{where}: spec")) from exc
        text = yaml.safe_dump(config.spec, sort_keys=False)
    else:
        spec, text = AuditSpec(), None
    if not spec.questions:
        raise ConfigError(f"{where}: `spec` must give a `questions` file (or the pinned asset "
                          "'mmlu'), in a spec YAML file or inline")
    questions = resolve(spec.questions, "questions")
    return spec, text, spec_hash(spec, load_catalogue(spec.personas), file_sha256(questions))


# -- outcomes -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one version in a pass."""

    name: str
    version: str | None
    status: str  # pass | warn | fail | error | up-to-date | skipped
    reason: str = ""
    run_id: str | None = None

    def line(self) -> str:
        v = f" v{self.version}" if self.version else ""
        run = f" (run {self.run_id})" if self.run_id else ""
        return f"  {self.status:<10} {self.name}{v}{run}: {self.reason}"


@dataclass
class PassReport:
    """Every outcome of one pass."""

    outcomes: list[Outcome] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def exit_code(self) -> int:
        return 1 if any(o.status == "error" for o in self.outcomes) else 0

    def text(self) -> str:
        took = (self.finished_at or time.time()) - self.started_at
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        head = (f"nightly pass: {len(self.outcomes)} versions in {took:.1f} s ("
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")")
        return "\n".join([head, *(o.line() for o in self.outcomes)])


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


def run_pass(config: NightlyConfig, *, models: list[str] | None = None,
             force: bool = False) -> PassReport:
    """Audit what needs auditing; see the module docstring."""
    from governance import __version__
    from governance.tracking import get_or_create_experiment
    from jobs.discovery import discover
    from jobs.lease import LeaseStore
    from jobs.verdict import load_policies

    _stop.clear()
    report = PassReport()
    client = connect(config)
    spec, spec_text, spec_sha = load_spec(config)
    policies = load_policies(config.policy_paths())
    experiment_id = get_or_create_experiment(client, config.experiment,
                                             config.experiment_artifact_location())
    ctx = _Context(config, client, experiment_id, spec, spec_text, spec_sha, policies,
                   __version__)
    targets, problems = discover(client, config, models)
    for p in problems:
        report.outcomes.append(Outcome(p.name, p.version, "error", redact(p.reason)))
    if not targets and not problems:
        log.warning("no model version matched the config's selectors (%s)",
                    config.source or "<defaults>")
    log.info("nightly pass: %d versions selected in %s, experiment %r, spec %s",
             len(targets), display_uri(config.tracking_uri), config.experiment, spec_sha[:12])
    leases = LeaseStore(config.lease_url(), config.lease.ttl_s)
    try:
        for target in targets:
            if _stop.is_set():
                log.info("stop requested: no further versions in this pass")
                break
            try:
                outcome = _one_version(ctx, leases, target, force)
            except Exception as exc:  # registry or lease database trouble before any run
                outcome = Outcome(target.name, target.version, "error",
                                  redact(f"{type(exc).__name__}: {exc}"))
            report.outcomes.append(outcome)
            log.info("%s", outcome.line().strip())
            if outcome.status == "error" and not _still_reachable(config):
                break
        done = {(o.name, o.version) for o in report.outcomes}
        for target in targets:  # left over after a stop request or a lost tracking server
            if (target.name, target.version) not in done:
                report.outcomes.append(Outcome(target.name, target.version, "skipped",
                                               "the pass stopped before this version"))
    finally:
        leases.dispose()
        report.finished_at = time.time()
    return report


def _still_reachable(config: NightlyConfig) -> bool:
    """After a failed version: is the tracking store still there (with backoff)? If not,
    the pass stops instead of failing every remaining version slowly."""
    r = config.retry
    try:
        with_retries(f"tracking store {display_uri(config.tracking_uri)}",
                     lambda: probe(config.tracking_uri, r.timeout_s), r.attempts,
                     r.initial_delay_s, r.max_delay_s)
    except TrackingUnavailable as exc:
        log.error("stopping the pass: %s", exc)
        return False
    return True


def _model_tags(client: MlflowClient, target: Target) -> dict[str, str]:
    """Registered-model tags overlaid by the version's own (what a policy's applies_to
    matches)."""
    tags = dict(client.get_registered_model(target.name).tags or {})
    tags.update(client.get_model_version(target.name, target.version).tags or {})
    return tags


def _one_version(ctx: _Context, leases: Any, target: Target, force: bool) -> Outcome:
    from governance.tracking import find_audit_run
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
        return Outcome(target.name, target.version, "up-to-date",
                       f"audited by run {run.info.run_id} "
                       f"({run.data.tags.get('persona_audit.status', '?')})")
    with leases.hold(f"{target.name}/{target.version}") as lease:
        if not lease.acquired:
            who = lease.holder.describe() if lease.holder else "held by another process"
            return Outcome(target.name, target.version, "skipped", f"lease {who}")
        if (run := done()) is not None:  # finished by another process since the first check
            return Outcome(target.name, target.version, "up-to-date",
                           f"audited meanwhile by run {run.info.run_id}")
        return _audit_version(ctx, target, policy, tags, lease)


def _audit_version(ctx: _Context, target: Target, policy: PolicyRef, tags: dict[str, str],
                   lease: Lease) -> Outcome:
    from governance import tracking as tr

    cfg = ctx.config
    run_tags = {
        tr.T_MODEL: target.name, tr.T_VERSION: target.version, tr.T_SPEC: ctx.spec_sha,
        tr.T_POLICY: policy.sha256, tr.T_TOOLKIT: ctx.toolkit,
        tr.T_KEY: tr.audit_key(ctx.spec_sha, policy.sha256, ctx.toolkit),
        tr.PREFIX + "policy_name": policy.name, "mlflow.source.name": "persona-gov nightly",
        "mlflow.source.type": "JOB",
    }
    if target.model_id:
        run_tags[tr.T_MODEL_ID] = target.model_id
    if target.aliases:
        run_tags[tr.PREFIX + "aliases"] = ",".join(target.aliases)
    run_id = tr.start_audit_run(ctx.client, ctx.experiment_id, run_tags,
                                run_name=f"{target.name}-v{target.version}")
    log.info("auditing %s in run %s", target.label, run_id)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="persona-gov-nightly-") as tmp:
            work = Path(tmp)
            with _system_metrics(cfg, run_id):
                result = _run_audit(ctx, target)
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
        tr.record_approval(ctx.client, target.name, target.version, status=decision.status,
                           run_id=run_id, spec_sha256=ctx.spec_sha,
                           policy_sha256=policy.sha256, summary=summary)
        return Outcome(target.name, target.version, decision.status, tr.one_line(summary),
                       run_id)
    except BaseException as exc:  # noqa: BLE001 - recorded as error, re-raised if fatal
        reason = redact(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted (SIGINT/SIGTERM) before the audit finished"
        log.error("audit of %s failed: %s", target.label, reason)
        _record_error(ctx, target, policy, run_id, reason, redact(traceback.format_exc()))
        if not isinstance(exc, Exception):
            raise
        return Outcome(target.name, target.version, "error", reason, run_id)


def _run_audit(ctx: _Context, target: Target) -> AuditResult:
    from governance.audit import run_audit
    from governance.models import load_model

    opts = ctx.config.audit
    with mlflow_uris(ctx.config):
        loaded = load_model(target.uri, device=opts.device, dtype=opts.dtype,
                            trust_remote_code=opts.trust_remote_code)
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
    from governance.audit import sampled_questions
    from governance.quality import validate_audit, validate_questions

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
    from governance import tracking as tr

    try:
        with tempfile.TemporaryDirectory(prefix="persona-gov-error-") as tmp:
            path = Path(tmp) / "error.txt"
            path.write_text(f"{reason}\n\n{trace}")
            ctx.client.log_artifact(run_id, str(path))
    except Exception as exc:
        log.warning("could not log error.txt for run %s: %s", run_id, redact(exc))
    try:
        tr.finish_audit_run(ctx.client, run_id, "error", f"error: {reason}", reason=reason)
    except Exception as exc:
        log.error("could not mark run %s as failed: %s", run_id, redact(exc))
    try:
        tr.record_approval(ctx.client, target.name, target.version, status="error",
                           run_id=run_id, spec_sha256=ctx.spec_sha,
                           policy_sha256=policy.sha256, summary=f"error: {reason}")
    except Exception as exc:
        log.error("could not record the error on %s: %s", target.label, redact(exc))


# -- the baseline ---------------------------------------------------------------------------


def resolve_baseline(
    client: MlflowClient, experiment_ids: list[str], target: Target, policy: PolicyRef,
    spec_sha: str, current_run_id: str, dst: Path, current: AuditResult | None = None,
) -> tuple[AuditResult | None, str | None]:
    """The baseline audit the policy names: the latest completed audit, under the same spec,
    of the version holding the alias / the previous version / this version. Returns (audit or
    None, a note saying why there is none).

    A version that itself holds the baseline alias and has no earlier audit is the approved
    baseline: it is compared with its own `current` audit (no drift by definition), with a
    note saying so, rather than reported as missing a baseline."""
    from governance.tracking import find_audit_run, load_audit
    from jobs.discovery import all_versions
    from jobs.verdict import baseline_choice

    choice = baseline_choice(policy)
    if choice is None:
        return None, None
    if choice.kind == "alias":
        try:
            version = str(client.get_model_version_by_alias(target.name, choice.alias).version)
        except Exception:
            return None, (f"baseline alias {choice.alias!r} is not set on {target.name!r}: "
                          "no baseline")
    elif choice.kind == "previous":
        older = [mv for mv in all_versions(client, target.name)
                 if int(mv.version) < int(target.version)]
        if not older:
            return None, f"{target.label} has no previous version: no baseline"
        version = str(older[0].version)
    else:
        version = target.version
    run = find_audit_run(client, experiment_ids, target.name, version, spec_sha256=spec_sha,
                         exclude_run_id=current_run_id)
    if run is None and choice.kind == "alias" and version == target.version and current:
        return current, (f"{target.label} holds the baseline alias {choice.alias!r}: it is the "
                         "baseline, compared with itself")
    if run is None:
        return None, (f"baseline {choice.describe()} ({target.name} v{version}) has no "
                      f"completed audit under spec {spec_sha[:12]}: no baseline")
    log.info("baseline for %s: v%s run %s (%s)", target.label, version, run.info.run_id,
             choice.describe())
    return load_audit(client, run.info.run_id, dst), None


# -- entry points ---------------------------------------------------------------------------


def scheduled_pass(config_path: str | None = None) -> int:
    """What the scheduler calls (by the reference `jobs.nightly:scheduled_pass`): one pass
    with the config file, logged; returns the pass's exit code. An unreachable tracking
    server raises, so the scheduler's error listener reports it."""
    config = load_config(config_path)
    report = run_pass(config)
    for line in report.text().splitlines():
        log.info("%s", line)
    if report.exit_code:
        log.error("nightly pass finished with errors (%d versions errored)",
                  sum(o.status == "error" for o in report.outcomes))
    return report.exit_code
