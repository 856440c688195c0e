"""The report page: self-contained HTML, PNGs and JSON beside it, and (e2e) its rendering
inside MLflow's artifact viewer in a real headless Chromium against a real `mlflow server`.

The e2e test drives Chromium over the DevTools protocol on a pipe (tests/support/devtools.py):
it reads console errors and uncaught exceptions from every frame, the sandboxed artifact
iframe included, reads the iframe's own document, and takes a screenshot whose iframe region
must not be blank.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from governance.audit.result import AuditResult
from governance.report.page import render_report

from support.devtools import FITS, DevTools, need_chromium, open_artifact

# `tiny_audit` (tests/conftest.py) is support.audits.TINY_SPEC on a tiny llama named
# "tiny-llama <test>"


@dataclass
class FakeVerdict:
    """Duck-typed like policy.Verdict: the report must not need the policy module."""

    status: str
    findings: pd.DataFrame
    summary: str

    def to_dict(self):
        return {"status": self.status, "summary": self.summary,
                "findings": self.findings.to_dict(orient="records")}


def _verdict() -> FakeVerdict:
    findings = pd.DataFrame([
        dict(rule="max_flip_rate", scope="race", observed=0.02, threshold=0.05,
             severity="fail", outcome="pass", evidence="a Black person -> a White person"),
        dict(rule="max_head_score", scope="race", observed=0.31, threshold=0.2,
             severity="warn", outcome="warn", evidence="layer 1 head 2"),
        dict(rule="max_accuracy_gap", scope="gender", observed=0.12, threshold=0.05,
             severity="fail", outcome="fail", evidence="a man vs a woman"),
    ])
    return FakeVerdict("fail", findings, "1 rule failed, 1 warned")


# -- the page itself ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(tiny_audit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert render_report(tiny_audit, out, verdict=_verdict()) == out
    return out


def test_page_is_self_contained_with_pngs_and_json_beside(tiny_audit, page):
    text = page.read_text()
    tmp_path = page.parent
    # nothing the sandboxed, null-origin iframe could not load or run
    assert "<script" not in text.lower()
    assert "localstorage" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3  # per-head heatmaps, layer curves, attention
    beside = sorted(p.name for p in tmp_path.glob("report_*.png"))
    assert beside == ["report_attention.png", "report_heads.png", "report_layers.png"]
    inline = {base64.b64decode(b) for b in images}
    assert inline == {p.read_bytes() for p in tmp_path.glob("report_*.png")}
    for png in inline:
        assert png.startswith(b"\x89PNG")
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["verdict"]["status"] == "fail"
    assert summary["spec_sha256"] == tiny_audit.meta["spec_sha256"]


def test_failed_rules_come_first_and_content_is_there(tiny_audit, page):
    text = page.read_text().replace("<wbr>", "")  # break hints inside long rule names
    failed, warned, passed = (text.index(r) for r in
                              ("max_accuracy_gap", "max_head_score", "max_flip_rate"))
    assert failed < warned < passed
    assert text.index("Verdict") < text.index("Behaviour per persona")
    assert "Passing rules (1)" in text and "Failed and warning rules (2)" in text
    assert tiny_audit.meta["noise_floor"].split("(")[0] in text
    for persona in tiny_audit.behaviour["persona"]:
        assert f"<td>{persona}</td>" in text
    assert tiny_audit.meta["versions"]["torch"] in text
    # the model name is escaped, not injected
    assert "tiny-llama &lt;test&gt;" in text and "<test>" not in text


def test_page_without_verdict_or_drift_says_so(tiny_audit, tmp_path):
    text = render_report(tiny_audit, tmp_path).read_text()  # a directory gets report.html
    assert (tmp_path / "report.html").exists()
    assert "No policy verdict is attached" in text
    assert "No drift comparison is attached" in text


def test_drift_summary_is_shown(tiny_audit, tmp_path):
    from governance.judge.drift import drift_report

    baseline = AuditResult(tiny_audit.scores.copy(), tiny_audit.attention,
                           tiny_audit.behaviour, tiny_audit.pairs, dict(tiny_audit.meta))
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["layer"] == 0) & (s["head"] == 3),
                        "score"] += 0.4
    drift = drift_report(tiny_audit, baseline, tmp_path / "drift")
    text = render_report(tiny_audit, tmp_path / "report.html", drift=drift).read_text()
    assert "Drift against the baseline" in text
    assert f"{drift.drift_share:.3g}" in text
    # drift PNGs are inlined too: 3 audit figures + head_change + layer_curves
    assert len(re.findall(r"data:image/png;base64,", text)) == 5


# -- rendering in MLflow's artifact viewer (e2e) ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp: Path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    log = (tmp / "mlflow-server.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(tmp / 'mlflow-server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError("mlflow server did not answer /health within 90 s")


def _not_blank(png: bytes, rect: dict) -> tuple[float, float]:
    """(pixel std, share of non-white pixels) inside the iframe's rectangle."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    x0, y0 = int(rect["x"]), int(rect["y"])
    x1, y1 = int(rect["x"] + rect["width"]), int(rect["y"] + rect["height"])
    region = img[max(y0, 0):y1, max(x0, 0):x1]
    return float(region.std()), float((region < 240).mean())


@pytest.mark.e2e
def test_report_and_evidently_render_in_mlflow_artifact_viewer(tiny_audit, tmp_path):
    binary = need_chromium()
    from governance.judge.drift import drift_report

    baseline = AuditResult(tiny_audit.scores.copy(), tiny_audit.attention,
                           tiny_audit.behaviour, tiny_audit.pairs, dict(tiny_audit.meta))
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["layer"] == 1), "score"] += 0.3
    drift = drift_report(tiny_audit, baseline, tmp_path / "drift")
    page = render_report(tiny_audit, tmp_path / "page" / "report.html", verdict=_verdict(),
                         drift=drift)

    server, url = _mlflow_server(tmp_path)
    devtools = None
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.create_experiment("report-render")
        run = client.create_run(exp).info.run_id
        client.log_artifact(run, str(page))
        client.log_artifact(run, str(drift.files["evidently_html"]))
        # negative control: a page that touches localStorage must raise inside the iframe
        bad = tmp_path / "bad" / "uses_storage.html"
        bad.parent.mkdir()
        bad.write_text("<!DOCTYPE html><html><body><p>storage page</p><script>"
                       "localStorage.setItem('k', '1');</script></body></html>")
        client.log_artifact(run, str(bad))
        client.set_terminated(run)

        devtools = DevTools(binary, tmp_path / "chromium-profile")
        base = f"{url}/#/experiments/{exp}/runs/{run}/artifacts"
        shots = {}
        for name, expect in (("report.html", "Failed and warning rules"),
                             ("evidently_drift.html", "heads/")):
            got = open_artifact(devtools, f"{base}/{name}", expect, check=FITS)
            shots[name] = got
            (tmp_path / f"{name}.png").write_bytes(got.screenshot)
            assert got.iframe_errors == [], f"{name}: errors inside the iframe"
            std, inked = _not_blank(got.screenshot, got.iframe_rect)
            assert got.iframe_rect["width"] > 300 and got.iframe_rect["height"] > 200
            assert std > 10 and inked > 0.01, f"{name}: the iframe region looks blank"
        control = open_artifact(devtools, f"{base}/uses_storage.html", "storage page")
        assert any("SecurityError" in e["text"] or "localStorage" in e["text"]
                   for e in control.iframe_errors), control
        for got in shots.values():  # MLflow's own page may log its own 404s, never ours
            assert not any("report.html" in e["text"] + e["url"] or "blob:" in e["url"]
                           for e in got.page_errors), got.page_errors
        report = shots["report.html"]
        fits = report.check
        assert fits["tables"] >= 1 and fits["clipped"] == [], fits  # no findings column cut
        assert fits["verdict_top"] < fits["height"] and fits["flagged_top"] < fits["height"], \
            fits  # the verdict and the failed rules are above the fold at 1280x800
        assert len(report.iframe_images) == 5
        assert all(done and width > 0 for done, width in report.iframe_images)
        assert "max_accuracy_gap" in report.iframe_text
        keep = os.environ.get("REPORT_SCREENSHOTS")
        if keep:  # for a person to look at
            Path(keep).mkdir(parents=True, exist_ok=True)
            for name, got in {**shots, "uses_storage.html": control}.items():
                (Path(keep) / f"{name}.png").write_bytes(got.screenshot)
                (Path(keep) / f"{name}.errors.json").write_text(json.dumps(
                    {"iframe": got.iframe_errors, "page": got.page_errors}, indent=2))
    finally:
        if devtools is not None:
            devtools.close()
        _stop(server)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started: its own process group (it runs worker processes)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
