"""The exit codes every `persona-gov` command follows (README, "Exit codes").

A deployment pipeline can rely on them: only 0 means "done, and the verdict (if any) passed".
"""

from __future__ import annotations

EXIT_OK = 0  # the command did its job; a verdict it reports is pass
EXIT_PASS = EXIT_OK
EXIT_FAIL = 1  # the verdict is fail
EXIT_BAD_INPUT = 2  # bad input, or nothing valid to judge: the message says what and where
EXIT_WARN = 3  # the verdict is warn (the gate passes a warn only with --warn-passes)
EXIT_INCOMPLETE = 4  # could not finish: a version errored, a server is unreachable, a bug
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM; the version in progress is `error`

TABLE = (
    (EXIT_OK, "success; a verdict, where the command gives one, is pass"),
    (EXIT_FAIL, "the verdict is fail"),
    (EXIT_BAD_INPUT, "bad input or nothing valid to judge (the message names the file, "
                     "field, row or version)"),
    (EXIT_WARN, "the verdict is warn"),
    (EXIT_INCOMPLETE, "could not finish: an audit errored, a server is unreachable, or an "
                      "unexpected error (traceback printed)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGTERM)"),
)


def for_status(status: str) -> int:
    """The exit code of a verdict status: pass 0, fail 1, warn 3, anything else 4."""
    return {"pass": EXIT_PASS, "fail": EXIT_FAIL, "warn": EXIT_WARN}.get(status,
                                                                          EXIT_INCOMPLETE)


def epilog() -> str:
    """The exit-code table for `--help`."""
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in TABLE)
