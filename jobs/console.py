"""What the terminal shows: our log records in one format, each warning said once per run,
and none of the third-party chatter that is expected in this use (shown again with `-v`).

    configure(verbose=False, as_json=False)    # persona-gov, before a command runs
    configure_child(settings())                # an audit child process: the same, and it
                                               # stays quiet about what the parent has said

Expected here, so hidden at the default verbosity (see `EXPECTED`): MLflow asking the model
hub for a model card and licence of a local model (there is no hub at run time), progress
bars of artifact copies and weight loading that take a second, transformers' advice about
generation settings, and third parties' info records. Warnings about our inputs (a question
file's stray header rows) are said once per run, also when each audit child reads the same
file again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.redaction import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (logger name prefix, text in the message): third-party records expected in this use
EXPECTED: tuple[tuple[str, str], ...] = (
    ("mlflow", "model card could not be retrieved"),  # no model hub at run time
    ("mlflow", "unable to find license information"),  # a local model has no hub licence
    ("mlflow", "could not find a license"),
    ("mlflow", "failed to infer"),  # task and signature of a model logged offline
    ("mlflow", "unable to infer"),
    ("mlflow", "model logged without a signature"),
    ("mlflow.models", "input example"),
    ("py.warnings", "generation"),  # transformers' advice on generation settings
    ("py.warnings", "pydantic"),  # libraries' own deprecations, not the user's to fix
    ("py.warnings", "deprecat"),
    ("py.warnings", "torch_dtype"),
    ("py.warnings", "safe_serialization"),
    ("transformers", "generation"),
    ("transformers", "attention mask"),
)

# environment defaults that keep libraries' own output down (a value already set wins)
QUIET_ENV = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # sub-second local artifact copies
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight-loading bar reads this too
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

SAID_FILE = "said.json"  # an audit child's warnings, read back by the parent

_said: set[tuple[str, int, str]] = set()
_settings: dict[str, Any] | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, and exc when
    there is one. Each text is redacted before it is encoded (redacting the encoded line
    could cut a JSON string); `install_redaction` has redacted the record already."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


class Once(logging.Filter):
    """Pass a warning or error only the first time its logger says the same message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in _said:
            return False
        _said.add(key)
        return True


class ExpectedNoise(logging.Filter):
    """Drop third parties' info and debug records (a library may set its own loggers' level,
    e.g. Great Expectations announcing a temporary docs site) and their warnings listed in
    `EXPECTED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("governance", "jobs")):
            return True
        if record.levelno < logging.WARNING:
            return False
        text = record.getMessage().lower()
        return not any(record.name.startswith(prefix) and needle in text
                       for prefix, needle in EXPECTED)


def configure(verbose: bool = False, as_json: bool = False,
              said: list[list[Any]] | None = None) -> logging.Handler:
    """Set up the process's logging for the terminal; returns the handler. `verbose` shows
    debug records and everything third parties say; otherwise `EXPECTED` records, repeated
    warnings and the libraries' progress bars are left out."""
    global _settings
    # MLflow's records then reach this handler and its filters instead of MLflow's own
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    if not verbose:
        handler.addFilter(ExpectedNoise())
        handler.addFilter(Once())
    root = logging.getLogger()
    if not root.handlers:  # a host that configured logging (pytest, a notebook) keeps its own
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            handlers=[handler])
        logging.captureWarnings(True)  # Python warnings as records, under the same filters
    for noisy in ("urllib3", "filelock", "httpx", "great_expectations", "alembic",
                  "sqlalchemy", "matplotlib", "PIL", "mlflow.system_metrics", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # their debug records say little
    for library in ("mlflow", "transformers", "huggingface_hub"):
        logging.getLogger(library).setLevel(logging.INFO if verbose else logging.WARNING)
    from governance.redaction import install_redaction

    install_redaction()
    remember(said or [])
    _settings = {"verbose": verbose, "as_json": as_json}
    return handler


def is_verbose() -> bool:
    return bool(_settings and _settings["verbose"])


@contextlib.contextmanager
def quiet_prints(what: str) -> Iterator[None]:
    """What libraries print to stderr themselves during the block (MLflow's "Successfully
    registered model ...", "Created version ...") kept out of the terminal unless `-v`; the
    caller says what it does itself. The text is logged at debug level, named by `what`.
    Our own log records still reach the terminal: their handler holds the real stream."""
    if is_verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            logging.getLogger(__name__).debug("%s printed: %s", what, buffer.getvalue().strip())


def settings() -> dict[str, Any] | None:
    """What an audit child needs to log like this process (None when `configure` was never
    called here: a library user's own logging is left alone)."""
    if _settings is None:
        return None
    return {**_settings, "said": said()}


def configure_child(parent: dict[str, Any] | None) -> None:
    if parent is not None:
        configure(parent["verbose"], parent["as_json"], parent["said"])


def said() -> list[list[Any]]:
    return [list(key) for key in sorted(_said)]


def remember(keys: list[list[Any]]) -> None:
    """Count these warnings as said (a child's, read back by the parent)."""
    _said.update((str(n), int(level), str(msg)) for n, level, msg in keys)


def write_said(directory: str | Path) -> None:
    """In an audit child: leave the warnings said for the parent (`read_said`)."""
    try:
        Path(directory, SAID_FILE).write_text(json.dumps(said()))
    except OSError:
        pass  # only a repeat in the terminal is at stake


def read_said(directory: str | Path) -> None:
    path = Path(directory, SAID_FILE)
    try:
        remember(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass  # a child that died before writing it has said nothing we can know
