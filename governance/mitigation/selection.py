"""Which components to switch off and which questions to measure on. Torch-free.

- `rank_components`: the audit's restoration scores, averaged over its persona pairs (the
  noise floor left out), highest first: the components that carry the persona.
- `random_orders`: the same candidates in a random order per seed, the control.
- `heldout_split`: the questions the ranking did not come from, sampled with a seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from governance.errors import ConfigError
from governance.inputs.questions import Question, sample_questions
from governance.mitigation.spec import Component, MitigationSpec

log = logging.getLogger(__name__)

RANKING_COLUMNS = ["rank", "component", "layer", "head", "positions", "score"]
# fewer held-out questions than this and no interval means anything
MIN_HELDOUT = 5


def rank_positions(scores: pd.DataFrame, spec: MitigationSpec) -> str:
    """The positions whose scores rank the components: the spec's, or `all` where the audit
    patched at all positions, else `last`."""
    if spec.rank_positions is not None:
        return spec.rank_positions
    kinds = scores.loc[scores["component"].isin(spec.components), "positions"]
    return "all" if (kinds == "all").any() else "last"


def rank_components(scores: pd.DataFrame, pairs: pd.DataFrame,
                    spec: MitigationSpec) -> pd.DataFrame:
    """Candidates (rank, component, layer, head, positions, score), the highest mean
    restoration score over the audit's persona pairs (the spec's, if it names some) first.
    Raises ConfigError when the audit scored none of the spec's components there."""
    positions = rank_positions(scores, spec)
    floor = pairs.loc[pairs["kind"] == "noise_floor", ["clean_persona", "corrupt_persona"]]
    floor_keys = set(map(tuple, floor.to_numpy()))
    pair_keys = scores[["clean_persona", "corrupt_persona"]].apply(tuple, axis=1)
    keep = (scores["component"].isin(spec.components) & (scores["positions"] == positions)
            & ~pair_keys.isin(floor_keys))
    if spec.pairs:  # rank by the measured pairs only
        keep &= pair_keys.isin({tuple(p) for p in spec.pairs})
    chosen = scores[keep]
    if chosen.empty:
        have = sorted(set(scores["component"] + ":" + scores["positions"]))
        raise ConfigError(
            f"the audit has no scores for {list(spec.components)} at positions {positions!r} "
            f"outside the noise floor (it has {have}); audit with e.g. --components head:all "
            "head:last, or pass --components/--rank-positions that the audit scored")
    frame = chosen.assign(head=chosen["head"].astype("Int64").fillna(-1))
    grouped = (frame.groupby(["component", "layer", "head"], as_index=False)["score"].mean()
               .dropna(subset=["score"]))
    grouped = grouped.sort_values(["score", "component", "layer", "head"],
                                  ascending=[False, True, True, True], kind="stable")
    grouped["head"] = grouped["head"].astype("Int64").replace(-1, pd.NA)
    grouped.insert(0, "rank", range(1, len(grouped) + 1))
    grouped["positions"] = positions
    return grouped[RANKING_COLUMNS].reset_index(drop=True)


def components_of(ranking: pd.DataFrame) -> list[Component]:
    """The ranking's rows as `Component`s, in its order."""
    return [Component(r.component, int(r.layer), None if pd.isna(r.head) else int(r.head))
            for r in ranking.itertuples()]


def random_orders(candidates: list[Component],
                  seeds: tuple[int, ...]) -> dict[int, list[Component]]:
    """Per seed, every candidate in a random order: its first k are that seed's random k
    (nested, like the flagged top k)."""
    out = {}
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(candidates))
        out[seed] = [candidates[i] for i in perm]
    return out


@dataclass(frozen=True)
class Split:
    """The questions the ranking came from and the held-out ones measured on."""

    ranking: list[Question]
    heldout: list[Question]
    requested: int
    seed: int

    def record(self) -> dict:
        return {"ranking_question_ids": [q.id for q in self.ranking],
                "heldout_question_ids": [q.id for q in self.heldout],
                "n_heldout_requested": self.requested, "n_heldout": len(self.heldout),
                "seed": self.seed}


def heldout_split(pool: list[Question], ranking_ids: list[str], n: int, seed: int) -> Split:
    """`n` questions of `pool` that are not among `ranking_ids`, sampled stratified by subject
    with `seed`. Fewer remain than asked: all of them, with a warning (recorded as n_heldout);
    fewer than MIN_HELDOUT: ConfigError."""
    ranking_set = set(ranking_ids)
    ranking = [q for q in pool if q.id in ranking_set]
    rest = [q for q in pool if q.id not in ranking_set]
    if len(rest) < MIN_HELDOUT:
        raise ConfigError(
            f"only {len(rest)} question(s) of the question set are not among the audit's "
            f"{len(ranking_set)}; at least {MIN_HELDOUT} held-out questions are needed: pass a "
            "larger question set (--questions)")
    if len(rest) < n:
        log.warning("only %d held-out questions remain (asked for %d): measuring on %d",
                    len(rest), n, len(rest))
    return Split(ranking, sample_questions(rest, min(n, len(rest)), seed), n, seed)
