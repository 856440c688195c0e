"""Which registered model versions a nightly pass audits, from the config's selectors.

A selector names a registered model, or matches registered models by tags (every tag must
match), and picks versions: `all`, `{latest: N}` (highest version numbers) or
`{aliases: [...]}`. Only versions whose registration finished (status READY) count. A name
or alias that does not exist is a `Problem` for that model, not the end of the pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from governance.tracking.runs import equals, exactly
from jobs.config import Aliases, Latest, ModelSelector, NightlyConfig, Versions

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

_MODEL_ID = re.compile(r"^models:/(m-[0-9a-f]+)$")


@dataclass(frozen=True)
class Target:
    """One model version to audit."""

    name: str
    version: str
    model_id: str | None = None
    source: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


@dataclass(frozen=True)
class Problem:
    """A selector that could not be resolved (the pass reports it as an error)."""

    name: str
    version: str | None
    reason: str


def model_id_of(mv: ModelVersion) -> str | None:
    """The LoggedModel id of a version: `ModelVersion.model_id`, or the id in its source
    URI (`models:/m-<id>`; a SQLite store returns model_id None for versions it has)."""
    mid = getattr(mv, "model_id", None)
    if mid:
        return mid
    match = _MODEL_ID.match(mv.source or "")
    return match.group(1) if match else None


def _target(mv: ModelVersion, aliases: tuple[str, ...] = ()) -> Target:
    return Target(mv.name, str(mv.version), model_id_of(mv), mv.source,
                  tuple(aliases or getattr(mv, "aliases", None) or ()))


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every READY version of `name`, newest version number first."""
    out, token = [], None
    while True:
        page = client.search_model_versions(equals("name", name), page_token=token)
        out.extend(mv for mv in page if mv.name == name)
        token = page.token
        if not token:
            break
    ready = [mv for mv in out if str(mv.status) in ("READY", "ModelVersionStatus.READY")]
    return sorted(ready, key=lambda mv: int(mv.version), reverse=True)


def _models_by_tags(client: MlflowClient, tags: dict[str, str]) -> list[str]:
    flt = " and ".join(equals(f"tags.`{k}`", v) for k, v in tags.items())
    names, token = [], None
    while True:
        page = client.search_registered_models(flt, max_results=100, page_token=token)
        names.extend(rm.name for rm in page if exactly(rm.tags or {}, tags))
        token = page.token
        if not token:
            break
    return sorted(names)


def _versions_of(client: MlflowClient, name: str, versions: Versions
                 ) -> tuple[list[Target], list[Problem]]:
    if isinstance(versions, Aliases):
        targets, problems = [], []
        for alias in versions.aliases:
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except Exception as exc:
                problems.append(Problem(name, None, f"alias {alias!r} of {name!r} cannot be "
                                        f"resolved: {exc}"))
                continue
            targets.append(_target(mv, (alias,)))
        return targets, problems
    ready = all_versions(client, name)
    if isinstance(versions, Latest):
        ready = ready[: versions.latest]
    # oldest first: a version's `previous` baseline is then audited before it
    return [_target(mv) for mv in reversed(ready)], []


def _selector_for(config: NightlyConfig, name: str, tags: dict[str, str]) -> ModelSelector:
    """The first config selector that selects model `name` (by name or by its tags), else
    one with the config's `default_versions`."""
    for sel in config.models:
        if sel.name == name or (sel.tags and all(tags.get(k) == v for k, v in sel.tags.items())):
            return ModelSelector(name=name, versions=sel.versions)
    return ModelSelector(name=name, versions=config.default_versions)


def discover(
    client: MlflowClient, config: NightlyConfig, names: list[str] | None = None
) -> tuple[list[Target], list[Problem]]:
    """The versions to audit (deduplicated, in config order, oldest version first) and the
    selectors that failed. `names` (from --model) replaces the config's selection; each
    name's versions come from the config selector that selects it, else `default_versions`."""
    problems: list[Problem] = []
    resolved: list[tuple[str, Versions]] = []
    if names:
        for name in dict.fromkeys(names):
            try:
                tags = dict(client.get_registered_model(name).tags or {})
            except Exception as exc:
                problems.append(Problem(name, None, f"registered model {name!r} not found: {exc}"))
                continue
            resolved.append((name, _selector_for(config, name, tags).versions))
    else:
        for sel in config.models:
            if sel.name is not None:
                try:
                    client.get_registered_model(sel.name)
                except Exception as exc:
                    problems.append(Problem(sel.name, None,
                                            f"registered model {sel.name!r} not found: {exc}"))
                    continue
                resolved.append((sel.name, sel.versions))
            else:
                resolved += [(n, sel.versions) for n in _models_by_tags(client, sel.tags or {})]
    targets: dict[tuple[str, str], Target] = {}
    for name, versions in resolved:
        try:
            found, bad = _versions_of(client, name, versions)
        except Exception as exc:  # one unreadable model never stops the others
            problems.append(Problem(name, None, f"the versions of {name!r} cannot be listed: "
                                    f"{type(exc).__name__}: {exc}"))
            continue
        problems.extend(bad)
        for t in found:
            key = (t.name, t.version)
            if key in targets:  # merge aliases seen through several selectors
                old = targets[key]
                targets[key] = Target(old.name, old.version, old.model_id, old.source,
                                      tuple(dict.fromkeys(old.aliases + t.aliases)))
            else:
                targets[key] = t
    return list(targets.values()), problems


def _describe(versions: Versions) -> str:
    if isinstance(versions, Aliases):
        return "aliases " + ", ".join(versions.aliases)
    if isinstance(versions, Latest):
        return f"the latest {versions.latest}"
    return "all versions"


def select_version(client: MlflowClient, config: NightlyConfig, name: str, version: str
                   ) -> tuple[Target | None, str]:
    """Whether the config's selectors select version `version` of model `name` (a version
    the registry announced): its Target, or None and why not. Only the config decides: a
    model no selector matches (by name or registered-model tags), or a version outside what
    its selectors pick (`latest`, `aliases`, READY), is not selected. A model or version
    that no longer exists is not selected either; other registry errors raise."""
    try:
        tags = dict(client.get_registered_model(name).tags or {})
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return None, f"registered model {name!r} no longer exists"
        raise
    selectors = [sel for sel in config.models
                 if sel.name == name or (sel.tags and exactly(tags, sel.tags))]
    if not selectors:
        return None, "not selected by the config"
    found: Target | None = None
    for sel in selectors:
        targets, _problems = _versions_of(client, name, sel.versions)
        for t in targets:
            if t.version != str(version):
                continue
            found = t if found is None else Target(
                found.name, found.version, found.model_id, found.source,
                tuple(dict.fromkeys(found.aliases + t.aliases)))
    if found is None:
        which = "; ".join(_describe(sel.versions) for sel in selectors)
        return None, (f"not selected by the config: v{version} is not among the versions "
                      f"its selectors pick for {name!r} ({which}, READY only)")
    return found, ""
