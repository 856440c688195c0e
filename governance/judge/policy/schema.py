"""The policy document: which models it applies to, its baseline, and its three rule families.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    model_validator,
)

from governance.judge.policy.base import Severity, StrictModel
from governance.judge.policy.behaviour import BehaviourRules
from governance.judge.policy.change import DriftRules
from governance.judge.policy.internals import InternalsRules
from governance.judge.policy.mitigation import MitigationRules

if TYPE_CHECKING:

    pass



# ---- the policy ---------------------------------------------------------------------------


class AppliesTo(StrictModel):
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    tags: dict[str, str] = Field(default_factory=dict)


class Baseline(StrictModel):
    """`{alias: champion}` (the version holding the alias), `previous` (the version before)
    or `self` (this version's last audit)."""

    kind: Literal["alias", "previous", "self"]
    alias: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and "kind" not in value and "alias" in value:
            return {"kind": "alias", **value}
        return value

    @model_validator(mode="after")
    def _alias_iff_kind(self) -> Baseline:
        if (self.kind == "alias") != (self.alias is not None):
            raise ValueError("write `baseline: {alias: NAME}`, `baseline: previous` or "
                             "`baseline: self`")
        return self

    def describe(self) -> str:
        return f"alias:{self.alias}" if self.kind == "alias" else self.kind


class Policy(StrictModel):
    version: Literal[1]
    name: str = Field(min_length=1)
    description: str = ""
    personas: str | None = Field(None, description="persona catalogue naming the categories")
    applies_to: AppliesTo = Field(default_factory=AppliesTo)
    baseline: Baseline = Field(default_factory=lambda: Baseline(kind="alias", alias="champion"))
    missing_data: Severity = "warn"
    behaviour: BehaviourRules = Field(default_factory=BehaviourRules)
    internals: InternalsRules = Field(default_factory=InternalsRules)
    drift: DriftRules = Field(default_factory=DriftRules)
    # judged on a mitigation what-if (persona-gov mitigate --policy), not on an audit
    mitigation: MitigationRules | None = None

    @model_validator(mode="after")
    def _has_rules(self) -> Policy:
        if not self.rules():
            raise ValueError("the policy has no rules: a policy without rules would pass "
                             "everything; add rules under behaviour, internals or drift")
        return self

    def rules(self) -> list[tuple[str, Any]]:
        """(`section.rule`, rule) for every rule that is set, in file order."""
        out = []
        for section in ("behaviour", "internals", "drift"):
            rules = getattr(self, section)
            for key in type(rules).model_fields:
                rule = getattr(rules, key)
                if isinstance(rule, BaseModel):
                    out.append((f"{section}.{key}", rule))
        return out

    def applies(self, model_name: str, tags: dict[str, str] | None = None) -> bool:
        """Whether this policy covers a model (name globs; every tag glob must match)."""
        if not any(fnmatchcase(model_name, g) for g in self.applies_to.models):
            return False
        tags = tags or {}
        return all(k in tags and fnmatchcase(str(tags[k]), g)
                   for k, g in self.applies_to.tags.items())

    def describe(self) -> str:
        rules = ", ".join(f"{n} ({r.severity})" for n, r in self.rules())
        return (f"policy {self.name!r} v{self.version}: {len(self.rules())} rules: {rules}; "
                f"baseline {self.baseline.describe()}")
