"""Credential redaction (governance/redaction.py): passwords of every form in URLs,
SQLAlchemy URLs, query strings and free text; the MLflow secret variables wherever they
appear; every logger, MLflow's own included; and what the CLI prints when a command fails."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from governance.redaction import redact

ROOT = Path(__file__).resolve().parents[1]

# Every password starts with Xq7 and ends with zz9: neither may survive redaction.
PASSWORDS = {
    "slash": "Xq7/zz9",
    "at": "Xq7@zz9",
    "colon": "Xq7:zz9",
    "space": "Xq7 zz9",
    "spaces": "Xq7 correct horse zz9",
    "all": "Xq7@/: ?#zz9",
    "double-at": "Xq7@@host@zz9",
    "escaped-at": "Xq7%40zz9",
    "escaped-slash": "Xq7%2Fzz9",
    "escaped-colon": "Xq7%3Azz9",
    "escaped-space": "Xq7%20zz9",
    "unicode": "Xq7ü€密zz9",
}
TEMPLATES = {
    "http": ("http://alice:{pw}@mlflow.example:5000/api/2.0/mlflow/runs/get",
             "mlflow.example:5000/api/2.0/mlflow/runs/get"),
    "https": ("https://alice:{pw}@mlflow.example/#/experiments/1",
              "mlflow.example/#/experiments/1"),
    "psycopg2": ("postgresql+psycopg2://alice:{pw}@db.example:5432/mlflow",
                 "db.example:5432/mlflow"),
    "pymysql": ("mysql+pymysql://alice:{pw}@db.example/mlflow?charset=utf8mb4",
                "db.example/mlflow?charset=utf8mb4"),
    "free text": ("API request to http://alice:{pw}@mlflow.example:5000/api failed: connection "
                  "refused, retrying in 2 s", "mlflow.example:5000/api failed: connection refused"),
    "quoted": ("could not resolve 'http://alice:{pw}@mlflow.example/' (HTTP 401)",
               "mlflow.example/' (HTTP 401)"),
    "end of sentence": ("Tracking store is http://alice:{pw}@mlflow.example:5000.",
                        "mlflow.example:5000."),
    "several": ("tracking http://alice:{pw}@mlflow.example:5000/ and lease "
                "postgresql+psycopg2://bob:{pw}@db.example:5432/leases, then "
                "https://carol:{pw}@other.example/x",
                "mlflow.example:5000/ and lease"),
}


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}


@pytest.mark.parametrize("encode", ["raw", "escaped"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("password", sorted(PASSWORDS))
def test_passwords_of_every_form_leave_urls(password, template, encode):
    pw = PASSWORDS[password]
    if encode == "escaped":
        pw = quote(pw, safe="")
    text, kept = TEMPLATES[template]
    clean = redact(text.format(pw=pw))
    assert "Xq7" not in clean and "zz9" not in clean, clean
    assert not any(form in clean for form in _forms(PASSWORDS[password])), clean
    assert kept in clean and "://***@" in clean, clean
    assert redact(clean) == clean


@pytest.mark.parametrize(("text", "expected"), [
    ("postgresql+psycopg2://user:p@ss/word@host:5432/db", "postgresql+psycopg2://***@host:5432/db"),
    ("mysql+pymysql://u:Xq7 zz9@db:3306/x", "mysql+pymysql://***@db:3306/x"),
    # a space in a password: the user information runs to the last `@` before the host
    ("error: http://u:a b@host/ failed", "error: http://***@host/ failed"),
    ("http://u:p@ss word@host:5000/api", "http://***@host:5000/api"),
    ("Invalid url: http://user:p%40ss/w@127.0.0.1:9/api/2.0/mlflow/runs/get",
     "Invalid url: http://***@127.0.0.1:9/api/2.0/mlflow/runs/get"),
    ("http://u:p@host: connection refused", "http://***@host: connection refused"),
    ("http://u:x@[::1]:5000/ and http://[::1]:5000/", "http://***@[::1]:5000/ and http://[::1]:5000/"),
    ("https://ghp_Xq7zz9@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("http://alice@corp.com:pw@host/", "http://***@host/"),
    # the documented price: a port, then something like an e-mail address on the same line
    ("http://mlflow:5000 is down, ask bob@corp.com", "http://***@corp.com"),
])
def test_where_user_information_ends(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize("text", [
    "sqlite:///mlflow.db",
    "sqlite:////tmp/a@b/mlflow.db",
    "file:///home/u/x@y/mlartifacts",
    "models:/tiny@champion and runs:/abc123/model",
    "loading models:/tiny@champion from http://mlflow:5000/ (models:/x@prod)",
    "tracking store http://***@mlflow:5000: tiny v1 (@champion) was never audited",
    "https://medium.com/@user/post and https://host/a/b@c",
    "http://mlflow.example/api failed for bob@corp.com; http://host and alice@corp.com",
    "http://u:pw@h\nnext line: bob@corp.com",
    "nightly pass: 3 versions in 12.0 s (1 pass, 2 up-to-date)",
    "url: /api/2.0/mlflow/runs/get?run_uuid=abc&run_id=abc",
])
def test_text_without_credentials_stays(text):
    expected = text.replace("http://u:pw@h", "http://***@h")
    assert redact(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("https://h/x?password=Xq7zz9", "https://h/x?password=***"),
    ("https://h/x?user=bob&token=Xq7zz9&sort=1", "https://h/x?user=bob&token=***&sort=1"),
    ("GET /api?PassWord=Xq7zz9&ACCESS_TOKEN=Xq7zz9&Api_Key=Xq7zz9 HTTP/1.1",
     "GET /api?PassWord=***&ACCESS_TOKEN=***&Api_Key=*** HTTP/1.1"),
    ("s3 https://b.s3.amazonaws.com/k?X-Amz-Security-Token=Xq7zz9&X-Amz-Signature=Xq7zz9",
     "s3 https://b.s3.amazonaws.com/k?X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("?secret=Xq7%2Fzz9&key=Xq7zz9&client_secret=Xq7zz9#frag",
     "?secret=***&key=***&client_secret=***#frag"),
    ("postgresql://db/x?user=u&password=Xq7%40zz9&sslmode=require",
     "postgresql://db/x?user=u&password=***&sslmode=require"),
    ("host=db password=Xq7zz9 user=u", "host=db password=*** user=u"),
    ("MlflowHostCreds(host='h', username='u', password='Xq7 zz9', token=Xq7zz9)",
     "MlflowHostCreds(host='h', username='u', password=***, token=***)"),
])
def test_query_parameters(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected


def test_mlflow_secret_variables_in_every_form(monkeypatch):
    import base64

    secret, token = "Hu nt@r/2ü", "tok-Xq7zz9"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://svc:Xq7 u/ri@mlflow.example/")
    basic = base64.b64encode(f"alice:{secret}".encode()).decode()
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), quote(secret, safe=""))
    forms = [secret, quote(secret, safe=""), lower_hex, quote_plus(secret),
             token, basic, "Xq7 u/ri", "Xq7%20u%2Fri"]
    clean = redact(" | ".join(f"seen {f} here" for f in forms))
    assert clean == " | ".join("seen *** here" for _ in forms)
    assert redact("user alice on https://mlflow.example/") == "user alice on https://mlflow.example/"


# -- logging ----------------------------------------------------------------------------------


@pytest.fixture
def logging_state():
    """Logging as it was before the test (the record factory is process-wide)."""
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)


def _mlflow_handlers() -> list[logging.Handler]:
    return [h for name in ("mlflow", "sqlalchemy.engine", "alembic")
            for h in logging.getLogger(name).handlers]


def test_mlflow_loggers_are_redacted_after_install(logging_state, capsys):
    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    from governance.redaction import RedactingFilter, install_redaction

    # what importing MLflow does outside our CLI (which sets MLFLOW_CONFIGURE_LOGGING=false):
    # its loggers get their own handler and stop propagating
    _configure_mlflow_loggers("mlflow")
    assert logging.getLogger("mlflow").propagate is False and _mlflow_handlers()
    install_redaction()
    assert all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in _mlflow_handlers())
    url = "http://alice:Xq7/zz9@mlflow.example:5000/api/2.0/mlflow/runs/get?token=Xq7zz9"
    logging.getLogger("mlflow.store.tracking.rest_store").warning("API request to %s failed",
                                                                  url)
    logging.getLogger("alembic.runtime.migration").warning("connecting to %s", url)
    logging.getLogger("sqlalchemy.engine.Engine").warning("engine %s", url)
    err = capsys.readouterr().err
    assert "Xq7" not in err and "zz9" not in err, err
    assert err.count("http://***@mlflow.example:5000/api/2.0/mlflow/runs/get?token=***") == 3
    assert "WARNING mlflow.store.tracking.rest_store: API request to" in err  # MLflow's format


def test_handlers_made_after_install_and_exceptions_are_redacted(logging_state, capsys):
    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    from governance.redaction import install_redaction

    install_redaction()
    install_redaction()  # idempotent: one factory, one filter per handler
    factory = logging.getLogRecordFactory()
    assert not getattr(factory.inner, "redacting", False)
    assert all(sum(type(f).__name__ == "RedactingFilter" for f in h.filters) == 1
               for h in logging.getLogger().handlers)
    _configure_mlflow_loggers("mlflow")  # MLflow replaces its handler: a new one, no filter
    sink = io.StringIO()
    quiet = logging.getLogger("persona-test.quiet")
    quiet.addHandler(logging.StreamHandler(sink))
    quiet.propagate = False
    try:
        logging.getLogger("mlflow.tracking").warning("run at http://u:Xq7 zz9@h:5000/#/x")
        try:
            raise RuntimeError("Invalid url: http://u:Xq7@zz9@h:5000/api")
        except RuntimeError:
            quiet.exception("load failed for %s", "postgresql://u:Xq7zz9@db/x")
    finally:
        quiet.handlers.clear()
    text = capsys.readouterr().err + sink.getvalue()
    assert "Xq7" not in text and "zz9" not in text, text
    assert "http://***@h:5000/#/x" in text and "postgresql://***@db/x" in text
    assert "RuntimeError: Invalid url: http://***@h:5000/api" in text


def test_libraries_that_propagate_to_root_are_redacted(logging_state, caplog):
    from governance.redaction import install_redaction

    install_redaction()
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        logging.getLogger("urllib3.connectionpool").warning(
            "Retrying after connection broken: /api/2.0/mlflow/runs/get?run_id=1&token=Xq7zz9")
    assert "Xq7zz9" not in caplog.text and "run_id=1&token=***" in caplog.text


def test_redacting_stream_redacts_whole_lines():
    from governance.redaction import RedactingStream

    sink = io.StringIO()
    stream = RedactingStream(sink)
    print("View run at:", "http://u:Xq7 zz9@h:5000/#/experiments/1", file=stream)
    stream.write("partial http://u:Xq7")
    assert "Xq7" not in sink.getvalue()
    stream.write("zz9@h/ done")
    stream.flush()
    assert sink.getvalue() == ("View run at: http://***@h:5000/#/experiments/1\n"
                               "partial http://***@h/ done")


# -- what the CLI prints -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("password", ["s3cr%2Ft", "s3 cr/t@x"])
def test_cli_error_about_an_unreachable_server_is_redacted(password, tmp_path, capsys,
                                                           monkeypatch):
    from jobs.cli.main import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://u:{password}@127.0.0.1:{_closed_port()}/"
    rc = main(["drift", "--current", "runs:/abc", "--baseline", "runs:/def", "--out",
               str(tmp_path / "drift"), "--tracking-uri", uri])
    out, err = capsys.readouterr()
    assert rc == 2 and "persona-gov drift: error:" in err, err
    assert "s3" not in out + err and "cr/t" not in out + err, err
    assert "http://***@127.0.0.1:" in err


def test_cli_traceback_and_library_prints_are_redacted(tmp_path, capsys, monkeypatch):
    """An unexpected error prints its traceback redacted; what a library writes to stdout
    itself (MLflow's run link carries the tracking URI as given) is redacted too."""
    from jobs.cli import drift
    from jobs.cli.main import main

    def fails(source, **_):
        sys.stdout.write("🏃 View run x at: http://u:Xq7 zz9@h:5000/#/experiments/1/runs/2\n")
        raise RuntimeError(f"cannot read {source} from postgresql://u:Xq7%40zz9@db/x")

    monkeypatch.setattr(drift, "load_audit", fails)
    rc = main(["drift", "--current", "runs:/abc", "--baseline", "runs:/def", "--out",
               str(tmp_path / "drift")])
    out, err = capsys.readouterr()
    assert rc == 4
    assert "Xq7" not in out + err and "zz9" not in out + err, out + err
    assert "View run x at: http://***@h:5000/#/experiments/1/runs/2" in out
    assert "Traceback" in err and "RuntimeError: cannot read runs:/abc from postgresql://***@db/x" \
        in err


def test_cli_failed_mlflow_model_load_is_redacted(tmp_path):
    """`persona-gov audit --model models:/x/1` against a tracking URI with a password: the
    console script, in its own process (its own logging setup and MLflow's)."""
    from support.nightly import QUESTIONS

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"http://user:p%40ss/w@127.0.0.1:{_closed_port()}/",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli.main", "-v", "audit", "--model", "models:/x/1",
         "--questions", str(questions), "--n-questions", "2", "--device", "cpu", "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "could not resolve the MLflow model 'models:/x/1'" in output
    assert "p%40ss" not in output and "p@ss" not in output and "ss/w" not in output, output
    assert "http://***@127.0.0.1:" in output
