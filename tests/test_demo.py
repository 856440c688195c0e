"""`persona-gov demo` end to end on a tiny model (assets overridden; the asset fetcher itself
is tested in tests/test_assets.py)."""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from governance.models.tiny import tiny_model
from jobs.cli.main import main

PLANT = ("2", "1", "8")  # layer, head, scale


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tokenizer):
    import mlflow

    root = tmp_path_factory.mktemp("demo")
    model_dir = root / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    questions = root / "q.jsonl"
    questions.write_text("".join(
        json.dumps({"question": f"Which number is prime, case {i}?", "answer_a": str(4 + i),
                    "answer_b": str(6 + i), "answer_c": str(7 + i), "answer_d": str(9 + i),
                    "correct_answer": "ABCD"[i % 4], "topic": ["math", "geo"][i % 2]}) + "\n"
        for i in range(12)))  # the audit samples 6; the mitigation what-if holds out the rest
    argv = ["demo", "--dir", str(root / "store"), "--model", str(model_dir), "--questions",
            str(questions), "--n-questions", "6", "--plant-layer", PLANT[0], "--plant-head",
            PLANT[1], "--plant-scale", PLANT[2]]
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(argv)
    after = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    client = mlflow.MlflowClient(f"sqlite:///{root / 'store' / 'mlflow.db'}")
    return {"root": root, "argv": argv, "code": code, "client": client,
            "uris": (before, after), "out": out.getvalue()}


def test_demo_leaves_the_process_mlflow_uri_as_it_was(demo):
    """The demo points MLflow at its store only while it registers and audits; pinning the
    default afterwards made later MLflow calls in the process write ./mlflow.db."""
    before, after = demo["uris"]
    assert after == before


def test_demo_registers_two_audited_versions(demo, capsys):
    client = demo["client"]
    assert demo["code"] == 0
    versions = {str(v.version): client.get_model_version("persona-demo", v.version)
                for v in client.search_model_versions("name = 'persona-demo'")}
    assert set(versions) == {"1", "2"}
    assert str(client.get_model_version_by_alias("persona-demo", "champion").version) == "1"
    v2 = versions["2"]
    assert v2.tags["persona_demo.planted_layer"] == PLANT[0]
    assert v2.tags["persona_demo.planted_head"] == PLANT[1]
    for v in versions.values():
        assert v.tags["persona_audit.status"] in {"pass", "warn", "fail"}
        assert v.tags["persona_audit.run_id"]
    # the champion is its own baseline: no drift, and no "missing baseline" warning
    assert versions["1"].tags["persona_audit.status"] == "pass"
    assert versions["2"].tags["persona_audit.status"] == "fail"  # flagged: the planted drift


def test_demo_ends_with_the_table(demo):
    """One row per version: verdict, policy, the first failing rule and where it points,
    then the report page to open next (a file of the local store)."""
    out = demo["out"]
    table = out[out.index("version  "):].splitlines()
    rows = {line.split()[1]: line.split() for line in table if line.startswith("persona-demo")}
    assert rows["v1"][2:4] == ["PASS", "default"], table
    assert rows["v2"][2:4] == ["FAIL", "default"], table
    # the first failing rule points at the planted layer, or (when the planted head moves the
    # answers enough) at the persona pair whose answers it moved; either way the per-head
    # change names the planted head
    v2 = next(line for line in table if line.startswith("persona-demo v2"))
    assert f" L{PLANT[0]}" in v2 or "a Black person -> a White person" in v2, table
    assert f"largest per-head change of v2 against the champion: L{PLANT[0]}.H{PLANT[1]} " \
        in out, out
    reports = [line.split("next: ")[1] for line in table if "next: " in line]
    assert len(reports) == 2 and all(Path(p).name == "report.html" and Path(p).is_file()
                                     for p in reports), reports


def test_drift_names_the_planted_head(demo):
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    client = demo["client"]
    run_id = client.get_model_version("persona-demo", "2").tags["persona_audit.run_id"]
    path = download_artifacts(run_id=run_id, artifact_path="drift/drift_changes.csv",
                              tracking_uri=client.tracking_uri)
    heads = pd.read_csv(path)
    heads = heads[heads["level"] == "head"]
    top = heads.iloc[0]
    assert (str(int(top["layer"])), str(int(top["head"]))) == PLANT[:2]
    findings = pd.read_csv(download_artifacts(run_id=run_id,
                                              artifact_path="verdict/findings.csv",
                                              tracking_uri=client.tracking_uri))
    failed = findings[findings["outcome"] == "fail"]
    assert failed["evidence"].astype(str).str.contains(
        f"layer={PLANT[0]} head={PLANT[1]}").any()


def test_second_run_reuses_everything(demo, capsys):
    capsys.readouterr()
    assert main(demo["argv"]) == 0
    out = capsys.readouterr().out
    assert "up-to-date" in out and "2 up-to-date" in out
    client = demo["client"]
    assert len(client.search_model_versions("name = 'persona-demo'")) == 2


def test_mitigation_what_if_undoes_the_plant(demo):
    """The demo's last step: v2's top-ranked head switched off on held-out questions, logged
    as a run linked to v2's audit run, lowers v2's persona shift."""
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    client = demo["client"]
    audit_run = client.get_model_version("persona-demo", "2").tags["persona_audit.run_id"]
    [what_if] = client.get_run(audit_run).data.tags["persona_audit.mitigation_runs"].split(",")
    assert client.get_run(what_if).data.tags["persona_mitigation.audit_run_id"] == audit_run
    curve = pd.read_csv(download_artifacts(run_id=what_if, artifact_path="mitigation/curve.csv",
                                           tracking_uri=client.tracking_uri))
    flagged = curve[curve["selection"] == "flagged"].iloc[0]
    assert flagged["components"] == f"L{PLANT[0]}.H{PLANT[1]}"
    unablated = curve[curve["selection"] == "none"].iloc[0]
    assert flagged["shift"] < unablated["shift"]
