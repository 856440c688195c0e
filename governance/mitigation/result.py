"""The result of a mitigation what-if: tidy tables plus what makes it reproducible.

    result = MitigationResult.load("out/mitigation")
    result.curve        # per condition: shift, floor shift, accuracy (flagged vs random)
    result.effects      # per condition and pair/persona: every metric with its interval
    result.selections   # which components each selection switched off
    result.meta["split"]  # the ranking and held-out question ids

Torch-free: written and read back as CSV + JSON in one directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from governance.errors import ConfigError
from governance.files import check_replaceable, replace_dir

MARKER = "mitigation.json"


@dataclass
class MitigationResult:
    effects: pd.DataFrame
    curve: pd.DataFrame
    selections: pd.DataFrame
    meta: dict[str, Any]

    TABLES = ("effects", "curve", "selections")

    def save(self, out_dir: str | Path) -> Path:
        """Write the tables and mitigation.json to `out_dir`: new, empty, or an earlier
        what-if's (replaced as a whole); any other directory is refused."""
        out = check_replaceable(out_dir, MARKER, "mitigation what-if")
        return replace_dir(out, self._write)

    def _write(self, out: Path) -> None:
        for name in self.TABLES:
            getattr(self, name).to_csv(out / f"{name}.csv", index=False)
        (out / MARKER).write_text(json.dumps(self.meta, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, out_dir: str | Path) -> MitigationResult:
        out = Path(out_dir)
        missing = [f for f in (*[f"{t}.csv" for t in cls.TABLES], MARKER)
                   if not (out / f).exists()]
        if missing:
            raise ConfigError(f"{out} is not a complete mitigation directory: missing {missing}")
        tables = {t: pd.read_csv(out / f"{t}.csv", keep_default_na=True) for t in cls.TABLES}
        for name, cols in (("effects", ["seed"]), ("curve", ["seed"]),
                           ("selections", ["seed", "head"])):
            for col in cols:
                tables[name][col] = tables[name][col].astype("Int64")
        tables["curve"]["components"] = tables["curve"]["components"].fillna("")
        return cls(**tables, meta=json.loads((out / MARKER).read_text()))

    def flagged_vs_random(self) -> pd.DataFrame:
        """Per k: the flagged set's shift ratio and accuracy change beside the random sets'
        mean (and range over seeds): does switching off the flagged components beat chance?"""
        c = self.curve
        flagged = c[c["selection"] == "flagged"].set_index("k")
        rand = c[c["selection"] == "random"].groupby("k")
        out = pd.DataFrame({
            "flagged_shift_ratio": flagged["shift_ratio"],
            "random_shift_ratio": rand["shift_ratio"].mean(),
            "random_shift_ratio_min": rand["shift_ratio"].min(),
            "random_shift_ratio_max": rand["shift_ratio"].max(),
            "flagged_accuracy_delta": flagged["accuracy_delta"],
            "random_accuracy_delta": rand["accuracy_delta"].mean(),
            "floor_shift_flagged": flagged["floor_shift"],
        })
        return out.reset_index()

    def summary(self) -> str:
        """A few readable lines: the unablated shift against the floor, then per k."""
        c = self.curve
        base = c[c["selection"] == "none"].iloc[0]
        split = self.meta.get("split", {})
        lines = [
            f"model {self.meta.get('model', {}).get('source')}  "
            f"method {self.meta['spec']['method']}"
            f"  held-out questions {split.get('n_heldout')} (ranking: "
            f"{len(split.get('ranking_question_ids', []))})",
            f"unablated: persona shift {base['shift']:.4f}, noise floor {base['floor_shift']:.4f}"
            f", accuracy {base['accuracy']:.3f}",
            f"{'k':>3}  {'flagged shift':>13} {'random shift':>12}  {'flagged acc':>11} "
            f"{'random acc':>10}   (shift as a share of the unablated; accuracy change)",
        ]
        for r in self.flagged_vs_random().itertuples():
            lines.append(f"{r.k:>3}  {r.flagged_shift_ratio:13.3f} {r.random_shift_ratio:12.3f}  "
                         f"{r.flagged_accuracy_delta:+11.3f} {r.random_accuracy_delta:+10.3f}")
        return "\n".join(lines)
