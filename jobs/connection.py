"""Connecting to MLflow: the tracking and registry URIs for the life of a pass, a reachability
probe, retries of transient failures, and errors that say why a server refused us.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError, Unavailable
from governance.redaction import redact
from jobs.config import NightlyConfig, sqlalchemy_url, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient




log = logging.getLogger(__name__)


class TrackingUnavailable(Unavailable):
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
    shown = redact(config.tracking_uri)
    with_retries(f"tracking store {shown}", lambda: probe(config.tracking_uri, r.timeout_s),
                 r.attempts, r.initial_delay_s, r.max_delay_s)
    if config.registry_uri and config.registry_uri != config.tracking_uri:
        with_retries(f"registry {redact(config.registry_uri)}",
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
