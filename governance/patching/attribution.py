"""Attribution patching (AtP): a first-order estimate of every patch from three passes.

For a patch that puts clean activation a_clean in place of a_corr, the change of the
restoration numerator m = centre(l) . d_q is estimated by the gradient of m at the
corrupted run (Nanda; Kramar et al. 2024, "AtP*"):

    m(patched) - m(corrupt)  ~=  sum over patched positions (and head) of (a_clean - a_corr) . dm/da

One clean forward (activations), one corrupted forward and one backward give the estimate
for every component, layer, head and position at once. It ranks components for exact
patching and never replaces it: the audit reports how well it agreed with exact patching.

AtP*'s saturation fix (recomputing the attention softmax) concerns patches of a head's
query/key inputs; this audit patches head *outputs*, attention outputs, MLP outputs and
the residual stream, where plain AtP is the estimator. AtP*'s GradDrop is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from governance.models.architectures import Anatomy
from governance.patching.engine import Patch, position_mask
from governance.patching.sites import Site, capture, hooked, last_logits


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def atp_screen(
    model: nn.Module,
    anatomy: Anatomy,
    prompts: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    patches: Sequence[Patch],
    option_ids: Sequence[int],
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`atp_batch` over any number of (clean, corrupt, identity) prompts, in batches of
    similar length. `batch_size` defaults to 16 on a GPU, where one prompt at a time leaves
    it idle, and 1 on a CPU, where padding would only add work."""
    if batch_size is None:
        batch_size = 16 if next(model.parameters()).device.type == "cuda" else 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
    nums = np.empty((len(prompts), len(patches)))
    dens = np.empty(len(prompts))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        nums[chunk], dens[chunk] = atp_batch(model, anatomy, [prompts[i] for i in chunk],
                                             patches, option_ids)
    return nums, dens


def atp_batch(
    model: nn.Module,
    anatomy: Anatomy,
    prompts: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
    patches: Sequence[Patch],
    option_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """AtP numerators (prompt, patch) and d.d (prompt,) for prompts run as one batch.

    Prompts of different lengths are right-padded: in a causal model no real token sees a
    pad after it, so each row's activations and its logits at its own last position are
    those of the prompt alone, and pad positions are left out of every sum.
    """
    device = next(model.parameters()).device
    options = list(option_ids)
    lengths = [len(c) for c, _, _ in prompts]
    width = max(lengths)

    def padded(ids: Sequence[int]) -> list[int]:
        return list(ids) + [ids[-1]] * (width - len(ids))

    clean = torch.tensor([padded(c) for c, _, _ in prompts], device=device)
    corrupt = torch.tensor([padded(k) for _, k, _ in prompts], device=device)
    last = [n - 1 for n in lengths]
    sites = sorted({p.site for p in patches})
    with torch.inference_mode():
        clean_acts, clean_logits = capture(model, anatomy, sites, clean, positions=last)
    clean_acts = {s: a.clone() for s, a in clean_acts.items()}  # leave inference mode
    clean_logits = clean_logits.clone()

    corr_acts: dict[Site, torch.Tensor] = {}

    def keep(site: Site):
        def edit(x: torch.Tensor) -> torch.Tensor:
            corr_acts[site] = x
            return x

        return edit

    def leaf(x: torch.Tensor) -> torch.Tensor:  # the graph starts at layer 0's input
        x = x.detach().requires_grad_(True)
        corr_acts.setdefault(Site("resid_pre", 0), x)
        return x

    edits = {s: keep(s) for s in sites}
    first = Site("resid_pre", 0)
    edits[first] = (lambda x: keep(first)(leaf(x))) if first in edits else leaf
    with torch.enable_grad(), hooked(model, anatomy, edits):
        corr_opt = last_logits(model, corrupt, positions=last)[:, options].float()
        d = (_centre(clean_logits[:, options].float()) - _centre(corr_opt)).detach()
        metric = (_centre(corr_opt) * d).sum()  # rows are independent: one backward for all
        tensors = [corr_acts[s] for s in sites]
        grads = torch.autograd.grad(metric, tensors, allow_unused=True)

    kinds = ("identity", "last", "all")
    masks = torch.zeros(len(prompts), len(kinds), width)
    for b, ((_, _, identity), n) in enumerate(zip(prompts, lengths, strict=True)):
        for k, kind in enumerate(kinds):
            masks[b, k, :n] = position_mask(kind, n, identity)
    masks = masks.to(device)
    sums = {}
    for site, a_corr, g in zip(sites, tensors, grads, strict=True):
        if g is None:
            contrib = torch.zeros(a_corr.shape[:-1], device=device)
        else:
            contrib = ((clean_acts[site].to(a_corr.dtype) - a_corr.detach()) * g).float().sum(-1)
        # (prompt, kind, [head]): one transfer per site
        flat = contrib.reshape(len(prompts), width, -1)
        sums[site] = torch.einsum("bkt,btx->bkx", masks, flat).cpu().numpy()
    estimates = np.empty((len(prompts), len(patches)))
    for i, p in enumerate(patches):
        by_kind = sums[p.site][:, kinds.index(p.positions)]
        estimates[:, i] = by_kind[:, p.head] if p.component == "head" else by_kind[:, 0]
    return estimates, (d * d).sum(-1).cpu().numpy()


def screen_scores(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """Estimated S per patch from per-question (question, patch) numerators and d.d."""
    total = float(np.sum(denominators))
    if total <= 0:
        return np.full(numerators.shape[-1], np.nan)
    return np.asarray(numerators).sum(axis=0) / total


def agreement(estimate: np.ndarray, exact: np.ndarray, k: int = 20) -> dict[str, float]:
    """Spearman rank correlation and recall of the exact top-k (by |S|) within the
    estimate's top-k, on the patches both computed."""
    est, ex = np.asarray(estimate, float), np.asarray(exact, float)
    ok = np.isfinite(est) & np.isfinite(ex)
    est, ex = est[ok], ex[ok]
    n = len(ex)
    key = f"recall_at_{k}"  # named for the k asked, computed on min(k, n)
    if n < 2:
        return {"n": float(n), "spearman": float("nan"), key: float("nan")}
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    rs = np.corrcoef(rank(est), rank(ex))[0, 1]
    top = min(k, n)
    top_exact = set(np.argsort(-np.abs(ex))[:top])
    top_est = set(np.argsort(-np.abs(est))[:top])
    return {"n": float(n), "spearman": float(rs), key: len(top_exact & top_est) / top}
