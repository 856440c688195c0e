"""Reading the YAML files users write (specs, catalogues, nightly configs) with errors that
name the file. Only `yaml.safe_load`: a config file never constructs Python objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from governance.errors import ConfigError


def read_yaml_mapping(path: str | Path, what: str, *, text: str | None = None) -> dict[str, Any]:
    """The mapping in YAML file `path` (`{}` for an empty file). `what` names the kind of
    file in errors ("audit spec"); `text`, if given, is parsed instead of reading `path`."""
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a mapping of fields, got {type(raw).__name__}")
    return raw
