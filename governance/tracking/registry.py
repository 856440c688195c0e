"""The approval record on a registered model version: `persona_audit.*` tags and a line in
the version's description, written after the audit run is complete."""

from __future__ import annotations

from typing import TYPE_CHECKING

from governance.redaction import redact
from governance.tracking.runs import (
    MAX_TAG,
    STATUSES,
    V_COMPLETED,
    V_POLICY,
    V_RUN,
    V_SPEC,
    V_STATUS,
    V_SUMMARY,
    one_line,
    utc_now,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


# -- the approval record --------------------------------------------------------------------


def record_approval(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    status: str,
    run_id: str,
    spec_sha256: str,
    policy_sha256: str,
    summary: str,
    completed_at: str | None = None,
) -> None:
    """Tag the model version with the audit outcome and append one line to its description
    (what a person wrote there stays); the summary is redacted of credentials. Call only
    after the run is finished."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    completed_at = completed_at or utc_now()
    line = one_line(redact(summary))
    for key, value in ((V_STATUS, status), (V_RUN, run_id), (V_SPEC, spec_sha256),
                       (V_POLICY, policy_sha256), (V_COMPLETED, completed_at),
                       (V_SUMMARY, line)):
        client.set_model_version_tag(name, version, key, value[:MAX_TAG])
    current = client.get_model_version(name, version).description or ""
    entry = (f"[persona audit {completed_at}] {status.upper()}: {line} "
             f"(run {run_id}, spec {spec_sha256[:12]}, policy {policy_sha256[:12]})")
    text = f"{current.rstrip()}\n\n{entry}" if current.strip() else entry
    client.update_model_version(name, version, description=text)
