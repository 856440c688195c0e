"""Drift of an audit against a baseline audit: which layers and heads moved, and how much.

    from governance.drift import drift_report
    drift = drift_report(current, baseline, "out/drift")
    drift.drift_share, drift.top_changes.head()

Three tables are compared, rows aligned by key:

| table     | key                                         | value                            |
|-----------|---------------------------------------------|----------------------------------|
| layers    | component, positions, category, layer       | mean restoration score (curves)  |
| heads     | positions, category, layer, head            | mean restoration score per head  |
| behaviour | persona, category                           | accuracy, deltas, flip rate, TV  |

Two views of change come out. The *aligned* view is ours: current − baseline per key,
sorted by |change| (`top_changes`, drift_changes.csv), which names the layer or head that
moved. The *distribution* view is Evidently 0.7's: each series (one component:positions:
category curve `layers/...`, one category's head grid `heads/...`, one behaviour column
`behaviour/...`) is a column of one Report whose drift method is chosen explicitly (normed
Wasserstein distance by default: these are tens of rows, where KS p-values flag noise).
Shorter tables are padded with empty cells, which Evidently drops per column. Evidently's
share of drifted columns is `drift_share`. A distribution test ignores which row moved, so
a single changed head may not drift its column: `top_changes` is what names it.

Files: evidently_drift.html + .json, head_change.png (current − baseline per head),
layer_curves.png (overlay), drift.json, drift_changes.csv, behaviour_changes.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from governance.errors import ConfigError, GovernanceError

if TYPE_CHECKING:
    from governance.audit import AuditResult

log = logging.getLogger(__name__)

DEFAULT_METHOD = "wasserstein"
DEFAULT_THRESHOLD = 0.1
# Evidently's numeric drift methods that give a distance (or a test) without needing labels
METHODS = ("wasserstein", "ed", "hellinger", "jensenshannon", "kl_div", "psi", "ks", "t_test")
LAYER_KEYS = ["component", "positions", "category", "layer"]
HEAD_KEYS = ["positions", "category", "layer", "head"]
BEHAVIOUR_KEYS = ["persona", "category"]
BEHAVIOUR_VALUES = ["accuracy", "delta", "delta_neutral", "flip_rate", "tv"]
CHANGE_COLUMNS = ["level", "component", "positions", "category", "layer", "head",
                  "baseline", "current", "change", "abs_change"]


class DriftError(GovernanceError):
    """Two audits cannot be compared, or an audit source cannot be read."""


@dataclass
class DriftResult:
    """What moved between a baseline audit and the current one, with the files written."""

    drift_share: float  # Evidently: drifted columns / compared columns, all tables together
    top_changes: pd.DataFrame  # per-layer and per-head changes, largest |change| first
    behaviour_changes: pd.DataFrame  # per persona and behaviour column
    tables: dict[str, dict[str, Any]]  # per table: columns, drifted, share, distances
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    current: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    def max_change(self, level: str) -> dict[str, Any] | None:
        """The largest |change| row of one level ("layer" or "head"), or None."""
        rows = self.top_changes[self.top_changes["level"] == level]
        return None if rows.empty else _record(rows.iloc[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "drift_share": self.drift_share,
            "tables": self.tables,
            "max_layer_change": self.max_change("layer"),
            "max_head_change": self.max_change("head"),
            "top_changes": [_record(r) for _, r in self.top_changes.head(20).iterrows()],
            "top_behaviour_changes": [
                _record(r) for _, r in self.behaviour_changes.head(10).iterrows()
            ],
            "notes": self.notes,
            "current": self.current,
            "baseline": self.baseline,
            "files": {k: p.name for k, p in self.files.items()},
        }


def _record(row: pd.Series) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if value is pd.NA or (isinstance(value, float) and np.isnan(value)):
            out[key] = None
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out


# -- aligned tables --------------------------------------------------------------------------


def layer_table(result: AuditResult) -> pd.DataFrame:
    """Per-layer curves: (component, positions, category, layer) -> mean score."""
    return result.layer_curves()


def head_table(result: AuditResult) -> pd.DataFrame:
    """Per-head grid: (positions, category, layer, head) -> mean score over a category's pairs."""
    heads = result.scores[result.scores["component"] == "head"]
    if heads.empty:
        return pd.DataFrame(columns=[*HEAD_KEYS, "score"])
    grid = heads.groupby(HEAD_KEYS, as_index=False)["score"].mean()
    grid["head"] = grid["head"].astype(int)
    return grid


def _align(current: pd.DataFrame, baseline: pd.DataFrame, keys: list[str], values: list[str]):
    """Outer-join on `keys`; returns (matched rows with <v>_baseline/<v>_current, counts of
    keys found only on one side)."""
    cur = current[keys + values].copy()
    base = baseline[keys + values].copy()
    for frame in (cur, base):
        for k in keys:
            if k in ("layer", "head"):
                frame[k] = frame[k].astype(int)
            else:
                frame[k] = frame[k].astype(str)
    joined = base.merge(cur, on=keys, how="outer", suffixes=("_baseline", "_current"),
                        indicator=True)
    only = {
        "only_current": int((joined["_merge"] == "right_only").sum()),
        "only_baseline": int((joined["_merge"] == "left_only").sum()),
    }
    matched = joined[joined["_merge"] == "both"].drop(columns="_merge").reset_index(drop=True)
    return matched, only


def _changes(matched: pd.DataFrame, level: str) -> pd.DataFrame:
    out = matched.rename(columns={"score_baseline": "baseline", "score_current": "current"})
    out = out.assign(level=level)
    if level == "head":
        out = out.assign(component="head")
    else:
        out = out.assign(head=pd.NA)
    out["change"] = out["current"] - out["baseline"]
    out["abs_change"] = out["change"].abs()
    out["head"] = out["head"].astype("Int64")
    return out[CHANGE_COLUMNS]


def _behaviour_changes(matched: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for col in BEHAVIOUR_VALUES:
        if f"{col}_baseline" not in matched:
            continue
        part = matched[BEHAVIOUR_KEYS].copy()
        part["metric"] = col
        part["baseline"] = matched[f"{col}_baseline"]
        part["current"] = matched[f"{col}_current"]
        rows.append(part)
    if not rows:
        return pd.DataFrame(columns=[*BEHAVIOUR_KEYS, "metric", "baseline", "current", "change",
                                     "abs_change"])
    out = pd.concat(rows, ignore_index=True)
    out["change"] = out["current"] - out["baseline"]
    out["abs_change"] = out["change"].abs()
    return _sort(out)


def _sort(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("abs_change", ascending=False, na_position="last",
                             kind="stable").reset_index(drop=True)


# -- Evidently -------------------------------------------------------------------------------


def _wide(matched: pd.DataFrame, index: list[str], series: list[str], side: str) -> pd.DataFrame:
    """One column per series (e.g. 'mlp_out:identity:race'), one row per index key."""
    frame = matched.copy()
    frame["_series"] = frame[series].astype(str).agg(":".join, axis=1)
    wide = frame.pivot_table(index=index, columns="_series", values=f"score_{side}",
                             aggfunc="mean", dropna=False)
    wide.columns = [str(c) for c in wide.columns]
    return wide.reset_index(drop=True)


def _evidently(current: pd.DataFrame, reference: pd.DataFrame, out_dir: Path, method: str,
               threshold: float) -> tuple[float, dict[str, float], dict[str, Path]]:
    """Run Evidently's DataDriftPreset over the shared, not-all-empty columns; save HTML +
    JSON. Returns (share of drifted columns, distance per column, files)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [c for c in current.columns
               if c in reference.columns and current[c].notna().any()
               and reference[c].notna().any()]
    if not columns:
        raise DriftError("no column of the current and baseline audits has values on both "
                         "sides: nothing to compare")
    definition = DataDefinition(numerical_columns=columns)
    # Evidently's histogram binning fails on a column whose values differ only in the last
    # float bits ("Too many bins for data range"); 1e-6 is far below any score that matters.
    current, reference = current[columns].round(6), reference[columns].round(6)
    report = Report([DataDriftPreset(num_method=method, num_threshold=threshold)],
                    include_tests=True)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(
            current_data=Dataset.from_pandas(current[columns], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    files = {"evidently_html": out_dir / "evidently_drift.html",
             "evidently_json": out_dir / "evidently_drift.json"}
    snapshot.save_html(str(files["evidently_html"]))
    snapshot.save_json(str(files["evidently_json"]))
    share, distances = None, {}
    for metric in snapshot.dict()["metrics"]:
        kind = metric["config"].get("type", "")
        if kind.endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif kind.endswith("ValueDrift") and metric["value"] is not None:
            distances[metric["config"]["column"]] = float(metric["value"])
    if share is None:
        raise DriftError("Evidently's drift report has no DriftedColumnsCount metric")
    return share, distances, files


def _is_drift(method: str, value: float, threshold: float) -> bool:
    # p-value tests drift below the threshold; distances drift at or above it (as Evidently)
    return value < threshold if method in ("ks", "t_test") else value >= threshold


def _table_summaries(distances: dict[str, float], method: str,
                     threshold: float) -> dict[str, dict[str, Any]]:
    """Evidently's per-column values grouped by table ('layers/...', 'heads/...')."""
    tables: dict[str, dict[str, Any]] = {}
    for column, value in distances.items():
        table, _, series = column.partition("/")
        entry = tables.setdefault(table, {"columns": 0, "drifted": 0, "share": 0.0,
                                          "method": method, "threshold": threshold,
                                          "drifted_columns": [], "distances": {}})
        entry["columns"] += 1
        entry["distances"][series] = value
        if _is_drift(method, value, threshold):
            entry["drifted"] += 1
            entry["drifted_columns"].append(series)
    for entry in tables.values():
        entry["share"] = entry["drifted"] / entry["columns"]
    return tables


# -- figures ---------------------------------------------------------------------------------


def _head_change_png(changes: pd.DataFrame, path: Path) -> bool:
    from governance.report import head_matrix, heatmap_panels

    heads = changes[changes["level"] == "head"]
    if heads.empty:
        return False
    panels = [(f"{category} (head:{positions})", head_matrix(part, "change"))
              for (positions, category), part in heads.groupby(["positions", "category"])]
    fig = heatmap_panels(panels, title="per-head change: current − baseline restoration score "
                         "(box: largest |change| per panel)", colorbar="change", mark_max=True)
    fig.savefig(path, dpi=100)
    return True


def _layer_curves_png(changes: pd.DataFrame, path: Path) -> bool:
    from governance.report import new_figure, style_layer_axis

    layers = changes[changes["level"] == "layer"]
    if layers.empty:
        return False
    groups = list(layers.groupby(["component", "positions"], sort=True))
    fig, axes = new_figure(len(groups), ncols=3, panel=(3.6, 2.6))
    for ax, ((component, positions), part) in zip(axes, groups, strict=True):
        for i, (category, line) in enumerate(part.groupby("category", sort=True)):
            line = line.sort_values("layer")
            colour = f"C{i % 10}"
            ax.plot(line["layer"], line["current"], color=colour, marker=".",
                    label=f"{category} current")
            ax.plot(line["layer"], line["baseline"], color=colour, ls="--",
                    label=f"{category} baseline")
        style_layer_axis(ax, f"{component}:{positions}", legend_size=6)
    fig.suptitle("per-layer restoration score: current (solid) vs baseline (dashed)",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    return True


# -- the report ------------------------------------------------------------------------------


def _identity(result: AuditResult) -> dict[str, Any]:
    model = result.meta.get("model", {}) or {}
    return {
        "model": model.get("source"),
        "weights_fingerprint": model.get("weights_fingerprint"),
        "spec_sha256": result.meta.get("spec_sha256"),
        "completed_at": result.meta.get("completed_at"),
    }


def drift_report(
    current: AuditResult,
    baseline: AuditResult,
    out_dir: str | Path,
    *,
    method: str = DEFAULT_METHOD,
    threshold: float = DEFAULT_THRESHOLD,
) -> DriftResult:
    """Compare `current` with `baseline` and write the drift files into `out_dir`.

    Files are written to a temporary sibling first and moved in at the end, so a failure
    leaves whatever `out_dir` held before untouched."""
    if method not in METHODS:
        raise ConfigError(f"drift method {method!r} is not one of {METHODS}")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and np.isfinite(threshold)):
        raise ConfigError(f"drift threshold must be a positive number, got {threshold!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    cur_id, base_id = _identity(current), _identity(baseline)
    if cur_id["spec_sha256"] != base_id["spec_sha256"]:
        notes.append("the two audits ran different specs (spec_sha256 differs): only rows "
                     "with the same key are compared, and a change may come from the spec")

    layers, layer_only = _align(layer_table(current), layer_table(baseline), LAYER_KEYS, ["score"])
    heads, head_only = _align(head_table(current), head_table(baseline), HEAD_KEYS, ["score"])
    cur_b, base_b = current.behaviour, baseline.behaviour
    values = [c for c in BEHAVIOUR_VALUES if c in cur_b and c in base_b]
    behaviour, beh_only = _align(cur_b, base_b, BEHAVIOUR_KEYS, values)
    for name, only in (("layers", layer_only), ("heads", head_only), ("behaviour", beh_only)):
        if only["only_current"] or only["only_baseline"]:
            notes.append(f"{name}: {only['only_current']} keys only in the current audit, "
                         f"{only['only_baseline']} only in the baseline (not compared)")
    if layers.empty and heads.empty and behaviour.empty:
        raise DriftError("the current and baseline audits share no layer, head or behaviour "
                         "rows: they are not comparable (check the specs and the model)")

    top = _sort(pd.concat(
        [f for f in (_changes(layers, "layer"), _changes(heads, "head")) if not f.empty]
        or [pd.DataFrame(columns=CHANGE_COLUMNS)], ignore_index=True))
    beh_changes = _behaviour_changes(behaviour)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.drift-", dir=out.parent))
    try:
        # one Evidently report: the tables' columns side by side, shorter ones padded with
        # empty cells (Evidently drops them per column)
        sides = {}
        for side in ("current", "baseline"):
            parts = []
            if not layers.empty:
                parts.append(_wide(layers, ["layer"], ["component", "positions", "category"],
                                   side).add_prefix("layers/"))
            if not heads.empty:
                parts.append(_wide(heads, ["layer", "head"], ["positions", "category"],
                                   side).add_prefix("heads/"))
            if not behaviour.empty:
                parts.append(behaviour[[f"{v}_{side}" for v in values]]
                             .set_axis([f"behaviour/{v}" for v in values], axis=1)
                             .reset_index(drop=True))
            sides[side] = pd.concat(parts, axis=1)
        share, distances, files = _evidently(sides["current"], sides["baseline"], tmp, method,
                                             threshold)
        tables = _table_summaries(distances, method, threshold)

        if _head_change_png(top, tmp / "head_change.png"):
            files["head_change"] = tmp / "head_change.png"
        if _layer_curves_png(top, tmp / "layer_curves.png"):
            files["layer_curves"] = tmp / "layer_curves.png"
        top.to_csv(tmp / "drift_changes.csv", index=False)
        beh_changes.to_csv(tmp / "behaviour_changes.csv", index=False)
        files["changes"] = tmp / "drift_changes.csv"
        files["behaviour_changes"] = tmp / "behaviour_changes.csv"
        files["summary"] = tmp / "drift.json"
        result = DriftResult(share, top, beh_changes, tables, files, notes, cur_id, base_id)
        (tmp / "drift.json").write_text(
            json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        final = {}
        for key, path in files.items():
            os.replace(path, out / path.name)
            final[key] = out / path.name
        result.files = final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# -- audit sources (directories or MLflow runs) ----------------------------------------------


def load_audit_source(source: str, *, tracking_uri: str | None = None,
                      download_dir: str | Path | None = None) -> AuditResult:
    """An AuditResult from an audit directory or from `runs:/<run_id>[/<artifact path>]`
    (default artifact path `audit`, where the nightly loop logs `AuditResult.save()`)."""
    from governance.audit import AuditResult

    if source.startswith("runs:/"):
        run_id, _, artifact_path = source[len("runs:/"):].strip("/").partition("/")
        if not run_id:
            raise DriftError(f"{source!r}: expected runs:/<run_id> or runs:/<run_id>/<path>")
        import mlflow
        from mlflow.exceptions import MlflowException

        dst = Path(download_dir or tempfile.mkdtemp(prefix="persona-gov-audit-"))
        dst.mkdir(parents=True, exist_ok=True)
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path or "audit", dst_path=str(dst),
                tracking_uri=tracking_uri,
            )
        except (MlflowException, OSError) as exc:
            raise DriftError(f"cannot download the audit artifacts of {source!r} "
                             f"(artifact path {artifact_path or 'audit'!r}): {exc}") from exc
        return AuditResult.load(local)
    path = Path(source)
    if not path.is_dir():
        raise DriftError(f"{source!r} is neither an audit directory (written by persona-gov "
                         "audit) nor an MLflow run URI runs:/<run_id>")
    return AuditResult.load(path)


def add_cli(sub: Any) -> None:
    """Register `persona-gov drift`."""
    p = sub.add_parser(
        "drift",
        help="compare an audit with a baseline audit (Evidently drift + per-head changes)",
        description=(
            "Compare the per-layer curves, per-head grid and behaviour table of the current "
            "audit with a baseline audit. Writes evidently_drift.html/.json, "
            "head_change.png, layer_curves.png, drift.json, drift_changes.csv and "
            "behaviour_changes.csv to --out."
        ),
        epilog=("examples:\n  persona-gov drift --current out/today --baseline out/approved "
                "--out out/drift\n  persona-gov drift --current runs:/<run_id> --baseline "
                "runs:/<run_id> --tracking-uri sqlite:///mlflow.db --out out/drift"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--current", required=True,
                   help="audit directory, or runs:/<run_id>[/<path>] (artifact path "
                        "default 'audit')")
    p.add_argument("--baseline", required=True, help="audit directory or runs:/<run_id>")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"Evidently drift method for numeric columns (default {DEFAULT_METHOD})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"drift threshold of the method (default {DEFAULT_THRESHOLD})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ sources (default: "
                                          "MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd_drift)


def _cmd_drift(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="persona-gov-drift-") as tmp:
        current = load_audit_source(args.current, tracking_uri=args.tracking_uri,
                                    download_dir=Path(tmp) / "current")
        baseline = load_audit_source(args.baseline, tracking_uri=args.tracking_uri,
                                     download_dir=Path(tmp) / "baseline")
        result = drift_report(current, baseline, args.out, method=args.method,
                              threshold=args.threshold)
    print(f"drift share (Evidently, {args.method}, threshold {args.threshold}): "
          f"{result.drift_share:.3f}")
    for name, table in result.tables.items():
        print(f"  {name:<10} {table['drifted']}/{table['columns']} columns drifted "
              f"{table['drifted_columns']}")
    print("largest changes (current - baseline):")
    for _, r in result.top_changes.head(5).iterrows():
        where = f"L{r['layer']}" + (f".H{r['head']}" if r["level"] == "head" else "")
        print(f"  {r['component']}:{r['positions']:<9} {r['category']:<12} {where:<8} "
              f"{r['baseline']:+.3f} -> {r['current']:+.3f} ({r['change']:+.3f})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {Path(args.out)}/ ({', '.join(p.name for p in result.files.values())})")
    return 0
