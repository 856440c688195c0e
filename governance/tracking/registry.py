"""The approval record on a registered model version: `persona_audit.*` tags and a line in
the version's description, written after the audit run is complete."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from governance.redaction import redact
from governance.tracking.runs import (
    MAX_TAG,
    PREFIX,
    STATUSES,
    V_COMPLETED,
    V_POLICY,
    V_POLICY_NAME,
    V_RECORD,
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


MAX_DESCRIPTION = 5000  # MLflow's limit of a model version's description
MAX_ENTRIES = 20  # audit lines kept in the description; every audit stays in its run
ENTRY_PREFIX = "[persona audit "


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
    policy_name: str | None = None,
    experiment_id: str | None = None,
    completed_at: str | None = None,
) -> None:
    """Write the approval record on the model version: first `persona_audit.record`, one tag
    holding the whole record as JSON (a single write, so a crash leaves the old complete
    record or the new one), then the per-field `persona_audit.*` tags, then one line in the
    description, newest first under what a person wrote there (which stays), with a link to
    the audit run that MLflow's UI follows (`experiment_id` given). Only the newest
    `MAX_ENTRIES` audit lines are kept, within MLflow's length limit. The summary is redacted
    of credentials. Call only after the run is finished."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    completed_at = completed_at or utc_now()
    line = one_line(redact(summary))
    fields = {V_STATUS: status, V_RUN: run_id, V_SPEC: spec_sha256, V_POLICY: policy_sha256,
              V_POLICY_NAME: policy_name or "", V_COMPLETED: completed_at, V_SUMMARY: line}
    record = {k.removeprefix(PREFIX): v for k, v in fields.items()}
    body = json.dumps(record, sort_keys=True)
    if len(body) > MAX_TAG:  # only the summary can be long
        record["summary"] = line[: max(0, len(line) - (len(body) - MAX_TAG) - 3)] + "..."
        body = json.dumps(record, sort_keys=True)
    client.set_model_version_tag(name, version, V_RECORD, body)
    for key, value in fields.items():
        client.set_model_version_tag(name, version, key, value[:MAX_TAG])
    policy = f"policy {policy_name!r} {policy_sha256[:12]}" if policy_name else (
        f"policy {policy_sha256[:12]}")
    run = (f"[run {run_id}](#/experiments/{experiment_id}/runs/{run_id})" if experiment_id
           else f"run {run_id}")
    entry = (f"{ENTRY_PREFIX}{completed_at}] **{status.upper()}** under {policy}: {line} "
             f"({run}, spec {spec_sha256[:12]})")
    current = client.get_model_version(name, version).description or ""
    text = with_entry(current, entry)
    if text is not None:
        client.update_model_version(name, version, description=text)


def with_entry(description: str, entry: str) -> str | None:
    """`description` with `entry` as its newest audit line: the person's text first and
    untouched, then the audit lines newest first (at most `MAX_ENTRIES`, the oldest dropped),
    the whole within `MAX_DESCRIPTION` characters. None when the person's text leaves no room
    for the entry (their text is never shortened)."""
    blocks = [b.rstrip() for b in description.split("\n\n") if b.strip()]
    person = "\n\n".join(b for b in blocks if not b.startswith(ENTRY_PREFIX))
    entries = [entry, *(b for b in blocks if b.startswith(ENTRY_PREFIX))][:MAX_ENTRIES]
    room = MAX_DESCRIPTION - (len(person) + 2 if person else 0)
    while entries and len("\n\n".join(entries)) > room:
        entries.pop()
    if not entries:
        return None
    return "\n\n".join([person, *entries] if person else entries)
