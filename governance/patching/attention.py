"""Attention to identity: how much each head at the last position looks at the persona.

For each head, the attention weight from the last position onto the identity positions
(summed over those positions), averaged over questions. Weights need the eager attention
implementation (under sdpa `output_attentions` returns nothing), so the forward runs inside
`eager_attention()`, which restores the model's implementation afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to eager attention for the duration of the block."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


@torch.inference_mode()
def forward_with_attention(
    model: nn.Module, ids: Sequence[int], identity: Sequence[int]
) -> tuple[torch.Tensor, np.ndarray]:
    """Last-position logits (vocab,) and identity mass per (layer, head) for one prompt.

    Call inside `eager_attention(model)`. With no identity positions the mass is all zero.
    """
    device = next(model.parameters()).device
    out = model(
        input_ids=torch.tensor([list(ids)], device=device),
        use_cache=False,
        output_attentions=True,
        logits_to_keep=1,
    )
    if not out.attentions:
        raise RuntimeError("the model returned no attention weights; is it in eager mode?")
    idx = list(identity)
    mass = np.stack(
        [a[0, :, -1, idx].float().sum(-1).cpu().numpy() for a in out.attentions]
    )  # (layer, head)
    return out.logits[0, -1].float(), mass


def attention_table(
    masses: dict[str, np.ndarray], categories: dict[str, str], control: str
) -> pd.DataFrame:
    """Tidy table (layer, head, category, persona, identity_mass, ratio, zscore).

    `masses[persona]` is the question-averaged (layer, head) identity mass. `ratio` divides
    by the same head's mass for the neutral `control` persona; `zscore` standardises a
    persona's mass across all heads of the model.
    """
    if control not in masses:
        raise ValueError(f"the neutral control {control!r} has no attention masses")
    base = masses[control]
    rows = []
    for persona, mass in masses.items():
        n_layers, n_heads = mass.shape
        std = mass.std()
        z = (mass - mass.mean()) / std if std > 0 else np.zeros_like(mass)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(base > 0, mass / base, np.nan)
        for layer in range(n_layers):
            for head in range(n_heads):
                rows.append(
                    (
                        layer, head, categories[persona], persona,
                        float(mass[layer, head]), float(ratio[layer, head]), float(z[layer, head]),
                    )
                )
    return pd.DataFrame(
        rows,
        columns=["layer", "head", "category", "persona", "identity_mass", "ratio", "zscore"],
    )
