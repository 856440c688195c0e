"""The per-audit report page: one self-contained HTML file a risk reviewer reads first.

    from governance.report.page import render_report
    render_report(result, "out/report.html", verdict=verdict, drift=drift)

Order: verdict and failed rules first, then the noise floor, behaviour, pairs, the per-head
heatmaps and per-layer curves, attention to identity, drift against the baseline, the
mitigation what-if (when given), and the spec, model identity and software versions last.
Figures are inline base64 PNGs and every style is inline, so the page needs no network, no
scripts and no storage: it renders inside
MLflow's artifact viewer (a sandboxed iframe with a null origin). The same PNGs and a JSON
summary are written beside the HTML, because a table or picture should never exist only
inside a page.

`verdict` and `drift` are duck-typed so this module imports neither the policy nor the drift
code: a verdict has `.status`, `.findings` (rule, scope, observed, threshold, severity,
outcome, evidence) and `.summary`; a drift result has `.drift_share`, `.top_changes` and
optionally `.files` (paths of its PNGs), `.tables` and `.notes`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from governance.numbers import fmt
from governance.plots import png_bytes
from governance.report.figures import attention_figure, head_figure, layer_figure

if TYPE_CHECKING:

    from governance.audit.result import AuditResult


OUTCOME_ORDER = {"fail": 0, "error": 0, "warn": 1, "missing": 1}  # anything else sorts after
STATUS_COLOURS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}


# -- HTML ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
  padding:16px 24px;color:#1f2328;background:#fff;font-size:14px;line-height:1.4}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid
  #d0d7de;padding-bottom:4px} .muted{color:#59636e} pre{background:#f6f8fa;padding:8px;
  overflow:auto;font-size:12px} table{border-collapse:collapse;margin:6px 0;font-size:12px;
  display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600}
.row-fail td{background:#ffebe9} .row-warn td{background:#fff8c5} img{max-width:100%;
  height:auto;border:1px solid #d0d7de;margin:4px 0} .note{background:#f6f8fa;padding:8px;
  border-left:4px solid #8c959f}
table.findings{display:table;width:100%;table-layout:auto} table.findings td{
  overflow-wrap:break-word} table.findings tr.evidence td{border-top:none;padding:0 6px 6px 24px;
  color:#1f2328}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        return fmt(value, missing="")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def table_html(frame: pd.DataFrame, *, row_class: str | None = None, limit: int | None = None,
               ) -> str:
    """An escaped HTML table; `row_class` names a column whose value becomes `row-<value>`."""
    if frame is None or frame.empty:
        return '<p class="muted">(empty)</p>'
    shown = frame.head(limit) if limit else frame
    cols = list(shown.columns)
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    rows = []
    for _, rec in shown.iterrows():
        cls = f' class="row-{_esc(rec[row_class])}"' if row_class else ""
        cells = "".join(
            f'<td class="num">{_esc(_fmt(rec[c]))}</td>'
            if isinstance(rec[c], (int, float, np.integer, np.floating))
            and not isinstance(rec[c], bool) else f"<td>{_esc(_fmt(rec[c]))}</td>"
            for c in cols
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    more = (f'<p class="muted">{len(frame) - len(shown)} more rows in the CSV.</p>'
            if len(shown) < len(frame) else "")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


FINDING_FIELDS = ("outcome", "rule", "scope", "observed", "threshold", "severity")


def findings_html(frame: pd.DataFrame) -> str:
    """Policy findings, one row of short fields each with its evidence (which pair, layer or
    head) on a full-width row beneath, so the table fits a narrow frame without clipping."""
    if frame is None or frame.empty:
        return '<p class="muted">(none)</p>'
    cols = [c for c in FINDING_FIELDS if c in frame.columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    rows = []
    for _, rec in frame.iterrows():
        cls = f"row-{_esc(rec['outcome'])}" if "outcome" in frame.columns else ""
        cells = "".join(f'<td class="num">{_esc(_fmt(rec[c]))}</td>'
                        if c in ("observed", "threshold") else f"<td>{_breakable(rec[c])}</td>"
                        for c in cols)
        rows.append(f'<tr class="{cls}">{cells}</tr>')
        evidence = rec.get("evidence")
        if isinstance(evidence, str) and evidence:
            rows.append(f'<tr class="{cls} evidence"><td colspan="{len(cols)}">'
                        f"{_esc(evidence)}</td></tr>")
    return f'<table class="findings"><tr>{head}</tr>{"".join(rows)}</table>'


def _breakable(value: Any) -> str:
    """Escaped text that may wrap after `_ . = / : ,` (rule names and scopes are long words)."""
    return re.sub(r"([_.=/:,])", r"\1<wbr>", _esc(_fmt(value)))


def _kv_table(mapping: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>"
                   for k, v in mapping.items())
    return f"<table>{rows}</table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _verdict_section(verdict: Any) -> str:
    if verdict is None:
        return ('<h2>Verdict</h2><p class="note">No policy verdict is attached to this page: '
                "it shows the audit's evidence only.</p>")
    status = str(getattr(verdict, "status", "unknown"))
    colour = STATUS_COLOURS.get(status, "#59636e")
    parts = [f'<h2 class="verdict">Verdict <span class="badge" style="background:{colour}">'
             f"{_esc(status)}</span></h2>"]
    summary = getattr(verdict, "summary", None)
    if isinstance(summary, dict):
        parts.append(_kv_table(summary))
    elif summary:
        parts.append(f"<p>{_esc(summary)}</p>")
    findings = getattr(verdict, "findings", None)
    if isinstance(findings, pd.DataFrame) and not findings.empty and "outcome" not in findings:
        parts.append(table_html(findings))
    elif isinstance(findings, pd.DataFrame) and not findings.empty:
        ordered = findings.assign(
            _order=findings["outcome"].map(lambda o: OUTCOME_ORDER.get(str(o), 2))
        ).sort_values("_order", kind="stable").drop(columns="_order")
        flagged = ordered[ordered["outcome"].astype(str) != "pass"]
        passed = ordered[ordered["outcome"].astype(str) == "pass"]
        parts.append(f'<h3 class="flagged">Failed and warning rules ({len(flagged)})</h3>')
        parts.append(findings_html(flagged) if len(flagged)
                     else '<p class="muted">none</p>')
        parts.append(f"<details><summary>Passing rules ({len(passed)})</summary>"
                     f"{findings_html(passed)}</details>")
    else:
        parts.append('<p class="muted">The verdict has no findings table.</p>')
    return "".join(parts)


def _drift_section(drift: Any) -> str:
    if drift is None:
        return ('<h2>Drift against the baseline</h2><p class="muted">No drift comparison is '
                "attached to this page.</p>")
    share = getattr(drift, "drift_share", float("nan"))
    parts = ["<h2>Drift against the baseline</h2>",
             f"<p>Evidently drift share (columns flagged over all compared tables): "
             f"<b>{_esc(_fmt(share))}</b></p>"]
    tables = getattr(drift, "tables", None)
    if isinstance(tables, dict) and tables:
        frame = pd.DataFrame([{"table": k, **{kk: vv for kk, vv in v.items()
                                              if not isinstance(vv, (list, dict))}}
                              for k, v in tables.items()])
        parts.append(table_html(frame))
    for note in getattr(drift, "notes", None) or []:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    top = getattr(drift, "top_changes", None)
    if isinstance(top, pd.DataFrame):
        parts.append("<h3>Largest per-layer and per-head changes (current − baseline)</h3>")
        parts.append(table_html(top, limit=15))
    files = getattr(drift, "files", None) or {}
    for key in ("head_change", "layer_curves"):
        path = files.get(key)
        if path and Path(path).is_file():
            parts.append(_img(Path(path).read_bytes(), f"drift {key}"))
    return "".join(parts)


def _audit_sections(result: AuditResult, images: dict[str, bytes]) -> str:
    meta = result.meta
    parts = ["<h2>Noise floor</h2>",
             f'<p class="note">{_esc(meta.get("noise_floor", "no noise-floor statement"))}</p>',
             "<h2>Behaviour per persona</h2>",
             '<p class="muted">accuracy with 95% interval; delta against the no-persona '
             "and neutral baselines; flip rate, TV and McNemar p against no persona.</p>",
             table_html(result.behaviour),
             "<h2>Persona pairs</h2>",
             '<p class="muted">shift_norm is the mean persona-induced logit shift; '
             "floor_ratio compares it with the paraphrase pair; above_floor needs the "
             "bootstrap interval of the difference to exclude zero.</p>",
             table_html(result.pairs)]
    if meta.get("plan"):
        parts += _plan_section(meta["plan"])
    if "heads" in images:
        parts += ["<h2>Per-head restoration scores</h2>", _img(images["heads"], "heads")]
        top = pd.concat([result.top_heads(10, p).assign(positions=p) for p in ("all", "last")])
        parts.append(table_html(top))
    if "layers" in images:
        parts += ["<h2>Per-layer curves</h2>", _img(images["layers"], "layer curves")]
    if "attention" in images:
        parts += ["<h2>Attention to identity tokens</h2>", _img(images["attention"], "attention")]
    return "".join(parts)


def _plan_section(plan: dict[str, Any]) -> list[str]:
    """What the budget plan estimated and what it verified exactly, per sweep."""
    agree = plan.get("agreement", {}) or {}
    rows = [{"sweep": s, "k exact": k, "patches": plan["sweep_sizes"].get(s),
             "k first pass": plan["k_first_pass"].get(s), "widened": s in plan["widened"],
             "screen spearman": agree.get(s, {}).get("spearman"),
             "screen recall": agree.get(s, {}).get("recall")}
            for s, k in plan["k"].items()]
    over = " Patching ran over what the budget left it." if plan.get("over_budget") else ""
    reserved = plan.get("reserved_s") or 0.0
    kept = (f" {_fmt(reserved)} s of it were kept for the persona pass (estimated)."
            if reserved else "")
    return ["<h2>Audit plan: estimated and exact</h2>",
            f'<p class="note">Budget {_fmt(plan["budget_s"] / 60)} min.{kept} Every patch was '
            f"estimated by the AtP screen ({_fmt(plan['screen_s'])} s); only the top k of each "
            f"sweep per pair was patched exactly ({plan['exact_patches']} patch-pairs, "
            f"estimated {_fmt(plan['estimated_exact_s'])} s, took "
            f"{_fmt(plan['actual_exact_s'])} s). {plan['skipped_patches']} patch-pairs have "
            f"an estimate only (screen.csv) and no exact score.{over}</p>",
            table_html(pd.DataFrame(rows))]


def _mitigation_section(mitigation: Any, png: bytes | None) -> str:
    if mitigation is None:
        return ""
    from governance.report.mitigation import mitigation_section

    return mitigation_section(mitigation, png)


def _provenance_section(meta: dict[str, Any]) -> str:
    model = meta.get("model", {}) or {}
    parts = ["<h2>Spec, model and versions</h2>",
             f"<p>spec sha256 <code>{_esc(meta.get('spec_sha256', '?'))}</code>, questions "
             f"sha256 <code>{_esc(meta.get('questions_sha256'))}</code></p>",
             "<h3>Model</h3>", _kv_table(model),
             "<h3>Software versions</h3>", _kv_table(meta.get("versions", {}) or {}),
             "<h3>Timings (s)</h3>", _kv_table(meta.get("timings_s", {}) or {})]
    if meta.get("skipped_pairs"):
        parts += ["<h3>Skipped pairs</h3>", table_html(pd.DataFrame(meta["skipped_pairs"]))]
    spec = json.dumps(meta.get("spec", {}), indent=2, default=str)
    parts += ["<h3>Audit spec</h3>", f"<pre>{_esc(spec)}</pre>"]
    return "".join(parts)


def render_report(
    result: AuditResult,
    out_path: str | Path,
    verdict: Any = None,
    drift: Any = None,
    mitigation: Any = None,
) -> Path:
    """Write the audit's report page to `out_path` (a .html file, or a directory that gets
    report.html) with its PNGs and a JSON summary beside it; return the HTML path.
    `mitigation` (a MitigationResult) adds the what-if's section after drift."""
    out = Path(out_path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem

    images: dict[str, bytes] = {}
    for key, make in (("heads", head_figure), ("layers", layer_figure),
                      ("attention", attention_figure)):
        fig = make(result)
        if fig is not None:
            images[key] = png_bytes(fig)
    if mitigation is not None:
        from governance.report.mitigation import tradeoff_figure

        images["mitigation"] = png_bytes(tradeoff_figure(mitigation))
    written = {}
    for key, png in images.items():
        path = out.parent / f"{stem}_{key}.png"
        path.write_bytes(png)
        written[key] = path.name

    meta = result.meta
    model = meta.get("model", {}) or {}
    title = f"Persona audit: {model.get('source', 'unknown model')}"
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">completed {_esc(meta.get("completed_at", "?"))} · spec '
        f'{_esc(str(meta.get("spec_sha256", "?"))[:12])} · '
        f'{_esc(meta.get("spec", {}).get("n_questions"))} questions</p>',
        _verdict_section(verdict),
        _audit_sections(result, images),
        _drift_section(drift),
        _mitigation_section(mitigation, images.get("mitigation")),
        _provenance_section(meta),
    ]
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
    out.write_text(page, encoding="utf-8")

    summary = {
        "report": out.name,
        "images": written,
        "model": model,
        "spec_sha256": meta.get("spec_sha256"),
        "completed_at": meta.get("completed_at"),
        "noise_floor": meta.get("noise_floor"),
        "verdict": _as_dict(verdict),
        "drift": _as_dict(drift),
    }
    (out.parent / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


def _as_dict(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {"status": str(getattr(obj, "status", "")), "summary": getattr(obj, "summary", None)}
