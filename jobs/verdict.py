"""From a finished audit to a verdict: the nightly loop's one interface to the policy, drift
and report modules.

    policies = load_policies(["policies/strict.yaml", "policies/default.yaml"])
    ref = pick_policy(policies, "my-llm", tags)            # the first whose applies_to matches
    decision = decide(ref, audit, baseline, work_dir, model_name="my-llm", model_tags=tags)
    decision.status, decision.summary, decision.artifacts   # {"verdict": dir, "drift": dir, ...}

A version to which no configured policy applies gets no verdict: `pick_policy` raises
`PolicyUnavailable` and the nightly records the version as `error`, never as a pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError, GovernanceError
from governance.judge.drift import DriftResult, drift_report
from governance.judge.policy import (
    DEFAULT_POLICY_PATH,
    Policy,
    Verdict,
    evaluate,
    load_policy,
    policy_sha256,
)
from governance.report.page import render_report

if TYPE_CHECKING:
    from governance.audit.result import AuditResult

log = logging.getLogger(__name__)

class PolicyUnavailable(GovernanceError):
    """No verdict can be given: no policy is configured, or none applies to the model."""


@dataclass(frozen=True)
class PolicyRef:
    """A loaded policy with what the nightly records about it."""

    path: str
    sha256: str
    text: str
    policy: Policy

    @property
    def name(self) -> str:
        return self.policy.name

    def resolved(self) -> dict[str, Any]:
        return self.policy.model_dump(mode="json")

    def applies(self, model_name: str, tags: dict[str, str]) -> bool:
        return self.policy.applies(model_name, tags)


@dataclass
class Decision:
    """The verdict of one audit and the files to log with it ({artifact dir: local path})."""

    status: str  # pass | warn | fail
    summary: str
    verdict: Verdict
    drift: DriftResult | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_policies(paths: list[str] | None) -> list[PolicyRef]:
    """Load the given policy files (default: the packaged default policy); an invalid policy
    file raises ConfigError naming the file, field and line."""
    refs = []
    for path in paths or [str(DEFAULT_POLICY_PATH)]:
        policy = load_policy(path)
        refs.append(PolicyRef(str(path), policy_sha256(policy), _read(path), policy))
    return refs


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc}") from exc


def pick_policy(refs: list[PolicyRef], model_name: str, tags: dict[str, str]) -> PolicyRef:
    """The first policy whose `applies_to` matches the model (list the specific ones first)."""
    if not refs:
        raise PolicyUnavailable("no policy configured")
    for ref in refs:
        if ref.applies(model_name, tags):
            return ref
    raise PolicyUnavailable(
        f"no policy applies to model {model_name!r} with tags {tags}: checked "
        + ", ".join(f"{r.path} (applies_to {r.policy.applies_to.model_dump()})" for r in refs)
    )


def decide(
    ref: PolicyRef,
    audit: AuditResult,
    baseline: AuditResult | None,
    work_dir: str | Path,
    *,
    model_name: str | None = None,
    model_tags: dict[str, str] | None = None,
) -> Decision:
    """Evaluate the policy on `audit` (with drift against `baseline` when there is one),
    write verdict/, drift/ and report/ into `work_dir`, and return the decision."""
    work = Path(work_dir)
    notes: list[str] = []
    artifacts: dict[str, Path] = {}
    drift = None
    if baseline is not None:
        drift = drift_report(audit, baseline, work / "drift")
        artifacts["drift"] = work / "drift"
        notes += list(drift.notes)
    share = drift.drift_share if drift is not None else None
    if share is not None and share != share:  # NaN: nothing was compared
        share = None
    verdict = evaluate(ref.policy, audit, baseline=baseline, drift_share=share,
                                     model_name=model_name, model_tags=model_tags)
    if verdict.status not in ("pass", "warn", "fail"):
        raise GovernanceError(f"policy returned status {verdict.status!r}: expected pass, warn "
                              "or fail")
    verdict.save(work / "verdict")
    artifacts["verdict"] = work / "verdict"
    render_report(audit, work / "report" / "report.html", verdict=verdict, drift=drift)
    artifacts["report"] = work / "report"
    return Decision(verdict.status, verdict.summary, verdict, drift, artifacts, notes)
