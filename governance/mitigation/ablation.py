"""Ablation: switch components off at inference time, many ablation sets per forward.

An ablation replaces a component's output at every position with a fixed value: its mean over
the no-persona run of the ranking questions (`mean_values`), zero, or one ranking question's
mean (resample). It is an edit of a site's tensor, like a patch, and runs through the
patching engine (`PatchingEngine.run_edits`: the same hooks, removed on every path, and the
same resumed rows): each ablation set is one row of a batched forward of one prompt, starting
at its first ablated layer; a row whose set is empty is the unablated model. No weight of the
model changes.

Shapes: `pos` the prompt's length, `rows` the ablation sets of one forward; a head site's
tensor is (rows, pos, head, d_head), every other site's (rows, pos, d_model).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from governance.mitigation.spec import Component
from governance.models.architectures import Anatomy
from governance.patching.sites import Edit, Site, capture

# per site: the value ablated components take, (d_model,); for heads (head, d_head)
Values = dict[Site, torch.Tensor]


def site_of(component: Component) -> Site:
    """The (component, layer) tensor a component is part of (a layer's heads share one)."""
    return Site(component.component, component.layer)


def sites_of(components: Collection[Component]) -> list[Site]:
    return sorted({site_of(c) for c in components})


def check_components(components: Collection[Component], anatomy: Anatomy) -> None:
    """ValueError naming the first component that is not in the model."""
    for c in components:
        if not 0 <= c.layer < anatomy.n_layers or (
                c.head is not None and not 0 <= c.head < anatomy.n_heads):
            raise ValueError(f"component {c.label} is outside the model ({anatomy.n_layers} "
                             f"layers x {anatomy.n_heads} heads)")


@torch.inference_mode()
def question_means(model: nn.Module, anatomy: Anatomy, prompts: Sequence[Sequence[int]],
                   sites: Sequence[Site]) -> tuple[list[Values], list[int]]:
    """Per prompt, each site's output averaged over its positions, and the prompts' lengths."""
    device = next(model.parameters()).device
    means, lengths = [], []
    for ids in prompts:
        acts, _ = capture(model, anatomy, list(sites), torch.tensor([list(ids)], device=device))
        means.append({s: a[0].float().mean(dim=0) for s, a in acts.items()})  # over pos
        lengths.append(len(ids))
    return means, lengths


def pooled_mean(means: Sequence[Values], lengths: Sequence[int]) -> Values:
    """The mean over every token of every prompt, from per-prompt means and lengths."""
    if not means:
        raise ValueError("no prompts to average over")
    total = float(sum(lengths))
    return {s: sum(m[s] * (n / total) for m, n in zip(means, lengths, strict=True))
            for s in means[0]}


def zero_values(anatomy: Anatomy, sites: Sequence[Site], device: torch.device) -> Values:
    """Zero for every site: what `method: zero` replaces with."""
    return {s: torch.zeros((anatomy.n_heads, anatomy.head_dim) if s.component == "head"
                           else (anatomy.d_model,), device=device) for s in sites}


def ablation_edit(mask: torch.Tensor, value: torch.Tensor) -> Edit:
    """Rows where `mask` is set take `value` at every position. Heads: mask (rows, head),
    value (head, d_head); else mask (rows,), value (d_model,). The tensor edited may hold
    only the first rows (those a resumed batch has started)."""

    def edit(x: torch.Tensor) -> torch.Tensor:  # (active, pos, head, d_head) or (active, pos, d)
        # resumed rows join in layer order: the active rows are the batch's first ones
        m = mask[:x.shape[0]]
        m = m[:, None, :, None] if m.dim() == 2 else m[:, None, None]
        return torch.where(m, value.to(x.dtype), x)  # a new tensor: hooks never edit in place

    return edit


def row_edits(rows: Sequence[Collection[Component]], values: Values, anatomy: Anatomy,
              device: torch.device) -> dict[Site, Edit]:
    """One edit per site that some row ablates: row r's components take `values`."""
    masks: dict[Site, torch.Tensor] = {}
    for r, components in enumerate(rows):
        for c in components:
            site = site_of(c)
            if site not in masks:
                shape = (len(rows), anatomy.n_heads) if c.component == "head" else (len(rows),)
                masks[site] = torch.zeros(shape, dtype=torch.bool)
            if c.head is None:
                masks[site][r] = True
            else:
                masks[site][r, c.head] = True
    return {s: ablation_edit(m.to(device), values[s]) for s, m in masks.items()}


def ablated_logits(model: nn.Module, anatomy: Anatomy, ids: Sequence[int],
                   rows: Sequence[Collection[Component]], values: Values,
                   option_ids: Sequence[int], chunk_rows: int = 32) -> torch.Tensor:
    """Option logits at the last position of prompt `ids` under each row's ablation set,
    (n_rows, n_options) fp32 on the host. Through the patching engine's resumed rows
    (`PatchingEngine.run_edits`): each row starts at its first ablated layer from the
    unablated run's residual stream there, `chunk_rows` rows per forward; an empty set is the
    unablated run itself."""
    from governance.patching.engine import PatchingEngine

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    device = next(model.parameters()).device
    order = sorted((r for r in range(len(rows)) if rows[r]),
                   key=lambda r: min(c.layer for c in rows[r]))
    chunks = [order[i:i + chunk_rows] for i in range(0, len(order), chunk_rows)]
    batches = [([min(c.layer for c in rows[r]) for r in chunk],
                row_edits([rows[r] for r in chunk], values, anatomy, device)) for chunk in chunks]
    engine = PatchingEngine(model, anatomy, chunk_rows, fused=False)
    base, logits = engine.run_edits(ids, batches, option_ids)
    out = base.cpu().expand(len(rows), -1).clone()  # (rows, n_options)
    for chunk, part in zip(chunks, logits, strict=True):
        out[chunk] = part.cpu()
    return out
