"""The audited party is not trusted (docs/threat-model.md): each case provoked for real.

A model registrant writes the artifacts, metadata, tags and descriptions the nightly reads.
Nothing of theirs may choose a policy, make the gate pass, stop the other versions' audits,
or make us delete what we did not create.
"""

from __future__ import annotations

import time

import pytest
import yaml

from support.nightly import ENABLED, LENIENT, register, tiny_registry, write_setup


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """A SQLite registry with one logged tiny model, registered under awkward names."""
    with tiny_registry(tmp_path_factory.mktemp("trust"), tokenizer) as registry:
        yield registry


def _config(store, name: str, **extra):
    from jobs.config import load_config

    path = write_setup(store["root"] / name, store["uri"], **extra)
    return load_config(path, env={})


# -- a name is data, whatever its quotes ----------------------------------------------------


def test_a_quote_in_a_model_name_never_stops_discovery(store):
    from jobs.discovery import discover

    client = store["client"]
    awkward = """o'brien "the" model"""
    register(client, awkward, store["src"], ENABLED)
    register(client, "plain-model", store["src"], ENABLED)
    targets, problems = discover(client, _config(store, "discover"))
    names = {t.name for t in targets}
    assert {awkward, "plain-model"} <= names and not problems
    only, problems = discover(client, _config(store, "discover"), [awkward])
    assert [t.name for t in only] == [awkward] and not problems


# -- the policy is the governance owner's choice --------------------------------------------


EXEMPT = {"persona_audit.exempt": "true"}


def _policies(tmp_path):
    lenient = {**LENIENT, "name": "exempt-lenient", "applies_to": {"tags": EXEMPT}}
    strict = {"version": 1, "name": "strict-all", "applies_to": {"models": ["*"]},
              "behaviour": {"accuracy_gap": {"max": 0.0, "severity": "fail"}}}
    paths = []
    for policy in (lenient, strict):  # the specific one first, as the config docs say
        path = tmp_path / f"{policy['name']}.yaml"
        path.write_text(yaml.safe_dump(policy))
        paths.append(str(path))
    return paths


def test_version_tags_never_choose_the_policy(store, tmp_path):
    from jobs.discovery import Target
    from jobs.nightly import _model_tags
    from jobs.verdict import load_policies, pick_policy

    client = store["client"]
    version = register(client, "owner-tagged", store["src"], ENABLED)
    for key, value in EXEMPT.items():  # what the version's owner can write
        client.set_model_version_tag("owner-tagged", version, key, value)
    refs = load_policies(_policies(tmp_path))
    target = Target("owner-tagged", version, None, store["src"], ())
    assert pick_policy(refs, "owner-tagged", _model_tags(client, target)).name == "strict-all"
    for key, value in EXEMPT.items():  # what the governance owner can write
        client.set_registered_model_tag("owner-tagged", key, value)
    assert pick_policy(refs, "owner-tagged", _model_tags(client, target)).name == \
        "exempt-lenient"


# -- never destroy what is not ours ---------------------------------------------------------


def test_audit_out_refuses_a_directory_of_foreign_files(tmp_path, tokenizer, capsys,
                                                        monkeypatch):
    from governance.models.tiny import tiny_model
    from jobs.cli.main import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = ["audit", "--model", str(model_dir), "--questions", "/nonexistent/q.jsonl",
            "--no-progress", "--out"]
    assert main([*args, str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds files that are not an earlier audit" in err and str(mine) in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(mine)
    assert main([*args, "."]) == 2
    assert "working directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_saving_over_an_earlier_audit_leaves_no_stale_table(tiny_audit, tmp_path):
    import pandas as pd

    from governance.audit.result import SCREEN_COLUMNS, AuditResult

    out = tmp_path / "audit"
    screened = AuditResult(**{**tiny_audit.__dict__,
                              "screen": pd.DataFrame([[None] * len(SCREEN_COLUMNS)],
                                                     columns=SCREEN_COLUMNS)})
    screened.save(out)
    assert (out / "screen.csv").exists()
    tiny_audit.save(out)  # the same directory: an earlier audit, so it is replaced whole
    assert not (out / "screen.csv").exists()
    assert AuditResult.load(out).meta == tiny_audit.meta


# -- the approval record --------------------------------------------------------------------


def test_description_keeps_the_persons_text_and_a_bounded_tail():
    from governance.tracking.registry import MAX_DESCRIPTION, MAX_ENTRIES, with_entry

    person = "Owner: team llm. Do not delete."
    text = person
    for i in range(MAX_ENTRIES + 5):
        text = with_entry(text, f"[persona audit {i:03d}] PASS: " + "x" * 150)
    blocks = text.split("\n\n")
    assert blocks[0] == person and len(text) <= MAX_DESCRIPTION
    assert len(blocks) - 1 <= MAX_ENTRIES
    assert blocks[1].startswith(f"[persona audit {MAX_ENTRIES + 4:03d}]")  # newest first
    assert not any("[persona audit 000]" in b for b in blocks)  # the oldest dropped
    assert with_entry("y" * MAX_DESCRIPTION, "[persona audit x] PASS") is None  # never cut
    assert with_entry("", "[persona audit x] PASS") == "[persona audit x] PASS"


def test_the_approval_record_is_one_json_tag(store):
    import json

    from governance.tracking.registry import record_approval
    from governance.tracking.runs import V_RECORD, V_STATUS

    client = store["client"]
    version = register(client, "recorded", store["src"])
    record_approval(client, "recorded", version, status="fail", run_id="r1", spec_sha256="s" * 64,
                    policy_sha256="p" * 64, policy_name="default", summary="FAIL: a gap")
    tags = client.get_model_version("recorded", version).tags
    record = json.loads(tags[V_RECORD])
    assert record == {"status": "fail", "run_id": "r1", "spec_sha256": "s" * 64,
                      "policy_sha256": "p" * 64, "policy_name": "default",
                      "completed_at": record["completed_at"], "summary": "FAIL: a gap"}
    assert tags[V_STATUS] == "fail"


# -- one bad version never stops the others -------------------------------------------------


def test_a_hung_audit_is_killed_at_its_time_limit_and_the_pass_goes_on(store):
    """Each audit runs in a child process under `audit.timeout_s`: one second is far less
    than a real audit takes, so every version times out, each is recorded `error`, and the
    pass still reaches them all; with the limit lifted the next pass audits them (the leases
    were released)."""
    from jobs.nightly import run_pass

    client = store["client"]
    register(client, "slow-a", store["src"], {"persona_audit.slow": "1"})
    register(client, "slow-b", store["src"], {"persona_audit.slow": "1"})
    models = [{"tags": {"persona_audit.slow": "1"}, "versions": "all"}]
    audit = {"device": "cpu", "torch_threads": 1, "system_metrics": False}
    t0 = time.perf_counter()
    report = run_pass(_config(store, "hung", models=models, policy=None,
                              audit={**audit, "timeout_s": 1.0}))
    took = time.perf_counter() - t0
    assert [(o.name, o.status) for o in report.outcomes] == [("slow-a", "error"),
                                                              ("slow-b", "error")]
    assert all("timed out after 1 s" in o.reason for o in report.outcomes)
    assert took < 120
    mv = client.get_model_version("slow-a", "1")
    assert mv.tags["persona_audit.status"] == "error"
    assert "timed out after 1 s" in mv.tags["persona_audit.summary"]
    again = run_pass(_config(store, "unhung", models=models, policy=None, audit=audit))
    assert {o.status for o in again.outcomes} <= {"pass", "warn", "fail"}
    assert len(again.outcomes) == 2


# -- every string is escaped in every page --------------------------------------------------


SCRIPT = '</script><script>alert("persona")</script>'
IMG = '"><img src=x onerror=alert(1)>'


def test_catalogue_and_model_strings_are_escaped_in_every_html_page(tiny_audit, tmp_path):
    from governance.judge.drift import drift_report
    from governance.judge.policy import evaluate, load_policy
    from governance.report.page import render_report

    from support.audits import copy_audit

    current, baseline = copy_audit(tiny_audit), copy_audit(tiny_audit)
    for audit in (current, baseline):
        for table in (audit.scores, audit.attention, audit.behaviour, audit.pairs):
            table["category"] = table["category"].replace("race", SCRIPT)
        audit.meta["model"]["source"] = IMG
    current.scores["score"] = current.scores["score"] * 1.5  # something moved
    drift = drift_report(current, baseline, tmp_path / "drift")
    verdict = evaluate(load_policy("policies/default.yaml"), current, baseline,
                       drift.drift_share)
    page = render_report(current, tmp_path / "report" / "report.html", verdict=verdict,
                         drift=drift)
    pages = [page, tmp_path / "drift" / "evidently_drift.html"]
    assert SCRIPT in drift.top_changes["category"].tolist()  # the data keeps the real name
    assert "%3C/script%3E%3Cscript%3E" in pages[1].read_text()  # the escaped label
    for path in pages:
        html = path.read_text()
        assert '<script>alert("persona")' not in html, path.name
        assert "<img src=x" not in html, path.name
