"""The end table of demo, nightly and audit (jobs/summary_table.py); the nightly's and the
demo's own tables are checked in tests/test_nightly.py and tests/test_demo.py."""

import pandas as pd
import pytest

from jobs.summary_table import (
    Row,
    first_finding,
    first_from_summary,
    render,
    report_location,
    where_of,
)


@pytest.mark.parametrize(("evidence", "where"), [
    ("layer=29 head=2 positions=last current +0.52 baseline +0.11 change +0.41", "L29.H2"),
    ("head L27.H2 attends 9.63x more", "L27.H2"),
    ("layer=0 positions=identity mlp_out score +0.9 (early layers 0-3 of 30)", "L0"),
    ("pair=a Black person -> a White person flips 3/10; 95% interval", "a Black person -> a "
     "White person"),
    ("the audit has no noise-floor pair", ""),
])
def test_where_names_the_layer_and_head(evidence, where):
    assert where_of(evidence) == where


def test_first_finding_is_the_first_that_does_not_pass():
    findings = pd.DataFrame([
        dict(rule="drift.head_change", scope="category=race", outcome="fail",
             evidence="layer=29 head=2 positions=last change +0.41"),
        dict(rule="internals.head_restoration", scope="category=race", outcome="warn",
             evidence="layer=3 head=1"),
        dict(rule="behaviour.flip_rate", scope="category=race", outcome="pass", evidence="x"),
    ])
    assert first_finding(findings) == ("drift.head_change category=race",
                                       "layer=29 head=2 positions=last change +0.41")
    assert first_finding(findings.iloc[2:]) == ("", "")
    summary = ("FAIL: 1 fail, 1 warn, 1 pass under policy 'default' (abc); first: "
               "drift.head_change category=race: layer=29 head=2 change +0.41; note: x")
    assert first_from_summary(summary) == ("drift.head_change category=race",
                                           "layer=29 head=2 change +0.41")
    assert first_from_summary("PASS: 0 fail, 0 warn, 5 pass") == ("", "")


def test_render_aligns_the_columns_and_wraps_the_rest():
    rows = [Row("persona-demo v1", "warn", "default 1a2b3c4d5e6f",
                "internals.attention_to_identity category=race",
                "layer=27 head=2 persona=a White person ratio 9.63 (max 3)",
                next="/tmp/demo/mlartifacts/audits/abc/artifacts/report/report.html"),
            Row("persona-demo v2", "pass", "default 1a2b3c4d5e6f", note="up to date")]
    text = render(rows, width=80)
    lines = text.splitlines()
    assert lines[0].split() == ["version", "verdict", "policy", "first", "failing", "rule",
                                "where"]
    rows_at = [i for i, line in enumerate(lines) if line.startswith("persona-demo")]
    assert len(rows_at) == 2
    first, second = (lines[i] for i in rows_at)
    for column in ("verdict", "policy", "where"):  # every row starts its cells under the header
        start = lines[0].index(column)
        assert first[start - 2:start] == "  " and first[start] != " "
    assert "WARN" in first and first.rstrip().endswith("L27.H2")
    assert "PASS" in second and second.rstrip().endswith("-")
    assert "  evidence: layer=27 head=2" in text and "  note: up to date" in text
    wrapped = [line for line in lines if line.startswith("  ") and "next:" not in line]
    assert wrapped and all(len(line) <= 80 for line in wrapped)
    # a path is never cut, so that it can be copied whole
    assert "  next: /tmp/demo/mlartifacts/audits/abc/artifacts/report/report.html" in lines


def test_report_location():
    run = "abc123"
    assert report_location("/srv/a/abc123/artifacts", "sqlite:///m.db", "1", run) == \
        "/srv/a/abc123/artifacts/report/report.html"
    assert report_location("mlflow-artifacts:/1/abc123/artifacts",
                           "https://user:s3cret@mlflow.example", "1", run) == \
        ("https://***@mlflow.example/#/experiments/1/runs/abc123/artifacts/"
         "report/report.html")
    assert report_location("s3://b/abc123", "sqlite:///m.db", "1", run) == \
        "runs:/abc123/report/report.html"
    assert report_location(None, None, None, None) == ""
