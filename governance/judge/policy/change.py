"""Change rules (risk): how far a version's per-layer curves and per-head grid moved from its
baseline audit, and Evidently's drift share.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import (
    Field,
)

from governance.judge.policy.base import (
    Candidate,
    Context,
    Finding,
    LayerComponent,
    Positions,
    Rate,
    Rule,
    Severity,
    StrictModel,
    component_matches,
)
from governance.numbers import fmt

if TYPE_CHECKING:

    pass



# ---- drift --------------------------------------------------------------------------------


class _ChangeRule(Rule):
    """Change against the baseline audit: |current - baseline| restoration score."""

    severity: Severity = "fail"
    max: float = Field(ge=0, le=1000)

    def _compare(self, name, ctx, cur, base, keys, label) -> list[Finding]:
        both = cur.merge(base, on=["category", *keys], how="outer",
                         suffixes=("_current", "_baseline"), indicator=True)
        cats, out = ctx.resolve(name, self.categories, both["category"], "comparable score")
        both = both[both["category"].isin(cats)]
        one_sided = both[both["_merge"] != "both"]
        if len(one_sided):
            first = one_sided.iloc[0]
            side = "current" if first["_merge"] == "left_only" else "baseline"
            out.append(Finding(
                name, "coverage", float(len(one_sided)), 0.0, ctx.missing_data,
                ctx.missing_data,
                f"{len(one_sided)} points are in only one of the two audits and were not "
                f"compared, e.g. {label(first)} category={first['category']} (only in {side})",
            ))
        both = both[both["_merge"] == "both"]
        for cat in cats:
            cands = []
            for _, r in both[both["category"] == cat].iterrows():
                change = r["score_current"] - r["score_baseline"]
                cands.append(Candidate(
                    abs(change), self.max, abs(change) > self.max,
                    f"{label(r)} current {fmt(r['score_current'], signed=True)} baseline "
                    f"{fmt(r['score_baseline'], signed=True)} change {fmt(change, signed=True)}",
                ))
            out += ctx.judge(name, cat, cands, self.severity, "no scores in both audits")
        return out


class LayerChange(_ChangeRule):
    components: list[LayerComponent] = Field(default_factory=lambda: ["*"], min_length=1)

    def check(self, name: str, ctx: Context) -> list[Finding]:
        def pick(curves):
            keep = [any(component_matches(p, c, q) for p in self.components)
                    for c, q in zip(curves["component"], curves["positions"], strict=True)]
            return curves.loc[keep]

        cur, base = pick(ctx.audit.layer_curves()), pick(ctx.baseline.layer_curves())
        return self._compare(
            name, ctx, cur, base, ["component", "positions", "layer"],
            lambda r: f"component={r['component']}:{r['positions']} layer={r['layer']}",
        )


class HeadChange(_ChangeRule):
    positions: list[Positions] = Field(default_factory=lambda: ["all", "last"], min_length=1)

    def check(self, name: str, ctx: Context) -> list[Finding]:
        def grid(audit):
            s = audit.scores
            s = s[(s["component"] == "head") & s["positions"].isin(self.positions)]
            keys = ["category", "positions", "layer", "head"]
            g = s.groupby(keys, as_index=False)["score"].mean()
            g["head"] = g["head"].astype(int)
            return g

        return self._compare(
            name, ctx, grid(ctx.audit), grid(ctx.baseline), ["positions", "layer", "head"],
            lambda r: f"layer={r['layer']} head={r['head']} positions={r['positions']}",
        )


class EvidentlyShare(StrictModel):
    """Share of drifted columns that governance.judge.drift's Evidently report supplies."""

    severity: Severity = "fail"
    max: Rate

    def check(self, name: str, ctx: Context) -> list[Finding]:
        if ctx.drift_share is None:
            return [Finding(name, "audit", math.nan, self.max, self.severity, ctx.missing_data,
                            "no Evidently drift share was supplied: the rule was not evaluated")]
        v = ctx.drift_share
        return [Finding(name, "audit", v, self.max, self.severity,
                        self.severity if v > self.max else "pass",
                        f"Evidently drift share {fmt(v)} of compared columns against the "
                        "baseline audit's tables")]


class DriftRules(StrictModel):
    missing_baseline: Severity = "warn"
    spec_mismatch: Severity = "warn"
    layer_change: LayerChange | None = None
    head_change: HeadChange | None = None
    evidently_share: EvidentlyShare | None = None

    def rules(self) -> list[tuple[str, Any]]:
        names = ("layer_change", "head_change", "evidently_share")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]
