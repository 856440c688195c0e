"""Drift between audits: a planted per-head or per-layer change is named exactly, Evidently's
drift share responds to a moved grid, files are written, and the CLI reads directories and
MLflow runs (runs:/<id>, artifacts under audit/) from a real SQLite tracking store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from governance.audit.result import AuditResult
from governance.audit.spec import AuditSpec
from governance.errors import ConfigError, DriftError
from governance.judge.drift import drift_report
from governance.models.tiny import tiny_questions
from governance.tracking.runs import load_audit
from jobs.cli.main import main

from support.audits import copy_audit, run_tiny_audit

# not the shared `tiny_audit`: head:last as well, so that moving the head:all grid is seen to
# drift that column alone
SPEC = AuditSpec(
    n_questions=6,
    pairs=[("a Black person", "a White person"), ("a man", "a woman")],
    components=("mlp_out:identity", "attn_out:last", "head:all", "head:last"),
    bootstrap=50,
)


@pytest.fixture(scope="module")
def audit(tokenizer) -> AuditResult:
    return run_tiny_audit(tokenizer, SPEC, questions=tiny_questions(6))


def test_planted_head_change_is_named_exactly(audit, tmp_path):
    baseline = copy_audit(audit)
    s = baseline.scores
    planted = (s["component"] == "head") & (s["layer"] == 1) & (s["head"] == 2)
    baseline.scores.loc[planted, "score"] -= 0.4
    drift = drift_report(audit, baseline, tmp_path)

    top = drift.top_changes.iloc[0]
    assert (top["level"], int(top["layer"]), int(top["head"])) == ("head", 1, 2)
    assert top["change"] == pytest.approx(0.4)
    moved = drift.top_changes[drift.top_changes["abs_change"] > 1e-9]
    assert set(zip(moved["layer"], moved["head"], strict=True)) == {(1, 2)}
    assert (moved["level"] == "head").all()
    assert drift.max_change("head")["head"] == 2
    assert drift.max_change("layer")["change"] == pytest.approx(0.0)

    saved = json.loads((tmp_path / "drift.json").read_text())
    assert (saved["max_head_change"]["layer"], saved["max_head_change"]["head"]) == (1, 2)
    csv = pd.read_csv(tmp_path / "drift_changes.csv")
    assert list(csv["abs_change"]) == sorted(csv["abs_change"], reverse=True)
    assert (int(csv["layer"].iloc[0]), int(csv["head"].iloc[0])) == (1, 2)
    for name in ("head_change.png", "layer_curves.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "evidently_drift.html").stat().st_size > 100_000
    assert set(drift.files) >= {"evidently_html", "evidently_json", "head_change",
                                "layer_curves", "changes", "summary"}
    assert all(p.parent == tmp_path and p.exists() for p in drift.files.values())
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.drift-*"))  # temp dir cleaned


def test_identical_audits_do_not_drift(audit, tmp_path):
    drift = drift_report(audit, copy_audit(audit), tmp_path)
    assert drift.drift_share == 0.0
    assert drift.top_changes["abs_change"].max() == pytest.approx(0.0)
    assert drift.behaviour_changes["abs_change"].max() == pytest.approx(0.0)
    assert drift.notes == []


def test_shifted_grid_drifts_in_evidently_with_the_chosen_method(audit, tmp_path):
    """Moving one category's whole head:all grid drifts that Evidently column (wasserstein,
    not a KS p-value), and a per-layer change shows up as a layer row."""
    baseline = copy_audit(audit)
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["positions"] == "all")
                        & (s["category"] == "race"), "score"] += 1.0
    baseline.scores.loc[(s["component"] == "mlp_out") & (s["layer"] == 2), "score"] += 0.2
    drift = drift_report(audit, baseline, tmp_path)
    assert drift.tables["heads"]["drifted_columns"] == ["all:race"]
    assert drift.tables["layers"]["drifted_columns"] != []
    assert drift.drift_share > 0
    assert drift.tables["heads"]["method"] == "wasserstein"
    evidently = (tmp_path / "evidently_drift.json").read_text()
    assert "method=wasserstein" in evidently and "method=ks" not in evidently
    layer_rows = drift.top_changes[drift.top_changes["level"] == "layer"]
    assert (layer_rows.iloc[0]["component"], int(layer_rows.iloc[0]["layer"])) == ("mlp_out", 2)


def test_partial_overlap_is_noted_and_nothing_shared_is_an_error(audit, tmp_path):
    baseline = copy_audit(audit)
    baseline.scores = baseline.scores[baseline.scores["layer"] != 2]
    baseline.meta["spec_sha256"] = "0" * 64
    drift = drift_report(audit, baseline, tmp_path / "a")
    assert any("different specs" in n for n in drift.notes)
    assert any(n.startswith("layers: ") and "only in the current" in n for n in drift.notes)
    assert (drift.top_changes["layer"] != 2).all()

    alien = copy_audit(audit)
    for table in (alien.scores, alien.behaviour):
        table["category"] = "other"
    with pytest.raises(DriftError, match="not comparable"):
        drift_report(audit, alien, tmp_path / "b")
    with pytest.raises(ConfigError, match="drift method 'ks_p' is not one of"):
        drift_report(audit, audit, tmp_path / "c", method="ks_p")
    with pytest.raises(ConfigError, match="threshold must be a positive number"):
        drift_report(audit, audit, tmp_path / "c", threshold=-1)


def test_cli_on_directories_and_bad_sources(audit, tmp_path, capsys):
    baseline = copy_audit(audit)
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["layer"] == 0) & (s["head"] == 3),
                        "score"] += 0.5
    audit.save(tmp_path / "cur")
    baseline.save(tmp_path / "base")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier file")
    rc = main(["drift", "--current", str(tmp_path / "cur"), "--baseline",
               str(tmp_path / "base"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "L0.H3" in printed.split("largest changes")[1].splitlines()[1]
    assert (tmp_path / "out" / "drift.json").exists()
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier file"

    rc = main(["drift", "--current", str(tmp_path / "nope"), "--baseline",
               str(tmp_path / "base"), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither an audit directory" in err and "nope" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "scores.csv").write_text("component\n")
    rc = main(["drift", "--current", str(tmp_path / "half"), "--baseline",
               str(tmp_path / "base"), "--out", str(tmp_path / "out2")])
    assert rc == 2 and "not a complete audit directory" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_runs_uri_downloads_the_audit_artifacts(audit, tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("drift", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp).info.run_id
    audit.save(tmp_path / "audit")
    client.log_artifacts(run, str(tmp_path / "audit"), "audit")

    loaded = load_audit(f"runs:/{run}", tracking_uri=uri,
                               download_dir=tmp_path / "dl")
    pd.testing.assert_frame_equal(loaded.scores, audit.scores, check_dtype=False)
    assert loaded.meta["spec_sha256"] == audit.meta["spec_sha256"]

    rc = main(["drift", "--current", f"runs:/{run}", "--baseline", f"runs:/{run}/audit",
               "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert np.isclose(json.loads((tmp_path / "out" / "drift.json").read_text())["drift_share"],
                      0.0)

    rc = main(["drift", "--current", "runs:/0123456789abcdef", "--baseline", f"runs:/{run}",
               "--tracking-uri", uri, "--out", str(tmp_path / "out3")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot download the audit artifacts of 'runs:/0123456789abcdef'" in err
    rc = main(["drift", "--current", f"runs:/{run}/elsewhere", "--baseline", f"runs:/{run}",
               "--tracking-uri", uri, "--out", str(tmp_path / "out3")])
    assert rc == 2 and "artifact path 'elsewhere'" in capsys.readouterr().err


def test_columns_differing_only_in_float_noise_do_not_break_evidently(tmp_path):
    """A head whose score moves by 1e-17 between audits (float noise) must not crash the
    histogram binning of Evidently: it is no change."""
    import numpy as np

    from governance.judge.drift import evidently_drift

    base = pd.DataFrame({"a": np.linspace(0, 1, 35), "b": np.full(35, 0.7)})
    cur = base.copy()
    cur["b"] = 0.7 + (np.arange(35) % 7 - 3) * np.spacing(0.7)  # +-3 ulp: binning fails
    share, distances, files = evidently_drift(cur, base, tmp_path, "wasserstein", 0.1)
    assert share == 0.0
    assert distances["b"] == pytest.approx(0.0, abs=1e-9)
    assert files["evidently_html"].exists()
