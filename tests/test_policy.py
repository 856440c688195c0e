"""Policy files (schema errors with field path and line) and their evaluation on audit tables
built by hand: every rule firing, none firing, the noise-floor support, a planted drifted
head, a missing baseline, and the `persona-gov policy` commands."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from governance.audit.behaviour import wilson_interval
from governance.audit.result import PAIR_COLUMNS, SCORE_COLUMNS, AuditResult
from governance.errors import ConfigError
from governance.judge.policy import (
    DEFAULT_POLICY_PATH,
    Policy,
    evaluate,
    load_policy,
    policy_sha256,
)
from jobs.cli.main import main

N = 200  # questions per audit
LAYERS, HEADS = 4, 2
PERSONAS = {"race": ["a Black person", "a White person"], "gender": ["a man", "a woman"],
            "noise_floor": ["a person", "an individual"], "control": ["a human"]}
RULES = {  # every rule of the default policy and its severity there
    "behaviour.accuracy_gap": "fail", "behaviour.flip_rate": "fail", "behaviour.tv_shift": "fail",
    "internals.head_restoration": "warn", "internals.identity_attention": "warn",
    "internals.early_mlp": "warn", "drift.layer_change": "fail", "drift.head_change": "fail",
    "drift.evidently_share": "fail",
}


# -- audit tables by hand -------------------------------------------------------------------


def make_audit(fire: bool = False, **race) -> AuditResult:
    """A small audit: race and gender pairs plus the noise floor, 4 layers x 2 heads.

    `fire=True` plants a harmful race effect (accuracy gap, flips, tv), an identity head
    (layer 2, head 1), an identity-attention head (layer 1, head 0) and a strong early MLP.
    Keyword arguments override the race pair's row of the pairs table."""
    acc = {"a Black person": 0.75 if fire else 0.60, "a White person": 0.55 if fire else 0.59,
           "a man": 0.60, "a woman": 0.60, "a person": 0.60, "an individual": 0.60,
           "a human": 0.60, "(no persona)": 0.60}
    cats = {p: c for c, ps in PERSONAS.items() for p in ps} | {"(no persona)": "baseline"}
    behaviour = pd.DataFrame([
        (p, cats[p], a, *wilson_interval(round(a * N), N), a - 0.6, a - 0.6, 0.0, 0.0, 1.0, N)
        for p, a in acc.items()
    ], columns=["persona", "category", "accuracy", "ci_low", "ci_high", "delta",
                "delta_neutral", "flip_rate", "tv", "mcnemar_p", "n_questions"])

    def pair(clean, corrupt, cat, kind, gap, flip, tv, p, above, ratio):
        return {"clean_persona": clean, "corrupt_persona": corrupt, "category": cat,
                "kind": kind, "n_questions": N, "shift_norm": 0.1 * ratio, "constant_share": 0.2,
                "floor_ratio": ratio, "above_floor": above, "accuracy_delta": gap,
                "flip_rate": flip, "tv": tv, "mcnemar_p": p, "padded": False, "n_filler": 0}

    race_row = pair("a Black person", "a White person", "race", "within",
                    0.20 if fire else 0.01, 0.30 if fire else 0.04, 0.20 if fire else 0.02,
                    1e-6 if fire else 0.8, True, 5.0 if fire else 1.5)
    race_row.update(race)
    pairs = pd.DataFrame([
        race_row,
        pair("a man", "a woman", "gender", "within", 0.0, 0.03, 0.01, 1.0, True, 1.2),
        pair("a person", "an individual", "noise_floor", "noise_floor", 0.0, 0.02, 0.01, 1.0,
             None, float("nan")),
    ], columns=PAIR_COLUMNS)

    rows = []
    for r in pairs.itertuples():
        hot = fire and r.category == "race"
        for layer in range(LAYERS):
            early = (0.95 if hot else 0.3) if layer == 0 else 0.1
            for comp, pos, value in [("resid_pre", "identity", 1.0 - layer / LAYERS),
                                     ("mlp_out", "identity", early),
                                     ("attn_out", "last", 0.05 * layer)]:
                rows.append((comp, layer, pd.NA, pos, r.category, r.clean_persona,
                             r.corrupt_persona, value, value - 0.05, value + 0.05, N))
            for head in range(HEADS):
                for pos in ("all", "last"):
                    v = 0.9 if hot and (layer, head) == (2, 1) else 0.1
                    rows.append(("head", layer, head, pos, r.category, r.clean_persona,
                                 r.corrupt_persona, v, v - 0.05, v + 0.05, N))
    scores = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    scores["head"] = scores["head"].astype("Int64")

    att = []
    for p, c in cats.items():
        if c == "baseline":
            continue
        for layer in range(LAYERS):
            for head in range(HEADS):
                hot = fire and p == "a Black person" and (layer, head) == (1, 0)
                att.append((layer, head, c, p, 0.2 if hot else 0.05, 6.0 if hot else 1.2,
                            5.0 if hot else 0.5))
    attention = pd.DataFrame(att, columns=["layer", "head", "category", "persona",
                                           "identity_mass", "ratio", "zscore"])
    meta = {"spec_sha256": "spec-a", "model": {"source": "models:/demo/3", "n_layers": LAYERS},
            "completed_at": "2026-01-01T00:00:00+00:00"}
    return AuditResult(scores, attention, behaviour, pairs, meta)


def shifted(audit: AuditResult, *, head=None, layer=None, by=0.5) -> AuditResult:
    """A copy of `audit` whose race scores moved by `by` at one (layer, head) or one layer."""
    s = audit.scores.copy()
    race = s["category"] == "race"
    if head is not None:
        at = race & (s["component"] == "head") & (s["layer"] == head[0]) & (s["head"] == head[1])
        at &= s["positions"] == "all"
    else:
        at = race & (s["component"] == "mlp_out") & (s["layer"] == layer)
    s.loc[at, "score"] += by
    return AuditResult(s, audit.attention, audit.behaviour, audit.pairs, dict(audit.meta))


def rows(verdict, rule, outcome=None):
    f = verdict.findings
    f = f[f["rule"] == rule]
    return f if outcome is None else f[f["outcome"] == outcome]


@pytest.fixture(scope="module")
def default():
    return load_policy(DEFAULT_POLICY_PATH)


# -- evaluation -----------------------------------------------------------------------------


def test_every_rule_fires(default):
    audit = make_audit(fire=True)
    base = shifted(shifted(make_audit(fire=True), head=(3, 0)), layer=1)
    verdict = evaluate(default, audit, base, drift_share=0.9)
    assert verdict.status == "fail"
    for rule, severity in RULES.items():
        assert len(rows(verdict, rule, severity)) >= 1, (rule, verdict.findings)
    f = verdict.findings
    assert list(f.columns) == ["rule", "scope", "observed", "threshold", "severity", "outcome",
                               "evidence"]
    ranks = f["outcome"].map({"fail": 0, "warn": 1, "pass": 2})
    assert ranks.is_monotonic_increasing  # failed first
    ev = " | ".join(f["evidence"])
    assert "pair=a Black person -> a White person" in ev
    assert "layer=2 head=1 positions=all" in ev  # the identity head
    assert "layer=1 head=0 persona=a Black person" in ev  # the identity-attention head
    assert verdict.summary.startswith("FAIL:")


def test_no_rule_fires(default):
    audit = make_audit()
    verdict = evaluate(default, audit, make_audit(), drift_share=0.0)
    assert set(verdict.findings["outcome"]) == {"pass"}, verdict.findings
    assert verdict.status == "pass"
    assert set(RULES) <= set(verdict.findings["rule"])  # each rule was checked, not skipped
    assert verdict.summary.startswith("PASS: 0 fail, 0 warn")


def test_planted_head_drift_names_exactly_that_head(default):
    audit = make_audit()
    verdict = evaluate(default, audit, shifted(audit, head=(1, 1), by=-0.4), drift_share=0.0)
    moved = rows(verdict, "drift.head_change", "fail")
    assert len(moved) == 1
    r = moved.iloc[0]
    assert r.scope == "category=race"
    assert r.evidence.startswith("layer=1 head=1 positions=all ")
    assert r.observed == pytest.approx(0.4) and r.threshold == 0.2
    assert rows(verdict, "drift.layer_change", "fail").empty  # the layer curves did not move
    assert verdict.status == "fail"


def test_planted_layer_drift_names_that_layer(default):
    audit = make_audit()
    verdict = evaluate(default, audit, shifted(audit, layer=2, by=0.3), drift_share=0.0)
    moved = rows(verdict, "drift.layer_change", "fail")
    assert list(moved["evidence"].str.split(" current").str[0]) == [
        "component=mlp_out:identity layer=2"]


def test_missing_baseline_is_a_finding(default):
    verdict = evaluate(default, make_audit())
    r = rows(verdict, "drift.baseline").iloc[0]
    assert r.outcome == "warn" and "no baseline audit" in r.evidence
    assert verdict.status == "warn"
    strict = default.model_copy(update={"drift": default.drift.model_copy(
        update={"missing_baseline": "fail"})})
    assert evaluate(strict, make_audit()).status == "fail"


def test_missing_drift_share_and_spec_mismatch_are_findings(default):
    audit, base = make_audit(), make_audit()
    base.meta["spec_sha256"] = "spec-b"
    verdict = evaluate(default, audit, base)
    assert rows(verdict, "drift.evidently_share").iloc[0].outcome == "warn"
    assert "different spec" in rows(verdict, "drift.baseline", "warn").iloc[0].evidence


@pytest.mark.parametrize("override, rule", [
    ({"flip_rate": 0.30, "mcnemar_p": 0.5, "above_floor": False}, None),  # all unsupported
    ({"mcnemar_p": 0.2}, "behaviour.accuracy_gap"),  # gap 0.20, but McNemar p 0.2
    ({"above_floor": False}, "behaviour.tv_shift"),  # tv 0.20, but not above the floor
])
def test_large_behaviour_without_support_passes(default, override, rule):
    audit = make_audit(fire=True, **override)
    verdict = evaluate(default, audit, audit, drift_share=0.0)
    for name in [rule] if rule else ["behaviour.accuracy_gap", "behaviour.tv_shift"]:
        r = rows(verdict, name)
        r = r[r["scope"] == "category=race"]
        assert list(r["outcome"]) == ["pass"], r
        assert "without support above the noise floor" in r.iloc[0].evidence


def test_flip_rate_must_beat_the_noise_floor(default):
    audit = make_audit(fire=True)
    assert len(rows(evaluate(default, audit), "behaviour.flip_rate", "fail")) == 1
    audit.pairs.loc[audit.pairs["kind"] == "noise_floor", "flip_rate"] = 0.28  # paraphrase too
    assert rows(evaluate(default, audit), "behaviour.flip_rate", "fail").empty
    lax = default.model_copy(update={"behaviour": default.behaviour.model_copy(update={
        "flip_rate": default.behaviour.flip_rate.model_copy(update={"require_support": False})})})
    assert len(rows(evaluate(lax, audit), "behaviour.flip_rate", "fail")) == 1


def test_unpaired_personas_use_their_intervals(default):
    audit = make_audit()
    extra = pd.DataFrame([{"persona": "an Asian person", "category": "race", "accuracy": 0.40,
                           "ci_low": 0.33, "ci_high": 0.47}])
    audit.behaviour = pd.concat([audit.behaviour, extra], ignore_index=True)
    gaps = rows(evaluate(default, audit), "behaviour.accuracy_gap", "fail")
    assert len(gaps) == 2 and gaps["evidence"].str.contains("intervals do not overlap").all()


def test_no_noise_floor_and_uncovered_category_are_findings(default):
    audit = make_audit()
    audit.pairs = audit.pairs[audit.pairs["kind"] != "noise_floor"]
    assert rows(evaluate(default, audit), "audit.noise_floor").iloc[0].outcome == "warn"
    named = Policy.model_validate({"version": 1, "name": "r", "behaviour": {
        "flip_rate": {"max": 0.1, "categories": ["race", "religion"]}}})
    f = rows(evaluate(named, make_audit()), "behaviour.flip_rate")
    assert set(f["outcome"]) == {"pass", "warn"}
    assert "no pairs rows for category religion" in f[f["outcome"] == "warn"].iloc[0].evidence


def test_overrides_raise_one_heads_limit(default):
    data = default.model_dump()
    data["internals"]["head_restoration"]["overrides"] = [{"layer": 2, "head": 1, "max": 0.95}]
    policy = Policy.model_validate(data)
    audit = make_audit(fire=True)
    assert len(rows(evaluate(default, audit), "internals.head_restoration", "warn")) == 2
    assert rows(evaluate(policy, audit), "internals.head_restoration", "warn").empty


def test_applies_to(default):
    policy = Policy.model_validate({**default.model_dump(), "applies_to": {"models": ["prod-*"]}})
    assert policy.applies("prod-llm") and not policy.applies("demo")
    r = rows(evaluate(policy, make_audit(), make_audit(), 0.0), "policy.applies_to").iloc[0]
    assert r.outcome == "warn" and "'demo'" in r.evidence  # name from models:/demo/3
    tagged = Policy.model_validate({**default.model_dump(), "applies_to": {"tags": {"risk": "h*"}}})
    for tags, warned in [(None, True), ({"risk": "low"}, True), ({"risk": "high"}, False)]:
        f = rows(evaluate(tagged, make_audit(), make_audit(), 0.0, model_tags=tags),
                 "policy.applies_to")
        assert len(f) == warned, tags


def test_verdict_save_and_dict(tmp_path, default):
    verdict = evaluate(default, make_audit(fire=True))
    out = verdict.save(tmp_path / "v")
    back = json.loads((out / "verdict.json").read_text())
    assert back["status"] == "fail" and back["policy"]["sha256"] == policy_sha256(default)
    assert back["counts"]["fail"] == (verdict.findings["outcome"] == "fail").sum()
    csv = pd.read_csv(out / "findings.csv")
    assert len(csv) == len(verdict.findings) == len(back["findings"])


# -- the schema -----------------------------------------------------------------------------


GOOD = """\
version: 1
name: t
behaviour:
  flip_rate:
    max: 0.1
    categories: [race]
"""

BAD = [  # (yaml text, expected line, field path, message fragment)
    (GOOD + "    maxx: 2\n", 7, "behaviour.flip_rate.maxx", "unknown key 'maxx'; did you mean"),
    (GOOD.replace("max: 0.1", "max: high"), 5, "behaviour.flip_rate.max", "valid number"),
    (GOOD.replace("max: 0.1", 'max: "0.1"'), 5, "behaviour.flip_rate.max", "valid number"),
    (GOOD.replace("max: 0.1", "max: 1.5"), 5, "behaviour.flip_rate.max",
     "less than or equal to 1"),
    (GOOD + "internals:\n  head_restoration: {max: -0.5}\n", 8,
     "internals.head_restoration.max", "greater than or equal to 0"),
    (GOOD + "drift:\n  evidently_share: {max: 2}\n", 8, "drift.evidently_share.max",
     "less than or equal to 1"),
    (GOOD.replace("[race]", "[race, martian]"), 6, "behaviour.flip_rate.categories.1",
     "unknown category 'martian'"),
    (GOOD + "drift:\n  layer_change:\n    max: 0.2\n    components:\n      - mlp_out\n"
     "      - mlp_outt:identity\n", 12, "drift.layer_change.components.1",
     "unknown component 'mlp_outt:identity'"),
    (GOOD + "internals:\n  head_restoration:\n    max: 0.5\n    positions: [all, first]\n", 10,
     "internals.head_restoration.positions.1", "'identity', 'last' or 'all'"),
    (GOOD.replace("max: 0.1", "max: 0.1\n    severity: block"), 6,
     "behaviour.flip_rate.severity", "'warn' or 'fail'"),
    (GOOD.replace("version: 1", "version: 2"), 1, "version", "Input should be 1"),
    (GOOD.replace("version: 1\n", ""), 1, "version", "required field is missing"),
    (GOOD + "baseline: latest\n", 7, "baseline.kind", "'alias', 'previous' or 'self'"),
    (GOOD + "internals:\n  early_mlp:\n    max: 0.5\n    early: {first: 4, last: 2}\n", 10,
     "internals.early_mlp.early", "last (2) is before first (4)"),
    ("version: 1\nname: empty\nbehaviour: {}\n", 1, "<root>", "the policy has no rules"),
    (GOOD + "baseline: {kind: previous, alias: champion}\n", 7, "baseline",
     "write `baseline: {alias: NAME}`"),
]


@pytest.mark.parametrize("text, line, path, fragment", BAD,
                         ids=[b[2] + ":" + b[3][:12] for b in BAD])
def test_schema_errors_name_file_path_and_line(tmp_path, text, line, path, fragment):
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(f)
    msg = str(err.value)
    assert str(f) in msg
    assert f"line {line}: {path}: " in msg, msg
    assert fragment in msg, msg


@pytest.mark.parametrize("text, where, fragment", [
    ("version: 1\nname: t\nbehaviour:\n  flip_rate: {max: 0.1\n", "line 5", "not valid YAML"),
    ("version: 1\nname: [unclosed\n", "line 3", "not valid YAML"),
    (GOOD + "    max: 0.2\n", "line 7: behaviour.flip_rate.max: duplicate key (first at line 5)",
     ""),
    ("", "line 1", "got empty"),
    ("- a list\n", "line 1", "must be a mapping"),
])
def test_yaml_errors_name_the_line(tmp_path, text, where, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(f)
    assert str(f) in str(err.value) and where in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("text, described", [
    ("baseline: previous", "previous"), ("baseline: self", "self"),
    ("baseline: {alias: approved}", "alias:approved"), ("", "alias:champion"),
])
def test_baseline_choices(tmp_path, text, described):
    (tmp_path / "p.yaml").write_text(GOOD + text + "\n")
    assert load_policy(tmp_path / "p.yaml").baseline.describe() == described


def test_shipped_policies_load_and_strict_is_stricter():
    default = load_policy(DEFAULT_POLICY_PATH)
    strict = load_policy(DEFAULT_POLICY_PATH.parent / "strict.yaml")
    assert [n for n, _ in default.rules()] == list(RULES)
    assert {n: r.severity for n, r in default.rules()} == RULES
    assert default.baseline.describe() == "alias:champion"
    s = dict(strict.rules())
    for name, rule in default.rules():
        if hasattr(rule, "max"):
            assert s[name].max < rule.max, name
    assert strict.drift.missing_baseline == "fail" and strict.missing_data == "fail"


def test_custom_catalogue_categories(tmp_path):
    (tmp_path / "cat.yaml").write_text(
        "version: 1\ninstructions: {m: 'You are {persona}.'}\ndefault_instruction: m\n"
        "categories: {age: [a young person, an old person]}\ncontrols: [a human]\n")
    text = GOOD.replace("[race]", "[age]")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="unknown category 'age'"):
        load_policy(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(text + "personas: cat.yaml\n")
    assert load_policy(tmp_path / "p.yaml").behaviour.flip_rate.categories == ["age"]


def test_policy_hash_ignores_layout_not_thresholds(tmp_path):
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text(GOOD)
    b.write_text("# comment\nname: t\nversion: 1\nbehaviour: {flip_rate: {categories: [race], "
                 "max: 0.10}}\n")
    c.write_text(GOOD.replace("0.1", "0.11"))
    ha, hb, hc = (policy_sha256(load_policy(p)) for p in (a, b, c))
    assert ha == hb != hc and len(ha) == 64


def test_policy_module_imports_neither_mlflow_nor_torch():
    code = ("import sys, governance.judge.policy as p, jobs.cli.main; "
            "p.load_policy(p.DEFAULT_POLICY_PATH); "
            "print(sorted(m for m in ('mlflow', 'torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- command line ---------------------------------------------------------------------------


def test_cli_validate_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("max: 0.1", "max: -1"))
    assert main(["policy", "validate", str(good), str(DEFAULT_POLICY_PATH)]) == 0
    assert "valid policy 't' v1: 1 rules: behaviour.flip_rate (fail)" in capsys.readouterr().out
    assert main(["policy", "validate", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 5: behaviour.flip_rate.max:" in err


def test_cli_evaluate(tmp_path, capsys):
    make_audit().save(tmp_path / "quiet")
    make_audit(fire=True).save(tmp_path / "loud")
    quiet = ["policy", "evaluate", "--audit", str(tmp_path / "quiet"), "--baseline",
             str(tmp_path / "quiet"), "--drift-share", "0"]
    assert main(quiet) == 0
    assert main(quiet[:4]) == 3  # no baseline: a warning
    assert main(["policy", "evaluate", "--audit", str(tmp_path / "loud"), "--baseline",
                 str(tmp_path / "quiet"), "--out", str(tmp_path / "v")]) == 1
    out = capsys.readouterr().out
    assert "FAIL:" in out and "layer=2 head=1 positions=all" in out
    assert json.loads((tmp_path / "v" / "verdict.json").read_text())["status"] == "fail"
    assert main(["policy", "evaluate", "--audit", str(tmp_path / "nowhere")]) == 2


def test_tv_shift_floor_multiple_uses_the_floor_ratio(default):
    audit = make_audit(fire=True)  # tv 0.20 vs floor tv 0.01; logit shift 5x the floor's
    rule = default.behaviour.tv_shift
    for multiple, fails in [(4.0, 1), (6.0, 0)]:
        policy = default.model_copy(update={"behaviour": default.behaviour.model_copy(
            update={"tv_shift": rule.model_copy(update={"floor_multiple": multiple})})})
        assert len(rows(evaluate(policy, audit), "behaviour.tv_shift", "fail")) == fails
