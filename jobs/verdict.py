"""From a finished audit to a verdict: the nightly loop's one interface to the policy, drift
and report modules.

    policies = load_policies(["policies/strict.yaml", "policies/default.yaml"])
    ref = pick_policy(policies, "my-llm", tags)            # the first whose applies_to matches
    decision = decide(ref, audit, baseline, work_dir, model_name="my-llm", model_tags=tags)
    decision.status, decision.summary, decision.artifacts   # {"verdict": dir, "drift": dir, ...}

`governance.policy`, `governance.drift` and `governance.report` are imported here and only
here, lazily. Without the policy module there is no verdict: `decide` raises
`PolicyUnavailable` and the nightly records the version as `error` ("policy module
unavailable"), never as a pass. Without the drift or report module the verdict still comes
from the policy, and the decision's notes say what is missing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import ConfigError, GovernanceError

if TYPE_CHECKING:
    from governance.audit import AuditResult

log = logging.getLogger(__name__)

UNAVAILABLE = "policy module unavailable"


class PolicyUnavailable(GovernanceError):
    """No verdict can be given: the policy module is missing or no policy applies."""


@dataclass(frozen=True)
class PolicyRef:
    """A loaded policy with what the nightly records about it."""

    path: str
    sha256: str
    text: str
    policy: Any = None  # governance.policy.Policy, or None when the module is unavailable
    problem: str | None = None

    @property
    def name(self) -> str:
        return getattr(self.policy, "name", None) or Path(self.path).name

    def resolved(self) -> dict[str, Any] | None:
        return self.policy.model_dump(mode="json") if self.policy is not None else None

    def applies(self, model_name: str, tags: dict[str, str]) -> bool:
        return self.policy is not None and self.policy.applies(model_name, tags)


@dataclass(frozen=True)
class BaselineChoice:
    """What the policy compares a version with: the version holding `alias`, the previous
    version, or the same version's last audit (`self`)."""

    kind: str  # alias | previous | self
    alias: str | None = None

    def describe(self) -> str:
        return f"alias:{self.alias}" if self.kind == "alias" else self.kind


@dataclass
class Decision:
    """The verdict of one audit and the files to log with it ({artifact dir: local path})."""

    status: str  # pass | warn | fail
    summary: str
    verdict: Any
    drift: Any = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_policy_path() -> str:
    from governance.policy import DEFAULT_POLICY_PATH

    return str(DEFAULT_POLICY_PATH)


def load_policies(paths: list[str] | None) -> list[PolicyRef]:
    """Load the given policy files (default: the packaged default policy). A missing policy
    module gives refs with `problem` set; an invalid policy file raises ConfigError."""
    try:
        from governance import policy as policy_module
    except ImportError as exc:
        if not paths:
            raise PolicyUnavailable(f"{UNAVAILABLE} ({exc}) and no policy file given") from exc
        refs = []
        for path in paths:
            text = _read(path)
            refs.append(PolicyRef(path, hashlib.sha256(text.encode()).hexdigest(), text,
                                  None, f"{UNAVAILABLE}: {exc}"))
        return refs
    refs = []
    for path in paths or [str(policy_module.DEFAULT_POLICY_PATH)]:
        policy = policy_module.load_policy(path)
        refs.append(PolicyRef(str(path), policy_module.policy_sha256(policy), _read(path),
                              policy))
    return refs


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc}") from exc


def pick_policy(refs: list[PolicyRef], model_name: str, tags: dict[str, str]) -> PolicyRef:
    """The first policy whose `applies_to` matches the model (list the specific ones first).
    With the policy module unavailable, the first ref (its `problem` set) is returned."""
    if not refs:
        raise PolicyUnavailable("no policy configured")
    if refs[0].policy is None:
        return refs[0]
    for ref in refs:
        if ref.applies(model_name, tags):
            return ref
    raise PolicyUnavailable(
        f"no policy applies to model {model_name!r} with tags {tags}: checked "
        + ", ".join(f"{r.path} (applies_to {r.policy.applies_to.model_dump()})" for r in refs)
    )


def baseline_choice(ref: PolicyRef) -> BaselineChoice | None:
    """The policy's baseline (None when the policy module is unavailable)."""
    if ref.policy is None:
        return None
    b = ref.policy.baseline
    return BaselineChoice(b.kind, b.alias)


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
    if ref.policy is None:
        raise PolicyUnavailable(ref.problem or UNAVAILABLE)
    from governance import policy as policy_module

    work = Path(work_dir)
    notes: list[str] = []
    artifacts: dict[str, Path] = {}
    drift = None
    if baseline is not None:
        try:
            from governance.drift import drift_report
        except ImportError as exc:
            notes.append(f"drift module unavailable ({exc}): no drift share for the policy")
        else:
            drift = drift_report(audit, baseline, work / "drift")
            artifacts["drift"] = work / "drift"
            notes += list(getattr(drift, "notes", []) or [])
    share = getattr(drift, "drift_share", None)
    if share is not None and share != share:  # NaN: nothing was compared
        share = None
    verdict = policy_module.evaluate(ref.policy, audit, baseline=baseline, drift_share=share,
                                     model_name=model_name, model_tags=model_tags)
    if verdict.status not in ("pass", "warn", "fail"):
        raise GovernanceError(f"policy returned status {verdict.status!r}: expected pass, warn "
                              "or fail")
    verdict.save(work / "verdict")
    artifacts["verdict"] = work / "verdict"
    try:
        from governance.report import render_report
    except ImportError as exc:
        notes.append(f"report module unavailable ({exc}): no report.html")
    else:
        render_report(audit, work / "report" / "report.html", verdict=verdict, drift=drift)
        artifacts["report"] = work / "report"
    return Decision(verdict.status, verdict.summary, verdict, drift, artifacts, notes)
