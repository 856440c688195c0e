"""Evaluating a policy on an audit: every rule's findings, the verdict and its summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError
from governance.files import write_text_atomic
from governance.judge.policy.base import (
    FINDING_COLUMNS,
    RANK,
    Context,
    Finding,
    Outcome,
    is_missing,
)
from governance.judge.policy.loading import policy_sha256
from governance.judge.policy.schema import Policy

if TYPE_CHECKING:
    import pandas as pd

    from governance.audit.result import AuditResult



@dataclass
class Verdict:
    """The outcome of a policy on an audit: `status` and the findings that explain it."""

    status: Outcome
    findings: pd.DataFrame
    summary: str
    policy: dict[str, Any]
    audit: dict[str, Any]
    baseline: dict[str, Any] | None
    drift_share: float | None
    evaluated_at: str

    def to_dict(self) -> dict[str, Any]:
        records = [{k: (None if is_missing(v) else v) for k, v in r.items()}
                   for r in self.findings.to_dict(orient="records")]
        counts = {o: int((self.findings["outcome"] == o).sum()) for o in ("fail", "warn", "pass")}
        return {
            "status": self.status, "summary": self.summary, "counts": counts,
            "policy": self.policy, "audit": self.audit, "baseline": self.baseline,
            "drift_share": self.drift_share, "evaluated_at": self.evaluated_at,
            "findings": records,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write findings.csv and verdict.json (each replaced atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "findings.csv", self.findings.to_csv(index=False))
        write_text_atomic(out / "verdict.json", json.dumps(self.to_dict(), indent=2) + "\n")
        return out


def evaluate(
    policy: Policy,
    audit: AuditResult,
    baseline: AuditResult | None = None,
    drift_share: float | None = None,
    *,
    model_name: str | None = None,
    model_tags: dict[str, str] | None = None,
) -> Verdict:
    """Check every rule of `policy` on `audit` (and `baseline` for drift) and return the
    verdict. `drift_share` is the Evidently drift share from governance.drift. `model_name`
    (default: from the audit's model source) and `model_tags` are checked against
    `applies_to`."""
    import pandas as pd

    _check_tables(audit, "audit")
    if baseline is not None:
        _check_tables(baseline, "baseline audit")
    if drift_share is not None and not 0 <= drift_share <= 1:
        raise ConfigError(f"drift_share must be in [0, 1], got {drift_share!r}")
    p = audit.pairs
    floor = next(p[p["kind"] == "noise_floor"].itertuples(), None)
    ctx = Context(audit, baseline, drift_share, policy.missing_data, floor,
                   dict(zip(audit.behaviour["persona"], audit.behaviour["category"], strict=True)))
    findings = _applies_findings(policy, audit, model_name, model_tags)
    if floor is None:
        findings.append(Finding(
            "audit.noise_floor", "audit", math.nan, math.nan, policy.missing_data,
            policy.missing_data, "the audit has no noise-floor pair: behaviour is compared "
            "with zero instead of the paraphrase floor, internals use every pair"))
    for name, rule in policy.rules():
        if name.startswith("drift.") and baseline is None:
            continue
        findings += rule.check(name, ctx)
    findings += _baseline_findings(policy, audit, baseline)

    frame = pd.DataFrame([f.__dict__ for f in findings], columns=FINDING_COLUMNS)
    frame["rank"] = frame["outcome"].map(RANK)
    frame = frame.sort_values("rank", kind="stable").drop(columns="rank").reset_index(drop=True)
    status: Outcome = min(frame["outcome"], key=RANK.__getitem__, default="pass")
    sha = policy_sha256(policy)
    counts = {o: int((frame["outcome"] == o).sum()) for o in ("fail", "warn", "pass")}
    summary = (f"{status.upper()}: {counts['fail']} fail, {counts['warn']} warn, "
               f"{counts['pass']} pass under policy {policy.name!r} ({sha[:12]})")
    if status != "pass":
        r = frame.iloc[0]
        summary += f"; first: {r.rule} {r.scope}: {r.evidence}"
    return Verdict(
        status=status,
        findings=frame,
        summary=summary,
        policy={"name": policy.name, "version": policy.version, "sha256": sha,
                "baseline": policy.baseline.describe()},
        audit=audit.identity(),
        baseline=baseline.identity() if baseline is not None else None,
        drift_share=drift_share,
        evaluated_at=pd.Timestamp.now(tz="UTC").isoformat(),
    )


def _baseline_findings(policy: Policy, audit, baseline) -> list[Finding]:
    drift = policy.drift
    names = [f"drift.{n}" for n, _ in drift.rules()]
    if not names:
        return []
    where = f"baseline={policy.baseline.describe()}"
    if baseline is None:
        return [Finding("drift.baseline", where, math.nan, math.nan, drift.missing_baseline,
                        drift.missing_baseline, "no baseline audit was supplied: "
                        + ", ".join(names) + " not evaluated")]
    mine, theirs = audit.meta.get("spec_sha256"), baseline.meta.get("spec_sha256")
    same = mine is not None and mine == theirs
    text = (f"both audits ran the same spec ({str(mine)[:12]})" if same else
            f"the baseline ran a different spec or question set ({str(theirs)[:12]} vs "
            f"{str(mine)[:12]}): changes may come from the audit, not the model")
    return [Finding("drift.baseline", where, math.nan, math.nan, drift.spec_mismatch,
                    "pass" if same else drift.spec_mismatch, text)]


def _applies_findings(policy: Policy, audit, name: str | None, tags) -> list[Finding]:
    name = name or _model_name(audit.meta)
    scope = f"model={name}"
    if not any(fnmatchcase(name, g) for g in policy.applies_to.models):
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"policy {policy.name!r} applies to models {policy.applies_to.models}, "
                        f"not to {name!r}")]
    if policy.applies_to.tags and tags is None:
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"the policy applies to tags {policy.applies_to.tags}; no model tags "
                        "were supplied to check them")]
    if not policy.applies(name, tags):
        return [Finding("policy.applies_to", scope, math.nan, math.nan, "warn", "warn",
                        f"model tags {tags} do not match {policy.applies_to.tags}")]
    return []


def _model_name(meta: dict) -> str:
    """A registered model's name from a models:/ source, else the source itself."""
    model = meta.get("model") or {}
    source = str(model.get("registered_name") or model.get("source") or "")
    if source.startswith("models:/"):
        return source.removeprefix("models:/").split("/")[0].split("@")[0]
    return source


_REQUIRED = {
    "scores": ["component", "layer", "head", "positions", "category", "clean_persona",
               "corrupt_persona", "score"],
    "attention": ["layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"],
    "behaviour": ["persona", "category", "accuracy", "ci_low", "ci_high"],
    "pairs": ["clean_persona", "corrupt_persona", "category", "kind", "n_questions",
              "floor_ratio", "above_floor", "flip_rate", "tv", "mcnemar_p"],
}


def _check_tables(audit, what: str) -> None:
    for table, cols in _REQUIRED.items():
        missing = [c for c in cols if c not in getattr(audit, table).columns]
        if missing:
            raise ConfigError(f"the {what}'s {table} table lacks columns {missing}; is it an "
                              "audit written by `persona-gov audit`?")



# -- command line ---------------------------------------------------------------------------

