"""The nightly config: which registered models to audit, where, with which spec and policy.

    cfg = load_config("jobs/nightly.example.yaml")   # YAML, then env overrides
    cfg.tracking_uri, cfg.models[0].versions, cfg.spec_path()

Precedence: command-line flags > environment variables > the YAML file > defaults. The
environment variables are MLflow's own (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`; basic
auth through `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`, read by MLflow itself and
never stored here) and `PERSONA_AUDIT_*` (see `ENV_OVERRIDES`). Relative file paths in the
file (spec, policy, artifact_location) are relative to the file; URIs go to MLflow and
SQLAlchemy as they are (a relative `sqlite:///mlflow.db` is relative to the working
directory, as in MLflow). The passwords of the config's URIs are registered with
`governance.redaction`, which removes them from every text that is logged or written.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from governance.errors import ConfigError, format_validation_error
from governance.files import read_yaml_mapping
from governance.redaction import register_uri

CONFIG_ENV = "PERSONA_AUDIT_CONFIG"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default
DEFAULT_EXPERIMENT = "persona-audits"
# env var -> dotted config field it overrides
ENV_OVERRIDES: dict[str, str] = {
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "MLFLOW_REGISTRY_URI": "registry_uri",
    "PERSONA_AUDIT_EXPERIMENT": "experiment",
    "PERSONA_AUDIT_SPEC": "spec",
    "PERSONA_AUDIT_POLICY": "policy",
    "PERSONA_AUDIT_LEASE_URL": "lease.url",
    "PERSONA_AUDIT_JOBSTORE_URL": "schedule.jobstore_url",
    "PERSONA_AUDIT_HEALTH_PORT": "schedule.health_port",
}
# MLflow's names of the registry events the webhook receiver can queue an audit for
WEBHOOK_EVENTS = ("model_version.created", "model_version_alias.created",
                  "model_version_tag.set")
WebhookEvent = Literal["model_version.created", "model_version_alias.created",
                       "model_version_tag.set"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latest(_Strict):
    """The newest N versions (by version number)."""

    latest: int = Field(gt=0)


class Aliases(_Strict):
    """The versions these aliases point to (an alias that does not exist is reported)."""

    aliases: list[str] = Field(min_length=1)


Versions = Literal["all"] | Latest | Aliases


class ModelSelector(_Strict):
    """Registered models by exact name or by registered-model tags, and which versions."""

    name: str | None = None
    tags: dict[str, str] | None = Field(
        None, description="every tag must match, e.g. {persona_audit.enabled: 'true'}"
    )
    versions: Versions = Latest(latest=1)

    @model_validator(mode="after")
    def _name_or_tags(self) -> ModelSelector:
        if (self.name is None) == (not self.tags):
            raise ValueError("give exactly one of `name` or `tags`")
        return self


class AuditOptions(_Strict):
    """How audits run (not part of the spec hash)."""

    device: str | None = "cpu"
    dtype: str | None = None
    chunk_rows: int | None = Field(
        None, gt=0, description="patched prompts per forward; None = 32 on a CPU, sized to "
        "free memory on a GPU"
    )
    trusted_models: list[str] = Field(
        default_factory=list, description="registered model names (globs) whose custom code "
        "and pickle weights may be loaded; every other model is loaded as config, "
        "safetensors weights and tokenizer files only")
    isolation: Literal["process", "inline"] = Field(
        "process", description="process: each audit in a child process under timeout_s, so "
        "a crash, out-of-memory or hang of one version cannot stop the pass; inline: in the "
        "nightly's own process (no time limit)")
    timeout_s: float | None = Field(
        6 * 3600.0, gt=0, description="per-version time limit with isolation: process; the "
        "audit is killed and recorded `error: timed out after N s`; None = no limit")
    torch_threads: int | None = Field(
        None, gt=0, description="CPU threads for torch during an audit; None = torch's default"
    )
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(5.0, gt=0)

    def trusts(self, model_name: str) -> bool:
        """Whether the config trusts this registered model's own code and pickle weights."""
        return any(fnmatchcase(model_name, glob) for glob in self.trusted_models)


class LeaseOptions(_Strict):
    """The cross-process lease: a row per model version in a SQL database."""

    url: str | None = Field(
        None, description="SQLAlchemy URL; None = SQLite file next to a SQLite tracking store"
    )
    ttl_s: float = Field(900.0, gt=0, description="expiry; a live holder renews at ttl/3")


class RetryOptions(_Strict):
    """Backoff for an unreachable tracking server: delay doubles up to max_delay_s."""

    attempts: int = Field(5, ge=1)
    initial_delay_s: float = Field(2.0, ge=0)
    max_delay_s: float = Field(60.0, ge=0)
    timeout_s: float = Field(10.0, gt=0, description="per probe")


class GateOptions(_Strict):
    warn_fails: bool = Field(True, description="a `warn` verdict fails the gate (exit 1)")


class ScheduleOptions(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    jobstore_url: str | None = Field(
        None, description="SQLAlchemy URL of the schedule's state (plain rows) and the "
                          "scheduler's lease; None = SQLite file")
    misfire_grace_time_s: int = Field(
        6 * 3600, gt=0,
        description="a run missed while the scheduler was down still runs (once, coalesced) "
                    "if it restarts within this many seconds",
    )
    queue_interval_s: int = Field(
        60, ge=0, description="drain the audit queue (versions the registry's webhooks "
                              "announced) every this many seconds between nightly passes; "
                              "0 = only at the nightly pass")
    health_host: str = "127.0.0.1"
    health_port: int | None = Field(
        None, ge=0, le=65535, description="serve GET /healthz and /metrics on this port "
                                          "(env PERSONA_AUDIT_HEALTH_PORT); None = off")


class WebhookOptions(_Strict):
    """`persona-gov webhook`: the receiver of MLflow's model-registry webhooks. Its HMAC
    secret comes only from the environment (PERSONA_AUDIT_WEBHOOK_SECRET)."""

    host: str = Field("127.0.0.1", description="listen address; loopback unless a TLS "
                                               "proxy in front of it needs otherwise")
    port: int = Field(8080, ge=0, le=65535)
    path: str = Field("/webhook", pattern=r"^/[A-Za-z0-9._~/-]*$",
                      description="the URL path MLflow posts to")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1,
        description="events that queue an audit; other signed events are acknowledged "
                    "and ignored")
    tolerance_s: float = Field(300.0, gt=0, description="refuse a delivery whose signed "
                                                        "timestamp is further than this from now")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger bodies are refused (413)")

    @model_validator(mode="before")
    @classmethod
    def _no_secret_here(cls, data: Any) -> Any:
        if isinstance(data, dict) and "secret" in data:
            raise ValueError("the webhook secret is never read from the config file: set "
                             "PERSONA_AUDIT_WEBHOOK_SECRET in the receiver's environment")
        return data


class RayOptions(_Strict):
    """`executor: ray`: one Ray task per (version, question shard), merged on the driver,
    which alone writes to MLflow. Needs the `ray` extra (pip install persona-governance[ray])."""

    address: str | None = Field(
        None, description="Ray cluster address (e.g. ray://head:10001, or auto for the "
                          "cluster on this host); None = start a local Ray instance")
    shards: int = Field(1, ge=1, description="question shards per version: tasks that each "
                                             "audit part of the questions, merged exactly")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task; fractional for small "
                                                   "models (0.25: four tasks share a GPU)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per task")
    max_retries: int = Field(3, ge=0, description="times a task is run again when its "
                                                  "worker or node dies")
    parallel_versions: int = Field(4, ge=1, description="versions in flight at once")


class NightlyConfig(_Strict):
    """Everything one nightly pass needs."""

    tracking_uri: str = DEFAULT_TRACKING_URI
    registry_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    artifact_location: str | None = Field(
        None, description="for a newly created experiment; None = next to a SQLite store"
    )
    spec: str | dict[str, Any] | None = Field(
        None, description="audit spec YAML file, or the spec's fields inline"
    )
    policy: str | list[str] | None = Field(
        None, description="policy YAML, or a list: the first whose applies_to matches a model "
                          "is used (specific first); None = the packaged default"
    )
    models: list[ModelSelector] = Field(default_factory=list)
    default_versions: Versions = Field(
        Latest(latest=1), description="versions for a --model NAME not named in `models`"
    )
    audit: AuditOptions = AuditOptions()
    executor: Literal["local", "ray"] = Field(
        "local", description="local: audits one after another on this host (audit.isolation "
                             "decides child process or inline); ray: on a Ray cluster")
    ray: RayOptions = RayOptions()
    lease: LeaseOptions = LeaseOptions()
    retry: RetryOptions = RetryOptions()
    gate: GateOptions = GateOptions()
    schedule: ScheduleOptions = ScheduleOptions()
    webhook: WebhookOptions = WebhookOptions()
    source: str | None = Field(None, description="the file this was read from")

    def _resolve(self, value: str | None) -> str | None:
        if value is None or Path(value).is_absolute() or self.source is None:
            return value
        return str((Path(self.source).parent / value).resolve())

    def spec_path(self) -> str | None:
        """The spec file, or None when the spec is inline (or absent)."""
        return self._resolve(self.spec) if isinstance(self.spec, str) else None

    def inline_spec(self) -> dict[str, Any] | None:
        """An inline spec with its relative file paths resolved against this file (asset
        names such as 'mmlu' stay as they are)."""
        if not isinstance(self.spec, dict):
            return None
        from governance.inputs.assets import ASSETS

        out = dict(self.spec)
        for key in ("questions", "personas"):
            value = out.get(key)
            if isinstance(value, str) and value not in ASSETS:
                out[key] = self._resolve(value)
        return out

    def policy_paths(self) -> list[str] | None:
        if self.policy is None:
            return None
        items = [self.policy] if isinstance(self.policy, str) else self.policy
        return [self._resolve(p) for p in items]  # type: ignore[misc]

    def state_dir(self) -> Path:
        """Where the default lease and job-store files live: beside a SQLite tracking store,
        else `$PERSONA_GOV_CACHE` (default ~/.cache/persona-governance)."""
        db = sqlite_path(self.tracking_uri)
        if db is not None:
            return db.parent
        return Path(os.environ.get("PERSONA_GOV_CACHE", Path.home() / ".cache/persona-governance"))

    def lease_url(self) -> str:
        return self.lease.url or f"sqlite:///{self.state_dir() / 'persona_audit_leases.db'}"

    def jobstore_url(self) -> str:
        return self.schedule.jobstore_url or f"sqlite:///{self.state_dir() / 'persona_jobs.db'}"

    def experiment_artifact_location(self) -> str | None:
        if self.artifact_location:
            return self._resolve(self.artifact_location)
        db = sqlite_path(self.tracking_uri)
        return str(db.parent / "mlartifacts") if db is not None else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URL, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().resolve()


def sqlalchemy_url(url: str) -> str:
    """`url` with an explicit PostgreSQL driver where needed: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3, while psycopg2 is what this project installs."""
    if url.startswith(("postgresql://", "postgres://")):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = data.get(key)
        if not isinstance(node, dict):
            node = {}
            data[key] = node
        data = node
    data[leaf] = value


def load_config(
    path: str | Path | None = None, *, env: dict[str, str] | None = None, **overrides: Any
) -> NightlyConfig:
    """Read the YAML config (or `$PERSONA_AUDIT_CONFIG`, or defaults), apply env overrides,
    then the given keyword overrides (dotted keys allowed: `**{"lease.url": ...}`)."""
    env = dict(os.environ) if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, "nightly config")
        raw["source"] = str(Path(path).resolve())
    for var, dotted in ENV_OVERRIDES.items():
        if env.get(var):
            _set_dotted(raw, dotted, env[var])
    for dotted, value in overrides.items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        config = NightlyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"nightly config {path or '<defaults>'}"))\
            from exc
    for uri in (config.tracking_uri, config.registry_uri, config.lease.url,
                config.schedule.jobstore_url):
        register_uri(uri)
    return config
