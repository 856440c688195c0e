"""MLflow I/O for audits: one run per audit, explicit run ids, no active-run globals.

    client = MlflowClient("sqlite:///mlflow.db")
    run_id = start_audit_run(client, experiment_id, tags)
    log_audit(client, run_id, result, spec_text=..., policy_text=...)
    back = load_audit(f"runs:/{run_id}", client=client)   # the same AuditResult

What a run holds:
- metrics: one per-layer curve per (component, positions, category), key
  `mlp_out.identity.race`, step = layer (mean restoration score over a category's pairs);
  summary metrics `head_score_max_abs.<category>`, `accuracy_gap.<category>`,
  `persona_shift.<category>`, `persona_shift_mean`, `noise_floor_shift`, timings;
- artifacts: `audit/` (AuditResult.save: the four tables, audit.json, prompts.jsonl),
  `heads/<category>.csv` + `plots/heads_<category>.png` (the per-head grid, layers x heads),
  `plots/layer_curves.png`, `spec/spec.yaml`, `policy/policy.yaml`, plus what the caller adds;
- tags `persona_audit.*` (model name and version, hashes, toolkit version, state, status).

A run counts as a *completed audit* only when its `persona_audit.state` tag is `completed`,
which `finish_audit_run` sets after everything else was logged. The approval record on the
model version (`governance.tracking.registry.record_approval`) is written last of all.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from governance.audit.result import AuditResult

from governance.errors import DriftError
from governance.redaction import redact

PREFIX = "persona_audit."
# run tags
T_MODEL = PREFIX + "model_name"
T_VERSION = PREFIX + "model_version"
T_MODEL_ID = PREFIX + "model_id"
T_SPEC = PREFIX + "spec_sha256"
T_POLICY = PREFIX + "policy_sha256"
T_POLICY_NAME = PREFIX + "policy_name"
T_TOOLKIT = PREFIX + "toolkit_version"
T_KEY = PREFIX + "key"
T_STATE = PREFIX + "state"  # running | completed | error
T_STATUS = PREFIX + "status"  # pass | warn | fail | error
T_SUMMARY = PREFIX + "summary"
T_REASON = PREFIX + "reason"
# model-version tags (the approval record)
V_STATUS, V_RUN, V_SPEC, V_POLICY, V_POLICY_NAME, V_COMPLETED, V_SUMMARY, V_RECORD = (
    PREFIX + k for k in ("status", "run_id", "spec_sha256", "policy_sha256", "policy_name",
                         "completed_at", "summary", "record")
)
STATUSES = ("pass", "warn", "fail", "error")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_TAG = 5000  # MLflow's limit of a tag value
MAX_PARAM = 6000

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


# -- names ----------------------------------------------------------------------------------


def sanitise(part: Any) -> str:
    """One piece of a metric key or file name in MLflow's allowed characters
    (`[A-Za-z0-9_-. /]`): anything else becomes `_`."""
    return _KEY_BAD.sub("_", str(part)).strip() or "_"


def metric_key(*parts: Any) -> str:
    """`metric_key("mlp_out", "identity", "race")` -> `mlp_out.identity.race` (<= 250 chars)."""
    return ".".join(sanitise(p).replace("/", "_") for p in parts)[:250]


def equals(field: str, value: Any) -> str:
    """A filter clause `field = 'value'`. MLflow's filter strings have no escape character,
    so a value holding a quote is matched with LIKE, each quote a one-character wildcard:
    callers keep only the exact matches (`exactly`)."""
    text = str(value)
    if "'" not in text:
        return f"{field} = '{text}'"
    return f"{field} LIKE '{text.replace(chr(39), '_').replace(chr(34), '_')}'"


def exactly(tags: Mapping[str, str], wanted: Mapping[str, Any]) -> bool:
    """Whether `tags` hold every wanted value exactly (after an `equals` LIKE match)."""
    return all(tags.get(k) == str(v) for k, v in wanted.items())


def audit_key(spec_sha256: str, policy_sha256: str, toolkit_version: str) -> str:
    """The idempotence key: an audit is redone when any of the three changes."""
    import hashlib

    return hashlib.sha256(f"{spec_sha256}:{policy_sha256}:{toolkit_version}".encode()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# -- what gets logged (pure) ----------------------------------------------------------------


def curve_metrics(result: AuditResult) -> list[tuple[str, float, int]]:
    """(key, value, step=layer) for every per-layer curve of the audit."""
    curves = result.layer_curves()
    return [
        (metric_key(r.component, r.positions, r.category), float(r.score), int(r.layer))
        for r in curves.itertuples()
        if np.isfinite(r.score)
    ]


def head_grid(result: AuditResult) -> pd.DataFrame:
    """The per-head grid, tidy: (category, positions, layer, head) -> mean score over pairs."""
    heads = result.scores[result.scores["component"] == "head"]
    cols = ["category", "positions", "layer", "head", "score", "ci_low", "ci_high"]
    if heads.empty:
        return pd.DataFrame(columns=cols)
    grid = heads.groupby(cols[:4], as_index=False)[cols[4:]].mean()
    grid["head"] = grid["head"].astype(int)
    return grid


def summary_metrics(result: AuditResult) -> dict[str, float]:
    """Per-category summaries a reviewer can sort runs by, and the audit's timings."""
    out: dict[str, float] = {}
    grid = head_grid(result)
    for category, part in grid.groupby("category"):
        values = part["score"].abs().dropna()
        if not values.empty:
            out[metric_key("head_score_max_abs", category)] = float(values.max())
    behaviour = result.behaviour
    personas = behaviour[~behaviour["category"].isin(["baseline"])]
    for category, part in personas.groupby("category"):
        if len(part) >= 2:
            out[metric_key("accuracy_gap", category)] = float(
                part["accuracy"].max() - part["accuracy"].min())
    pairs = result.pairs
    real = pairs[pairs["kind"] != "noise_floor"]
    for category, part in real.groupby("category"):
        out[metric_key("persona_shift", category)] = float(part["shift_norm"].mean())
    if not real.empty:
        out["persona_shift_mean"] = float(real["shift_norm"].mean())
    floor = pairs[pairs["kind"] == "noise_floor"]
    if not floor.empty:
        out["noise_floor_shift"] = float(floor["shift_norm"].mean())
    for name, seconds in (result.meta.get("timings_s") or {}).items():
        out[metric_key("audit_time_s", name)] = float(seconds)
    return {k: v for k, v in out.items() if np.isfinite(v)}


def spec_params(result: AuditResult) -> dict[str, str]:
    """The spec's fields as run params (`spec.<field>`), values JSON-encoded and capped."""
    spec = result.meta.get("spec") or {}
    return {
        f"spec.{k}": (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM]
        for k, v in spec.items()
    }


# -- figures --------------------------------------------------------------------------------


def write_plots(result: AuditResult, out_dir: Path) -> list[Path]:
    """Per-head heatmaps (one PNG per category, one panel per positions) and the per-layer
    curves (one PNG), drawn with governance.report.page's figure helpers."""
    from governance.plots import head_matrix, heatmap_panels
    from governance.report.figures import layer_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    grid = head_grid(result)
    for category, part in grid.groupby("category", sort=True):
        panels = [(f"head:{positions}", head_matrix(p))
                  for positions, p in part.groupby("positions", sort=True)]
        fig = heatmap_panels(panels, title=f"{category}: restoration score per head "
                             "(layers x heads, mean over pairs)", colorbar="restoration score S",
                             mark_max=True)
        path = out_dir / f"heads_{sanitise(category).replace(' ', '_')}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    fig = layer_figure(result)
    if fig is not None:
        path = out_dir / "layer_curves.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# -- runs -----------------------------------------------------------------------------------


def get_or_create_experiment(client: MlflowClient, name: str,
                             artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) if missing."""
    from mlflow.exceptions import MlflowException

    from governance.errors import ConfigError

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {name!r} is deleted: restore it in MLflow or set "
                          "`experiment` in the nightly config to another name")
    return exp.experiment_id


def start_audit_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str],
                    run_name: str | None = None) -> str:
    """Create the audit's run (state `running`) and return its id."""
    run = client.create_run(experiment_id, tags={**tags, T_STATE: "running"}, run_name=run_name)
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: Iterable[tuple[str, float, int]],
                model_id: str | None = None) -> int:
    """Log (key, value, step) triples in batches of at most 1000; return how many."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch: list[Metric] = []
    count = 0
    for key, value, step in metrics:
        batch.append(Metric(key, float(value), now, int(step), model_id=model_id))
        if len(batch) == MAX_BATCH:
            client.log_batch(run_id, metrics=batch)
            count, batch = count + len(batch), []
    if batch:
        client.log_batch(run_id, metrics=batch)
        count += len(batch)
    return count


def log_audit(
    client: MlflowClient,
    run_id: str,
    result: AuditResult,
    *,
    spec_text: str | None = None,
    policy_text: str | None = None,
    policy_resolved: Mapping[str, Any] | None = None,
    extra_artifacts: Mapping[str, str | Path] | None = None,
    model_id: str | None = None,
) -> None:
    """Log one audit into run `run_id`: curves (step = layer), summary metrics, spec params,
    `audit/`, per-head grids and PNGs, the resolved spec and policy, and `extra_artifacts`
    ({artifact dir: local file or directory}). Summary metrics are linked to `model_id`."""
    from mlflow.entities import LoggedModelInput, Param

    from governance.audit.spec import AuditSpec

    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    params = [Param(k, v) for k, v in spec_params(result).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    log_metrics(client, run_id, curve_metrics(result))
    log_metrics(client, run_id, ((k, v, 0) for k, v in summary_metrics(result).items()),
                model_id=model_id)

    with tempfile.TemporaryDirectory(prefix="persona-gov-log-") as tmp:
        root = Path(tmp)
        result.save(root / "audit")
        grid = head_grid(result)
        (root / "heads").mkdir()
        for category, part in grid.groupby("category", sort=True):
            part.to_csv(root / "heads" / f"{sanitise(category).replace(' ', '_')}.csv",
                        index=False)
        write_plots(result, root / "plots")
        (root / "spec").mkdir()
        resolved = AuditSpec.model_validate(result.meta["spec"]).model_dump(mode="json")
        import yaml

        (root / "spec" / "spec.resolved.yaml").write_text(yaml.safe_dump(resolved,
                                                                         sort_keys=False))
        if spec_text is not None:
            (root / "spec" / "spec.yaml").write_text(spec_text)
        if policy_text is not None or policy_resolved is not None:
            (root / "policy").mkdir()
            if policy_text is not None:
                (root / "policy" / "policy.yaml").write_text(policy_text)
            if policy_resolved is not None:
                (root / "policy" / "policy.resolved.json").write_text(
                    json.dumps(policy_resolved, indent=2, default=str) + "\n")
        for sub in sorted(p.name for p in root.iterdir()):
            if any((root / sub).iterdir()):
                client.log_artifacts(run_id, str(root / sub), artifact_path=sub)
    log_extra(client, run_id, extra_artifacts or {})


def log_extra(client: MlflowClient, run_id: str, artifacts: Mapping[str, str | Path]) -> None:
    """Log local files or directories under the given artifact directories."""
    for artifact_dir, local in artifacts.items():
        path = Path(local)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=artifact_dir or None)
        else:
            client.log_artifact(run_id, str(path), artifact_path=artifact_dir or None)


def finish_audit_run(client: MlflowClient, run_id: str, status: str, summary: str,
                     reason: str | None = None) -> None:
    """Mark the run: `completed` with its verdict status (every artifact is logged by now),
    or `error` with the reason (the run ends FAILED and never counts as an audit). Both texts
    are redacted of credentials."""
    from mlflow.entities import RunTag

    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    tags = [RunTag(T_STATUS, status), RunTag(T_SUMMARY, one_line(redact(summary), MAX_TAG))]
    if status == "error":
        tags += [RunTag(T_STATE, "error"),
                 RunTag(T_REASON, one_line(redact(reason or summary), MAX_TAG))]
    else:
        tags.append(RunTag(T_STATE, "completed"))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")


def abandon_running(client: MlflowClient, experiment_ids: list[str], model_name: str,
                    version: str, *, exclude_run_id: str, reason: str) -> list[str]:
    """Mark every other attempt of a model version still `running` as `error` with `reason`
    (its run ends FAILED) and return their ids. Call only while holding the version's lease:
    an attempt still running then is one that stopped without recording its end."""
    stale = [r.info.run_id for r in audit_runs(client, experiment_ids, model_name, version)
             if r.data.tags.get(T_STATE) == "running" and r.info.run_id != exclude_run_id]
    for run_id in stale:
        finish_audit_run(client, run_id, "error", f"error: {reason}", reason=reason)
    return stale


def audit_runs(
    client: MlflowClient,
    experiment_ids: list[str],
    model_name: str,
    version: str,
    *,
    completed: bool = False,
    max_results: int = 50,
    **hashes: str | None,
) -> list[Run]:
    """The audit runs of a model version, newest first: every attempt (running, completed or
    error), or only completed ones; `hashes` (spec_sha256=, policy_sha256=,
    toolkit_version=) narrow them to one spec, policy or toolkit version."""
    wanted: dict[str, Any] = {T_MODEL: model_name, T_VERSION: version}
    names = {"spec_sha256": T_SPEC, "policy_sha256": T_POLICY, "toolkit_version": T_TOOLKIT}
    for key, value in hashes.items():
        if key not in names:
            raise TypeError(f"unknown audit hash {key!r}; expected one of {sorted(names)}")
        if value is not None:
            wanted[names[key]] = value
    clauses = [equals(f"tags.`{tag}`", value) for tag, value in wanted.items()]
    if completed:
        clauses += [f"tags.`{T_STATE}` = 'completed'", "attributes.status = 'FINISHED'"]
    runs = client.search_runs(experiment_ids, " and ".join(clauses), max_results=max_results,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if exactly(r.data.tags, wanted)]


def find_audit_run(
    client: MlflowClient,
    experiment_ids: list[str],
    model_name: str,
    version: str,
    *,
    spec_sha256: str | None = None,
    policy_sha256: str | None = None,
    toolkit_version: str | None = None,
    exclude_run_id: str | None = None,
) -> Run | None:
    """The newest completed audit run of a model version, optionally under given hashes."""
    runs = audit_runs(client, experiment_ids, model_name, version, completed=True,
                      spec_sha256=spec_sha256, policy_sha256=policy_sha256,
                      toolkit_version=toolkit_version)
    return next((r for r in runs if r.info.run_id != exclude_run_id), None)


def load_audit(source: str | Path, *, client: MlflowClient | None = None,
               tracking_uri: str | None = None,
               download_dir: str | Path | None = None) -> AuditResult:
    """An AuditResult from an audit directory or from an MLflow run, `runs:/<run_id>[/<path>]`
    (artifact path `audit` by default, where `log_audit` puts `AuditResult.save()`). Run
    artifacts are downloaded through `client` (default: a client for `tracking_uri`) into
    `download_dir` (default: a new temporary directory)."""
    from governance.audit.result import AuditResult

    source = str(source)
    if not source.startswith("runs:/"):
        path = Path(source)
        if not path.is_dir():
            raise DriftError(f"{source!r} is neither an audit directory (written by "
                             "persona-gov audit) nor an MLflow run URI runs:/<run_id>")
        return AuditResult.load(path)
    run_id, _, artifact_path = source[len("runs:/"):].strip("/").partition("/")
    if not run_id:
        raise DriftError(f"{source!r}: expected runs:/<run_id> or runs:/<run_id>/<path>")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient(tracking_uri)
    target = Path(download_dir or tempfile.mkdtemp(prefix="persona-gov-audit-"))
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(run_id, artifact_path or "audit", str(target))
    except (MlflowException, OSError) as exc:
        raise DriftError(f"cannot download the audit artifacts of {source!r} "
                         f"(artifact path {artifact_path or 'audit'!r}): {exc}") from exc
    return AuditResult.load(local)
