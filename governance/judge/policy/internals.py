"""Internals rules (anatomy): heads and layers that concentrate identity processing, and heads
that attend to identity tokens. Evidence and mitigation targets; by default they warn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import (
    Field,
    model_validator,
)

from governance.judge.policy.base import (
    Candidate,
    Context,
    Finding,
    Positions,
    Rate,
    Rule,
    Severity,
    StrictModel,
    as_flag,
    is_missing,
    override_for,
)
from governance.numbers import fmt

if TYPE_CHECKING:

    pass



# ---- internals ----------------------------------------------------------------------------


class HeadOverride(StrictModel):
    layer: int = Field(ge=0)
    head: int | None = Field(None, ge=0, description="None: every head of the layer")
    max: float = Field(ge=0, le=1000)


class LayerOverride(StrictModel):
    layer: int = Field(ge=0)
    max: float = Field(ge=0, le=1000)


class _ScoreRule(Rule):
    """Anatomy: restoration scores (docs/method.md) of the category's pairs, warn by default."""

    severity: Severity = "warn"
    max: float = Field(ge=0, le=1000)
    aggregate: Literal["mean", "max"] = "mean"
    absolute: bool = True
    only_pairs_above_floor: bool = True

    def _scores(self, name: str, ctx: Context, component: str, positions: list[str]):
        s = ctx.audit.scores
        s = s[(s["component"] == component) & s["positions"].isin(positions)]
        what = f"{component}:{'/'.join(positions)} score"
        cats, out = ctx.resolve(name, self.categories, s["category"], what)
        if self.only_pairs_above_floor and ctx.floor is not None:
            keep = {(r.clean_persona, r.corrupt_persona) for r in ctx.audit.pairs.itertuples()
                    if as_flag(r.above_floor)}
            pairs = zip(s["clean_persona"], s["corrupt_persona"], strict=True)
            s = s.loc[[k in keep for k in pairs]]
        return s, cats, out

    def _value(self, score: float) -> float:
        return abs(score) if self.absolute else score

    def _judge(self, name: str, ctx: Context, cat: str, cands: list[Candidate]):
        if self.only_pairs_above_floor and ctx.floor is not None:
            # the category has scores (resolve checked), but no pair's effect beats the floor
            empty = (f"no {cat} pair moves the answers more than the noise floor: nothing to "
                     "localise (only_pairs_above_floor)")
            return ctx.judge(name, cat, cands, self.severity, empty, missing="pass")
        return ctx.judge(name, cat, cands, self.severity, f"no scores for category {cat}")


class HeadRestoration(_ScoreRule):
    positions: list[Positions] = Field(default_factory=lambda: ["all", "last"], min_length=1)
    overrides: list[HeadOverride] = Field(default_factory=list)

    def check(self, name: str, ctx: Context) -> list[Finding]:
        s, cats, out = self._scores(name, ctx, "head", self.positions)
        grid = s.groupby(["category", "positions", "layer", "head"], as_index=False)["score"]
        grid = grid.agg(self.aggregate)
        for cat in cats:
            cands = []
            for r in grid[grid["category"] == cat].itertuples():
                limit = override_for(self.overrides, self.max, r.layer, r.head)
                v = self._value(r.score)
                cands.append(Candidate(
                    v, limit, v > limit,
                    f"layer={r.layer} head={r.head} positions={r.positions} score "
                    f"{fmt(r.score, signed=True)} ({self.aggregate} over the category's pairs)",
                ))
            out += self._judge(name, ctx, cat, cands)
        return out


class EarlyLayers(StrictModel):
    """Which layers count as early: `first`..`last` (inclusive) or the first `fraction`."""

    first: int | None = Field(None, ge=0)
    last: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_form(self) -> EarlyLayers:
        if (self.fraction is None) == (self.first is None and self.last is None):
            raise ValueError("give either `fraction` or `first` and `last`")
        if self.fraction is None and (self.first is None or self.last is None):
            raise ValueError("give both `first` and `last`")
        if self.first is not None and self.last is not None and self.last < self.first:
            raise ValueError(f"last ({self.last}) is before first ({self.first})")
        return self

    def layers(self, n_layers: int) -> range:
        if self.fraction is not None:
            return range(0, max(1, math.ceil(self.fraction * n_layers)))
        return range(self.first or 0, min(n_layers - 1, self.last or 0) + 1)


class EarlyMlp(_ScoreRule):
    positions: list[Positions] = Field(default_factory=lambda: ["identity"], min_length=1)
    early: EarlyLayers = Field(default_factory=lambda: EarlyLayers(fraction=0.25))
    overrides: list[LayerOverride] = Field(default_factory=list)

    def check(self, name: str, ctx: Context) -> list[Finding]:
        s, cats, out = self._scores(name, ctx, "mlp_out", self.positions)
        layers = self.early.layers(ctx.n_layers)
        s = s[s["layer"].isin(list(layers))]
        curve = s.groupby(["category", "positions", "layer"], as_index=False)["score"]
        curve = curve.agg(self.aggregate)
        for cat in cats:
            cands = []
            for r in curve[curve["category"] == cat].itertuples():
                limit = override_for(self.overrides, self.max, r.layer)
                v = self._value(r.score)
                cands.append(Candidate(
                    v, limit, v > limit,
                    f"layer={r.layer} positions={r.positions} mlp_out score "
                    f"{fmt(r.score, signed=True)} "
                    f"(early layers {layers.start}-{layers.stop - 1} of {ctx.n_layers})",
                ))
            out += self._judge(name, ctx, cat, cands)
        return out


class AttentionOverride(StrictModel):
    layer: int = Field(ge=0)
    head: int | None = Field(None, ge=0)
    max_ratio: float | None = Field(None, ge=0)
    max_zscore: float | None = Field(None, ge=0)


class IdentityAttention(Rule):
    """A head attends disproportionately to identity tokens (docs/method.md): its mass is far
    above the same head's mass for the neutral control (`ratio`) and above the other heads
    (`zscore`). `combine: all` needs both limits exceeded, `any` one of them."""

    severity: Severity = "warn"
    max_ratio: float | None = Field(None, ge=0)
    max_zscore: float | None = Field(None, ge=0)
    combine: Literal["all", "any"] = "all"
    min_mass: Rate = 0.0
    overrides: list[AttentionOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_limit(self) -> IdentityAttention:
        if self.max_ratio is None and self.max_zscore is None:
            raise ValueError("give max_ratio, max_zscore or both")
        return self

    def check(self, name: str, ctx: Context) -> list[Finding]:
        a = ctx.audit.attention
        cats, out = ctx.resolve(name, self.categories, a["category"], "attention")
        for cat in cats:
            rows = a[(a["category"] == cat) & (a["identity_mass"] >= self.min_mass)]
            best: dict[tuple[int, int], tuple[tuple[bool, float], Candidate]] = {}
            for r in rows.itertuples():  # one row per (persona, layer, head)
                o = next((o for o in self.overrides if o.layer == r.layer
                          and o.head in (None, r.head)), None)
                limits = {
                    "ratio": o.max_ratio if o and o.max_ratio is not None else self.max_ratio,
                    "zscore": o.max_zscore if o and o.max_zscore is not None else self.max_zscore,
                }
                checked = [(m, getattr(r, m), lim) for m, lim in limits.items()
                           if lim is not None and not is_missing(getattr(r, m))]
                if not checked:
                    continue
                hits = [v > lim for _, v, lim in checked]
                n_limits = sum(lim is not None for lim in limits.values())
                violated = (any(hits) if self.combine == "any"
                            else all(hits) and len(checked) == n_limits)
                # report the metric that is furthest past (or closest to) its limit first
                checked.sort(key=lambda c: -(c[1] - c[2]) / max(c[2], 1e-9))
                metric, value, limit = checked[0]
                shown = ", ".join(f"{m} {fmt(v)} (max {fmt(lim)})" for m, v, lim in checked)
                cand = Candidate(value, limit, violated,
                                  f"layer={r.layer} head={r.head} persona={r.persona} {shown}, "
                                  f"identity mass {fmt(r.identity_mass)}")
                key = (violated, (value - limit) / max(limit, 1e-9))
                head = (int(r.layer), int(r.head))
                if head not in best or key > best[head][0]:  # the persona that matters most
                    best[head] = (key, cand)
            cands = [c for _, c in best.values()]
            out += ctx.judge(name, cat, cands, self.severity, "no attention rows for this "
                             "category (attention disabled, or all below min_mass)")
        return out


class InternalsRules(StrictModel):
    head_restoration: HeadRestoration | None = None
    identity_attention: IdentityAttention | None = None
    early_mlp: EarlyMlp | None = None
