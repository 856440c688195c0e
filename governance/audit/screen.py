"""The attribution-patching (AtP) screen inside an audit: estimates for every patch, the top k
of each sweep kept for exact patching, and how well the estimates agreed with exact scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from governance.audit.result import SCREEN_COLUMNS
from governance.inputs.personas import PersonaPair


def screen_pairs(loaded, aligned: dict[PersonaPair, list], patches,
                 option_ids) -> dict[PersonaPair, np.ndarray]:
    """AtP-estimated restoration score of every patch (never exact), per pair. All pairs'
    prompts are screened as one list: on a GPU the batches fill across pairs instead of
    ending at each pair's last question."""
    from governance.patching.attribution import atp_screen, screen_scores

    triples = [(ap.clean_ids, ap.corrupt_ids, ap.identity)
               for prompts in aligned.values() for ap in prompts]
    nums, dens = atp_screen(loaded.model, loaded.anatomy, triples, patches, option_ids)
    out, start = {}, 0
    for pair, prompts in aligned.items():
        stop = start + len(prompts)
        out[pair] = screen_scores(nums[start:stop], dens[start:stop])
        start = stop
    return out


def top_k(patches, estimate: np.ndarray, k: int | None) -> list:
    """Per (component, positions) sweep, the k patches with the largest |estimate|."""
    if k is None:
        return list(patches)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(patches):
        groups.setdefault((p.component, p.positions), []).append(i)
    keep: set[int] = set()
    for members in groups.values():
        ranked = sorted(members, key=lambda i: -abs(np.nan_to_num(estimate[i])))
        keep.update(ranked[:k])
    return [p for i, p in enumerate(patches) if i in keep]


def screen_rows(pair: PersonaPair, patches, estimate: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "component": [p.component for p in patches],
        "layer": [p.layer for p in patches],
        "head": pd.array([p.head for p in patches], dtype="Int64"),
        "positions": [p.positions for p in patches],
        "category": pair.category,
        "clean_persona": pair.clean.phrase,
        "corrupt_persona": pair.corrupt.phrase,
        "estimate": estimate,
    })


def screen_table(screens: list[pd.DataFrame], scores: pd.DataFrame) -> pd.DataFrame:
    """AtP estimates beside the exact score where exact patching also ran."""
    if not screens:
        return pd.DataFrame(columns=SCREEN_COLUMNS)
    keys = ["component", "layer", "head", "positions", "clean_persona", "corrupt_persona"]
    frame = pd.concat(screens, ignore_index=True)
    exact = scores[keys + ["score"]].rename(columns={"score": "exact"})
    return frame.merge(exact, on=keys, how="left")[SCREEN_COLUMNS]


def screen_agreement(screen: pd.DataFrame, k: int = 20) -> dict[str, dict[str, float]]:
    """How well the AtP screen agreed with exact patching, per sweep, where both ran."""
    from governance.patching.attribution import agreement

    out: dict[str, dict[str, float]] = {}
    both = screen.dropna(subset=["exact"])
    for (component, positions), group in both.groupby(["component", "positions"]):
        out[f"{component}:{positions}"] = agreement(group["estimate"].to_numpy(),
                                                    group["exact"].to_numpy(), k)
    return out
