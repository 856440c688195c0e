"""The compact table that ends `demo`, `nightly` and `audit`: one row per audited version
with its verdict, policy, the first failing rule and where it points (layer/head), and
where to look next.

    rows = [Row("persona-demo v2", "fail", "default 1a2b3c4d5e6f", *first_finding(findings),
                next="demo/mlartifacts/.../report/report.html")]
    print(render(rows))

    version          verdict  policy                first failing rule                 where
    persona-demo v2  FAIL     default 1a2b3c4d5e6f  drift.head_change category=race    L29.H2
      evidence: layer=29 head=2 positions=last current +0.52 baseline +0.11 change +0.41
      next: demo/mlartifacts/.../report/report.html

Numbers inside the evidence are already rounded by the rules that wrote it.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass
from typing import Any

from governance.redaction import redact

NEXT_REPORT = "report/report.html"  # where the nightly logs the report page in a run

_HEAD = re.compile(r"\blayer=(\d+)\s+head=(\d+)")
_LAYER = re.compile(r"\blayer=(\d+)")
_NAMED_HEAD = re.compile(r"\bL(\d+)\.H(\d+)\b")
_PAIR = re.compile(r"\bpair=(.+?)(?:;| accuracy| flips| tv |$)")


@dataclass(frozen=True)
class Row:
    """One version's line: what was judged, how, the first failing rule, where to look."""

    version: str
    verdict: str  # pass | warn | fail | error | skipped ...
    policy: str = ""
    rule: str = ""  # "internals.head_restoration category=race", "" when every rule passed
    evidence: str = ""
    next: str = ""  # a report path, a run URL or a command
    note: str = ""  # e.g. "up to date" or an error's reason

    @property
    def where(self) -> str:
        return where_of(self.evidence)


def where_of(evidence: str) -> str:
    """The layer/head a finding's evidence names ("L29.H2", "L0"), else its persona pair."""
    if not isinstance(evidence, str):
        return ""
    if m := _HEAD.search(evidence) or _NAMED_HEAD.search(evidence):
        return f"L{m.group(1)}.H{m.group(2)}"
    if m := _LAYER.search(evidence):
        return f"L{m.group(1)}"
    if m := _PAIR.search(evidence):
        return m.group(1).strip()
    return ""


def first_finding(findings: Any) -> tuple[str, str]:
    """(rule with its scope, evidence) of the first non-passing finding of a verdict's
    findings table (sorted fail, warn, pass), or ("", "") when every rule passed."""
    if findings is None or len(findings) == 0:
        return "", ""
    bad = findings[findings["outcome"] != "pass"]
    if bad.empty:
        return "", ""
    r = bad.iloc[0]
    evidence = r["evidence"] if isinstance(r["evidence"], str) else ""
    return f"{r['rule']} {r['scope']}".strip(), evidence


def first_from_summary(summary: str) -> tuple[str, str]:
    """(rule with its scope, evidence) from a verdict summary's "; first: RULE SCOPE:
    EVIDENCE" part (a run's `persona_audit.summary` tag), or ("", "")."""
    _, found, rest = (summary or "").partition("; first: ")
    if not found:
        return "", ""
    rest = rest.split("; note: ")[0]
    rule, _, evidence = rest.partition(": ")
    return rule.strip(), evidence.strip()


def render(rows: list[Row], width: int | None = None) -> str:
    """The rows as an aligned table; under each row its note and evidence, wrapped to the
    terminal's width (at most 120 columns), and its next step on one line."""
    if not rows:
        return "(no versions)"
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    header = ("version", "verdict", "policy", "first failing rule", "where")
    cells = [(r.version, r.verdict.upper(), r.policy, r.rule or "-", r.where or "-")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    widths[3] = min(widths[3], 48)
    widths[2] = min(widths[2], 28)

    def line(values) -> str:
        return "  ".join(_cut(v, w).ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(header)]
    for row, values in zip(rows, cells, strict=True):
        out.append(line(values))
        for label, text in (("note", row.note), ("evidence", row.evidence)):
            if text:
                out += textwrap.wrap(f"{label}: {text}", width=width, initial_indent="  ",
                                     subsequent_indent="    ", max_lines=3,
                                     break_on_hyphens=False, break_long_words=False)
        if row.next:  # a path or URL: one line, never cut, so that it can be copied whole
            out.append(f"  next: {row.next}")
    return "\n".join(out)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def report_location(artifact_uri: str | None, tracking_uri: str | None,
                    experiment_id: str | None, run_id: str | None) -> str:
    """Where a person opens a run's report page: the file itself when the artifacts are
    local, the MLflow UI's artifact view on a tracking server (credentials redacted), else
    the runs:/ URI."""
    if not run_id:
        return ""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
        return redact(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/"
                      f"{run_id}/artifacts/{NEXT_REPORT}")
    if artifact_uri and (artifact_uri.startswith("/") or artifact_uri.startswith("file:")):
        return artifact_uri.removeprefix("file://").rstrip("/") + "/" + NEXT_REPORT
    return f"runs:/{run_id}/{NEXT_REPORT}"
