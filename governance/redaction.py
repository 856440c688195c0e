"""Credentials out of any text before it is logged, printed or written.

    redact("GET http://alice:p@ss/w@mlflow:5000/api?token=abc failed")
    # -> 'GET http://***@mlflow:5000/api?token=*** failed'
    install_redaction()          # every log record of every logger, from now on
    with redacted_output(): ...  # and everything written to sys.stdout / sys.stderr

`redact` parses the text; it removes
- the user information (`user:password@`) of every `scheme://` URL anywhere in the text,
  SQLAlchemy URLs included (`postgresql+psycopg2://user:pw@db:5432/x`), leaving
  `scheme://***@host...`: the host, port, path and database stay readable;
- the value of every query parameter (`?...`, `&...`) whose name says it is secret
  (`password`, `token`, `secret`, `key`, `api_key`, `access_token`, `X-Amz-Signature`, ...;
  any case, percent-escaped or not), and of a bare `password=`, `secret=`, `token=`,
  `api_key=`, ... assignment (a libpq connection string, a Python repr);
- wherever they appear, the values of `MLFLOW_TRACKING_PASSWORD` and `MLFLOW_TRACKING_TOKEN`,
  the Basic header made from `MLFLOW_TRACKING_USERNAME` and the password, the passwords of
  the URIs in `MLFLOW_TRACKING_URI` and `MLFLOW_REGISTRY_URI`, and what `register_secret` /
  `register_uri` were given: raw, percent-encoded (`%40`, `%2f`, `+` for a space, any mix)
  or not. Values shorter than 3 characters are left alone (they would hide half the text).

Where the user information of a URL ends. Passwords may hold any character (`@`, `/`,
`:`, `?`, `#`, spaces), escaped or not, so the first `@` or `/` after `//` proves nothing.
After `scheme://` the user information runs to the LAST `@` that
1. is followed by a host (a name, an IPv4 or `[IPv6]` address, or nothing), an optional
   `:port`, and then the end of the authority: `/`, `?`, `#`, whitespace, a quote or
   bracket, `,`, `;`, a `.`, `:` or `!` that ends a sentence, or the end of the text;
2. directly follows a character that is not whitespace nor an opening bracket or quote
   (`see @champion`, `(@champion)` are not the end of a password);
3. leaves a user name (the text before the first `:`) free of whitespace, `/`, `?` and `#`,
   which RFC 3986 requires to be escaped there, so a path or a sentence is never read as a
   user name (`http://host/a/b@c` and `http://host and bob@corp.com` keep everything);
4. lies on the same line, before the next URL-like word (`models:/x@champion`, `runs:/`,
   `s3://`, after whitespace, a quote, a bracket, `=` or `,`).
An authority that starts with `/` (`sqlite:///x.db`, `file:///`) has no user information,
and `scheme://***@` (already redacted) is left as it is, so redacting twice changes nothing.

So `http://u:a b@host/` in free text loses `u:a b`: a password may hold spaces. The price
is on the safe side: a URL with a port (or with credentials) followed on the same line by
something like an e-mail address, `http://mlflow:5000 is down, ask bob@corp.com`, reads as
a password `5000 is down, ask bob` and becomes `http://***@corp.com`. An unescaped newline
or ` word:/` inside a password ends it early; such a password is still removed wherever it
is a known value (the variables above, `register_secret`).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TextIO
from urllib.parse import unquote, unquote_plus

__all__ = [
    "MASK",
    "SECRET_ENV",
    "RedactingFilter",
    "RedactingStream",
    "install_redaction",
    "redact",
    "redact_record",
    "redacted_output",
    "register_secret",
    "register_uri",
]

MASK = "***"
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_MIN_SECRET = 3

# -- URLs in free text ------------------------------------------------------------------------

_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://")
_NEXT_URL = re.compile(r"(?<=[\s\"'(<\[{=,])[A-Za-z][A-Za-z0-9+.\-]*:/")
_HOST_PORT = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[^\s/?#@:\"'<>()\[\]{},;|\\]*)(?::[0-9]*)?")
_AUTHORITY_END = set("/?#\"'<>()[]{},;|\\")
_SENTENCE_END = set(".:!")
_NOT_BEFORE_AT = set("([{<\"'")
_NOT_IN_USER = set("/?#")


def _ends_authority(text: str, j: int, stop: int) -> bool:
    if j >= stop:
        return True
    c = text[j]
    if c.isspace() or c in _AUTHORITY_END:
        return True
    return c in _SENTENCE_END and (j + 1 >= stop or text[j + 1].isspace())


def _ends_userinfo(text: str, start: int, at: int, stop: int) -> bool:
    """Whether the `@` at `at` can end user information that starts at `start` (rules 1-3
    of the module docstring)."""
    if at == start:
        return False
    before = text[at - 1]
    if before.isspace() or before in _NOT_BEFORE_AT:
        return False
    user = text[start:at].partition(":")[0]
    if any(c.isspace() or c in _NOT_IN_USER for c in user):
        return False
    host = _HOST_PORT.match(text, at + 1, stop)
    return host is not None and _ends_authority(text, host.end(), stop)


def _userinfo_end(text: str, start: int) -> int | None:
    """Index of the `@` that ends the user information of the URL whose authority starts
    at `start` (just after `//`), or None when it has none."""
    if start >= len(text) or text[start] in "/\\":
        return None
    if text.startswith(MASK + "@", start):
        return start + len(MASK)
    stop = len(text)
    for end in (text.find("\n", start), text.find("\r", start)):
        if end != -1:
            stop = min(stop, end)
    following = _NEXT_URL.search(text, start, stop)
    if following is not None:
        stop = following.start()
    found = None
    at = text.find("@", start, stop)
    while at != -1:
        if _ends_userinfo(text, start, at, stop):
            found = at
        at = text.find("@", at + 1, stop)
    return found


def _redact_userinfo(text: str) -> str:
    out: list[str] = []
    pos = 0
    while (m := _SCHEME.search(text, pos)) is not None:
        start = m.end()
        at = _userinfo_end(text, start)
        if at is None:
            out.append(text[pos:start])
            pos = start
            continue
        out.append(text[pos:start] + MASK)
        pos = at  # the `@` and the host stay
    out.append(text[pos:])
    return "".join(out)


def _passwords(uri: str) -> list[str]:
    """The passwords (text after the first `:` of the user information) of the URLs in
    `uri`, as written and decoded."""
    found = []
    for m in _SCHEME.finditer(uri):
        at = _userinfo_end(uri, m.end())
        if at is None:
            continue
        _user, colon, password = uri[m.end():at].partition(":")
        if colon and password != MASK:
            found += [password, unquote(password)]
    return found


# -- query strings ------------------------------------------------------------------------------

_QUERY_PARAM = re.compile(r"(?P<lead>[?&])(?P<name>[^=&#\s?]+)=(?P<value>[^&#\s]*)")
_ASSIGNMENT = re.compile(
    r"(?:^|(?<=[\s,;(]))(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)="
    r"(?P<value>'[^'\n]*'|\"[^\"\n]*\"|[^\s,;)&#]*)"
)
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "secret", "token", "key", "apikey", "signature",
    "sig", "credential", "credentials", "auth", "authorization",
})
_ASSIGNMENT_NAMES = frozenset({
    "password", "passwd", "pwd", "secret", "token", "apikey", "api_key", "access_token",
    "auth_token", "refresh_token", "client_secret",
})


def _secret_parameter(name: str) -> bool:
    """A query parameter whose value is a credential: `password`, `api_key`, `accessToken`,
    `X-Amz-Security-Token`, `client_secret`, `sig`, ... (any case, escaped or not)."""
    lowered = unquote_plus(name).strip().lower()
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w]
    return bool(words) and (words[-1] in _SECRET_WORDS
                            or any(w in lowered for w in ("password", "secret", "token")))


def _secret_assignment(name: str) -> bool:
    """A bare `name=value` outside a query string whose value is a credential (narrower than
    a query parameter: `pad_token=` in a log line is not one)."""
    lowered = name.lower().replace("-", "_")
    return lowered in _ASSIGNMENT_NAMES or lowered.endswith("password")


def _redact_parameters(text: str) -> str:
    def query(m: re.Match[str]) -> str:
        if not m["value"] or m["value"] == MASK or not _secret_parameter(m["name"]):
            return m[0]
        return f"{m['lead']}{m['name']}={MASK}"

    def assignment(m: re.Match[str]) -> str:
        if not m["value"] or m["value"].strip("'\"") == MASK or not _secret_assignment(
                m["name"]):
            return m[0]
        return f"{m['name']}={MASK}"

    return _ASSIGNMENT.sub(assignment, _QUERY_PARAM.sub(query, text))


# -- known values -------------------------------------------------------------------------------

_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remove `value` (and its percent-encoded forms) from every text redacted from now on,
    wherever it appears."""
    if value and len(value) >= _MIN_SECRET:
        with _registered_lock:
            _registered.add(value)


def register_uri(uri: str | None) -> None:
    """Remove the password of `uri` (a URL with `user:password@`) from every text redacted
    from now on, even where it appears outside a URL."""
    for password in _passwords(uri or ""):
        register_secret(password)


def _encoded(secret: str) -> str:
    """A pattern for `secret` as written or with any of its characters percent-encoded
    (hex digits of either case; `+` for a space)."""
    parts = []
    for ch in secret:
        escaped = "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        alternatives = [re.escape(ch), f"(?i:{re.escape(escaped)})"]
        if ch == " ":
            alternatives.append(r"\+")
        parts.append("(?:" + "|".join(alternatives) + ")")
    return "".join(parts)


@lru_cache(maxsize=32)
def _known_pattern(values: frozenset[str], basic: frozenset[str]) -> re.Pattern[str] | None:
    patterns = [_encoded(v) for v in sorted(values, key=len, reverse=True)]
    patterns += [re.escape(b) for b in basic]
    return re.compile("|".join(patterns)) if patterns else None


def _known_values() -> re.Pattern[str] | None:
    values = {os.environ[v] for v in SECRET_ENV if os.environ.get(v)}
    for var in URI_ENV:
        values.update(_passwords(os.environ.get(var) or ""))
    with _registered_lock:
        values |= _registered
    values = {v for v in values if len(v) >= _MIN_SECRET and v != MASK}
    basic = set()
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get(
        "MLFLOW_TRACKING_PASSWORD")
    if user and password:  # what an `Authorization: Basic` header would carry
        basic.add(base64.b64encode(f"{user}:{password}".encode()).decode())
    return _known_pattern(frozenset(values), frozenset(basic))


# -- the entry point ----------------------------------------------------------------------------


def redact(text: Any) -> str:
    """`str(text)` without credentials (see the module docstring); `***` marks what was
    removed. Idempotent: redacting redacted text changes nothing."""
    out = str(text)
    if "://" in out:
        out = _redact_userinfo(out)
    if "=" in out:
        out = _redact_parameters(out)
    known = _known_values()
    if known is not None:
        out = known.sub(MASK, out)
    return out


# -- logging --------------------------------------------------------------------------------


def redact_record(record: logging.LogRecord) -> None:
    """Redact a log record in place: its message (with its arguments merged in), the text
    of its exception (the exception itself is dropped, so no handler formats it afresh)
    and its stack."""
    if getattr(record, "_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to the handler's own error path
        return
    clean = redact(message)
    if clean != message or record.args:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record.__dict__["_redacted"] = True


class RedactingFilter(logging.Filter):
    """A handler filter that redacts every record before the handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


class _RedactingFactory:
    """A log-record factory that redacts each record as it is made, whatever logger makes
    it and whatever handlers (added before or after) will write it."""

    redacting = True

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        redact_record(record)
        return record


def install_redaction() -> None:
    """Redact every log record of the process: a record factory that redacts each record
    as any logger makes it (MLflow's, SQLAlchemy's and alembic's loggers write through
    their own handlers with `propagate=False`, and MLflow replaces its handler when it
    configures logging), plus a `RedactingFilter` on every handler that exists now, of the
    root logger and of every other logger (`mlflow`, `sqlalchemy.engine`, `alembic`,
    `urllib3`, ...). Idempotent; call it after logging is configured."""
    if not getattr(logging.getLogRecordFactory(), "redacting", False):
        logging.setLogRecordFactory(_RedactingFactory(logging.getLogRecordFactory()))
    loggers = [logging.getLogger()]
    loggers += [lg for lg in list(logging.Logger.manager.loggerDict.values())
                if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


# -- terminal output ------------------------------------------------------------------------


class RedactingStream:
    """A text stream that redacts what it forwards to `stream`, a line at a time (a line
    is held until its end, or a flush, so a URL printed in pieces is redacted whole)."""

    _MAX_PENDING = 1 << 16

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._pending = ""
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            data = self._pending + text
            head, newline, self._pending = data.rpartition("\n")
            if newline:
                self.stream.write(redact(head + newline))
            if len(self._pending) > self._MAX_PENDING:
                self.stream.write(redact(self._pending))
                self._pending = ""
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self.stream.write(redact(self._pending))
                self._pending = ""
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...
        if name == "stream":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.stream, name)


@contextmanager
def redacted_output() -> Iterator[None]:
    """`sys.stdout` and `sys.stderr` redacted for the block: what libraries print
    themselves (MLflow's run links, which carry the tracking URI as given) or write past
    logging, and our own messages."""
    saved = sys.stdout, sys.stderr
    wrapped = [RedactingStream(s) if s is not None else None for s in saved]
    sys.stdout, sys.stderr = wrapped
    try:
        yield
    finally:
        for stream in wrapped:
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # a closed pipe
                pass
        sys.stdout, sys.stderr = saved
