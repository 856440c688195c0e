"""`persona-gov drift`: compare an audit with a baseline audit.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.judge.drift import DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS, drift_report
from governance.numbers import fmt
from governance.tracking.runs import load_audit

if TYPE_CHECKING:
    pass



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
        current = load_audit(args.current, tracking_uri=args.tracking_uri,
                                    download_dir=Path(tmp) / "current")
        baseline = load_audit(args.baseline, tracking_uri=args.tracking_uri,
                                     download_dir=Path(tmp) / "baseline")
        result = drift_report(current, baseline, args.out, method=args.method,
                              threshold=args.threshold)
    print(f"drift share (Evidently, {args.method}, threshold {args.threshold}): "
          f"{fmt(result.drift_share)}")
    for name, table in result.tables.items():
        print(f"  {name:<10} {table['drifted']}/{table['columns']} columns drifted "
              f"{table['drifted_columns']}")
    print("largest changes (current - baseline):")
    for _, r in result.top_changes.head(5).iterrows():
        where = f"L{r['layer']}" + (f".H{r['head']}" if r["level"] == "head" else "")
        print(f"  {r['component']}:{r['positions']:<9} {r['category']:<12} {where:<8} "
              f"{fmt(r['baseline'], signed=True)} -> {fmt(r['current'], signed=True)} "
              f"({fmt(r['change'], signed=True)})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {Path(args.out)}/ ({', '.join(p.name for p in result.files.values())})")
    return 0
