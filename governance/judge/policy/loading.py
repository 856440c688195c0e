"""Reading a policy file: YAML parsed safely, validated strictly, every error naming the file,
the field path and the line; and the policy's content hash.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from governance.errors import ConfigError
from governance.judge.policy.schema import Policy

if TYPE_CHECKING:

    pass



# -- loading --------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file. Raises ConfigError naming the file, field and line."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy {where}: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: {at}not valid YAML: {problem}") from exc
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(f"{where}: line 1: a policy must be a mapping of fields, got {kind}")
    lines = _key_lines(root, where)
    context = {}
    if isinstance(raw.get("personas"), str):
        from governance.inputs.personas import load_catalogue

        catalogue = Path(raw["personas"])
        if not catalogue.is_absolute():
            catalogue = Path(path).parent / catalogue
        try:
            context["categories"] = frozenset(load_catalogue(catalogue).categories)
        except ConfigError as exc:
            raise ConfigError(f"{where}: line {lines[('personas',)]}: personas: {exc}") from exc
    try:
        return Policy.model_validate(raw, context=context)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where, lines)) from exc


def _key_lines(root: yaml.Node, where: str) -> dict[tuple, int]:
    """Field path -> 1-based line of its key (or list item); duplicate keys are errors."""
    lines: dict[tuple, int] = {(): 1}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = (*path, str(key.value))
                if p in lines and p != ():
                    dotted = ".".join(map(str, p))
                    raise ConfigError(f"{where}: line {key.start_mark.line + 1}: {dotted}: "
                                      f"duplicate key (first at line {lines[p]})")
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(root, ())
    return lines


def _format_errors(exc: ValidationError, where: str, lines: dict[tuple, int]) -> str:
    errors = exc.errors()
    found = []
    for err in errors:
        loc = tuple(err["loc"])
        # the deepest part of the path that is in the file gives the line
        known = max((loc[:i] for i in range(len(loc) + 1) if loc[:i] in lines), key=len)
        dotted = ".".join(map(str, loc)) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(loc)
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] != "value_error" and not isinstance(err.get("input"), dict | list):
            msg += f" (got {err.get('input')!r})"
        found.append((lines[known], f"  line {lines[known]}: {dotted}: {msg}"))
    head = f"{where} is not a valid policy ({len(errors)} error{'s' * (len(errors) > 1)}):"
    return "\n".join([head, *(text for _, text in sorted(found, key=lambda f: f[0]))])


def _unknown_key(loc: tuple) -> str:
    model: Any = Policy
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if model else None
        model = _model_in(info.annotation) if info else None
    key = str(loc[-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def policy_sha256(policy: Policy) -> str:
    """Hash of the policy's canonical JSON: the same rules give the same hash, whatever the
    file's comments, key order or layout. The `mitigation` block judges what-ifs, not
    audits, so it is left out: editing it does not make audits stale."""
    dumped = policy.model_dump(mode="json", exclude={"mitigation"})
    body = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()
