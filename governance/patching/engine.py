"""Exact activation patching, many patches per forward.

One generic sweep over `Patch(component, layer, positions, head)`: the clean run's
activations are captured once, then each patch becomes one row of a batched forward of the
corrupted prompt, in which that row's site tensor takes the clean values at the patch's
positions (and head). Only the option-letter logits at the last position are kept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from governance.architectures import Anatomy
from governance.patching.sites import COMPONENTS, POSITIONS, Site, capture, hooked, last_logits


@dataclass(frozen=True, order=True)
class Patch:
    """Replace `component` at `layer` (and `head`, for heads) at `positions` with clean values."""

    component: str
    layer: int
    positions: str
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r} is not one of {COMPONENTS}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not one of {POSITIONS}")
        if (self.head is None) == (self.component == "head"):
            need = "need a" if self.head is None else "take no"
            raise ValueError(f"{self.component!r} patches {need} head")

    @property
    def site(self) -> Site:
        return Site(self.component, self.layer)


def sweep(
    anatomy: Anatomy, sweeps: Iterable[tuple[str, str]], layers: Sequence[int] | None = None
) -> list[Patch]:
    """Every patch of each (component, positions) sweep, over all layers (and heads)."""
    layers = range(anatomy.n_layers) if layers is None else layers
    for layer in layers:
        if not 0 <= layer < anatomy.n_layers:
            raise ValueError(f"layer {layer} is out of range 0..{anatomy.n_layers - 1}")
    out = []
    for component, positions in sweeps:
        for layer in layers:
            if component == "head":
                out += [Patch(component, layer, positions, h) for h in range(anatomy.n_heads)]
            else:
                out.append(Patch(component, layer, positions))
    return out


def position_mask(positions: str, length: int, identity: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    if positions == "all":
        mask[:] = True
    elif positions == "last":
        mask[-1] = True
    else:
        mask[list(identity)] = True
    return mask


@dataclass
class PairRun:
    """Logits of one aligned pair on one question: clean, corrupt, and one row per patch."""

    clean: torch.Tensor  # (vocab,) or (n_options,)
    corrupt: torch.Tensor
    patched: torch.Tensor  # (n_patches, ...)


def _row_edit(rows: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor):
    """Edit for rows `rows` of the batch: where `mask` (rows, pos[, head]) take `clean`."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        sub = x[rows]
        m = mask.view(*mask.shape, *([1] * (sub.dim() - mask.dim())))
        x = x.clone()
        x[rows] = torch.where(m, clean.unsqueeze(0).to(sub.dtype), sub)
        return x

    return edit


class PatchingEngine:
    """Batched exact patching on one model. `chunk_rows` bounds the rows of one forward."""

    def __init__(self, model: nn.Module, anatomy: Anatomy, chunk_rows: int = 32) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.model = model
        self.anatomy = anatomy
        self.chunk_rows = chunk_rows

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(
        self,
        clean_ids: Sequence[int],
        corrupt_ids: Sequence[int],
        identity: Sequence[int],
        patches: Sequence[Patch],
        option_ids: Sequence[int] | None = None,
    ) -> PairRun:
        """Logits (at `option_ids` if given) of the clean, corrupt and every patched run."""
        if len(clean_ids) != len(corrupt_ids):
            raise ValueError(
                f"clean and corrupt prompts differ in length ({len(clean_ids)} vs "
                f"{len(corrupt_ids)}); align them first (governance.prompts)"
            )
        dev = self.device
        clean = torch.tensor([list(clean_ids)], device=dev)
        corrupt = torch.tensor([list(corrupt_ids)], device=dev)
        sites = sorted({p.site for p in patches})
        acts, clean_logits = capture(self.model, self.anatomy, sites, clean)
        corrupt_logits = last_logits(self.model, corrupt)
        pick = (lambda t: t) if option_ids is None else (lambda t: t[..., list(option_ids)])
        length = len(clean_ids)
        masks = {pos: position_mask(pos, length, identity).to(dev) for pos in POSITIONS}
        rows_out = []
        for start in range(0, len(patches), self.chunk_rows):
            chunk = patches[start : start + self.chunk_rows]
            by_site: dict[Site, list[tuple[int, Patch]]] = defaultdict(list)
            for row, patch in enumerate(chunk):
                by_site[patch.site].append((row, patch))
            edits = {}
            for site, members in by_site.items():
                rows = torch.tensor([r for r, _ in members], device=dev)
                mask = torch.stack([self._mask(p, masks) for _, p in members])
                edits[site] = _row_edit(rows, mask, acts[site][0])
            ids = corrupt.expand(len(chunk), length)
            with hooked(self.model, self.anatomy, edits):
                rows_out.append(pick(last_logits(self.model, ids)).float())
        empty = torch.empty(0, *pick(corrupt_logits[0]).shape)
        patched = torch.cat(rows_out) if rows_out else empty
        return PairRun(pick(clean_logits[0]).float(), pick(corrupt_logits[0]).float(), patched)

    def _mask(self, patch: Patch, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        pos = masks[patch.positions]
        if patch.component != "head":
            return pos
        heads = torch.zeros(self.anatomy.n_heads, dtype=torch.bool, device=pos.device)
        heads[patch.head] = True
        return pos[:, None] & heads[None, :]
