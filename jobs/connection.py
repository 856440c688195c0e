"""Connecting to MLflow: the tracking and registry URIs for the life of a pass, a reachability
probe, retries of transient failures, and errors that say why a server refused us.

`connect` returns a client whose every call is retried with the config's backoff
(`retry.attempts`, `initial_delay_s`, `max_delay_s`) when it failed for a transient reason: the
server or its database could not be reached, dropped the connection, timed out, or answered
with a server error (5xx) or a rate limit (429). A refusal of the request itself (a missing
run, a bad parameter, a permission) is raised at once. MLflow's own HTTP client retries each
request too (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, 7 by default); these retries come on top,
and apply to every kind of store.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from governance.errors import ConfigError, Unavailable
from governance.redaction import redact
from jobs.config import NightlyConfig, RetryOptions, sqlalchemy_url, sqlite_path

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
                 max_delay_s: float, sleep: Callable[[float], None] = time.sleep,
                 retry_if: Callable[[Exception], bool] | None = None,
                 error: type[Unavailable] | None = None) -> Any:
    """Call `fn` up to `attempts` times, doubling the delay between tries; configuration
    errors, and errors `retry_if` rejects, are raised at once. The last error is raised as
    `error` (TrackingUnavailable by default)."""
    delay = initial_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except ConfigError:
            raise
        except Exception as exc:
            if retry_if is not None and not retry_if(exc):
                raise
            message = redact(f"{type(exc).__name__}: {exc}")
            if attempt == attempts:
                tries = f"{attempts} attempts" if attempts != 1 else "1 attempt"
                raise (error or TrackingUnavailable)(
                    f"{what} unreachable after {tries}: {message}") from None
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


def transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed when tried again: the store could not be
    reached, dropped the connection or timed out (anywhere in the exception's chain), or
    answered with a server error or a rate limit. A refused request is not transient."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    for cause in _chain(exc):
        if isinstance(cause, (ConnectionError, TimeoutError, requests.ConnectionError,
                              requests.Timeout, requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.RetryError)):
            return True
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            return _transient_status(cause.response.status_code)
        if database_gone(cause):
            return True
    if isinstance(exc, RestException):  # the server answered with an MLflow error
        return _transient_status(exc.get_http_status_code())
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        # MLflow's HTTP client: "API request to URL failed with exception ..." (no answer) or
        # "... failed with error code 503 != 200" (an answer that is not MLflow's JSON)
        failed = re.match(r"API request to \S+ failed with (?:error code (\d{3})|exception)",
                          str(exc.message))
        if failed:
            return failed.group(1) is None or _transient_status(int(failed.group(1)))
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transient_status(status: int) -> bool:
    return status >= 500 or status == 429


def database_gone(exc: BaseException) -> bool:
    """A SQL database's connection was refused, dropped or invalidated (a restart)."""
    try:
        from sqlalchemy import exc as sa
    except ImportError:  # pragma: no cover - SQLAlchemy comes with MLflow
        return False
    if isinstance(exc, (sa.OperationalError, sa.InterfaceError)):
        return True
    return isinstance(exc, sa.DBAPIError) and bool(exc.connection_invalidated)


class RetryingClient:
    """An MlflowClient whose calls are retried with backoff while they fail for a transient
    reason (`transient`), then raise TrackingUnavailable naming the call and the store.

    Every call is retried on its own, with the same arguments, so a retried `log_batch`
    sends the same metrics (MLflow stores a repeated metric once) and a retried
    `log_artifacts` uploads the same files again. After a call has failed every attempt, the
    next calls are tried once each until one succeeds: a pass that lost its server reports it
    once, not once per call. Attributes that are not public methods are the client's own."""

    def __init__(self, client: MlflowClient, retry: RetryOptions, where: str):
        self._client = client
        self._retry = retry
        self._where = where
        self._down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, lambda: attr(*args, **kwargs))

        call.__name__ = name
        call.__doc__ = attr.__doc__
        return call

    def _call(self, name: str, fn: Callable[[], Any]) -> Any:
        r = self._retry
        try:
            result = with_retries(f"MLflow {name} on {self._where}", fn,
                                  1 if self._down else r.attempts, r.initial_delay_s,
                                  r.max_delay_s, retry_if=transient)
        except TrackingUnavailable:
            self._down = True
            raise
        self._down = False
        return result


def connect(config: NightlyConfig) -> MlflowClient:
    """An MlflowClient for the config's stores, after checking they answer (with backoff);
    its calls are retried with the same backoff (`RetryingClient`)."""
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
    return cast("MlflowClient", RetryingClient(client, r, shown))


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
