"""The baseline a policy compares a version with: the latest completed audit, under the same
spec, of the version holding an alias, of the previous version, or of this version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from governance.audit.result import AuditResult
    from jobs.discovery import Target
    from jobs.verdict import PolicyRef



log = logging.getLogger(__name__)


# -- the baseline ---------------------------------------------------------------------------


def resolve_baseline(
    client: MlflowClient, experiment_ids: list[str], target: Target, policy: PolicyRef,
    spec_sha: str, current_run_id: str, dst: Path, current: AuditResult | None = None,
) -> tuple[AuditResult | None, str | None]:
    """The baseline audit the policy names: the latest completed audit, under the same spec,
    of the version holding the alias / the previous version / this version. Returns (audit or
    None, a note saying why there is none).

    A version that itself holds the baseline alias and has no earlier audit is the approved
    baseline: it is compared with its own `current` audit (no drift by definition), with a
    note saying so, rather than reported as missing a baseline."""
    from governance.tracking.runs import find_audit_run, load_audit
    from jobs.discovery import all_versions
    choice = policy.policy.baseline
    if choice.kind == "alias":
        try:
            version = str(client.get_model_version_by_alias(target.name, choice.alias).version)
        except Exception:
            return None, (f"baseline alias {choice.alias!r} is not set on {target.name!r}: "
                          "no baseline")
    elif choice.kind == "previous":
        older = [mv for mv in all_versions(client, target.name)
                 if int(mv.version) < int(target.version)]
        if not older:
            return None, f"{target.label} has no previous version: no baseline"
        version = str(older[0].version)
    else:
        version = target.version
    run = find_audit_run(client, experiment_ids, target.name, version, spec_sha256=spec_sha,
                         exclude_run_id=current_run_id)
    if run is None and choice.kind == "alias" and version == target.version and current:
        return current, (f"{target.label} holds the baseline alias {choice.alias!r}: it is the "
                         "baseline, compared with itself")
    if run is None:
        return None, (f"baseline {choice.describe()} ({target.name} v{version}) has no "
                      f"completed audit under spec {spec_sha[:12]}: no baseline")
    log.info("baseline for %s: v%s run %s (%s)", target.label, version, run.info.run_id,
             choice.describe())
    return load_audit(f"runs:/{run.info.run_id}", client=client, download_dir=dst), None
