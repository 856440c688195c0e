"""The mitigation what-if, drawn and written for a reviewer: the trade-off curve (persona
shift and accuracy against the number of components switched off, flagged vs random, with
the noise floor) and the report page's section.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from governance.plots import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from governance.mitigation.result import MitigationResult


def _positions(ks: list[int]) -> dict[int, int]:
    """Evenly spaced x positions for k = 0, 1, 2, 4, ... (a log-like axis that keeps 0)."""
    return {k: i for i, k in enumerate(sorted(set(ks)))}


def tradeoff_figure(result: MitigationResult) -> Figure:
    """Two panels against k: the persona pairs' mean shift and the overall accuracy, for the
    flagged components (line), the random ones (mean over seeds, band = range) and the noise
    floor pair's shift under the flagged ablation (dotted) and unablated (grey)."""
    curve = result.curve
    base = curve[curve["selection"] == "none"].iloc[0]
    flagged = pd.concat([curve[curve["selection"] == "none"],
                         curve[curve["selection"] == "flagged"]]).sort_values("k")
    rand = curve[curve["selection"] == "random"]
    xs = _positions(list(curve["k"]))
    fig, axes = new_figure(2, ncols=2, panel=(4.2, 3.0))
    for ax, column, label in ((axes[0], "shift", "persona shift (mean ||d||)"),
                              (axes[1], "accuracy", "accuracy (all personas)")):
        ax.plot([xs[k] for k in flagged["k"]], flagged[column], marker="o", color="#cf222e",
                label="flagged top k")
        if not rand.empty:
            stats = rand.groupby("k")[column].agg(["mean", "min", "max"])
            stats.loc[0] = base[column]
            stats = stats.sort_index()
            x = [xs[k] for k in stats.index]
            ax.plot(x, stats["mean"], marker="s", color="#0969da",
                    label=f"random k ({rand['seed'].nunique()} seeds)")
            ax.fill_between(x, stats["min"], stats["max"], color="#0969da", alpha=0.15)
        if column == "shift":
            ax.plot([xs[k] for k in flagged["k"]], flagged["floor_shift"], ls=":",
                    color="#59636e", label="noise-floor pair (flagged)")
            ax.axhline(base["floor_shift"], color="grey", lw=0.8, ls="--",
                       label="noise floor, unablated")
        ax.set_xticks(list(xs.values()), [str(k) for k in xs])
        ax.set_xlabel("components switched off (k)", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    method = result.meta.get("spec", {}).get("method", "?")
    n = result.meta.get("split", {}).get("n_heldout", "?")
    fig.suptitle(f"mitigation what-if: {method} ablation, {n} held-out questions", fontsize=10)
    return fig


def mitigation_section(result: MitigationResult, png: bytes | None = None) -> str:
    """The report page's section: reading, trade-off figure, flagged-vs-random table, split."""
    from governance.report.page import _img, table_html

    split = result.meta.get("split", {})
    audit = result.meta.get("audit", {})
    parts = [
        "<h2>Mitigation what-if</h2>",
        '<p class="muted">the audit\'s top-ranked components switched off at inference time '
        f"({html.escape(str(result.meta['spec']['method']))} ablation at every position; no "
        "weight changes), measured on held-out questions beside the same number of random "
        f"components. Audit {html.escape(str(audit.get('source')))}; "
        f"{split.get('n_heldout')} held-out questions, {len(split.get('ranking_question_ids', []))}"
        " ranking questions.</p>",
        f"<pre>{html.escape(result.summary())}</pre>",
    ]
    if png is not None:
        parts.append(_img(png, "mitigation trade-off"))
    parts += [table_html(result.flagged_vs_random()),
              "<h3>Every condition</h3>", table_html(result.curve),
              "<h3>Components switched off</h3>", table_html(result.selections, limit=60)]
    return "".join(parts)


def render_mitigation_page(result: MitigationResult, out_path) -> Path:
    """A self-contained HTML page of the what-if (the report page's section on its own),
    with the trade-off PNG (`<stem>_tradeoff.png`) beside it; returns the HTML path."""
    from governance.plots import png_bytes
    from governance.report.page import CSS

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = png_bytes(tradeoff_figure(result))
    (out.parent / f"{out.stem}_tradeoff.png").write_bytes(png)
    title = f"Mitigation what-if: {result.meta.get('model', {}).get('source', '?')}"
    out.write_text("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                   f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
                   f"<h1>{html.escape(title)}</h1>{mitigation_section(result, png)}"
                   "</body></html>\n", encoding="utf-8")
    return out
