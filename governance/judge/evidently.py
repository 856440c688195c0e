"""Evidently's data-drift report on the side-by-side score tables: the drift share, the
per-column distances, and the HTML/JSON pages for the risk team.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from governance.errors import DriftError

# characters a column label may carry into Evidently's page as they are; every other one is
# percent-escaped, so no catalogue or model string can open a tag or close a script block
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _:./=+-")


def safe_label(name: str) -> str:
    """`name` with every character outside a small safe set percent-escaped ('<' -> '%3C').
    Evidently writes column names into a script block of its HTML page unescaped."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode())
                   for c in str(name))


def evidently_drift(current: pd.DataFrame, reference: pd.DataFrame, out_dir: Path, method: str,
                    threshold: float) -> tuple[float, dict[str, float], dict[str, Path]]:
    """Run Evidently's DataDriftPreset over the shared, not-all-empty columns; save HTML +
    JSON. Returns (share of drifted columns, distance per column, files). Column labels reach
    Evidently escaped (`safe_label`); the distances come back under the original names."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [c for c in current.columns
               if c in reference.columns and current[c].notna().any()
               and reference[c].notna().any()]
    if not columns:
        raise DriftError("no column of the current and baseline audits has values on both "
                         "sides: nothing to compare")
    labels = {safe_label(c): c for c in columns}
    current = current[columns].set_axis(list(labels), axis=1)
    reference = reference[columns].set_axis(list(labels), axis=1)
    columns = list(labels)
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
            distances[labels[metric["config"]["column"]]] = float(metric["value"])
    if share is None:
        raise DriftError("Evidently's drift report has no DriftedColumnsCount metric")
    return share, distances, files


def is_drift(method: str, value: float, threshold: float) -> bool:
    # p-value tests drift below the threshold; distances drift at or above it (as Evidently)
    return value < threshold if method in ("ks", "t_test") else value >= threshold


def table_summaries(distances: dict[str, float], method: str,
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
        if is_drift(method, value, threshold):
            entry["drifted"] += 1
            entry["drifted_columns"].append(series)
    for entry in tables.values():
        entry["share"] = entry["drifted"] / entry["columns"]
    return tables
