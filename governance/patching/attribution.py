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

from governance.architectures import Anatomy
from governance.patching.engine import Patch, position_mask
from governance.patching.sites import Site, capture, hooked


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def atp_numerators(
    model: nn.Module,
    anatomy: Anatomy,
    clean_ids: Sequence[int],
    corrupt_ids: Sequence[int],
    identity: Sequence[int],
    patches: Sequence[Patch],
    option_ids: Sequence[int],
) -> tuple[np.ndarray, float]:
    """AtP estimates of each patch's restoration numerator for one question, and d.d.

    Summing the first over questions and dividing by the summed second gives the estimated
    restoration score S of each patch, comparable with the exact one.
    """
    device = next(model.parameters()).device
    options = list(option_ids)
    clean = torch.tensor([list(clean_ids)], device=device)
    corrupt = torch.tensor([list(corrupt_ids)], device=device)
    sites = sorted({p.site for p in patches})
    with torch.inference_mode():
        clean_acts, clean_logits = capture(model, anatomy, sites, clean)
    clean_acts = {s: a.clone() for s, a in clean_acts.items()}  # leave inference mode

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
        out = model(input_ids=corrupt, use_cache=False, logits_to_keep=1)
        corr_opt = out.logits[0, -1, options].float()
        d = (_centre(clean_logits[0, options].float()) - _centre(corr_opt)).detach()
        metric = (_centre(corr_opt) * d).sum()
        tensors = [corr_acts[s] for s in sites]
        grads = torch.autograd.grad(metric, tensors, allow_unused=True)

    per_site: dict[Site, torch.Tensor] = {}
    for site, a_corr, g in zip(sites, tensors, grads, strict=True):
        if g is None:
            per_site[site] = torch.zeros(a_corr.shape[:-1], device=device)
            continue
        delta = (clean_acts[site].to(a_corr.dtype) - a_corr.detach()) * g
        per_site[site] = delta.float().sum(-1)[0]  # (pos,) or, for heads, (pos, head)
    length = len(clean_ids)
    kinds = ("identity", "last", "all")
    masks = torch.stack([position_mask(k, length, identity) for k in kinds]).to(device)
    # one transfer per site: (kind, [head]) sums over each kind of positions
    sums = {site: (masks.float() @ contrib.reshape(length, -1)).cpu().numpy()
            for site, contrib in per_site.items()}
    estimates = np.empty(len(patches))
    for i, p in enumerate(patches):
        row = sums[p.site][kinds.index(p.positions)]
        estimates[i] = row[p.head] if p.component == "head" else row[0]
    return estimates, float((d * d).sum())


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
