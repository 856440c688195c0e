"""The findings page (governance/report/findings.py): each claim's answer follows from the
tables it reads (edited tables move the answer), and the page is written from stored audits
only, with its figures."""

import pytest

from governance.report.findings import (
    HOLDS,
    NOT_HERE,
    PARTLY,
    UNTESTED,
    ModelAudits,
    claim_early_mlp,
    claim_identity_heads,
    claim_middle_attention,
    thirds,
)

from support.audits import copy_audit


def _set_curve(audit, component, positions, values, floor=False):
    """Overwrite one sweep's S (and a +-0.05 interval) layer by layer."""
    s = audit.scores
    sel = (s["component"] == component) & (s["positions"] == positions)
    sel &= (s["category"] == "noise_floor") if floor else (s["category"] != "noise_floor")
    for layer, value in enumerate(values):
        rows = sel & (s["layer"] == layer)
        s.loc[rows, ["score", "ci_low", "ci_high"]] = [value, value - 0.05, value + 0.05]


def _model(audit):
    return ModelAudits("tiny", audit, audit)


def test_thirds_cut_the_depth_in_three():
    assert thirds(24) == {"early": range(0, 8), "middle": range(8, 16), "late": range(16, 24)}
    assert thirds(30)["middle"] == range(10, 20)


def test_claim_1_follows_the_early_mlp_curve(tiny_audit):
    audit = copy_audit(tiny_audit)
    audit.pairs["above_floor"] = [True if k != "noise_floor" else None
                                  for k in audit.pairs["kind"]]
    # the tiny llama has 3 layers: early = layer 0, middle = layer 1, late = layer 2
    _set_curve(audit, "mlp_out", "identity", [0.6, 0.1, 0.05])
    assert claim_early_mlp(_model(audit)).answer == HOLDS
    _set_curve(audit, "mlp_out", "identity", [0.6, 0.1, 0.5])  # does not fade with depth
    assert claim_early_mlp(_model(audit)).answer == PARTLY
    _set_curve(audit, "mlp_out", "identity", [0.02, 0.5, 0.5])
    verdict = claim_early_mlp(_model(audit))
    assert verdict.answer == NOT_HERE and "early peak layer 0" in verdict.evidence


def test_claim_2_needs_the_middle_third_to_carry_the_most(tiny_audit):
    audit = copy_audit(tiny_audit)
    audit.pairs["above_floor"] = [True if k != "noise_floor" else None
                                  for k in audit.pairs["kind"]]
    _set_curve(audit, "attn_out", "last", [0.1, 0.7, 0.0])
    verdict = claim_middle_attention(_model(audit))
    assert verdict.answer == HOLDS and "middle third holds 88%" in verdict.evidence
    _set_curve(audit, "attn_out", "last", [0.9, 0.2, 0.0])
    assert claim_middle_attention(_model(audit)).answer == PARTLY  # early carries more
    _set_curve(audit, "attn_out", "last", [0.9, 0.0, 0.0])
    assert claim_middle_attention(_model(audit)).answer == NOT_HERE
    audit.pairs["above_floor"] = False
    _set_curve(audit, "attn_out", "last", [0.1, 0.7, 0.0])
    assert claim_middle_attention(_model(audit)).answer == PARTLY  # shift not above floor


def test_claim_3_compares_race_heads_with_every_other_category(tiny_audit):
    audit = copy_audit(tiny_audit)
    att = audit.attention
    att["identity_mass"] = 0.1
    att["zscore"] = 0.0
    assert claim_identity_heads(_model(audit)).answer == NOT_HERE  # no head prefers race
    hot = (att["category"] == "race") & (att["layer"] == 1) & (att["head"] == 0)
    att.loc[hot, ["identity_mass", "zscore"]] = [0.4, 3.0]
    verdict = claim_identity_heads(_model(audit))
    assert verdict.answer == HOLDS and "L1.H0: 4.00x" in verdict.evidence
    gender = (att["category"] == "gender") & (att["layer"] == 0) & (att["head"] == 1)
    att.loc[gender, "identity_mass"] = 0.9  # a placebo category beats race
    assert claim_identity_heads(_model(audit)).answer == PARTLY


def test_a_claim_without_its_sweep_is_not_tested(tiny_audit):
    audit = copy_audit(tiny_audit)
    audit.scores = audit.scores[audit.scores["component"] != "attn_out"]
    assert claim_middle_attention(_model(audit)).answer == UNTESTED
    audit.attention = audit.attention.iloc[0:0]
    assert claim_identity_heads(_model(audit)).answer == UNTESTED


def test_findings_page_is_written_from_stored_audits(tiny_audit, tmp_path):
    from governance.report.findings import main

    copy_audit(tiny_audit).save(tmp_path / "results" / "tiny")
    manifest = tmp_path / "results" / "findings.yaml"
    manifest.write_text("preamble: Tiny models only.\nmodels:\n"
                        "  - {label: tiny-llama, catalogue: tiny, anatomy: tiny}\n"
                        "  - {label: later, note: Not run.}\n")
    out = tmp_path / "findings.md"
    assert main([str(manifest), "--out", str(out)]) == 0
    page = out.read_text()
    assert "Tiny models only." in page and "| claim | tiny-llama | later |" in page
    assert "- **later**: no audit. Not run." in page
    rows = [line for line in page.splitlines() if line.startswith("| 1. ")]
    cells = [c.strip() for c in rows[0].split("|")[2:4]]
    assert len(rows) == 1 and cells[0] in (HOLDS, PARTLY, NOT_HERE) and cells[1] == UNTESTED
    acc = tiny_audit.behaviour.set_index("persona").loc["a Black person", "accuracy"]
    assert f"| a Black person | race | {acc:.3f} |" in page
    for name in ("behaviour", "anatomy", "heads"):
        assert (tmp_path / "findings" / f"{name}.png").stat().st_size > 1000


def test_manifest_without_models_is_refused(tmp_path):
    from governance.errors import ConfigError
    from governance.report.findings import load_manifest

    path = tmp_path / "findings.yaml"
    path.write_text("models: []\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_manifest(path)


def test_claim_3_without_other_categories_uses_the_control_and_the_paraphrase(tiny_audit):
    audit = copy_audit(tiny_audit)
    att = audit.attention[audit.attention["category"] != "gender"].copy()
    att["ratio"], att["zscore"] = 1.0, 0.0
    audit.attention = att
    verdict = claim_identity_heads(_model(audit))
    assert verdict.answer == NOT_HERE and "ratio to the neutral control" in verdict.evidence
    hot = (att["category"] == "race") & (att["layer"] == 2) & (att["head"] == 3)
    att.loc[hot, ["ratio", "zscore"]] = [2.0, 2.5]
    verdict = claim_identity_heads(_model(audit))
    assert verdict.answer == HOLDS and "L2.H3: 2.00x" in verdict.evidence
