"""MLflow I/O for the mitigation what-if: one run per what-if, linked to its audit run both
ways.

    run_id = log_mitigation(client, experiment_id, result, audit_run_id=audit_run)

The mitigation run holds:
- tags `persona_mitigation.audit_run_id` (the audit it took its ranking from),
  `persona_mitigation.method`, `.top_k`, `.n_heldout`, and a note (`mlflow.note.content`)
  with a link to the audit run's page;
- metrics per k (step = k): `flagged.shift_ratio`, `flagged.accuracy_delta`,
  `flagged.floor_shift`, `random.shift_ratio`, `random.accuracy_delta` (mean over seeds);
  `unablated.shift`, `unablated.floor_shift`, `unablated.accuracy`;
- artifacts: `mitigation/` (MitigationResult.save), `plots/tradeoff.png`,
  `tables/tradeoff.csv`, `report/mitigation.html`.

The audit run gets the tag `persona_audit.mitigation_runs` (the mitigation run ids, comma
separated), appended to, never replaced: and only on a run this toolkit created (a completed
audit run with our toolkit-version tag), never on a run a registrant made.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from governance.errors import ConfigError
from governance.tracking.runs import (
    MAX_TAG,
    T_STATE,
    T_TOOLKIT,
    log_metrics,
    metric_key,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from governance.mitigation.result import MitigationResult

M_PREFIX = "persona_mitigation."
M_AUDIT_RUN = M_PREFIX + "audit_run_id"
T_MITIGATIONS = "persona_audit.mitigation_runs"
NOTE = "mlflow.note.content"


def run_link(client: MlflowClient, run_id: str) -> str:
    """The UI path of a run (relative to the MLflow server's root)."""
    run = client.get_run(run_id)
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


def tradeoff_metrics(result: MitigationResult) -> list[tuple[str, float, int]]:
    """(key, value, step = k) for the flagged and random curves, and the unablated values."""
    import numpy as np

    c = result.curve
    out: list[tuple[str, float, int]] = []
    for r in c[c["selection"] == "flagged"].itertuples():
        out += [(metric_key("flagged", "shift_ratio"), r.shift_ratio, r.k),
                (metric_key("flagged", "accuracy_delta"), r.accuracy_delta, r.k),
                (metric_key("flagged", "floor_shift"), r.floor_shift, r.k)]
    rand = c[c["selection"] == "random"].groupby("k")[["shift_ratio", "accuracy_delta"]].mean()
    for k, r in rand.iterrows():
        out += [(metric_key("random", "shift_ratio"), r["shift_ratio"], int(k)),
                (metric_key("random", "accuracy_delta"), r["accuracy_delta"], int(k))]
    base = c[c["selection"] == "none"].iloc[0]
    out += [(f"unablated.{m}", base[m], 0) for m in ("shift", "floor_shift", "accuracy")]
    return [(k, float(v), int(s)) for k, v, s in out if np.isfinite(v)]


def is_our_audit_run(client: MlflowClient, run_id: str) -> bool:
    """Whether `run_id` is an audit run this toolkit created and completed."""
    tags = client.get_run(run_id).data.tags
    return tags.get(T_STATE) == "completed" and T_TOOLKIT in tags


def log_mitigation(client: MlflowClient, experiment_id: str, result: MitigationResult, *,
                   audit_run_id: str | None = None, run_name: str | None = None) -> str:
    """Log `result` as a new run in `experiment_id`, linked to `audit_run_id` (tag and note
    on the new run; the audit run's `persona_audit.mitigation_runs` appended to, if it is
    ours). Returns the new run's id."""
    from mlflow.entities import Param, RunTag

    from governance.report.mitigation import render_mitigation_page
    from governance.tracking.runs import T_MODEL, T_VERSION

    spec = result.meta["spec"]
    tags = {M_PREFIX + "method": str(spec["method"]),
            M_PREFIX + "top_k": " ".join(map(str, spec["top_k"])),
            M_PREFIX + "n_heldout": str(result.meta["split"]["n_heldout"]),
            M_PREFIX + "state": "running"}
    note = ["Mitigation what-if: the audit's top-ranked components switched off on "
            "held-out questions, beside random components."]
    if audit_run_id:
        audit_tags = client.get_run(audit_run_id).data.tags
        tags[M_AUDIT_RUN] = audit_run_id
        for key in (T_MODEL, T_VERSION):
            if key in audit_tags:
                tags[key.replace("persona_audit.", M_PREFIX)] = audit_tags[key]
        note.append(f"Ranking from audit run [{audit_run_id}]({run_link(client, audit_run_id)}).")
    tags[NOTE] = "\n\n".join(note)
    run = client.create_run(experiment_id, tags=tags, run_name=run_name or "mitigation")
    run_id = run.info.run_id
    try:
        params = [Param(f"mitigation.{k}", str(v)[:6000]) for k, v in spec.items()]
        client.log_batch(run_id, params=params)
        log_metrics(client, run_id, tradeoff_metrics(result))
        with tempfile.TemporaryDirectory(prefix="persona-gov-mitigation-") as tmp:
            root = Path(tmp)
            result.save(root / "mitigation")
            render_mitigation_page(result, root / "report" / "mitigation.html")
            (root / "plots").mkdir()
            (root / "report" / "mitigation_tradeoff.png").rename(root / "plots" / "tradeoff.png")
            (root / "tables").mkdir()
            result.flagged_vs_random().to_csv(root / "tables" / "tradeoff.csv", index=False)
            for sub in ("mitigation", "report", "plots", "tables"):
                client.log_artifacts(run_id, str(root / sub), artifact_path=sub)
    except BaseException:
        client.set_tag(run_id, M_PREFIX + "state", "error")
        client.set_terminated(run_id, "FAILED")
        raise
    client.log_batch(run_id, tags=[RunTag(M_PREFIX + "state", "completed")])
    client.set_terminated(run_id, "FINISHED")
    if audit_run_id:
        link_audit_run(client, audit_run_id, run_id)
    return run_id


def link_audit_run(client: MlflowClient, audit_run_id: str, mitigation_run_id: str) -> bool:
    """Append `mitigation_run_id` to the audit run's `persona_audit.mitigation_runs`, if the
    audit run is ours; return whether it was linked."""
    if not is_our_audit_run(client, audit_run_id):
        return False
    existing = client.get_run(audit_run_id).data.tags.get(T_MITIGATIONS, "")
    ids = [i for i in existing.split(",") if i]
    if mitigation_run_id not in ids:
        ids.append(mitigation_run_id)
    value = ",".join(ids)
    if len(value) > MAX_TAG:
        raise ConfigError(f"audit run {audit_run_id} links too many mitigation runs for one tag")
    client.set_tag(audit_run_id, T_MITIGATIONS, value)
    return True
