"""From the ablated runs' option logits to the what-if's tidy tables. Pure numpy/pandas.

Definitions are the audit's (docs/method.md, "Behaviour" and "The scores"): for a pair, the
persona shift is mean_q ||d_q|| with d_q = centre(l_A(q)) - centre(l_B(q)); the flip rate is
the share of questions whose argmax answer differs between A and B; TV is the mean total
variation distance between their answer distributions; accuracy is the share of argmax
answers that are correct. Each is measured with both personas under the same ablation, and
every value comes with a percentile bootstrap interval over questions (one set of resamples
for every value, so differences are paired), and its change against the unablated model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from governance.audit.behaviour import softmax
from governance.mitigation.spec import Component
from governance.patching.scores import centre

EFFECT_COLUMNS = [
    "selection", "seed", "k", "scope", "category", "kind", "clean_persona", "corrupt_persona",
    "persona", "metric", "value", "ci_low", "ci_high", "baseline", "delta", "delta_low",
    "delta_high", "n_questions",
]
CURVE_COLUMNS = [
    "selection", "seed", "k", "shift", "shift_ratio", "floor_shift", "flip_rate", "tv",
    "accuracy", "accuracy_delta", "components",
]


@dataclass(frozen=True)
class Condition:
    """One ablation set: `selection` none (the unablated model), flagged (the ranking's top
    k) or random (k random candidates drawn with `seed`)."""

    selection: str
    k: int
    components: tuple[Component, ...]
    seed: int | None = None


@dataclass(frozen=True)
class MeasuredPair:
    clean_persona: str
    corrupt_persona: str
    category: str
    kind: str  # as in the audit's pairs table: noise_floor for the paraphrase pair


class _Boot:
    """Means with percentile intervals, all over the same resamples of the questions."""

    def __init__(self, n_questions: int, n_boot: int, seed: int) -> None:
        self.n = n_questions
        rng = np.random.default_rng(seed)
        self.counts = (rng.multinomial(n_questions, np.full(n_questions, 1.0 / n_questions),
                                       size=n_boot).astype(np.float64)
                       if n_boot > 0 and n_questions > 1 else None)  # (boot, q)

    def interval(self, per_question: np.ndarray) -> tuple[float, float]:
        if self.counts is None:
            return float("nan"), float("nan")
        boot = self.counts @ per_question / self.n
        low, high = np.quantile(boot, [0.025, 0.975])
        return float(low), float(high)


def effects_table(conditions: Sequence[Condition], personas: Sequence[str],
                  pairs: Sequence[MeasuredPair], logits: np.ndarray, answers: np.ndarray,
                  n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Long table: per condition, each pair's shift, flip rate and TV, each persona's
    accuracy and the overall accuracy (mean over the personas). `logits` is
    (condition, persona, question, option); condition 0 must be the unablated model."""
    if not conditions or conditions[0].selection != "none":
        raise ValueError("the first condition must be the unablated model (selection 'none')")
    logits = np.asarray(logits, np.float64)
    answers = np.asarray(answers)
    index = {p: i for i, p in enumerate(personas)}
    boot = _Boot(logits.shape[2], n_boot, seed)
    picks = logits.argmax(axis=-1)  # (cond, persona, q)
    correct = (picks == answers).astype(np.float64)
    probs = softmax(logits)
    series: list[tuple[dict, str, np.ndarray]] = []  # (labels, metric, (cond, q))
    for pair in pairs:
        a, b = index[pair.clean_persona], index[pair.corrupt_persona]
        d = centre(logits[:, a]) - centre(logits[:, b])  # (cond, q, option)
        labels = dict(scope="pair", category=pair.category, kind=pair.kind,
                      clean_persona=pair.clean_persona, corrupt_persona=pair.corrupt_persona)
        series += [
            (labels, "shift", np.linalg.norm(d, axis=-1)),
            (labels, "flip_rate", (picks[:, a] != picks[:, b]).astype(np.float64)),
            (labels, "tv", 0.5 * np.abs(probs[:, a] - probs[:, b]).sum(axis=-1)),
        ]
    for persona, i in index.items():
        series.append((dict(scope="persona", persona=persona), "accuracy", correct[:, i]))
    series.append((dict(scope="overall"), "accuracy", correct.mean(axis=1)))
    rows = []
    for labels, metric, values in series:
        base = values[0]
        for c, cond in enumerate(conditions):
            low, high = boot.interval(values[c])
            dlow, dhigh = boot.interval(values[c] - base)
            rows.append({"selection": cond.selection, "seed": cond.seed, "k": cond.k, **labels,
                         "metric": metric, "value": float(values[c].mean()), "ci_low": low,
                         "ci_high": high, "baseline": float(base.mean()),
                         "delta": float((values[c] - base).mean()), "delta_low": dlow,
                         "delta_high": dhigh, "n_questions": values.shape[1]})
    frame = pd.DataFrame(rows).reindex(columns=EFFECT_COLUMNS)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def curve_table(effects: pd.DataFrame, conditions: Sequence[Condition]) -> pd.DataFrame:
    """One row per condition: the persona pairs' mean shift (and its ratio to the unablated
    model's), the noise floor's shift, mean flip rate and TV, overall accuracy and its change,
    and the components switched off."""
    pairs = effects[effects["scope"] == "pair"]
    persona = pairs[pairs["kind"] != "noise_floor"]
    floor = pairs[pairs["kind"] == "noise_floor"]
    overall = effects[effects["scope"] == "overall"]
    keys = ["selection", "seed", "k"]

    def per_condition(frame: pd.DataFrame, metric: str, column: str = "value") -> pd.Series:
        part = frame[frame["metric"] == metric]
        return part.groupby(keys, dropna=False)[column].mean()

    out = pd.DataFrame({
        "shift": per_condition(persona, "shift"),
        "floor_shift": per_condition(floor, "shift"),
        "flip_rate": per_condition(persona, "flip_rate"),
        "tv": per_condition(persona, "tv"),
        "accuracy": per_condition(overall, "accuracy"),
        "accuracy_delta": per_condition(overall, "accuracy", "delta"),
        "baseline_shift": per_condition(persona, "shift", "baseline"),
    }).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["shift_ratio"] = out["shift"] / out["baseline_shift"]
    labels = {(c.selection, c.seed, c.k): " ".join(x.label for x in c.components)
              for c in conditions}
    out["components"] = [labels.get((s, None if pd.isna(sd) else int(sd), int(k)), "")
                         for s, sd, k in out[keys].itertuples(index=False)]
    order = {"none": 0, "flagged": 1, "random": 2}
    out = out.sort_values(keys, key=lambda col: col.map(order) if col.name == "selection"
                          else col).reset_index(drop=True)
    out["seed"] = out["seed"].astype("Int64")
    return out[CURVE_COLUMNS]


def selection_table(conditions: Sequence[Condition], ranking: pd.DataFrame) -> pd.DataFrame:
    """Which components each selection switched off, in order (the largest k of each
    selection; smaller k are its first k), with the audit's score of each."""
    score = {(r.component, int(r.layer), None if pd.isna(r.head) else int(r.head)): r.score
             for r in ranking.itertuples()}
    largest: dict[tuple[str, int | None], Condition] = {}
    for c in conditions:
        key = (c.selection, c.seed)
        if c.selection != "none" and (key not in largest or c.k > largest[key].k):
            largest[key] = c
    rows = [(c.selection, c.seed, i + 1, x.component, x.layer, x.head,
             score.get((x.component, x.layer, x.head), float("nan")))
            for c in largest.values() for i, x in enumerate(c.components)]
    frame = pd.DataFrame(rows, columns=["selection", "seed", "order", "component", "layer",
                                        "head", "score"])
    frame["seed"] = frame["seed"].astype("Int64")
    frame["head"] = frame["head"].astype("Int64")
    return frame
