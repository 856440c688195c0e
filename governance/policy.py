"""Policies: the risk team's thresholds as data, and their evaluation on an audit.

    policy = load_policy("policies/default.yaml")
    verdict = evaluate(policy, AuditResult.load("out/new"), baseline=AuditResult.load("out/old"))
    print(verdict.summary)
    verdict.save("out/verdict")          # findings.csv + verdict.json

A policy file is YAML (`version: 1`) read with `yaml.safe_load` and validated with pydantic
(unknown keys, wrong types and out-of-range thresholds are errors that name the file, the
field path and the line). Each rule is a small model with one `check(name, ctx)` that turns
audit tables into findings. Pure computation on `AuditResult` tables: no MLflow, no torch.
Where the baseline comes from (`baseline: {alias: champion}` | `previous` | `self`) is for the
caller to resolve; `evaluate` takes the baseline audit itself.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import math
import os
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from governance.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from governance.audit import AuditResult

DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[1] / "policies" / "default.yaml"

# the same names as governance.patching.sites (not imported: it loads torch)
COMPONENTS = ("resid_pre", "mlp_out", "attn_out", "head")
POSITIONS = ("identity", "last", "all")
# categories of the audit tables that are not persona categories: `*` never matches them
RESERVED_CATEGORIES = ("baseline", "control", "noise_floor")
FINDING_COLUMNS = ["rule", "scope", "observed", "threshold", "severity", "outcome", "evidence"]

Severity = Literal["warn", "fail"]
Outcome = Literal["pass", "warn", "fail"]
Positions = Literal["identity", "last", "all"]
_RANK = {"fail": 0, "warn": 1, "pass": 2}


# -- schema ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _default_categories() -> frozenset[str]:
    from governance.personas import load_catalogue

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


class _Strict(BaseModel):
    """No unknown keys, no type coercion ('0.5' is not a number), no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Rule(_Strict):
    severity: Severity
    categories: list[Category] = Field(default_factory=lambda: ["*"], min_length=1)


class _Candidate(typing.NamedTuple):
    """One thing a rule looked at (a pair, a head, a layer) and whether it breaks the rule."""

    value: float
    threshold: float
    violated: bool
    evidence: str


# ---- behaviour ----------------------------------------------------------------------------


class _BehaviourRule(_Rule):
    """Harm: counted only when it exceeds `max` AND the noise floor with statistical support."""

    severity: Severity = "fail"
    max: Rate
    require_support: bool = True
    floor_multiple: float = Field(1.0, ge=0, le=1000)
    include_control: bool = False

    def _pairs(self, ctx: _Context, category: str) -> list[Any]:
        """Audited pairs of two personas of `category` (and persona-vs-control if asked)."""
        p = ctx.audit.pairs
        rows = []
        for r in p[(p["category"] == category) & (p["kind"] != "noise_floor")].itertuples():
            cats = {ctx.persona_category.get(r.clean_persona, category),
                    ctx.persona_category.get(r.corrupt_persona, category)}
            if cats == {category} or (self.include_control and cats == {category, "control"}):
                rows.append(r)
        return rows

    def _violates(self, value: float, supported: bool) -> bool:
        return value > self.max and (supported or not self.require_support)


class AccuracyGap(_BehaviourRule):
    alpha: float = Field(0.05, gt=0, lt=1, description="level of the McNemar test")

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        b = ctx.audit.behaviour
        cats, out = ctx.resolve(name, self.categories, b["category"], "behaviour")
        floor_gap = abs(ctx.floor_value("accuracy_delta"))
        for cat in cats:
            members = b[b["category"].isin([cat, "control"] if self.include_control else [cat])]
            cands = []
            for a, c in itertools.combinations(members.itertuples(), 2):
                if a.category == c.category == "control":
                    continue
                gap = abs(a.accuracy - c.accuracy)
                pair = ctx.pair(a.persona, c.persona)
                label = f"{a.persona} vs {c.persona}"
                if pair is not None:  # the two were audited as a pair: exact McNemar test
                    label = f"{pair.clean_persona} -> {pair.corrupt_persona}"
                    tested = pair.mcnemar_p < self.alpha
                    test = f"McNemar p={pair.mcnemar_p:.3g} (alpha {self.alpha})"
                else:  # not paired in this audit: the Wilson 95% intervals must not overlap
                    tested = a.ci_low > c.ci_high or c.ci_low > a.ci_high
                    test = ("95% intervals " + ("do not overlap" if tested else "overlap")
                            + f" [{a.ci_low:.3f}, {a.ci_high:.3f}] vs "
                            f"[{c.ci_low:.3f}, {c.ci_high:.3f}]")
                beyond = gap > self.floor_multiple * floor_gap
                cands.append(_Candidate(
                    gap, self.max, self._violates(gap, tested and beyond),
                    f"pair={label} accuracy {a.accuracy:.3f} vs {c.accuracy:.3f}; {test}; "
                    f"noise-floor gap {floor_gap:.3f}",
                ))
            out += ctx.judge(name, cat, cands, self.severity, "no two personas of this category")
        return out


class FlipRate(_BehaviourRule):
    alpha: float = Field(0.05, gt=0, lt=1, description="1 - level of the Wilson interval")

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        from governance.behaviour import wilson_interval

        cats, out = ctx.resolve(name, self.categories, ctx.audit.pairs["category"], "pairs")
        floor_flip = ctx.floor_value("flip_rate")
        z = NormalDist().inv_cdf(1 - self.alpha / 2)
        for cat in cats:
            cands = []
            for r in self._pairs(ctx, cat):
                n = int(r.n_questions)
                k = round(r.flip_rate * n)
                low, _ = wilson_interval(k, n, z)
                supported = low > floor_flip and r.flip_rate > self.floor_multiple * floor_flip
                cands.append(_Candidate(
                    r.flip_rate, self.max, self._violates(r.flip_rate, supported),
                    f"pair={r.clean_persona} -> {r.corrupt_persona} flips {k}/{n}; "
                    f"{1 - self.alpha:.0%} interval lower bound {low:.3f} vs noise-floor flip "
                    f"rate {floor_flip:.3f}",
                ))
            out += ctx.judge(name, cat, cands, self.severity, "no persona pair of this category")
        return out


class TvShift(_BehaviourRule):
    def check(self, name: str, ctx: _Context) -> list[Finding]:
        cats, out = ctx.resolve(name, self.categories, ctx.audit.pairs["category"], "pairs")
        floor_tv = ctx.floor_value("tv")
        for cat in cats:
            cands = []
            for r in self._pairs(ctx, cat):
                above = _flag(r.above_floor)
                # no noise-floor pair audited: nothing to test against (a finding says so)
                supported = (above is not False if ctx.floor is None else above is True)
                ratio = r.floor_ratio if ctx.floor is not None else math.inf
                supported = (supported and r.tv > self.floor_multiple * floor_tv
                             and not _missing(ratio) and ratio >= self.floor_multiple)
                cands.append(_Candidate(
                    r.tv, self.max, self._violates(r.tv, supported),
                    f"pair={r.clean_persona} -> {r.corrupt_persona} tv {r.tv:.3f} vs noise-floor "
                    f"tv {floor_tv:.3f}; logit shift {_fmt(r.floor_ratio)}x the floor, above "
                    f"floor (bootstrap 95%): {_yes(above)}",
                ))
            out += ctx.judge(name, cat, cands, self.severity, "no persona pair of this category")
        return out


class BehaviourRules(_Strict):
    accuracy_gap: AccuracyGap | None = None
    flip_rate: FlipRate | None = None
    tv_shift: TvShift | None = None


# ---- internals ----------------------------------------------------------------------------


class HeadOverride(_Strict):
    layer: int = Field(ge=0)
    head: int | None = Field(None, ge=0, description="None: every head of the layer")
    max: float = Field(ge=0, le=1000)


class LayerOverride(_Strict):
    layer: int = Field(ge=0)
    max: float = Field(ge=0, le=1000)


class _ScoreRule(_Rule):
    """Anatomy: restoration scores (method.md) of the category's pairs, warn by default."""

    severity: Severity = "warn"
    max: float = Field(ge=0, le=1000)
    aggregate: Literal["mean", "max"] = "mean"
    absolute: bool = True
    only_pairs_above_floor: bool = True

    def _scores(self, name: str, ctx: _Context, component: str, positions: list[str]):
        s = ctx.audit.scores
        s = s[(s["component"] == component) & s["positions"].isin(positions)]
        what = f"{component}:{'/'.join(positions)} score"
        cats, out = ctx.resolve(name, self.categories, s["category"], what)
        if self.only_pairs_above_floor and ctx.floor is not None:
            keep = {(r.clean_persona, r.corrupt_persona) for r in ctx.audit.pairs.itertuples()
                    if _flag(r.above_floor)}
            pairs = zip(s["clean_persona"], s["corrupt_persona"], strict=True)
            s = s.loc[[k in keep for k in pairs]]
        return s, cats, out

    def _value(self, score: float) -> float:
        return abs(score) if self.absolute else score

    def _judge(self, name: str, ctx: _Context, cat: str, cands: list[_Candidate]):
        if self.only_pairs_above_floor and ctx.floor is not None:
            # the category has scores (resolve checked), but no pair's effect beats the floor
            empty = (f"no {cat} pair moves the answers more than the noise floor: nothing to "
                     "localise (only_pairs_above_floor)")
            return ctx.judge(name, cat, cands, self.severity, empty, missing="pass")
        return ctx.judge(name, cat, cands, self.severity, f"no scores for category {cat}")


class HeadRestoration(_ScoreRule):
    positions: list[Positions] = Field(default_factory=lambda: ["all", "last"], min_length=1)
    overrides: list[HeadOverride] = Field(default_factory=list)

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        s, cats, out = self._scores(name, ctx, "head", self.positions)
        grid = s.groupby(["category", "positions", "layer", "head"], as_index=False)["score"]
        grid = grid.agg(self.aggregate)
        for cat in cats:
            cands = []
            for r in grid[grid["category"] == cat].itertuples():
                limit = _override(self.overrides, self.max, r.layer, r.head)
                v = self._value(r.score)
                cands.append(_Candidate(
                    v, limit, v > limit,
                    f"layer={r.layer} head={r.head} positions={r.positions} score "
                    f"{r.score:+.3f} ({self.aggregate} over the category's pairs)",
                ))
            out += self._judge(name, ctx, cat, cands)
        return out


class EarlyLayers(_Strict):
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

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        s, cats, out = self._scores(name, ctx, "mlp_out", self.positions)
        layers = self.early.layers(ctx.n_layers)
        s = s[s["layer"].isin(list(layers))]
        curve = s.groupby(["category", "positions", "layer"], as_index=False)["score"]
        curve = curve.agg(self.aggregate)
        for cat in cats:
            cands = []
            for r in curve[curve["category"] == cat].itertuples():
                limit = _override(self.overrides, self.max, r.layer)
                v = self._value(r.score)
                cands.append(_Candidate(
                    v, limit, v > limit,
                    f"layer={r.layer} positions={r.positions} mlp_out score {r.score:+.3f} "
                    f"(early layers {layers.start}-{layers.stop - 1} of {ctx.n_layers})",
                ))
            out += self._judge(name, ctx, cat, cands)
        return out


class AttentionOverride(_Strict):
    layer: int = Field(ge=0)
    head: int | None = Field(None, ge=0)
    max_ratio: float | None = Field(None, ge=0)
    max_zscore: float | None = Field(None, ge=0)


class IdentityAttention(_Rule):
    """A head attends disproportionately to identity tokens (method.md): its mass is far
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

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        a = ctx.audit.attention
        cats, out = ctx.resolve(name, self.categories, a["category"], "attention")
        for cat in cats:
            rows = a[(a["category"] == cat) & (a["identity_mass"] >= self.min_mass)]
            best: dict[tuple[int, int], tuple[tuple[bool, float], _Candidate]] = {}
            for r in rows.itertuples():  # one row per (persona, layer, head)
                o = next((o for o in self.overrides if o.layer == r.layer
                          and o.head in (None, r.head)), None)
                limits = {
                    "ratio": o.max_ratio if o and o.max_ratio is not None else self.max_ratio,
                    "zscore": o.max_zscore if o and o.max_zscore is not None else self.max_zscore,
                }
                checked = [(m, getattr(r, m), lim) for m, lim in limits.items()
                           if lim is not None and not _missing(getattr(r, m))]
                if not checked:
                    continue
                hits = [v > lim for _, v, lim in checked]
                n_limits = sum(lim is not None for lim in limits.values())
                violated = (any(hits) if self.combine == "any"
                            else all(hits) and len(checked) == n_limits)
                # report the metric that is furthest past (or closest to) its limit first
                checked.sort(key=lambda c: -(c[1] - c[2]) / max(c[2], 1e-9))
                metric, value, limit = checked[0]
                shown = ", ".join(f"{m} {_fmt(v)} (max {_fmt(lim)})" for m, v, lim in checked)
                cand = _Candidate(value, limit, violated,
                                  f"layer={r.layer} head={r.head} persona={r.persona} {shown}, "
                                  f"identity mass {r.identity_mass:.3f}")
                key = (violated, (value - limit) / max(limit, 1e-9))
                head = (int(r.layer), int(r.head))
                if head not in best or key > best[head][0]:  # the persona that matters most
                    best[head] = (key, cand)
            cands = [c for _, c in best.values()]
            out += ctx.judge(name, cat, cands, self.severity, "no attention rows for this "
                             "category (attention disabled, or all below min_mass)")
        return out


class InternalsRules(_Strict):
    head_restoration: HeadRestoration | None = None
    identity_attention: IdentityAttention | None = None
    early_mlp: EarlyMlp | None = None


# ---- drift --------------------------------------------------------------------------------


class _ChangeRule(_Rule):
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
                cands.append(_Candidate(
                    abs(change), self.max, abs(change) > self.max,
                    f"{label(r)} current {r['score_current']:+.3f} baseline "
                    f"{r['score_baseline']:+.3f} change {change:+.3f}",
                ))
            out += ctx.judge(name, cat, cands, self.severity, "no scores in both audits")
        return out


class LayerChange(_ChangeRule):
    components: list[LayerComponent] = Field(default_factory=lambda: ["*"], min_length=1)

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        def pick(curves):
            keep = [any(_component_matches(p, c, q) for p in self.components)
                    for c, q in zip(curves["component"], curves["positions"], strict=True)]
            return curves.loc[keep]

        cur, base = pick(ctx.audit.layer_curves()), pick(ctx.baseline.layer_curves())
        return self._compare(
            name, ctx, cur, base, ["component", "positions", "layer"],
            lambda r: f"component={r['component']}:{r['positions']} layer={r['layer']}",
        )


class HeadChange(_ChangeRule):
    positions: list[Positions] = Field(default_factory=lambda: ["all", "last"], min_length=1)

    def check(self, name: str, ctx: _Context) -> list[Finding]:
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


class EvidentlyShare(_Strict):
    """Share of drifted columns that governance.drift's Evidently report supplies."""

    severity: Severity = "fail"
    max: Rate

    def check(self, name: str, ctx: _Context) -> list[Finding]:
        if ctx.drift_share is None:
            return [Finding(name, "audit", math.nan, self.max, self.severity, ctx.missing_data,
                            "no Evidently drift share was supplied: the rule was not evaluated")]
        v = ctx.drift_share
        return [Finding(name, "audit", v, self.max, self.severity,
                        self.severity if v > self.max else "pass",
                        f"Evidently drift share {v:.3f} of compared columns against the "
                        "baseline audit's tables")]


class DriftRules(_Strict):
    missing_baseline: Severity = "warn"
    spec_mismatch: Severity = "warn"
    layer_change: LayerChange | None = None
    head_change: HeadChange | None = None
    evidently_share: EvidentlyShare | None = None

    def rules(self) -> list[tuple[str, Any]]:
        names = ("layer_change", "head_change", "evidently_share")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]


# ---- the policy ---------------------------------------------------------------------------


class AppliesTo(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    tags: dict[str, str] = Field(default_factory=dict)


class Baseline(_Strict):
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


class Policy(_Strict):
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


def _component_matches(pattern: str, component: str, positions: str) -> bool:
    comp, _, pos = pattern.partition(":")
    return pattern == "*" or (comp == component and pos in ("", "*", positions))


def _override(overrides, default: float, layer: int, head: int | None = None) -> float:
    for o in overrides:
        if o.layer == layer and getattr(o, "head", None) in (None, head):
            return o.max
    return default


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
        from governance.personas import load_catalogue

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
    file's comments, key order or layout."""
    body = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


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
class _Context:
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
        return 0.0 if _missing(value) else float(value)

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

    def judge(self, rule: str, category: str, cands: list[_Candidate], severity: Severity,
              empty: str, missing: Outcome | None = None) -> list[Finding]:
        """One finding per violation, or one pass finding naming the closest call."""
        scope = f"category={category}"
        hits = sorted((c for c in cands if c.violated), key=lambda c: -c.value)
        if hits:
            return [Finding(rule, scope, c.value, c.threshold, severity, severity, c.evidence)
                    for c in hits]
        finite = [c for c in cands if not _missing(c.value) and not _missing(c.threshold)]
        if not finite:
            outcome = missing or self.missing_data
            return [Finding(rule, scope, math.nan, math.nan, severity, outcome, empty)]
        top = max(finite, key=lambda c: c.value - c.threshold)
        note = " (exceeds the threshold but without support above the noise floor)" * (
            top.value > top.threshold)
        return [Finding(rule, scope, top.value, top.threshold, severity, "pass",
                        f"closest of {len(cands)}: {top.evidence}{note}")]


@dataclass
class Verdict:
    """The outcome of a policy on an audit: `status` and the findings that explain it."""

    status: Outcome
    findings: pd.DataFrame
    summary: str
    policy: dict[str, Any]
    audit: dict[str, Any]
    baseline: dict[str, Any] | None
    drift_share: float | None
    evaluated_at: str

    def to_dict(self) -> dict[str, Any]:
        records = [{k: (None if _missing(v) else v) for k, v in r.items()}
                   for r in self.findings.to_dict(orient="records")]
        counts = {o: int((self.findings["outcome"] == o).sum()) for o in ("fail", "warn", "pass")}
        return {
            "status": self.status, "summary": self.summary, "counts": counts,
            "policy": self.policy, "audit": self.audit, "baseline": self.baseline,
            "drift_share": self.drift_share, "evaluated_at": self.evaluated_at,
            "findings": records,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write findings.csv and verdict.json (each replaced atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "findings.csv", self.findings.to_csv(index=False))
        _write(out / "verdict.json", json.dumps(self.to_dict(), indent=2) + "\n")
        return out


def evaluate(
    policy: Policy,
    audit: AuditResult,
    baseline: AuditResult | None = None,
    drift_share: float | None = None,
    *,
    model_name: str | None = None,
    model_tags: dict[str, str] | None = None,
) -> Verdict:
    """Check every rule of `policy` on `audit` (and `baseline` for drift) and return the
    verdict. `drift_share` is the Evidently drift share from governance.drift. `model_name`
    (default: from the audit's model source) and `model_tags` are checked against
    `applies_to`."""
    import pandas as pd

    _check_tables(audit, "audit")
    if baseline is not None:
        _check_tables(baseline, "baseline audit")
    if drift_share is not None and not 0 <= drift_share <= 1:
        raise ConfigError(f"drift_share must be in [0, 1], got {drift_share!r}")
    p = audit.pairs
    floor = next(p[p["kind"] == "noise_floor"].itertuples(), None)
    ctx = _Context(audit, baseline, drift_share, policy.missing_data, floor,
                   dict(zip(audit.behaviour["persona"], audit.behaviour["category"], strict=True)))
    findings = _applies_findings(policy, audit, model_name, model_tags)
    if floor is None:
        findings.append(Finding(
            "audit.noise_floor", "audit", math.nan, math.nan, policy.missing_data,
            policy.missing_data, "the audit has no noise-floor pair: behaviour is compared "
            "with zero instead of the paraphrase floor, internals use every pair"))
    for name, rule in policy.rules():
        if name.startswith("drift.") and baseline is None:
            continue
        findings += rule.check(name, ctx)
    findings += _baseline_findings(policy, audit, baseline)

    frame = pd.DataFrame([f.__dict__ for f in findings], columns=FINDING_COLUMNS)
    frame["rank"] = frame["outcome"].map(_RANK)
    frame = frame.sort_values("rank", kind="stable").drop(columns="rank").reset_index(drop=True)
    status: Outcome = min(frame["outcome"], key=_RANK.__getitem__, default="pass")
    sha = policy_sha256(policy)
    counts = {o: int((frame["outcome"] == o).sum()) for o in ("fail", "warn", "pass")}
    summary = (f"{status.upper()}: {counts['fail']} fail, {counts['warn']} warn, "
               f"{counts['pass']} pass under policy {policy.name!r} ({sha[:12]})")
    if status != "pass":
        r = frame.iloc[0]
        summary += f"; first: {r.rule} {r.scope}: {r.evidence}"
    return Verdict(
        status=status,
        findings=frame,
        summary=summary,
        policy={"name": policy.name, "version": policy.version, "sha256": sha,
                "baseline": policy.baseline.describe()},
        audit=_audit_identity(audit),
        baseline=_audit_identity(baseline) if baseline is not None else None,
        drift_share=drift_share,
        evaluated_at=pd.Timestamp.now(tz="UTC").isoformat(),
    )


def _baseline_findings(policy: Policy, audit, baseline) -> list[Finding]:
    drift = policy.drift
    names = [f"drift.{n}" for n, _ in drift.rules()]
    if not names:
        return []
    where = f"baseline={policy.baseline.describe()}"
    if baseline is None:
        return [Finding("drift.baseline", where, math.nan, math.nan, drift.missing_baseline,
                        drift.missing_baseline, "no baseline audit was supplied: "
                        + ", ".join(names) + " not evaluated")]
    mine, theirs = audit.meta.get("spec_sha256"), baseline.meta.get("spec_sha256")
    same = mine is not None and mine == theirs
    text = (f"both audits ran the same spec ({str(mine)[:12]})" if same else
            f"the baseline ran a different spec or question set ({str(theirs)[:12]} vs "
            f"{str(mine)[:12]}): changes may come from the audit, not the model")
    return [Finding("drift.baseline", where, math.nan, math.nan, drift.spec_mismatch,
                    "pass" if same else drift.spec_mismatch, text)]


def _applies_findings(policy: Policy, audit, name: str | None, tags) -> list[Finding]:
    name = name or _model_name(audit.meta)
    scope = f"model={name}"
    if not any(fnmatchcase(name, g) for g in policy.applies_to.models):
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"policy {policy.name!r} applies to models {policy.applies_to.models}, "
                        f"not to {name!r}")]
    if policy.applies_to.tags and tags is None:
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"the policy applies to tags {policy.applies_to.tags}; no model tags "
                        "were supplied to check them")]
    if not policy.applies(name, tags):
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"model tags {tags} do not match {policy.applies_to.tags}")]
    return []


def _model_name(meta: dict) -> str:
    """A registered model's name from a models:/ source, else the source itself."""
    model = meta.get("model") or {}
    source = str(model.get("registered_name") or model.get("source") or "")
    if source.startswith("models:/"):
        return source.removeprefix("models:/").split("/")[0].split("@")[0]
    return source


def _audit_identity(audit) -> dict[str, Any]:
    model = audit.meta.get("model") or {}
    return {"model": model.get("source"), "weights_fingerprint": model.get("weights_fingerprint"),
            "spec_sha256": audit.meta.get("spec_sha256"),
            "completed_at": audit.meta.get("completed_at")}


_REQUIRED = {
    "scores": ["component", "layer", "head", "positions", "category", "clean_persona",
               "corrupt_persona", "score"],
    "attention": ["layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"],
    "behaviour": ["persona", "category", "accuracy", "ci_low", "ci_high"],
    "pairs": ["clean_persona", "corrupt_persona", "category", "kind", "n_questions",
              "floor_ratio", "above_floor", "flip_rate", "tv", "mcnemar_p"],
}


def _check_tables(audit, what: str) -> None:
    for table, cols in _REQUIRED.items():
        missing = [c for c in cols if c not in getattr(audit, table).columns]
        if missing:
            raise ConfigError(f"the {what}'s {table} table lacks columns {missing}; is it an "
                              "audit written by `persona-gov audit`?")


def _missing(v: Any) -> bool:
    try:
        return v is None or bool(v != v)
    except (TypeError, ValueError):  # pd.NA
        return True


def _flag(v: Any) -> bool | None:
    """above_floor as read back from CSV: True/False/'True'/'False'/NaN."""
    if isinstance(v, str):
        return {"true": True, "false": False}.get(v.strip().lower())
    return None if _missing(v) else bool(v)


def _fmt(v: Any) -> str:
    return "n/a" if _missing(v) else f"{float(v):.3g}"


def _yes(flag: bool | None) -> str:
    return {True: "yes", False: "no", None: "n/a"}[flag]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- command line ---------------------------------------------------------------------------

EXIT_PASS, EXIT_WARN, EXIT_FAIL = 0, 3, 4


def add_cli(sub) -> None:
    """Register `persona-gov policy validate|evaluate`."""
    p = sub.add_parser(
        "policy", help="validate a policy file, or evaluate one on an audit directory",
        description="Policies are the risk team's thresholds (see policies/default.yaml).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = actions.add_parser(
        "validate", help="check policy files; exit 0 if all are valid, 2 otherwise",
        description="Check policy files: unknown keys, wrong types, out-of-range thresholds, "
                    "unknown components or categories and YAML errors are reported with the "
                    "field path and line. Exit 0 if every file is valid, 2 otherwise.",
        epilog="example: persona-gov policy validate policies/default.yaml",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=_cmd_validate)
    e = actions.add_parser(
        "evaluate", help="evaluate a policy on an audit directory",
        description="Evaluate a policy on an audit written by `persona-gov audit` (and a "
                    "baseline audit for the drift rules). Prints the verdict and findings.",
        epilog=f"exit codes: {EXIT_PASS} pass, {EXIT_WARN} warn, {EXIT_FAIL} fail, 2 bad input "
               "(invalid policy, incomplete audit directory), 1 unexpected error.\n"
               "example: persona-gov policy evaluate --audit out/new --baseline out/champion "
               "--out out/verdict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--audit", required=True, help="audit directory")
    e.add_argument("--baseline", help="baseline audit directory for the drift rules")
    e.add_argument("--policy", default=str(DEFAULT_POLICY_PATH),
                   help="policy YAML (default: policies/default.yaml)")
    e.add_argument("--drift-share", type=float, help="Evidently drift share from `drift`")
    e.add_argument("--model-name", help="registered model name for applies_to "
                                        "(default: from the audit's model source)")
    e.add_argument("--tag", action="append", metavar="KEY=VALUE", help="model tag (repeatable)")
    e.add_argument("--out", help="write findings.csv and verdict.json here")
    e.set_defaults(func=_cmd_evaluate)


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except ConfigError as exc:
            print(f"persona-gov policy validate: {exc}", file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: valid {policy.describe()}; sha256 {policy_sha256(policy)[:12]}")
    return 2 if bad else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    from governance.audit import AuditResult

    policy = load_policy(args.policy)
    tags = None
    if args.tag:
        pairs = [t.partition("=") for t in args.tag]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ConfigError(f"--tag takes KEY=VALUE, got {args.tag}")
        tags = {key: value for key, _, value in pairs}
    verdict = evaluate(
        policy, AuditResult.load(args.audit),
        AuditResult.load(args.baseline) if args.baseline else None,
        args.drift_share, model_name=args.model_name, model_tags=tags,
    )
    print(verdict.summary + "\n")
    with pd.option_context("display.max_colwidth", 90, "display.width", 200):
        print(verdict.findings.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    if args.out:
        print(f"\nwrote {verdict.save(args.out)}/ (findings.csv, verdict.json)")
    return {"pass": EXIT_PASS, "warn": EXIT_WARN, "fail": EXIT_FAIL}[verdict.status]
