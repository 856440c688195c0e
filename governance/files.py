"""Files at the edge: reading the YAML files users write (specs, catalogues, nightly configs)
with errors that name the file, and writing outputs atomically.

Only `yaml.safe_load`: a config file never constructs Python objects. Every output is built
beside its destination and renamed into place, so a failure leaves earlier results intact."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and a rename: a reader (or a crash)
    sees the old file or the new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(out: str | Path, write: Callable[[Path], Any]) -> Path:
    """Build a directory with `write(tmp)` in a temporary sibling, then swap it in for `out`:
    a failed write leaves whatever `out` held intact."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def check_replaceable(out: str | Path, marker: str, what: str) -> Path:
    """Refuse an output directory that holds anything but an earlier output of ours: `out`
    may be new, empty, or hold `marker` (the file every `what` writes). Never the working
    directory or one above it. Returns `out`; raises ConfigError otherwise."""
    out = Path(out)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ConfigError(f"output directory {out} is the working directory or one above it: "
                          f"choose a new directory for the {what}")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"output directory {out} is a file: choose a new directory for the "
                          f"{what}")
    if (out / marker).is_file() or not any(out.iterdir()):
        return out
    raise ConfigError(f"output directory {out} holds files that are not an earlier {what} "
                      f"(it has no {marker}); refusing to replace them: choose a new directory")


def move_into(files: dict[str, Path], out: str | Path) -> dict[str, Path]:
    """Move each built file into directory `out` (one rename each), returning the new paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    moved = {}
    for key, path in files.items():
        os.replace(path, out / path.name)
        moved[key] = out / path.name
    return moved
