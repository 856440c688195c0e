"""Findings across models: the method's three claims tested on stored audits, with figures.

    python -m governance.report.findings docs/results/findings.yaml --out docs/findings.md

The manifest lists, per model, a *catalogue* audit (every persona of the catalogue: behaviour,
pair shifts against the noise floor, attention to identity) and an *anatomy* audit (a few
pairs patched per component and layer). Everything here reads stored audit directories
(`AuditResult.load`); nothing loads a model, so the page can be rebuilt anywhere.

The claims (docs/method.md, after Poonia & Jain 2025) and how each is tested:

1. *Early MLPs encode the persona at its token positions.* Exact restoration score S of
   `mlp_out:identity` per layer for the persona pairs: the early third's peak with its
   bootstrap 95% interval, the same layer for the noise-floor pair, the late third's mean
   (the effect should fade with depth), and whether the pair's shift is above the floor.
2. *Middle attention carries the persona to the answer.* Exact S of `attn_out:last` per
   layer: the middle third's peak with its interval and the middle third's share of the
   total positive S over all layers.
3. *Some heads attend disproportionately to racial and colour identities.* From the
   attention-to-identity table: per head, a category's *selectivity* is its personas' mean
   identity mass over the other categories' mean. Race's strongest head is compared with the
   strongest head of every other category (a placebo: what selectivity any category reaches
   by chance over the same heads), and with the head's z-score across heads.

Answers are "holds", "holds partly", "does not hold here" or "not tested" (the audit lacks
the sweep), with the numbers behind them.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from governance.audit.result import AuditResult
from governance.errors import ConfigError
from governance.files import read_yaml_mapping

HOLDS, PARTLY, NOT_HERE, UNTESTED = "holds", "holds partly", "does not hold here", "not tested"
CLAIMS = {
    1: "Early MLP layers encode the persona at its token positions (and the effect fades "
       "with depth).",
    2: "Middle attention layers carry the persona from its tokens to the answer.",
    3: "Some attention heads attend disproportionately to racial and colour identity tokens.",
}
KINDS = {"catalogue": "behaviour and attention", "anatomy": "patching anatomy"}
SELECTIVE = 1.5  # a head is race-selective at >= 1.5x the other categories' mean mass
Z_HIGH = 2.0  # ... and when its race mass stands out across heads


@dataclass
class ModelAudits:
    """One model's stored audits, as named in the manifest."""

    label: str
    catalogue: AuditResult | None
    anatomy: AuditResult | None
    paths: dict[str, str] = field(default_factory=dict)
    note: str = ""
    answer_formats: pd.DataFrame | None = None

    @property
    def n_layers(self) -> int:
        for audit in (self.anatomy, self.catalogue):
            if audit is not None:
                return int(audit.meta["model"]["n_layers"])
        raise ConfigError(f"model {self.label!r} has no audit")


@dataclass(frozen=True)
class Verdict:
    claim: int
    model: str
    answer: str
    test: str
    evidence: str


def load_manifest(path: str | Path) -> list[ModelAudits]:
    """The models of a findings manifest, their audit directories resolved relative to it."""
    raw = read_yaml_mapping(path, "findings manifest")
    base = Path(path).parent
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: 'models' must be a non-empty list")
    out = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "label" not in entry:
            raise ConfigError(f"{path}: models[{i}] needs a 'label'")
        loaded: dict[str, AuditResult | None] = {}
        paths = {}
        for kind in ("catalogue", "anatomy"):
            rel = entry.get(kind)
            loaded[kind] = None if rel is None else AuditResult.load(base / rel)
            if rel is not None:
                paths[kind] = os.path.relpath(base / rel)
        formats = None
        if entry.get("answer_formats"):
            formats = pd.read_csv(base / entry["answer_formats"])
            paths["answer formats"] = os.path.relpath(base / entry["answer_formats"])
        out.append(ModelAudits(entry["label"], loaded["catalogue"], loaded["anatomy"], paths,
                               str(entry.get("note", "")), formats))
    return out


# -- the pieces each claim reads -------------------------------------------------------------


def thirds(n_layers: int) -> dict[str, range]:
    """Early, middle and late layers: the model's depth cut in three."""
    a, b = math.ceil(n_layers / 3), math.ceil(2 * n_layers / 3)
    return {"early": range(0, a), "middle": range(a, b), "late": range(b, n_layers)}


def _sweep(audit: AuditResult, component: str, positions: str, floor: bool) -> pd.DataFrame:
    s = audit.scores
    sel = (s["component"] == component) & (s["positions"] == positions)
    sel &= (s["category"] == "noise_floor") if floor else (s["category"] != "noise_floor")
    return s[sel]


def _fmt(row: pd.Series) -> str:
    return f"{row.score:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"


def _pair_floor(audit: AuditResult, clean: str, corrupt: str) -> str:
    p = audit.pairs
    row = p[(p["clean_persona"] == clean) & (p["corrupt_persona"] == corrupt)]
    if row.empty or pd.isna(row.iloc[0]["floor_ratio"]):
        return "no noise-floor comparison"
    r = row.iloc[0]
    above = "above" if r["above_floor"] in (True, "True") else "not above"
    return f"shift {r['floor_ratio']:.2f}x the paraphrase floor's, {above} it (bootstrap 95%)"


def _above_floor(audit: AuditResult, clean: str, corrupt: str) -> bool:
    p = audit.pairs
    row = p[(p["clean_persona"] == clean) & (p["corrupt_persona"] == corrupt)]
    return bool(not row.empty and row.iloc[0]["above_floor"] in (True, "True"))


def _screened_note(audit: AuditResult, component: str, positions: str) -> str:
    spec = audit.meta["spec"]
    exact = [int(x) for x in sorted(_sweep(audit, component, positions, False)["layer"].unique())]
    if spec.get("screen", "off") == "atp":
        return f"AtP-screened, exact at layers {exact}"
    if spec.get("layers"):
        return f"exact, at layers {exact}"
    return "exact at every layer"


# -- the claims ---------------------------------------------------------------------------


def claim_early_mlp(m: ModelAudits) -> Verdict:
    test = ("exact S of mlp_out:identity, early-third peak with bootstrap 95% CI, against the "
            "noise-floor pair at that layer and the late third's mean")
    a = m.anatomy
    rows = pd.DataFrame() if a is None else _sweep(a, "mlp_out", "identity", False)
    if a is None or rows.empty:
        return Verdict(1, m.label, UNTESTED, test, "no mlp_out:identity sweep in the audit")
    parts = thirds(m.n_layers)
    floor = _sweep(a, "mlp_out", "identity", True)
    lines, answers = [], []
    for (clean, corrupt), pair in rows.groupby(["clean_persona", "corrupt_persona"]):
        early = pair[pair["layer"].isin(parts["early"])]
        if early.empty:
            continue
        peak = early.loc[early["score"].idxmax()]
        floor_at = floor[floor["layer"] == peak.layer]
        late = pair[pair["layer"].isin(parts["late"])]["score"]
        late_mean = float(late.mean()) if not late.empty else float("nan")
        local = peak.ci_low > 0
        fades = not np.isnan(late_mean) and late_mean < peak.score / 2
        above = _above_floor(a, clean, corrupt)
        answers.append(HOLDS if local and fades and above else PARTLY if local else NOT_HERE)
        floor_text = (f"noise-floor pair at that layer {_fmt(floor_at.iloc[0])}"
                      if not floor_at.empty else "no noise-floor sweep")
        lines.append(
            f"{clean} -> {corrupt}: early peak layer {int(peak.layer)} S {_fmt(peak)}; "
            f"{floor_text}; late-third mean S {late_mean:+.2f}; "
            f"{_pair_floor(a, clean, corrupt)} (n={int(peak.n_questions)}, "
            f"{_screened_note(a, 'mlp_out', 'identity')})"
        )
    return Verdict(1, m.label, _combine(answers), test, "; ".join(lines) or "no early layer")


def claim_middle_attention(m: ModelAudits) -> Verdict:
    test = ("exact S of attn_out:last, middle-third peak with bootstrap 95% CI, and the middle "
            "third's share of all positive S")
    a = m.anatomy
    rows = pd.DataFrame() if a is None else _sweep(a, "attn_out", "last", False)
    if a is None or rows.empty:
        return Verdict(2, m.label, UNTESTED, test, "no attn_out:last sweep in the audit")
    parts = thirds(m.n_layers)
    lines, answers = [], []
    for (clean, corrupt), pair in rows.groupby(["clean_persona", "corrupt_persona"]):
        mid = pair[pair["layer"].isin(parts["middle"])]
        if mid.empty:
            continue
        peak = mid.loc[mid["score"].idxmax()]
        positive = pair["score"].clip(lower=0)
        share = {k: float(positive[pair["layer"].isin(r)].sum()) for k, r in parts.items()}
        total = sum(share.values())
        mid_share = share["middle"] / total if total > 0 else float("nan")
        strongest = max(share, key=share.get) if total > 0 else "none"
        local = peak.ci_low > 0
        above = _above_floor(a, clean, corrupt)
        answers.append(HOLDS if local and strongest == "middle" and above
                       else PARTLY if local else NOT_HERE)
        lines.append(
            f"{clean} -> {corrupt}: middle peak layer {int(peak.layer)} S {_fmt(peak)}; "
            f"middle third holds {mid_share:.0%} of the positive S (largest: {strongest}); "
            f"{_pair_floor(a, clean, corrupt)} (n={int(peak.n_questions)}, "
            f"{_screened_note(a, 'attn_out', 'last')})"
        )
    return Verdict(2, m.label, _combine(answers), test, "; ".join(lines) or "no middle layer")


def identity_lengths(audit: AuditResult) -> dict[str, int]:
    """Tokens of each persona phrase, from the stored prompts (the padded side's filler
    tokens taken off)."""
    out: dict[str, int] = {}
    for p in audit.prompts:
        n = len(p["identity_positions"])
        out.setdefault(p["clean_persona"], n - (p["n_filler"] if p["padded"] == "clean" else 0))
        out.setdefault(p["corrupt_persona"],
                       n - (p["n_filler"] if p["padded"] == "corrupt" else 0))
    return out


def selectivity(attention: pd.DataFrame, lengths: dict[str, int] | None = None) -> pd.DataFrame:
    """Per (category, layer, head): the category's mean identity mass over the mean of every
    other persona category's (controls and the noise floor excluded from both sides). With
    `lengths` covering every persona, mass is taken per persona token, so a longer phrase
    does not look more attended merely for having more tokens."""
    att = attention[~attention["category"].isin(["control", "noise_floor", "baseline"])].copy()
    if lengths and set(att["persona"]) <= set(lengths):
        att["identity_mass"] = att["identity_mass"] / att["persona"].map(lengths)
    mean = att.groupby(["category", "layer", "head"], as_index=False)["identity_mass"].mean()
    z = att.groupby(["category", "layer", "head"], as_index=False)["zscore"].mean()
    rows = []
    for cat, part in mean.groupby("category"):
        others = mean[mean["category"] != cat].groupby(["layer", "head"])["identity_mass"].mean()
        part = part.set_index(["layer", "head"])
        ratio = part["identity_mass"] / others.reindex(part.index)
        rows.append(pd.DataFrame({"category": cat, "selectivity": ratio}).reset_index())
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["category", "layer", "head", "selectivity"])
    return out.merge(z, on=["category", "layer", "head"], how="left")


def _top(sel: pd.DataFrame) -> pd.DataFrame:
    """Per category, its most selective head among the heads whose mass stands out across
    heads (z >= Z_HIGH), or among all heads where none does."""
    picks = []
    for _, part in sel.dropna(subset=["selectivity"]).groupby("category"):
        strong = part[part["zscore"] >= Z_HIGH]
        part = strong if not strong.empty else part
        picks.append(part.loc[part["selectivity"].idxmax()])
    return pd.DataFrame(picks).set_index("category")


def _by_control(audit: AuditResult) -> Verdict | None:
    """Claim 3 where the attention table has race but no other persona category: race's
    strongest head by its ratio to the neutral control, against the paraphrase personas'
    strongest head by the same ratio (docs/method.md's definition of disproportionate)."""
    att = audit.attention
    race = att[att["category"] == "race"]
    floor = att[att["category"] == "noise_floor"]
    if race.empty or floor.empty:
        return None
    r = race.groupby(["layer", "head"], as_index=False)[["ratio", "zscore"]].mean()
    f = floor.groupby(["layer", "head"], as_index=False)[["ratio", "zscore"]].mean()
    strong_r, strong_f = r[r["zscore"] >= Z_HIGH], f[f["zscore"] >= Z_HIGH]
    r_pick = strong_r if not strong_r.empty else r  # heads whose mass stands out, where any
    top = r_pick.loc[r_pick["ratio"].idxmax()]
    f_max = float((strong_f if not strong_f.empty else f)["ratio"].max())
    heads = r[(r["ratio"] >= SELECTIVE * f_max) & (r["zscore"] >= Z_HIGH)]
    beats = bool(top["ratio"] > f_max)
    answer = (HOLDS if not heads.empty and beats else PARTLY if beats else NOT_HERE)
    n = int(len(audit.meta.get("question_ids", [])))
    return Verdict(3, "", answer, "", (
        f"(no other persona category in the audit: ratio to the neutral control instead) race's "
        f"top head (among heads with z >= {Z_HIGH} where any) "
        f"L{int(top['layer'])}.H{int(top['head'])}: {top['ratio']:.2f}x the control's "
        f"identity mass (z {top['zscore']:+.1f}); the paraphrase personas' top head: "
        f"{f_max:.2f}x; {len(heads)} race heads at >= {SELECTIVE}x the paraphrase maximum with "
        f"z >= {Z_HIGH}. Caveat: persona phrases of more tokens collect more mass "
        f"(question-averaged masses over n={n} questions; no interval)"))


def claim_identity_heads(m: ModelAudits) -> Verdict:
    test = (f"per head, race personas' identity mass over the other persona categories' "
            f"(selectivity); race's top head against every other category's top head "
            f"(placebo); race-selective at >= {SELECTIVE}x with z >= {Z_HIGH}. Without other "
            f"categories: the ratio to the neutral control against the paraphrase personas'")
    audit = m.catalogue if m.catalogue is not None and not m.catalogue.attention.empty \
        else m.anatomy
    if audit is None or audit.attention.empty:
        return Verdict(3, m.label, UNTESTED, test, "no attention-to-identity table")
    lengths = identity_lengths(audit)
    att = audit.attention
    compared = att[~att["category"].isin(["control", "noise_floor", "baseline"])]
    per_token = bool(lengths) and set(compared["persona"]) <= set(lengths)
    sel = selectivity(audit.attention, lengths)
    if "race" not in set(sel["category"]) or sel["category"].nunique() < 2:
        fallback = _by_control(audit)
        if fallback is None:
            return Verdict(3, m.label, UNTESTED, test, "the attention table lacks race, or "
                           "both another category and the paraphrase personas")
        return Verdict(3, m.label, fallback.answer, test, fallback.evidence)
    top = _top(sel)
    race = top.loc["race"]
    placebo = top.drop(index="race")["selectivity"]
    race_heads = sel[(sel["category"] == "race") & (sel["selectivity"] >= SELECTIVE)
                     & (sel["zscore"] >= Z_HIGH)]
    beats = bool(race.selectivity > placebo.max())
    answer = (HOLDS if not race_heads.empty and beats else
              PARTLY if not race_heads.empty or beats else NOT_HERE)
    n = int(len(audit.meta.get("question_ids", [])))
    evidence = (
        f"race's most selective head (among heads with z >= {Z_HIGH} where any) "
        f"L{int(race['layer'])}.H{int(race['head'])}: {race.selectivity:.2f}x the other "
        f"categories' mass {'per persona token' if per_token else '(not per token)'} "
        f"(z {race.zscore:+.1f}); "
        f"{len(race_heads)} race heads at >= {SELECTIVE}x with z >= {Z_HIGH}; other "
        f"categories' top heads (placebo): "
        + ", ".join(f"{c} {v:.2f}x" for c, v in placebo.sort_values(ascending=False).items())
        + f" (question-averaged masses over n={n} questions; no interval: per-question masses "
        "are not stored)"
    )
    return Verdict(3, m.label, answer, test, evidence)


def _combine(answers: list[str]) -> str:
    if not answers:
        return UNTESTED
    if all(a == HOLDS for a in answers):
        return HOLDS
    if any(a in (HOLDS, PARTLY) for a in answers):
        return PARTLY
    return NOT_HERE


def verdicts(models: list[ModelAudits]) -> pd.DataFrame:
    """Every claim on every model: (claim, model, answer, test, evidence)."""
    rows = []
    for m in models:
        for fn in (claim_early_mlp, claim_middle_attention, claim_identity_heads):
            rows.append(fn(m).__dict__)
    return pd.DataFrame(rows, columns=["claim", "model", "answer", "test", "evidence"])


# -- behaviour --------------------------------------------------------------------------------


def behaviour_summary(m: ModelAudits) -> pd.DataFrame:
    """The catalogue audit's behaviour table with the model's label."""
    audit = m.catalogue or m.anatomy
    if audit is None:
        return pd.DataFrame()
    return audit.behaviour.assign(model=m.label)


def pair_summary(m: ModelAudits) -> pd.DataFrame:
    audit = m.catalogue or m.anatomy
    if audit is None:
        return pd.DataFrame()
    return audit.pairs.assign(model=m.label)


# -- figures ----------------------------------------------------------------------------------


def behaviour_figure(models: list[ModelAudits]):
    """Accuracy per persona with its 95% interval, one panel per model."""
    from governance.plots import new_figure

    shown = [m for m in models if not behaviour_summary(m).empty]
    fig, axes = new_figure(len(shown), ncols=len(shown), panel=(4.0, 6.0))
    for ax, m in zip(axes, shown, strict=True):
        b = behaviour_summary(m).iloc[::-1]
        y = np.arange(len(b))
        ax.errorbar(b["accuracy"], y, xerr=[b["accuracy"] - b["ci_low"],
                                            b["ci_high"] - b["accuracy"]],
                    fmt="o", ms=3, lw=0.8, color="tab:blue")
        base = b[b["category"] == "baseline"]["accuracy"]
        if not base.empty:
            ax.axvline(float(base.iloc[0]), color="grey", ls="--", lw=0.8, label="no persona")
        ax.axvline(0.25, color="tab:red", ls=":", lw=0.8, label="chance")
        ax.set_yticks(y, b["persona"], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"{m.label} (n={int(b['n_questions'].iloc[0])})", fontsize=9)
        ax.set_xlabel("accuracy (95% Wilson interval)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("MMLU accuracy per persona", fontsize=10)
    return fig


def anatomy_figure(models: list[ModelAudits]):
    """S per layer with its interval for mlp_out:identity and attn_out:last, persona pairs
    solid and the noise-floor pair dashed, one row per model; thirds shaded."""
    from governance.plots import new_figure

    shown = [m for m in models if m.anatomy is not None]
    sweeps = [("mlp_out", "identity"), ("attn_out", "last")]
    fig, axes = new_figure(len(shown) * 2, ncols=2, panel=(4.4, 2.6))
    for i, m in enumerate(shown):
        parts = thirds(m.n_layers)
        for j, (component, positions) in enumerate(sweeps):
            ax = axes[2 * i + j]
            ax.axvspan(parts["middle"].start - 0.5, parts["middle"].stop - 0.5,
                       color="0.93", lw=0)
            for floor in (False, True):
                rows = _sweep(m.anatomy, component, positions, floor)
                for (clean, corrupt), line in rows.groupby(["clean_persona", "corrupt_persona"]):
                    line = line.sort_values("layer")
                    ax.errorbar(line["layer"], line["score"],
                                yerr=[line["score"] - line["ci_low"],
                                      line["ci_high"] - line["score"]],
                                fmt="--" if floor else "-", marker=".", ms=3, lw=0.8,
                                capsize=0, label=f"{clean} -> {corrupt}")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{m.label}: {component}:{positions}", fontsize=8)
            ax.set_xlabel("layer (middle third shaded)", fontsize=7)
            ax.set_ylabel("S (95% CI)", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    fig.suptitle("restoration score per layer (exact; dashed: noise-floor pair)", fontsize=10)
    return fig


def heads_figure(models: list[ModelAudits]):
    """Race identity mass per head over its comparison: the other persona categories' mass,
    or the neutral control's where the audit has no other category (log2), per model."""
    from governance.plots import head_matrix, heatmap_panels

    panels = []
    for m in models:
        audit = m.catalogue if m.catalogue is not None else m.anatomy
        if audit is None or audit.attention.empty:
            continue
        sel = selectivity(audit.attention, identity_lengths(audit))
        race = sel[sel["category"] == "race"].dropna(subset=["selectivity"])
        name = f"{m.label} (vs other categories)"
        if race.empty:
            att = audit.attention
            race = (att[att["category"] == "race"].groupby(["layer", "head"], as_index=False)
                    ["ratio"].mean().rename(columns={"ratio": "selectivity"}))
            name = f"{m.label} (vs the neutral control)"
        if not race.empty:
            race = race.assign(log2=np.log2(race["selectivity"].clip(lower=1e-6)))
            panels.append((name, head_matrix(race, "log2")))
    if not panels:
        return None
    return heatmap_panels(panels, title="race identity mass per head over its comparison "
                          "(log2; outlined: the largest)", colorbar="log2 ratio", mark_max=True)


# -- the page ---------------------------------------------------------------------------------


def _table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append("" if np.isnan(v) else format(v, floatfmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(models: list[ModelAudits], figures: dict[str, str], command: str,
           preamble: str = "") -> str:
    """The findings page as Markdown."""
    v = verdicts(models)
    out = ["# Findings: the method's claims on real instruct models", "",
           f"Generated by `{command}` from the stored audits below; every number on this "
           "page is recomputed from their tables.", ""]
    if preamble:
        out += [preamble.strip(), ""]
    out += ["## The models and their audits", ""]
    for m in models:
        audits = ", ".join(f"{KINDS.get(k, k)}: `{p}`" for k, p in m.paths.items())
        if m.anatomy is None and m.catalogue is None:
            line = f"- **{m.label}**: no audit" + (f" ({audits})" if audits else "") + "."
        else:
            line = f"- **{m.label}** ({m.n_layers} layers): {audits}."
        if m.note:
            line += f" {m.note}"
        out.append(line)
    formats = [m for m in models if m.answer_formats is not None]
    if formats:
        out += ["", "## Does the prompt suit the model?", "",
                "No-persona accuracy per answer prefix (`docs/answer_formats.py`): the option "
                "mass is the probability the model puts on the four letter tokens right after "
                "the prefix; near 1, it answers with a letter there.", ""]
        for m in formats:
            out += [f"**{m.label}**", "", _table(m.answer_formats), ""]
    out += ["", "## The three claims", "",
            "| claim | " + " | ".join(m.label for m in models) + " |",
            "|---|" + "---|" * len(models)]
    for c, text in CLAIMS.items():
        cells = [v[(v["claim"] == c) & (v["model"] == m.label)]["answer"].iloc[0]
                 for m in models]
        out.append(f"| {c}. {text} | " + " | ".join(cells) + " |")
    out.append("")
    for c, text in CLAIMS.items():
        out += [f"### Claim {c}: {text}", ""]
        sub = v[v["claim"] == c]
        out += [f"Test: {sub['test'].iloc[0]}.", ""]
        for r in sub.itertuples():
            out.append(f"- **{r.model}: {r.answer}.** {r.evidence}.")
        out.append("")
    if "anatomy" in figures:
        out += [f"![restoration per layer]({figures['anatomy']})", ""]
    if "heads" in figures:
        out += [f"![race selectivity per head]({figures['heads']})", ""]
    out += ["## Behaviour per persona", "",
            "Accuracy with its Wilson 95% interval, delta against no persona, flip rate and "
            "total-variation distance of the answer distribution against no persona, McNemar "
            "p against no persona.", ""]
    if "behaviour" in figures:
        out += [f"![accuracy per persona]({figures['behaviour']})", ""]
    for m in models:
        b = behaviour_summary(m)
        if b.empty:
            continue
        out += [f"### {m.label}", "",
                _table(b[["persona", "category", "accuracy", "ci_low", "ci_high", "delta",
                          "flip_rate", "tv", "mcnemar_p", "n_questions"]]), ""]
        p = pair_summary(m)
        if not p.empty:
            audit = m.catalogue or m.anatomy
            out += ["Persona pairs against the noise floor (mean logit shift over the "
                    "paraphrase pair's; above = bootstrap 95% interval of the paired "
                    "difference excludes zero):", "",
                    _table(p[["clean_persona", "corrupt_persona", "kind", "shift_norm",
                              "floor_ratio", "above_floor", "flip_rate", "mcnemar_p",
                              "constant_share"]]), "",
                    f"{audit.meta.get('noise_floor', '')}", ""]
    return "\n".join(out) + "\n"


def write_findings(manifest: str | Path, out: str | Path, command: str) -> Path:
    """Render the page and its figures (PNG beside it, under `<out dir>/findings/`)."""
    raw = read_yaml_mapping(manifest, "findings manifest")
    models = load_manifest(manifest)
    out = Path(out)
    fig_dir = out.parent / "findings"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, fig in (("behaviour", behaviour_figure(models)),
                      ("anatomy", anatomy_figure(models)), ("heads", heads_figure(models))):
        if fig is not None:
            fig.savefig(fig_dir / f"{name}.png", dpi=90)
            figures[name] = f"findings/{name}.png"
    out.write_text(render(models, figures, command, str(raw.get("preamble", ""))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m governance.report.findings",
        description="Write the findings page (the method's claims per model, behaviour, "
                    "figures) from the stored audits a manifest names.")
    parser.add_argument("manifest", help="findings manifest YAML (models: label, catalogue, "
                                         "anatomy: audit directories relative to it)")
    parser.add_argument("--out", default="docs/findings.md", help="Markdown page to write")
    args = parser.parse_args(argv)
    command = f"python -m governance.report.findings {args.manifest} --out {args.out}"
    path = write_findings(args.manifest, args.out, command)
    print(f"wrote {path} and its figures in {path.parent / 'findings'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
