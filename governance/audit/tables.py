"""From the numbers of the model runs to the audit's tidy tables: scores, behaviour, pairs
(with the noise floor) and attention. Pure numpy/pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from governance.audit.result import BEHAVIOUR_COLUMNS, PAIR_COLUMNS, SCORE_COLUMNS
from governance.audit.spec import AuditSpec, involved_personas
from governance.inputs.personas import NO_PERSONA, PersonaPair
from governance.numbers import fmt
from governance.patching.scores import persona_shift, restoration


@dataclass
class PairScores:
    """Option logits of one pair over the questions: patched (patch, q, option)."""

    patches: list
    patched: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray


def score_table(runs: dict[PersonaPair, PairScores], spec: AuditSpec) -> pd.DataFrame:
    rows = []
    for pair, run in runs.items():
        patched, clean, corrupt = run.patched, run.clean, run.corrupt
        res = restoration(patched, clean, corrupt, n_boot=spec.bootstrap, seed=spec.seed)
        for i, p in enumerate(run.patches):
            rows.append((
                p.component, p.layer, p.head, p.positions, pair.category, pair.clean.phrase,
                pair.corrupt.phrase, res.score[i], res.ci_low[i], res.ci_high[i], clean.shape[0],
            ))
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    frame["head"] = frame["head"].astype("Int64")
    return frame


def behaviour_table(logits, answers, catalogue, pairs) -> pd.DataFrame:
    from governance.audit.behaviour import accuracy, compare

    categories = {NO_PERSONA: "baseline", **involved_personas(pairs, catalogue)}
    base = logits[NO_PERSONA]
    neutral = logits.get(catalogue.neutral.phrase)
    base_acc = accuracy(base, answers)[0]
    neutral_acc = accuracy(neutral, answers)[0] if neutral is not None else float("nan")
    rows = []
    for persona, lg in logits.items():
        acc, low, high = accuracy(lg, answers)
        vs_base = compare(lg, base, answers)
        rows.append((
            persona, categories[persona], acc, low, high, acc - base_acc, acc - neutral_acc,
            vs_base.flip_rate, vs_base.tv, vs_base.mcnemar_p, len(answers),
        ))
    return pd.DataFrame(rows, columns=BEHAVIOUR_COLUMNS)


def shift_interval(d_norm: np.ndarray, floor_norm: np.ndarray, n_boot: int = 1000, seed: int = 0):
    """95% bootstrap interval of mean(d_norm - floor_norm), paired by question."""
    diff = d_norm - floor_norm
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return np.quantile(means, [0.025, 0.975])


def pair_table(aligned, runs, persona_logits, answers) -> pd.DataFrame:
    from governance.audit.behaviour import compare
    from governance.patching.scores import centre

    def norms(clean, corrupt):
        return np.linalg.norm(centre(clean) - centre(corrupt), axis=1)

    floor = next((p for p in runs if p.kind == "noise_floor"), None)
    floor_norms = norms(runs[floor].clean, runs[floor].corrupt) if floor is not None else None
    rows = []
    for pair, run in runs.items():
        clean, corrupt = run.clean, run.corrupt
        shift = persona_shift(clean, corrupt)
        cmp = compare(persona_logits[pair.clean.phrase], persona_logits[pair.corrupt.phrase],
                      answers)
        ratio, above = float("nan"), None
        if floor_norms is not None and pair is not floor:
            floor_mean = floor_norms.mean()
            ratio = shift.mean_norm / floor_mean if floor_mean > 0 else float("inf")
            low, _ = shift_interval(norms(clean, corrupt), floor_norms)
            above = bool(low > 0)
        first = aligned[pair][0]
        rows.append((
            pair.clean.phrase, pair.corrupt.phrase, pair.category, pair.kind, shift.n_questions,
            shift.mean_norm, shift.constant_share, ratio, above, cmp.accuracy_delta,
            cmp.flip_rate, cmp.tv, cmp.mcnemar_p, first.padded, first.n_filler,
        ))
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def floor_statement(pairs: pd.DataFrame) -> str:
    floor = pairs[pairs["kind"] == "noise_floor"]
    if floor.empty:
        return "no noise-floor pair was audited"
    others = pairs[pairs["kind"] != "noise_floor"]
    above = others[others["above_floor"] == True]  # noqa: E712  (column holds None too)
    f = floor.iloc[0]
    head = (f"noise floor ({f.clean_persona!r} vs {f.corrupt_persona!r}): mean shift "
            f"{fmt(f.shift_norm)}, flip rate {fmt(f.flip_rate)}. ")
    if above.empty:
        return head + ("No persona pair moves the answers more than this paraphrase does "
                       "(bootstrap 95%): there is no persona effect above the noise floor.")
    return head + (f"{len(above)} of {len(others)} persona pairs shift the answers more than the "
                   "paraphrase (bootstrap 95%): " + ", ".join(
                       f"{r.clean_persona} -> {r.corrupt_persona}" for r in above.itertuples()))


def attention_frame(masses, catalogue, pairs) -> pd.DataFrame:
    from governance.patching.attention import attention_table

    return attention_table(masses, involved_personas(pairs, catalogue), catalogue.neutral.phrase)


def empty_attention() -> pd.DataFrame:
    return pd.DataFrame(
        columns=["layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"]
    )
