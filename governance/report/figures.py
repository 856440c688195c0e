"""The audit's figures: restoration score per head and per layer, and attention to identity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governance.plots import head_matrix, heatmap_panels, new_figure, style_layer_axis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from governance.audit.result import AuditResult



def head_figure(result: AuditResult) -> Figure | None:
    heads = result.scores[result.scores["component"] == "head"]
    if heads.empty:
        return None
    grouped = heads.groupby(["positions", "category", "layer", "head"], as_index=False)["score"]
    mean = grouped.mean()
    panels = [
        (f"{category} (head:{positions})", head_matrix(part))
        for (positions, category), part in mean.groupby(["positions", "category"], sort=True)
    ]
    return heatmap_panels(panels, title="restoration score per head (mean over a category's "
                          "pairs)", colorbar="restoration score S")


def layer_figure(result: AuditResult) -> Figure | None:
    """Per-layer S curves, one panel per component:positions, one line per category."""
    curves = result.layer_curves()
    if curves.empty:
        return None
    groups = list(curves.groupby(["component", "positions"], sort=True))
    fig, axes = new_figure(len(groups), ncols=3, panel=(3.6, 2.6))
    for ax, ((component, positions), part) in zip(axes, groups, strict=True):
        for category, line in part.groupby("category", sort=True):
            line = line.sort_values("layer")
            ax.plot(line["layer"], line["score"], marker=".", label=category)
        style_layer_axis(ax, f"{component}:{positions}")
    fig.suptitle("restoration score per layer (mean over a category's pairs)", fontsize=10)
    return fig


def attention_figure(result: AuditResult) -> Figure | None:
    att = result.attention
    if att is None or att.empty:
        return None
    mean = att.groupby(["category", "layer", "head"], as_index=False)["zscore"].mean()
    panels = [(str(cat), head_matrix(part, "zscore")) for cat, part in mean.groupby("category")]
    return heatmap_panels(panels, title="attention from the last position to the identity "
                          "tokens: z-score across heads", colorbar="z-score")
