"""governance.tracking.runs against a real SQLite tracking store: metric keys, batching, the
logged run, load_audit, finding completed audits, and the approval record."""

from __future__ import annotations

import pandas as pd
import pytest

from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model, tiny_questions
from governance.tracking import runs as tr
from governance.tracking.registry import record_approval

SPEC = AuditSpec(
    n_questions=4,
    pairs=[("a Black person", "a White person"), ("a man", "a woman")],
    components=("resid_pre:identity", "mlp_out:all", "head:all", "head:last"),
    bootstrap=20,
)


@pytest.fixture(scope="module")
def result(tokenizer):
    qs = tiny_questions(4, subjects=("math",))
    import torch

    model = tiny_model("llama", vocab_size=len(tokenizer))
    loaded = LoadedModel.from_model(model, tokenizer, "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest on a shared host
    try:
        return run_audit(loaded, SPEC, questions=qs, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); tests use own names."""
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('tracking')}/mlflow.db")


@pytest.fixture(scope="module")
def experiment(client, tmp_path_factory):
    art = tmp_path_factory.mktemp("art")
    exp = tr.get_or_create_experiment(client, "persona-audits", str(art))
    assert tr.get_or_create_experiment(client, "persona-audits") == exp  # found, not created
    return exp


@pytest.mark.parametrize(("parts", "key"), [
    (("mlp_out", "identity", "race"), "mlp_out.identity.race"),
    (("head", "all", "gender/sex"), "head.all.gender_sex"),
    (("accuracy_gap", "religión (é)"), "accuracy_gap.religi_n ___"),
    (("x", "a:b;c"), "x.a_b_c"),
])
def test_metric_key(parts, key):
    assert tr.metric_key(*parts) == key


def test_metric_key_length_capped():
    assert len(tr.metric_key("a" * 300, "b")) == 250


@pytest.mark.parametrize("value", ["tiny", "o'brien", 'say "hi"', """a'b"c""", "50%_off"])
def test_filters_match_exactly_whatever_the_quotes(client, experiment, value):
    """MLflow's filters have no escape character: a value with quotes is matched by LIKE and
    kept only on an exact match, so a look-alike name never stands in for it."""
    twin = value.replace("'", "x").replace('"', "x").replace("%", "x")
    for name in (value, twin):
        run = tr.start_audit_run(client, experiment, {tr.T_MODEL: name, tr.T_VERSION: "1"})
        tr.finish_audit_run(client, run, "pass", "PASS")
    found = tr.audit_runs(client, [experiment], value, "1")
    assert found and {r.data.tags[tr.T_MODEL] for r in found} == {value}


def test_curves_and_summaries(result):
    curves = tr.curve_metrics(result)
    keys = {k for k, _, _ in curves}
    # heads are not curves; every other component x positions x category is
    assert keys == {f"{c}.{p}.{cat}" for c, p in [("resid_pre", "identity"), ("mlp_out", "all")]
                    for cat in ("race", "gender", "noise_floor")}
    assert sorted(s for k, _, s in curves if k == "mlp_out.all.race") == [0, 1, 2]
    summary = tr.summary_metrics(result)
    grid = tr.head_grid(result)
    race = grid[grid["category"] == "race"]["score"].abs().max()
    assert summary["head_score_max_abs.race"] == pytest.approx(race)
    b = result.behaviour[result.behaviour["category"] == "gender"]
    assert summary["accuracy_gap.gender"] == pytest.approx(b["accuracy"].max()
                                                           - b["accuracy"].min())
    real = result.pairs[result.pairs["kind"] != "noise_floor"]
    assert summary["persona_shift_mean"] == pytest.approx(real["shift_norm"].mean())
    assert "noise_floor_shift" in summary and "audit_time_s.total" in summary


def test_log_metrics_batches_at_most_1000(client, experiment):
    run_id = tr.start_audit_run(client, experiment, {"t": "1"})
    sizes = []
    real = client.log_batch

    def recording(run_id, metrics=(), **kw):  # the real call, with its batch size noted
        sizes.append(len(metrics))
        return real(run_id, metrics=metrics, **kw)

    client.log_batch = recording
    n = tr.log_metrics(client, run_id, ((f"m{i % 5}", float(i), i // 5) for i in range(2500)))
    assert n == 2500 and sizes == [1000, 1000, 500]
    assert len(client.get_metric_history(run_id, "m3")) == 500


def test_log_and_load_audit(client, experiment, result, tmp_path):
    run_id = tr.start_audit_run(client, experiment, {tr.T_MODEL: "logged", tr.T_VERSION: "1"})
    tr.log_audit(client, run_id, result, spec_text="n_questions: 4\n",
                 policy_text="version: 1\n", policy_resolved={"name": "p"},
                 extra_artifacts={"notes": _write(tmp_path / "note.txt", "hello")})
    run = client.get_run(run_id)
    assert run.data.tags[tr.T_STATE] == "running"  # not an audit until finish_audit_run
    assert run.data.params["spec.bootstrap"] == "20"
    assert sorted(m.step for m in client.get_metric_history(run_id, "resid_pre.identity.race")) \
        == [0, 1, 2]
    paths = {a.path for d in ("audit", "heads", "plots", "spec", "policy", "notes")
             for a in client.list_artifacts(run_id, d)}
    assert {"audit/scores.csv", "audit/audit.json", "audit/prompts.jsonl", "heads/race.csv",
            "heads/gender.csv", "plots/heads_race.png", "plots/layer_curves.png",
            "spec/spec.yaml", "spec/spec.resolved.yaml", "policy/policy.yaml",
            "policy/policy.resolved.json", "notes/note.txt"} <= paths
    png = client.download_artifacts(run_id, "plots/heads_race.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    grid = pd.read_csv(client.download_artifacts(run_id, "heads/race.csv", str(tmp_path)))
    assert list(grid.columns[:4]) == ["category", "positions", "layer", "head"]
    assert len(grid) == 2 * 3 * 4  # positions x layers x heads

    back = tr.load_audit(f"runs:/{run_id}", client=client, download_dir=tmp_path / "back")
    pd.testing.assert_frame_equal(back.scores, result.scores, check_dtype=False)
    assert back.meta["spec_sha256"] == result.meta["spec_sha256"]
    assert back.spec == SPEC


def _write(path, text):
    path.write_text(text)
    return path


def test_find_audit_run_only_completed(client, experiment):
    name = "o'brien-model"  # a quote in the name must not break the filter
    tags = {tr.T_MODEL: name, tr.T_VERSION: "3", tr.T_SPEC: "s1", tr.T_POLICY: "p1",
            tr.T_TOOLKIT: "0.1.0"}
    assert tr.find_audit_run(client, [experiment], name, "3") is None
    failed = tr.start_audit_run(client, experiment, tags)
    tr.finish_audit_run(client, failed, "error", "error: boom", reason="boom")
    running = tr.start_audit_run(client, experiment, tags)
    assert tr.find_audit_run(client, [experiment], name, "3") is None  # neither counts
    done = tr.start_audit_run(client, experiment, tags)
    tr.finish_audit_run(client, done, "warn", "WARN: 1 warn")
    found = tr.find_audit_run(client, [experiment], name, "3", spec_sha256="s1",
                              policy_sha256="p1", toolkit_version="0.1.0")
    assert found.info.run_id == done and found.data.tags[tr.T_STATUS] == "warn"
    assert tr.find_audit_run(client, [experiment], name, "3", policy_sha256="p2") is None
    assert tr.find_audit_run(client, [experiment], name, "4") is None
    assert tr.find_audit_run(client, [experiment], name, "3", exclude_run_id=done) is None
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(running).info.status == "RUNNING"


def test_finish_rejects_unknown_status(client, experiment):
    run_id = tr.start_audit_run(client, experiment, {})
    with pytest.raises(ValueError, match="status must be one of"):
        tr.finish_audit_run(client, run_id, "ok", "fine")


def test_record_approval_adds_the_newest_line_first(client):
    client.create_registered_model("approved")
    client.create_model_version("approved", "/nowhere", description="Written by a person.")
    for status in ("pass", "fail"):
        record_approval(client, "approved", "1", status=status, run_id=f"run-{status}",
                           spec_sha256="a" * 64, policy_sha256="b" * 64,
                           summary=f"{status.upper()}:\nfirst line\nsecond")
    mv = client.get_model_version("approved", "1")
    assert mv.tags[tr.V_STATUS] == "fail" and mv.tags[tr.V_RUN] == "run-fail"
    assert mv.tags[tr.V_SUMMARY] == "FAIL: first line second"  # one line
    assert mv.tags[tr.V_COMPLETED].endswith("Z")
    lines = mv.description.split("\n\n")
    assert lines[0] == "Written by a person."  # the person's text first, untouched
    assert lines[1].startswith("[persona audit ") and "**FAIL**" in lines[1]  # newest first
    assert "run-fail" in lines[1] and "**PASS**" in lines[2] and len(lines) == 3


def test_deleted_experiment_is_a_clear_error(client):
    from governance.errors import ConfigError

    exp = client.create_experiment("gone")
    client.delete_experiment(exp)
    with pytest.raises(ConfigError, match="experiment 'gone' is deleted"):
        tr.get_or_create_experiment(client, "gone")
