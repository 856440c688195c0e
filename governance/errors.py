"""Errors the toolkit raises for bad input, each naming what is wrong and where."""

from __future__ import annotations

from pydantic import ValidationError


class GovernanceError(Exception):
    """Base class: an error the CLI reports as one clear message and a non-zero exit."""


class ConfigError(GovernanceError):
    """A spec, catalogue or policy file is malformed."""


class QuestionSetError(GovernanceError):
    """A question file is malformed; the message names the file and row."""


class PromptError(GovernanceError):
    """A persona phrase cannot be located or aligned in a prompt."""


class ModelLoadError(GovernanceError):
    """A model could not be loaded or its architecture is not supported."""


class Unavailable(GovernanceError):
    """A service the command needs (the tracking server, a database) cannot be reached."""


class DriftError(GovernanceError):
    """Two audits cannot be compared, or an audit source cannot be read."""


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line per pydantic error: `where: field.path: message`."""
    lines = [f"{where} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)
