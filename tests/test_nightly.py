"""The nightly loop against a real SQLite-backed MLflow registry with tiny random models:
runs, metrics with steps, artifacts, approval records, idempotence, --force, failure
isolation, the gate, two concurrent processes, and a real `mlflow server` over HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from jobs.cli.main import main

from support.nightly import ENABLED, LENIENT, SPEC, log_tiny, register, write_setup
from support.servers import clean_env, mlflow_server

HUMAN_NOTE = "Owner: team llm-platform. Do not delete."


_env = clean_env


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tokenizer):
    """tiny-a v1, v2 and tiny-b v1 (tagged), broken v1 (tagged, no model behind it),
    ignored v1 (not tagged); then one nightly pass through the CLI."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("nightly")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = write_setup(root, uri)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PERSONA_AUDIT_CONFIG"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.create_experiment("models", artifact_location=str(root / "models"))
        src1, src2 = log_tiny(tokenizer, exp, 1), log_tiny(tokenizer, exp, 2)
        register(client, "tiny-a", src1, ENABLED)
        register(client, "tiny-a", src2)
        client.update_model_version("tiny-a", "2", description=HUMAN_NOTE)
        client.set_registered_model_alias("tiny-a", "champion", "2")
        register(client, "tiny-b", src1, ENABLED)
        client.create_registered_model("broken", tags=ENABLED)
        (root / "empty").mkdir()
        client.create_model_version("broken", source=str(root / "empty"))
        register(client, "ignored", src2)
        mlflow.set_tracking_uri(None)  # the nightly takes its URI from the config alone
        t0 = time.perf_counter()
        code = main(["nightly", "--once", "--config", str(cfg)])
        yield {"root": root, "uri": uri, "config": cfg, "client": client, "code": code,
               "src": (src1, src2), "first_pass_s": time.perf_counter() - t0}


def audit_runs(client, name: str, version: str, state: str | None = None) -> list:
    exp = client.get_experiment_by_name("persona-audits")
    flt = (f"tags.`persona_audit.model_name` = '{name}' and "
           f"tags.`persona_audit.model_version` = '{version}'")
    if state:
        flt += f" and tags.`persona_audit.state` = '{state}'"
    return client.search_runs([exp.experiment_id], flt, order_by=["attributes.start_time ASC"])


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_first_pass_statuses(registry):
    client = registry["client"]
    assert registry["code"] == 4  # the broken version errored
    status = {(n, v): audit_runs(client, n, v)[-1].data.tags["persona_audit.status"]
              for n, v in [("tiny-a", "1"), ("tiny-a", "2"), ("tiny-b", "1"), ("broken", "1")]}
    assert status == {("tiny-a", "1"): "warn",  # no previous version: missing baseline warns
                      ("tiny-a", "2"): "pass",  # drift against v1 within the (huge) limit
                      ("tiny-b", "1"): "fail",  # heads-fail policy picked by applies_to
                      ("broken", "1"): "error"}
    assert audit_runs(client, "ignored", "1") == []  # not tagged: not selected


def test_run_has_tags_metrics_and_artifacts(registry):
    from governance import __version__

    client = registry["client"]
    run = audit_runs(client, "tiny-a", "2")[-1]
    rid, tags = run.info.run_id, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-a-v2"
    assert tags["persona_audit.state"] == "completed"
    assert tags["persona_audit.toolkit_version"] == __version__
    assert len(tags["persona_audit.spec_sha256"]) == 64
    assert len(tags["persona_audit.policy_sha256"]) == 64
    assert tags["persona_audit.policy_name"] == "lenient"
    model_id = registry["src"][1].removeprefix("models:/")
    assert tags["persona_audit.model_id"] == model_id

    # per-layer curves: one key per component x positions x category, step = layer (3 layers)
    history = client.get_metric_history(rid, "mlp_out.identity.race")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert {"attn_out.last.race", "noise_floor_shift", "persona_shift_mean",
            "head_score_max_abs.race", "accuracy_gap.race", "audit_time_s.total",
            "nightly_wall_time_s"} <= set(run.data.metrics)
    assert "mlp_out.identity.noise_floor" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics
    assert run.data.params["spec.n_questions"] == "4"
    # summary metrics are linked to the registered version's LoggedModel
    linked = client.get_logged_model(model_id).metrics
    assert any(m.key == "head_score_max_abs.race" and m.run_id == rid for m in linked)
    assert [m.model_id for m in client.get_run(rid).inputs.model_inputs] == [model_id]

    files = artifacts(client, rid)
    expected = {
        "audit/scores.csv", "audit/attention.csv", "audit/behaviour.csv", "audit/pairs.csv",
        "audit/audit.json", "audit/prompts.jsonl", "heads/race.csv", "plots/heads_race.png",
        "plots/layer_curves.png", "spec/spec.yaml", "spec/spec.resolved.yaml",
        "policy/policy.yaml", "policy/policy.resolved.json", "verdict/verdict.json",
        "verdict/findings.csv", "drift/drift.json", "report/report.html",
    }
    assert expected <= files, expected - files


def test_load_audit_round_trip(registry, tmp_path):
    from governance.tracking.runs import load_audit

    client = registry["client"]
    run = audit_runs(client, "tiny-a", "2")[-1]
    result = load_audit(f"runs:/{run.info.run_id}", client=client, download_dir=tmp_path)
    assert result.meta["spec_sha256"] == run.data.tags["persona_audit.spec_sha256"]
    assert result.meta["model"]["registered_name"] == "tiny-a"
    assert set(result.scores["component"]) == {"mlp_out", "attn_out", "head"}
    curve = result.layer_curves()
    row = curve[(curve.component == "mlp_out") & (curve.category == "race") & (curve.layer == 1)]
    logged = {m.step: m.value for m in
              client.get_metric_history(run.info.run_id, "mlp_out.identity.race")}
    assert logged[1] == pytest.approx(float(row["score"].iloc[0]))
    # v2's drift baseline is v1's audit (policy `baseline: previous`)
    drift = json.loads((Path(client.download_artifacts(run.info.run_id, "drift/drift.json",
                                                       str(tmp_path)))).read_text())
    v1 = audit_runs(client, "tiny-a", "1")[-1]
    v1_meta = load_audit(f"runs:/{v1.info.run_id}", client=client,
                         download_dir=tmp_path / "v1").meta
    assert drift["baseline"]["weights_fingerprint"] == v1_meta["model"]["weights_fingerprint"]
    assert drift["current"]["weights_fingerprint"] != drift["baseline"]["weights_fingerprint"]


def test_approval_record(registry):
    client = registry["client"]
    mv = client.get_model_version("tiny-a", "2")
    run = audit_runs(client, "tiny-a", "2")[-1]
    t = mv.tags
    assert t["persona_audit.status"] == "pass"
    assert t["persona_audit.run_id"] == run.info.run_id
    assert t["persona_audit.spec_sha256"] == run.data.tags["persona_audit.spec_sha256"]
    assert t["persona_audit.policy_sha256"] == run.data.tags["persona_audit.policy_sha256"]
    done = datetime.fromisoformat(t["persona_audit.completed_at"].replace("Z", "+00:00"))
    assert done.tzinfo is not None and done.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - done).total_seconds()) < 3600
    assert "\n" not in t["persona_audit.summary"] and "PASS" in t["persona_audit.summary"]
    # the person's text stays; the audit line is appended after it
    assert mv.description.startswith(HUMAN_NOTE + "\n\n[persona audit ")
    assert run.info.run_id in mv.description
    # the newest line links to its run in MLflow's UI and names the policy
    newest = mv.description.split("\n\n")[1]
    assert f"(#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in newest
    assert f"policy {run.data.tags['persona_audit.policy_name']!r}" in newest
    # the approval record is written after the run finished
    assert run.info.end_time <= int(done.timestamp() * 1000) + 1000


def test_broken_version_is_error_not_pass(registry, tmp_path):
    client = registry["client"]
    run = audit_runs(client, "broken", "1")[-1]
    assert run.info.status == "FAILED"
    assert run.data.tags["persona_audit.state"] == "error"
    assert "ModelLoadError" in run.data.tags["persona_audit.reason"]
    assert "error.txt" in artifacts(client, run.info.run_id)
    mv = client.get_model_version("broken", "1")
    assert mv.tags["persona_audit.status"] == "error"
    assert mv.tags["persona_audit.summary"].startswith("error: ModelLoadError")
    assert "ERROR" in mv.description


def test_second_pass_audits_nothing_new(registry):
    client = registry["client"]
    before = {v: len(audit_runs(client, *v)) for v in [("tiny-a", "1"), ("tiny-a", "2"),
                                                       ("tiny-b", "1"), ("broken", "1")]}
    assert main(["nightly", "--once", "--config", str(registry["config"])]) == 4
    after = {v: len(audit_runs(client, *v)) for v in before}
    assert after == {**before, ("broken", "1"): before[("broken", "1")] + 1}  # errors retried


def test_force_audits_again(registry, capsys):
    client = registry["client"]
    before = len(audit_runs(client, "tiny-b", "1", "completed"))
    code = main(["nightly", "--once", "--config", str(registry["config"]), "--model", "tiny-b",
                 "--force"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(audit_runs(client, "tiny-b", "1", "completed")) == before + 1
    assert "tiny-a" not in out and "fail" in out
    # the end table: verdict, policy, first failing rule with its head, the report to open
    row = next(line.split() for line in out.splitlines() if line.startswith("tiny-b v1"))
    assert row[2:4] == ["FAIL", "heads-fail"], out
    assert row[5:7] == ["internals.head_restoration", "category=race"], out
    assert re.fullmatch(r"L\d+\.H\d+", row[7]), out
    report = out.split("next: ")[1].split()[0]
    assert report.endswith("report/report.html") and Path(report).is_file(), out
    mv = client.get_model_version("tiny-b", "1")
    assert mv.description.count("[persona audit ") == before + 1  # appended, never replaced


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--model", "tiny-a", "--version", "2"], 0, "PASS"),
    (["--model", "tiny-a", "--alias", "champion"], 0, "PASS"),
    (["--model", "tiny-a", "--version", "1"], 3, "WARN"),
    (["--model", "tiny-a", "--version", "1", "--warn-passes"], 0, "WARN"),
    (["--model", "tiny-b", "--version", "1"], 1, "FAIL"),
    (["--model", "broken", "--version", "1"], 2, "is error, not completed"),
    (["--model", "ignored", "--version", "1"], 2, "never been audited"),
    (["--model", "tiny-a", "--version", "9"], 2, "not found"),
    (["--model", "tiny-a", "--alias", "nope"], 2, "not found"),
])
def test_gate_exit_codes(registry, capsys, args, code, says):
    assert main(["gate", "--config", str(registry["config"]), *args]) == code
    captured = capsys.readouterr()
    assert says in captured.out + captured.err


def test_gate_needs_an_audit_under_the_current_policy(registry, tmp_path, capsys):
    changed = {**LENIENT, "behaviour": {"accuracy_gap": {"max": 0.9, "severity": "fail"}}}
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    cfg = yaml.safe_load(registry["config"].read_text())
    cfg.update(policy=str(tmp_path / "changed.yaml"),
               spec={**SPEC, "questions": str(registry["root"] / "questions.jsonl")})
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["gate", "--config", str(tmp_path / "nightly.yaml"), "--model", "tiny-a",
                 "--version", "2"]) == 2
    assert "judged under policy" in capsys.readouterr().err


def test_gate_needs_an_audit_under_the_current_spec(registry, tmp_path, capsys):
    """A pass under yesterday's spec does not pass today's gate (spec hash changed)."""
    cfg = yaml.safe_load(registry["config"].read_text())
    cfg["spec"] = {**cfg["spec"], "questions": str(registry["root"] / "questions.jsonl"),
                   "n_questions": 3}
    cfg["policy"] = [str(registry["root"] / p) for p in cfg["policy"]]
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["gate", "--config", str(tmp_path / "nightly.yaml"), "--model", "tiny-a",
                 "--version", "2"]) == 2
    err = capsys.readouterr().err
    assert "ran under another spec than the current" in err and "policy" not in err.split(
        "another ")[1].split(" than")[0]


def test_gate_refuses_when_a_newer_attempt_failed(registry, capsys):
    """A completed pass followed by a newer attempt that errored: the gate does not answer
    from the older pass."""
    from governance.tracking import runs as tr

    client = registry["client"]
    assert main(["gate", "--config", str(registry["config"]), "--model", "tiny-a",
                 "--version", "2"]) == 0
    passed = audit_runs(client, "tiny-a", "2", "completed")[-1]
    keep = (tr.T_MODEL, tr.T_VERSION, tr.T_SPEC, tr.T_POLICY, tr.T_TOOLKIT)
    tags = {k: passed.data.tags[k] for k in keep}
    exp = client.get_experiment_by_name("persona-audits").experiment_id
    newer = tr.start_audit_run(client, exp, tags)
    tr.finish_audit_run(client, newer, "error", "error: crashed", reason="crashed")
    try:
        assert main(["gate", "--config", str(registry["config"]), "--model", "tiny-a",
                     "--version", "2"]) == 2
        err = capsys.readouterr().err
        assert f"(run {newer}) is error, not completed: crashed" in err
    finally:
        client.delete_run(newer)  # the other tests see the registry as the pass left it


def test_lease_held_elsewhere_skips_the_version(registry, capsys):
    """Another process holds tiny-a v1's lease: this pass skips v1 and still audits v2."""
    from jobs.config import load_config

    lease_url = load_config(registry["config"]).lease_url()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from jobs.lease import LeaseStore; "
         f"s = LeaseStore({lease_url!r}, ttl_s=120, holder='other-host:1:x'); "
         "assert s.try_acquire('tiny-a/1'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["nightly", "--once", "--config", str(registry["config"]), "--model",
                     "tiny-a", "--force"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "skipped" in out and "held by other-host:1:x" in out
        assert "tiny-a v2" in out and "pass" in out
    finally:
        holder.kill()
        holder.wait()


def test_unreachable_tracking_server_is_retried_then_reported(tmp_path, capsys, caplog,
                                                               monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = write_setup(tmp_path, f"http://alice:s3cr3t-pw@127.0.0.1:{port}",
                      retry={"attempts": 3, "initial_delay_s": 0.05})
    t0 = time.perf_counter()
    assert main(["nightly", "--once", "--config", str(cfg)]) == 4  # could not finish
    err = capsys.readouterr().err
    assert "unreachable after 3 attempts" in err and f"127.0.0.1:{port}" in err
    assert time.perf_counter() - t0 < 10
    assert "s3cr3t-pw" not in err + caplog.text
    assert "retrying" in caplog.text


# -- retries and MLflow's process-wide URIs (no registry needed) -------------------------------


def test_retries_back_off_then_report():
    from governance.errors import ConfigError
    from jobs.connection import TrackingUnavailable, with_retries

    delays, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    assert with_retries("x", flaky, 5, 1.0, 3.0, sleep=delays.append) == "ok"
    assert delays == [1.0, 2.0]
    delays.clear()
    with pytest.raises(TrackingUnavailable, match="x unreachable after 4 attempts: "
                                                  "ConnectionError: down"):
        with_retries("x", lambda: (_ for _ in ()).throw(ConnectionError("down")), 4, 1.0, 3.0,
                     sleep=delays.append)
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped at max_delay_s
    delays.clear()
    with pytest.raises(ConfigError):  # bad configuration is not retried
        with_retries("x", lambda: (_ for _ in ()).throw(ConfigError("bad")), 4, 1.0, 3.0,
                     sleep=delays.append)
    assert delays == []


def test_mlflow_uris_are_restored(monkeypatch, tmp_path):
    """Model loading needs mlflow's process-wide URIs; a pass must not leave them behind
    (MLflow keeps them in the env vars that are also the config's overrides)."""
    import mlflow

    from jobs.config import NightlyConfig
    from jobs.connection import mlflow_uris

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/a.db"
    with mlflow_uris(NightlyConfig(tracking_uri=uri)):
        assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_registry_uri() != uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    with mlflow_uris(NightlyConfig(tracking_uri=uri)):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    mlflow.set_tracking_uri(None)


@pytest.mark.e2e
def test_two_concurrent_passes_audit_each_version_once(registry, tokenizer):
    """Two `persona-gov nightly --once` processes started together on a new version."""
    client = registry["client"]
    register(client, "tiny-c", registry["src"][0], ENABLED)
    cmd = [sys.executable, "-m", "jobs.cli.main", "nightly", "--once", "--config",
           str(registry["config"]), "--model", "tiny-c"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = audit_runs(client, "tiny-c", "1")
    assert len(runs) == 1 and runs[0].data.tags["persona_audit.state"] == "completed", outs
    lines = [line for out in outs for line in out.splitlines() if "tiny-c v1" in line]
    statuses = sorted(m for out in outs for m in re.findall(
        r"jobs\.nightly: (pass|warn|fail|error|skipped|up-to-date) +tiny-c v1\b", out))
    assert len(statuses) == 2 and statuses[1] in ("pass", "warn"), lines  # one audited it
    assert statuses[0] in ("skipped", "up-to-date"), lines  # the other: lease or idempotence


# -- a real tracking server over HTTP, PostgreSQL backend --------------------------------------


def _pg_url(db: str = "test") -> str:
    # psycopg2 named explicitly: SQLAlchemy 2.1 (and so `mlflow server`) maps a bare
    # postgresql:// to psycopg 3, which is not installed
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}"


def _pg_or_skip():
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(_pg_url(), connect_args={"connect_timeout": 3},
                                          isolation_level="AUTOCOMMIT")
        engine.connect().close()
        return engine
    except sqlalchemy.exc.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but PostgreSQL at 127.0.0.1:5432 is unreachable: "
                               f"{exc}") from exc
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc}")


@pytest.fixture
def pg_database():
    """A fresh PostgreSQL database, dropped afterwards."""
    import sqlalchemy

    engine = _pg_or_skip()
    name = f"pgov_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.e2e
def test_pass_against_mlflow_server_over_http(pg_database, tmp_path, tokenizer):
    import mlflow
    from mlflow import MlflowClient

    with mlflow_server(tmp_path, ["--backend-store-uri", _pg_url(pg_database),
                        "--default-artifact-root", str(tmp_path / "artifacts")], _env(), 90) as url:
        try:
            mlflow.set_tracking_uri(url)
            client = MlflowClient(url)
            exp = client.create_experiment("models")
            register(client, "tiny-http", log_tiny(tokenizer, exp, 5), ENABLED)
            mlflow.set_tracking_uri(None)

            cfg = write_setup(tmp_path / "cfg", url, lease={"url": _pg_url(pg_database)})
            secret = "pw-" + uuid.uuid4().hex
            env = _env(MLFLOW_TRACKING_USERNAME="auditor", MLFLOW_TRACKING_PASSWORD=secret)
            cmd = [sys.executable, "-m", "jobs.cli.main", "-v", "nightly", "--once", "--config",
                   str(cfg)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            output = done.stdout + done.stderr
            assert done.returncode == 0, output[-4000:]
            assert "tiny-http v1" in done.stdout, output[-3000:]
            runs = audit_runs(client, "tiny-http", "1", "completed")
            assert len(runs) == 1
            rid = runs[0].info.run_id
            assert sorted(m.step for m in client.get_metric_history(rid, "attn_out.last.race")) \
                == [0, 1, 2]
            assert {"audit/scores.csv", "verdict/verdict.json", "plots/layer_curves.png"} \
                <= artifacts(client, rid)
            mv = client.get_model_version("tiny-http", "1")
            assert mv.tags["persona_audit.run_id"] == rid
            assert mv.tags["persona_audit.status"] == "warn"  # first version: no baseline
            gate = subprocess.run([sys.executable, "-m", "jobs.cli.main", "gate", "--config",
                                   str(cfg), "--model", "tiny-http", "--version", "1",
                                   "--warn-passes"], capture_output=True, text=True, env=env,
                                  timeout=120)
            assert gate.returncode == 0, gate.stdout + gate.stderr
            # the credentials appear in no output and no artifact
            assert secret not in output + gate.stdout + gate.stderr
            for path in (tmp_path / "artifacts").rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
        finally:
            mlflow.set_tracking_uri(None)


def test_failed_data_quality_blocks_the_verdict(registry, monkeypatch, capsys):
    """Great Expectations runs on the audit tables before anything is published: an audit
    whose scores are not finite gets `error` with the failed expectation, never a verdict,
    and the quality evidence is logged with the run."""
    import numpy as np

    from governance.judge import quality

    real = quality.validate_audit

    def with_a_broken_score(result):
        result.scores.loc[result.scores.index[0], "score"] = np.inf
        return real(result)

    monkeypatch.setattr(quality, "validate_audit", with_a_broken_score)
    client = registry["client"]
    code = main(["nightly", "--once", "--config", str(registry["config"]), "--model", "tiny-b",
                 "--force"])
    assert code == 4
    run = audit_runs(client, "tiny-b", "1")[-1]
    assert run.data.tags["persona_audit.state"] == "error"
    assert "data quality" in run.data.tags["persona_audit.reason"]
    assert "score_not_infinite" in run.data.tags["persona_audit.reason"]
    logged = artifacts(client, run.info.run_id)
    assert any(p.startswith("quality/audit/") for p in logged)
    assert not any(p.startswith("verdict/") for p in logged)
    assert client.get_model_version("tiny-b", "1").tags["persona_audit.status"] == "error"


# -- a tracking server that enforces basic auth ------------------------------------------------


@pytest.mark.e2e
def test_pass_against_a_basic_auth_server(tmp_path, tokenizer, monkeypatch):
    """`mlflow server --app-name basic-auth` (SQLite, proxied artifacts): without credentials,
    or with a wrong password, the nightly exits 2 saying the server refused them; with
    MLFLOW_TRACKING_USERNAME/PASSWORD it audits the version and writes its approval record;
    the password appears in no output, artifact or store."""
    import base64

    import mlflow
    import requests
    from mlflow import MlflowClient

    secret = "pw-" + uuid.uuid4().hex
    wrong = "wrong-" + uuid.uuid4().hex
    auth_ini = tmp_path / "auth" / "basic_auth.ini"  # the server's own users DB and config
    auth_ini.parent.mkdir()
    auth_ini.write_text(f"[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = sqlite:///{auth_ini.parent / 'users.db'}\n"
                        f"admin_username = admin\nadmin_password = {secret}\n")
    with mlflow_server(tmp_path, ["--app-name", "basic-auth", "--backend-store-uri",
                        f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                        str(tmp_path / "artifacts")], _env(MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
                            MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex), 60) as url:
        try:
            create = f"{url}/api/2.0/mlflow/experiments/create"
            assert requests.post(create, json={"name": "x"}, timeout=10).status_code == 401
            assert requests.post(create, json={"name": "x"}, auth=("admin", wrong),
                                 timeout=10).status_code == 401

            cfg = write_setup(tmp_path / "cfg", url,
                              lease={"url": f"sqlite:///{tmp_path / 'leases.db'}"})
            cmd = [sys.executable, "-m", "jobs.cli.main", "-v", "nightly", "--once", "--config",
                   str(cfg)]
            outputs = []
            for creds, says in [
                ({}, "refused the request without credentials (HTTP 401"),
                ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": wrong},
                 "refused the credentials of user 'admin' (HTTP 401)"),
            ]:
                refused = subprocess.run(cmd, capture_output=True, text=True, env=_env(**creds),
                                         timeout=120)
                outputs.append(refused.stdout + refused.stderr)
                assert refused.returncode == 4, outputs[-1][-3000:]
                assert says in refused.stderr and "MLFLOW_TRACKING_PASSWORD" in refused.stderr, \
                    outputs[-1][-3000:]
                assert "Traceback" not in outputs[-1]
            assert wrong not in "".join(outputs)

            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
            mlflow.set_tracking_uri(url)
            client = MlflowClient(url)
            exp = client.create_experiment("models")
            register(client, "tiny-auth", log_tiny(tokenizer, exp, 7), ENABLED)
            mlflow.set_tracking_uri(None)

            env = _env(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=secret)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            outputs.append(done.stdout + done.stderr)
            assert done.returncode == 0, outputs[-1][-4000:]
            assert "tiny-auth v1" in done.stdout, outputs[-1][-3000:]
            mv = client.get_model_version("tiny-auth", "1")
            assert mv.tags["persona_audit.status"] == "warn"  # first version: no baseline
            run = client.get_run(mv.tags["persona_audit.run_id"])
            assert run.data.tags["persona_audit.state"] == "completed"
            assert "audit/scores.csv" in artifacts(client, run.info.run_id)

            # the password (and the Basic header made from it) is in no output, artifact or store
            basic = base64.b64encode(f"admin:{secret}".encode())
            assert secret not in "".join(outputs)
            stored = [p for p in tmp_path.rglob("*")
                      if p.is_file() and auth_ini.parent not in p.parents]
            assert any(p.is_relative_to(tmp_path / "artifacts") for p in stored)
            for path in stored:
                data = path.read_bytes()
                assert secret.encode() not in data and basic not in data, path
        finally:
            mlflow.set_tracking_uri(None)
