"""Drift of an audit against a baseline audit: which layers and heads moved, and how much.

    from governance.judge.drift import drift_report
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

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from governance.errors import ConfigError, DriftError
from governance.files import move_into
from governance.judge.evidently import evidently_drift, table_summaries

if TYPE_CHECKING:
    from governance.audit.result import AuditResult


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


# -- figures ---------------------------------------------------------------------------------


def _head_change_png(changes: pd.DataFrame, path: Path) -> bool:
    from governance.plots import head_matrix, heatmap_panels

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
    from governance.plots import new_figure, style_layer_axis

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
    cur_id, base_id = current.identity(), baseline.identity()
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
        share, distances, files = evidently_drift(sides["current"], sides["baseline"], tmp, method,
                                             threshold)
        tables = table_summaries(distances, method, threshold)

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
        result.files = move_into(files, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
