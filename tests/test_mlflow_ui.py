"""What an approver sees in the MLflow UI at 1280x800, in a real headless Chromium against a
real `mlflow server`: the model version page shows the verdict, the policy, the date and a
link to the audit run; the run's report page shows the verdict and the failed rules above
the fold, no findings column clipped. With REPORT_SCREENSHOTS=DIR the two screenshots are
saved there, compressed for the README (docs/mlflow_ui_version.png, docs/mlflow_ui_report.png):

    REPORT_SCREENSHOTS=docs pytest tests/test_mlflow_ui.py
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from governance.judge.policy import DEFAULT_POLICY_PATH, evaluate, load_policy
from governance.report.page import render_report
from governance.tracking.registry import record_approval

from support.devtools import FITS, DevTools, need_chromium, open_artifact, open_page
from support.servers import clean_env, mlflow_server

MODEL = "persona-tiny"

# on the version page: where the audit line's verdict and run link are, and where they point
VERSION_CHECK = """(() => {
  const run = '%(run)s';
  const link = Array.from(document.querySelectorAll('a'))
    .find(a => a.textContent.trim() === 'run ' + run);
  const strong = Array.from(document.querySelectorAll('strong, b'))
    .find(e => e.textContent.trim() === '%(status)s');
  const top = e => e ? e.getBoundingClientRect().top : null;
  return {height: window.innerHeight, href: link ? link.getAttribute('href') : null,
          link_top: top(link), verdict_top: top(strong)};
})()"""


def _small_png(png: bytes, path: Path) -> None:
    """The screenshot as a 64-colour PNG (a README image well under 200 KB)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


@pytest.mark.e2e
def test_version_page_and_report_read_well_in_the_mlflow_ui(tiny_audit, tmp_path):
    binary = need_chromium()
    policy = load_policy(DEFAULT_POLICY_PATH)
    verdict = evaluate(policy, tiny_audit, model_name=MODEL)
    page = render_report(tiny_audit, tmp_path / "report" / "report.html", verdict=verdict)
    args = ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--default-artifact-root", str(tmp_path / "artifacts")]
    devtools = None
    with mlflow_server(tmp_path, args, clean_env(), wait_s=180) as url:
        from mlflow import MlflowClient

        client = MlflowClient(url)
        exp = client.create_experiment("persona-audits")
        run = client.create_run(exp, run_name=f"{MODEL}-v1").info.run_id
        client.log_artifacts(run, str(page.parent), "report")
        client.set_terminated(run)
        client.create_registered_model(MODEL)
        client.create_model_version(MODEL, f"runs:/{run}/report", run_id=run)
        client.update_model_version(MODEL, "1", description="Fine-tuned for support chat.")
        record_approval(client, MODEL, "1", status=verdict.status, run_id=run,
                        spec_sha256=tiny_audit.meta["spec_sha256"],
                        policy_sha256=verdict.policy["sha256"], summary=verdict.summary,
                        policy_name=policy.name, experiment_id=exp,
                        completed_at="2026-12-02T02:00:00+00:00")
        try:
            devtools = DevTools(binary, tmp_path / "chromium-profile")
            status = verdict.status.upper()
            version = open_page(devtools, f"{url}/#/models/{MODEL}/versions/1",
                                f"run {run}", check=VERSION_CHECK % {"run": run,
                                                                     "status": status})
            report = open_artifact(devtools, f"{url}/#/experiments/{exp}/runs/{run}/artifacts/"
                                   "report/report.html", "Verdict", check=FITS)
        finally:
            if devtools is not None:
                devtools.close()

    # the version page: the person's text, then the audit line with verdict, policy, date
    # and a link that MLflow's router follows to the audit run, all above the fold
    text = version.text
    assert "Fine-tuned for support chat." in text
    assert f"{status} under policy '{policy.name}' {verdict.policy['sha256'][:12]}" in text
    assert "2026-12-02T02:00:00+00:00" in text
    got = version.check
    assert got["href"] and got["href"].endswith(f"/experiments/{exp}/runs/{run}"), got
    assert 0 < got["verdict_top"] < got["height"] and 0 < got["link_top"] < got["height"], got
    # the report in the artifact viewer: nothing clipped, verdict and failed rules visible
    fits = report.check
    assert report.iframe_errors == [], report.iframe_errors
    assert fits["tables"] >= 1 and fits["clipped"] == [], fits
    assert fits["verdict_top"] is not None and fits["verdict_top"] < fits["height"], fits
    if verdict.status != "pass":
        assert fits["flagged_top"] is not None and fits["flagged_top"] < fits["height"], fits
    keep = os.environ.get("REPORT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        _small_png(version.screenshot, Path(keep) / "mlflow_ui_version.png")
        _small_png(report.screenshot, Path(keep) / "mlflow_ui_report.png")
