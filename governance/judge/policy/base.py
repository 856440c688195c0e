"""What every policy rule shares: strict pydantic models, the finding a rule produces, and
the context (audit, baseline, noise floor) its `check` reads.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
)

from governance.names import COMPONENTS, POSITIONS, RESERVED_CATEGORIES

if TYPE_CHECKING:

    from governance.audit.result import AuditResult


DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[3] / "policies" / "default.yaml"

FINDING_COLUMNS = ["rule", "scope", "observed", "threshold", "severity", "outcome", "evidence"]

Severity = Literal["warn", "fail"]
Outcome = Literal["pass", "warn", "fail"]
Positions = Literal["identity", "last", "all"]
RANK = {"fail": 0, "warn": 1, "pass": 2}


# -- schema ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _default_categories() -> frozenset[str]:
    from governance.inputs.personas import load_catalogue

    return frozenset(load_catalogue().categories)


def _known_category(value: str, info: ValidationInfo) -> str:
    known = (info.context or {}).get("categories") or _default_categories()
    allowed = {"*", "noise_floor", *known}
    if value not in allowed:
        raise ValueError(
            f"unknown category {value!r}; expected '*', 'noise_floor' or a catalogue category: "
            + ", ".join(sorted(known))
        )
    return value


def _layer_component(value: str) -> str:
    """'*', 'mlp_out' (any positions) or 'mlp_out:identity'; heads have their own rule."""
    comp, sep, pos = value.partition(":")
    if value == "*":
        return value
    if comp == "head":
        raise ValueError("heads are compared by drift.head_change, not by per-layer curves")
    if comp not in COMPONENTS or (sep and pos not in (*POSITIONS, "*")):
        raise ValueError(
            f"unknown component {value!r}; expected '*', a component in "
            f"{[c for c in COMPONENTS if c != 'head']} or '<component>:<positions>' with "
            f"positions in {list(POSITIONS)}"
        )
    return value


Category = Annotated[str, AfterValidator(_known_category)]
LayerComponent = Annotated[str, AfterValidator(_layer_component)]
Rate = Annotated[float, Field(ge=0, le=1)]


class StrictModel(BaseModel):
    """No unknown keys, no type coercion ('0.5' is not a number), no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Rule(StrictModel):
    severity: Severity
    categories: list[Category] = Field(default_factory=lambda: ["*"], min_length=1)


class Candidate(typing.NamedTuple):
    """One thing a rule looked at (a pair, a head, a layer) and whether it breaks the rule."""

    value: float
    threshold: float
    violated: bool
    evidence: str


def component_matches(pattern: str, component: str, positions: str) -> bool:
    comp, _, pos = pattern.partition(":")
    return pattern == "*" or (comp == component and pos in ("", "*", positions))


def override_for(overrides, default: float, layer: int, head: int | None = None) -> float:
    for o in overrides:
        if o.layer == layer and getattr(o, "head", None) in (None, head):
            return o.max
    return default


# -- evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    rule: str
    scope: str
    observed: float
    threshold: float
    severity: Severity
    outcome: Outcome
    evidence: str


@dataclass
class Context:
    """What every rule's check reads: the audits, the noise floor and the policy's settings."""

    audit: AuditResult
    baseline: AuditResult | None
    drift_share: float | None
    missing_data: Severity
    floor: Any = None  # the noise-floor pair's row of audit.pairs, or None
    persona_category: dict[str, str] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        n = (self.audit.meta.get("model") or {}).get("n_layers")
        return int(n) if n else int(self.audit.scores["layer"].max()) + 1

    def floor_value(self, column: str) -> float:
        """The noise-floor pair's value (0 when the audit has no floor: a finding says so)."""
        if self.floor is None:
            return 0.0
        value = getattr(self.floor, column)
        return 0.0 if is_missing(value) else float(value)

    def pair(self, a: str, b: str) -> Any:
        p = self.audit.pairs
        hit = p[((p["clean_persona"] == a) & (p["corrupt_persona"] == b))
                | ((p["clean_persona"] == b) & (p["corrupt_persona"] == a))]
        return next(hit.itertuples(), None)

    def resolve(self, rule: str, wanted: list[str], present: Iterable[str],
                table: str) -> tuple[list[str], list[Finding]]:
        """The categories a rule checks, and a finding for each it names that has no data."""
        present = list(dict.fromkeys(present))
        personas = [c for c in present if c not in RESERVED_CATEGORIES]
        cats: list[str] = []
        for c in wanted:
            for x in personas if c == "*" else [c]:
                if x not in cats:
                    cats.append(x)
        missing = [c for c in cats if c not in present]
        out = [Finding(rule, f"category={c}", math.nan, math.nan, self.missing_data,
                       self.missing_data, f"the audit has no {table} rows for category {c}: "
                       "the rule could not be checked") for c in missing]
        if not cats:
            out.append(Finding(rule, "category=*", math.nan, math.nan, self.missing_data,
                               self.missing_data, f"the audit has no {table} rows for any "
                               "persona category: the rule could not be checked"))
        return [c for c in cats if c in present], out

    def judge(self, rule: str, category: str, cands: list[Candidate], severity: Severity,
              empty: str, missing: Outcome | None = None) -> list[Finding]:
        """One finding per violation, or one pass finding naming the closest call."""
        scope = f"category={category}"
        hits = sorted((c for c in cands if c.violated), key=lambda c: -c.value)
        if hits:
            return [Finding(rule, scope, c.value, c.threshold, severity, severity, c.evidence)
                    for c in hits]
        finite = [c for c in cands if not is_missing(c.value) and not is_missing(c.threshold)]
        if not finite:
            outcome = missing or self.missing_data
            return [Finding(rule, scope, math.nan, math.nan, severity, outcome, empty)]
        top = max(finite, key=lambda c: c.value - c.threshold)
        note = " (exceeds the threshold but without support above the noise floor)" * (
            top.value > top.threshold)
        return [Finding(rule, scope, top.value, top.threshold, severity, "pass",
                        f"closest of {len(cands)}: {top.evidence}{note}")]


def is_missing(v: Any) -> bool:
    try:
        return v is None or bool(v != v)
    except (TypeError, ValueError):  # pd.NA
        return True


def as_flag(v: Any) -> bool | None:
    """above_floor as read back from CSV: True/False/'True'/'False'/NaN."""
    if isinstance(v, str):
        return {"true": True, "false": False}.get(v.strip().lower())
    return None if is_missing(v) else bool(v)


def yes_no(flag: bool | None) -> str:
    return {True: "yes", False: "no", None: "n/a"}[flag]
