"""The README's figures, from a stored audit directory.

    python docs/figures.py docs/results/smollm2-readme docs
"""

from __future__ import annotations

import sys
from pathlib import Path

from governance.audit.result import AuditResult
from governance.plots import head_matrix, heatmap_panels, new_figure

PANELS = [
    ("MLP output", [("mlp_out", "identity"), ("mlp_out", "all")]),
    ("attention output", [("attn_out", "identity"), ("attn_out", "last"), ("attn_out", "all")]),
    ("residual stream", [("resid_pre", "identity")]),
]


def layer_figure(result: AuditResult):
    """Per-layer S, mean over the persona pairs, with the noise-floor pair dashed."""
    curves = result.layer_curves()
    persona = curves[curves["category"] != "noise_floor"]
    persona = persona.groupby(["component", "positions", "layer"], as_index=False)["score"].mean()
    floor = curves[curves["category"] == "noise_floor"]
    fig, axes = new_figure(len(PANELS), ncols=3, panel=(4.2, 3.0))
    for ax, (title, series) in zip(axes, PANELS, strict=True):
        for component, positions in series:
            sel = (persona["component"] == component) & (persona["positions"] == positions)
            line = persona[sel].sort_values("layer")
            if line.empty:
                continue
            (handle,) = ax.plot(line["layer"], line["score"], marker=".",
                                label=f"{component}:{positions}")
            f = floor[(floor["component"] == component) & (floor["positions"] == positions)]
            if not f.empty:
                f = f.sort_values("layer")
                ax.plot(f["layer"], f["score"], ls="--", lw=0.8, color=handle.get_color(),
                        alpha=0.6)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("restoration score S", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: where the persona shift is restored (solid: mean of "
                 "3 persona pairs; dashed: noise-floor paraphrase pair)", fontsize=10)
    return fig


def head_figure(result: AuditResult):
    heads = result.scores[(result.scores["component"] == "head")
                          & (result.scores["category"] != "noise_floor")]
    panels = [(f"{cat} (head:{pos})", head_matrix(part))
              for (pos, cat), part in heads.groupby(["positions", "category"])]
    return heatmap_panels(panels, title="per-head restoration score", colorbar="S",
                          mark_max=True)


def main(audit_dir: str, out_dir: str) -> None:
    result = AuditResult.load(audit_dir)
    out = Path(out_dir)
    layer_figure(result).savefig(out / "smollm2_layers.png", dpi=110)
    head_figure(result).savefig(out / "smollm2_heads.png", dpi=90)


if __name__ == "__main__":
    main(*sys.argv[1:3])
