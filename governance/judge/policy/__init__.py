"""Policies: the risk team's thresholds as data, and their evaluation on an audit.

    policy = load_policy("policies/default.yaml")
    verdict = evaluate(policy, AuditResult.load("out/new"), baseline=AuditResult.load("out/old"))
    print(verdict.summary)
    verdict.save("out/verdict")          # findings.csv + verdict.json

A policy file is YAML (`version: 1`) read with `yaml.safe_load` and validated with pydantic
(unknown keys, wrong types and out-of-range thresholds are errors that name the file, the
field path and the line). Each rule is a small model with one `check(name, ctx)` that turns
audit tables into findings. Pure computation on `AuditResult` tables: no MLflow, no torch.
Where the baseline comes from (`baseline: {alias: champion}` | `previous` | `self`) is for the
caller to resolve; `evaluate` takes the baseline audit itself.

Modules: `base` (shared models, `Finding`, the rule context), the three rule families
`behaviour`, `internals` and `change`, `schema` (the `Policy` document), `loading` (reading
and hashing a file) and `evaluate` (the verdict).
"""

from governance.judge.policy.base import DEFAULT_POLICY_PATH, FINDING_COLUMNS, Finding
from governance.judge.policy.evaluate import Verdict, evaluate
from governance.judge.policy.loading import load_policy, policy_sha256
from governance.judge.policy.schema import Policy

__all__ = ["DEFAULT_POLICY_PATH", "FINDING_COLUMNS", "Finding", "Policy", "Verdict", "evaluate",
           "load_policy", "policy_sha256"]
