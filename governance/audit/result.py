"""The result of an audit: tidy tables plus the metadata that makes two audits comparable.

    result = AuditResult.load("out/smollm2")
    result.layer_curves(); result.top_heads(10)

Torch-free: written and read back as CSV + JSON in one directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from governance.audit.spec import AuditSpec
from governance.errors import ConfigError
from governance.files import check_replaceable, replace_dir

SCORE_COLUMNS = [
    "component", "layer", "head", "positions", "category", "clean_persona", "corrupt_persona",
    "score", "ci_low", "ci_high", "n_questions",
]
BEHAVIOUR_COLUMNS = [
    "persona", "category", "accuracy", "ci_low", "ci_high", "delta", "delta_neutral",
    "flip_rate", "tv", "mcnemar_p", "n_questions",
]
SCREEN_COLUMNS = [
    "component", "layer", "head", "positions", "category", "clean_persona", "corrupt_persona",
    "estimate", "exact",
]
PAIR_COLUMNS = [
    "clean_persona", "corrupt_persona", "category", "kind", "n_questions", "shift_norm",
    "constant_share", "floor_ratio", "above_floor", "accuracy_delta", "flip_rate", "tv",
    "mcnemar_p", "padded", "n_filler",
]


@dataclass
class AuditResult:
    """The tidy tables of one audit and the metadata that makes it comparable."""

    scores: pd.DataFrame
    attention: pd.DataFrame
    behaviour: pd.DataFrame
    pairs: pd.DataFrame
    meta: dict[str, Any]
    prompts: list[dict[str, Any]] = field(default_factory=list, repr=False)
    screen: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCREEN_COLUMNS))

    TABLES = ("scores", "attention", "behaviour", "pairs")

    def save(self, out_dir: str | Path) -> Path:
        """Write scores/attention/behaviour/pairs CSVs (and screen.csv), audit.json and
        prompts.jsonl to `out_dir`: a new or empty directory, or an earlier audit's, which is
        replaced as a whole (no stale table stays). Any other directory is refused."""
        out = check_replaceable(out_dir, "audit.json", "audit")
        return replace_dir(out, self._write)

    def _write(self, out: Path) -> None:
        for name in self.TABLES:
            getattr(self, name).to_csv(out / f"{name}.csv", index=False)
        if not self.screen.empty:
            self.screen.to_csv(out / "screen.csv", index=False)
        (out / "audit.json").write_text(json.dumps(self.meta, indent=2, default=str) + "\n")
        with (out / "prompts.jsonl").open("w") as fh:
            for record in self.prompts:
                fh.write(json.dumps(record) + "\n")

    @classmethod
    def load(cls, out_dir: str | Path) -> AuditResult:
        out = Path(out_dir)
        missing = [f for f in (*[f"{t}.csv" for t in cls.TABLES], "audit.json")
                   if not (out / f).exists()]
        if missing:
            raise ConfigError(f"{out} is not a complete audit directory: missing {missing}")
        tables = {t: pd.read_csv(out / f"{t}.csv") for t in cls.TABLES}
        if "head" in tables["scores"]:
            tables["scores"]["head"] = tables["scores"]["head"].astype("Int64")
        prompts_path = out / "prompts.jsonl"
        prompts = (
            [json.loads(line) for line in prompts_path.read_text().splitlines() if line]
            if prompts_path.exists()
            else []
        )
        screen = out / "screen.csv"
        if screen.exists():
            tables["screen"] = pd.read_csv(screen)
            tables["screen"]["head"] = tables["screen"]["head"].astype("Int64")
        return cls(**tables, meta=json.loads((out / "audit.json").read_text()), prompts=prompts)

    @property
    def spec(self) -> AuditSpec:
        return AuditSpec.model_validate(self.meta["spec"])

    def identity(self) -> dict[str, Any]:
        """What identifies this audit when two are compared: the model source and weights
        fingerprint, the spec hash and when it completed."""
        model = self.meta.get("model") or {}
        return {"model": model.get("source"),
                "weights_fingerprint": model.get("weights_fingerprint"),
                "spec_sha256": self.meta.get("spec_sha256"),
                "completed_at": self.meta.get("completed_at")}

    def layer_curves(self) -> pd.DataFrame:
        """Per-layer scores averaged over a category's pairs: (component, positions, category,
        layer) -> score. Heads are averaged into their layer."""
        frame = self.scores[self.scores["component"] != "head"]
        return (
            frame.groupby(["component", "positions", "category", "layer"], as_index=False)["score"]
            .mean()
        )

    def top_heads(self, n: int = 10, positions: str = "all") -> pd.DataFrame:
        heads = self.scores[(self.scores["component"] == "head")
                            & (self.scores["positions"] == positions)]
        grouped = heads.groupby(["category", "layer", "head"], as_index=False)["score"].mean()
        return grouped.reindex(grouped["score"].abs().sort_values(ascending=False).index).head(n)
