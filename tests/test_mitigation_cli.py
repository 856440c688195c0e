"""`persona-gov mitigate` end to end on a tiny planted model and a real SQLite MLflow store:
the what-if run, its two-way link with the audit run (appended, never overwriting, and only
on an audit run of ours), its artifacts, and the errors that exit 2 and write nothing."""

import copy
import hashlib
import json

import pytest
import torch

from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.mitigation import MitigationResult
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model
from governance.tracking import runs as tr
from governance.tracking.mitigation import M_AUDIT_RUN, NOTE, T_MITIGATIONS, log_mitigation
from jobs.cli.main import main

PLANTED = (2, 1)


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """A planted tiny model on disk, 16 questions, and its audit logged as a completed run."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mitigate")
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    with torch.no_grad():  # only the planted head writes into the residual stream
        for layer, block in enumerate(model.model.layers):
            w = block.self_attn.o_proj.weight
            for head in range(4):
                w[:, head * 8:(head + 1) * 8] *= 4.0 if (layer, head) == PLANTED else 0.0
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    questions = root / "q.jsonl"
    questions.write_text("".join(
        json.dumps({"question": f"Which number is prime, case {i}?", "answer_a": str(4 + i),
                    "answer_b": str(6 + i), "answer_c": str(7 + i), "answer_d": str(9 + i),
                    "correct_answer": "ABCD"[i % 4], "topic": ["math", "geo"][i % 2]}) + "\n"
        for i in range(16)))
    spec = AuditSpec(questions=str(questions), n_questions=4, bootstrap=20, attention=False,
                     pairs=[("a Black person", "a White person")], components=("head:all",))
    audit = run_audit(LoadedModel.from_model(model, tokenizer, str(root / "model")), spec,
                      progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tr.get_or_create_experiment(client, "persona-audits", str(root / "art"))
    run_id = tr.start_audit_run(client, experiment, {
        tr.T_MODEL: "tiny", tr.T_VERSION: "1", tr.T_TOOLKIT: "0", "team.note": "keep me"})
    tr.log_audit(client, run_id, audit)
    tr.finish_audit_run(client, run_id, "warn", "WARN")
    return {"root": root, "uri": uri, "client": client, "experiment": experiment,
            "audit_run": run_id, "audit": audit, "questions": questions}


def _argv(store, out, *extra):
    return ["mitigate", "--audit", f"runs:/{store['audit_run']}", "--tracking-uri",
            store["uri"], "--model", str(store["root"] / "model"), "--questions",
            str(store["questions"]), "--top-k", "1", "2", "--n-heldout", "6", "--random-seeds",
            "0", "1", "--bootstrap", "50", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def mitigated(store):
    import yaml

    from governance.judge.policy import DEFAULT_POLICY_PATH

    policy = store["root"] / "policy.yaml"
    raw = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    policy.write_text(yaml.safe_dump({**raw, "mitigation": {"localised": {"k": 1}}}))
    before = _digest(store["root"] / "model")
    code = main(_argv(store, store["root"] / "out", "--policy", str(policy)))
    return {"code": code, "weights_before": before}


def test_mitigate_writes_the_tradeoff_and_never_touches_the_model(store, mitigated):
    assert mitigated["code"] == 0
    assert _digest(store["root"] / "model") == mitigated["weights_before"]
    result = MitigationResult.load(store["root"] / "out")
    assert (store["root"] / "out" / "mitigation_tradeoff.png").stat().st_size > 1000
    assert "Mitigation what-if" in (store["root"] / "out" / "mitigation.html").read_text()
    flagged = result.curve[result.curve["selection"] == "flagged"]
    assert (flagged["shift_ratio"] < 1e-4).all()  # the planted head carries all of it
    assert set(result.meta["split"]["ranking_question_ids"]) == set(
        store["audit"].meta["question_ids"])
    assert result.meta["audit"]["source"] == f"runs:/{store['audit_run']}"
    [finding] = result.meta["policy"]["findings"]  # the planted head: localised
    assert finding["rule"] == "mitigation.localised" and finding["outcome"] == "warn"


def test_mitigation_run_and_audit_run_link_both_ways(store, mitigated):
    client = store["client"]
    audit_tags = client.get_run(store["audit_run"]).data.tags
    linked = audit_tags[T_MITIGATIONS].split(",")
    assert len(linked) == 1
    run = client.get_run(linked[0])
    assert run.data.tags[M_AUDIT_RUN] == store["audit_run"]
    assert f"runs/{store['audit_run']}" in run.data.tags[NOTE]
    assert run.info.status == "FINISHED"
    assert audit_tags["team.note"] == "keep me"
    artifacts = {f.path for d in ("plots", "tables", "report", "mitigation")
                 for f in client.list_artifacts(linked[0], d)}
    assert {"plots/tradeoff.png", "tables/tradeoff.csv", "report/mitigation.html",
            "mitigation/curve.csv", "mitigation/mitigation.json"} <= artifacts
    steps = [m.step for m in client.get_metric_history(linked[0], "flagged.shift_ratio")]
    assert sorted(steps) == [1, 2]


def test_a_second_what_if_is_appended(store, mitigated):
    client = store["client"]
    first = client.get_run(store["audit_run"]).data.tags[T_MITIGATIONS]
    result = MitigationResult.load(store["root"] / "out")
    second = log_mitigation(client, store["experiment"], result, audit_run_id=store["audit_run"])
    assert client.get_run(store["audit_run"]).data.tags[T_MITIGATIONS] == f"{first},{second}"


def test_a_registrants_run_is_never_tagged(store, mitigated):
    client = store["client"]
    foreign = client.create_run(store["experiment"], tags={"owner": "registrant"}).info.run_id
    result = MitigationResult.load(store["root"] / "out")
    run_id = log_mitigation(client, store["experiment"], result, audit_run_id=foreign)
    assert client.get_run(run_id).data.tags[M_AUDIT_RUN] == foreign
    assert T_MITIGATIONS not in client.get_run(foreign).data.tags


def test_bad_input_exits_2_and_leaves_what_was_there(store, mitigated, tmp_path, capsys):
    audit_dir = tmp_path / "audit"
    no_heads = copy.deepcopy(store["audit"])
    no_heads.scores = no_heads.scores.assign(component="mlp_out", head=None)
    no_heads.save(audit_dir)
    assert main(["mitigate", "--audit", str(audit_dir), "--model", str(store["root"] / "model"),
                 "--questions", str(store["questions"]), "--out", str(tmp_path / "o")]) == 2
    assert "no scores for ['head']" in capsys.readouterr().err
    assert main(_argv(store, tmp_path / "o2", "--model", str(tmp_path / "missing"))) == 2
    assert "missing" in capsys.readouterr().err
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(_argv(store, keep)) == 2
    assert (keep / "notes.txt").read_text() == "mine" and len(list(keep.iterdir())) == 1
    assert main(["mitigate", "--audit", str(audit_dir), "--no-mlflow"]) == 2
    assert "nowhere to write" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
