"""Plotting building blocks every figure shares: panel grids, per-head heatmaps and per-layer
axes. matplotlib's object API only (no pyplot, no global backend state), so figures can be
drawn from any thread and any process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure




# -- figures (matplotlib's object API: no pyplot, no global backend state) ------------------


def new_figure(n_panels: int, *, ncols: int = 4, panel: tuple[float, float] = (3.2, 2.8)):
    """A Figure with a grid of `n_panels` axes (unused cells hidden) and its flat axes list."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel[0] * ncols + 0.8, panel[1] * nrows + 0.6), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def heatmap_panels(
    panels: Sequence[tuple[str, pd.DataFrame]],
    *,
    title: str,
    colorbar: str,
    symmetric: bool = True,
    cmap: str = "RdBu_r",
    mark_max: bool = False,
) -> Figure:
    """One layers x heads heatmap per panel, all on one colour scale (so panels compare).

    Each frame is indexed by layer with one column per head. `symmetric` centres the scale
    on zero (for signed scores and changes); `mark_max` outlines the cell of largest |value|.
    """
    from matplotlib.patches import Rectangle

    values = np.concatenate([f.to_numpy(dtype=float).ravel() for _, f in panels])
    finite = values[np.isfinite(values)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    vmin = -vmax if symmetric else float(finite.min()) if finite.size else 0.0
    fig, axes = new_figure(len(panels))
    image = None
    for ax, (name, frame) in zip(axes, panels, strict=True):
        data = frame.to_numpy(dtype=float)
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                          interpolation="nearest", origin="upper")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(len(frame.columns)), [str(c) for c in frame.columns], fontsize=7)
        step = max(1, len(frame.index) // 10)
        ticks = list(range(0, len(frame.index), step))
        ax.set_yticks(ticks, [str(frame.index[i]) for i in ticks], fontsize=7)
        if mark_max and np.isfinite(data).any():
            r, c = np.unravel_index(np.nanargmax(np.abs(data)), data.shape)
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.8, ec="black"))
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=colorbar)
    fig.suptitle(title, fontsize=10)
    return fig


def head_matrix(frame: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Pivot a (layer, head, value) frame into layers x heads (missing cells NaN)."""
    grid = frame.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
    grid.index = grid.index.astype(int)
    grid.columns = grid.columns.astype(int)
    return grid.sort_index().sort_index(axis=1)


def png_bytes(fig: Figure) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def style_layer_axis(ax, title: str, legend_size: int = 7) -> None:
    """The look every per-layer panel shares: zero line, integer layers, small labels."""
    from matplotlib.ticker import MaxNLocator

    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("S", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=legend_size)
