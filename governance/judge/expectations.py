"""Running Great Expectations 1.x on pandas tables: one ephemeral context per process, checks
named for the failures table, and the result a caller gates on (`QualityResult.success`).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    pass


FLOAT_MAX = float(np.finfo(np.float64).max)
MASS_TOLERANCE = 1e-6  # float32 attention weights may sum a hair above 1
CHECK_COLUMNS = ["name", "table", "expectation", "column", "success", "unexpected_count",
                 "failed_rows", "failed_values", "observed", "note"]


@dataclass
class QualityResult:
    """Outcome of one suite: every check, and the failed ones with their rows and values."""

    suite: str
    success: bool
    checks: pd.DataFrame  # CHECK_COLUMNS, one row per expectation
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> pd.DataFrame:
        return self.checks[~self.checks["success"].astype(bool)].reset_index(drop=True)

    def failed_names(self) -> list[str]:
        return list(self.failures["name"])

    def summary(self) -> str:
        if self.success:
            return f"{self.suite}: all {len(self.checks)} expectations passed"
        lines = [f"{self.suite}: {len(self.failures)} of {len(self.checks)} expectations failed"]
        for _, r in self.failures.iterrows():
            rows = short_values(r["failed_rows"])
            lines.append(f"  {r['name']} ({r['table']}.{r['column'] or '*'}): "
                         f"{r['unexpected_count'] or 0} rows {rows} {r['note'] or ''}".rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "success": self.success,
            "n_expectations": len(self.checks),
            "n_failed": len(self.failures),
            "notes": self.notes,
            "checks": json.loads(self.checks.to_json(orient="records", default_handler=str)),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write quality_<suite>.json (all checks) and quality_<suite>_failures.csv."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"quality_{self.suite}.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        failures = self.failures.copy()
        for col in ("failed_rows", "failed_values", "observed"):
            failures[col] = failures[col].map(lambda v: json.dumps(v, default=str))
        failures.to_csv(out / f"quality_{self.suite}_failures.csv", index=False)
        return path


def short_values(value: Any, n: int = 5) -> str:
    if not value:
        return ""
    items = list(value)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return json.dumps(items[:n], default=str) + more


# -- the GX context: one per process ---------------------------------------------------------

_LOCK = threading.Lock()


@functools.cache
def _context():
    """The process's ephemeral GX context and its pandas data source (built once)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx, ctx.data_sources.add_pandas("governance")


@functools.cache
def _batch_definition(table: str):
    _, source = _context()
    return source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")


@dataclass(frozen=True)
class Check:
    """One named expectation on one table: `kind` is a GX expectation class name."""

    name: str
    kind: str
    kwargs: dict[str, Any]

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def validate_table(table: str, frame: pd.DataFrame, checks: Sequence[Check],
              index_columns: list[str]) -> list[dict[str, Any]]:
    """Run `checks` on `frame` as one GX suite; one record per check."""
    import great_expectations as gx

    _context()  # a suite needs the process's context to exist first
    suite = gx.ExpectationSuite(name=f"governance_{table}")
    for check in checks:
        expectation = getattr(gx.expectations, check.kind)(**check.kwargs,
                                                           meta={"name": check.name})
        suite.add_expectation(expectation)
    result_format = {"result_format": "COMPLETE",
                     "unexpected_index_column_names": [c for c in index_columns
                                                       if c in frame.columns]}
    with _LOCK:
        batch = _batch_definition(table).get_batch(batch_parameters={"dataframe": frame})
        results = batch.validate(suite, result_format=result_format)
    records = []
    for res in results.results:
        config = res.expectation_config
        info = res.result or {}
        note = ""
        if res.exception_info and res.exception_info.get("raised_exception"):
            note = str(res.exception_info.get("exception_message", ""))[:500]
        index_rows = info.get("unexpected_index_list") or []
        rows = [{k: v for k, v in r.items() if k in index_columns} for r in index_rows
                if isinstance(r, dict)]
        records.append({
            "name": (config.meta or {}).get("name", config.type),
            "table": table,
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "success": bool(res.success),
            "unexpected_count": plain(info.get("unexpected_count")),
            "failed_rows": plain(rows) if not res.success else [],
            "failed_values": (plain(info.get("unexpected_list") or [])[:50]
                              if not res.success else []),
            "observed": plain(info.get("observed_value")),
            "note": note,
        })
    return records


def plain(value: Any) -> Any:
    """numpy/pandas scalars inside GX results -> plain Python (NaN and NA -> None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if value is pd.NA or value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def quality_result(suite: str, records: list[dict[str, Any]], notes: list[str]) -> QualityResult:
    checks = pd.DataFrame(records, columns=CHECK_COLUMNS)
    checks["unexpected_count"] = checks["unexpected_count"].astype("Int64")
    return QualityResult(suite, bool(checks["success"].all()) if len(checks) else False,
                         checks, notes)


def meta_failure(name: str, table: str, note: str) -> dict[str, Any]:
    """A check that could not be expressed because the metadata it needs is missing."""
    return {"name": name, "table": table, "expectation": "metadata", "column": None,
            "success": False, "unexpected_count": None, "failed_rows": [], "failed_values": [],
            "observed": None, "note": note}
