"""The report page: self-contained HTML, PNGs and JSON beside it, and (e2e) its rendering
inside MLflow's artifact viewer in a real headless Chromium against a real `mlflow server`.

The e2e test drives Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe,
no port, no extra package): it reads console errors and uncaught exceptions from every frame,
the sandboxed artifact iframe included, reads the iframe's own document, and takes a
screenshot whose iframe region must not be blank.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
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
from governance.audit.run import run_audit
from governance.audit.spec import AuditSpec
from governance.models.loading import LoadedModel
from governance.models.tiny import tiny_model, tiny_questions
from governance.report.page import render_report

SPEC = AuditSpec(
    n_questions=6,
    pairs=[("a Black person", "a White person"), ("a man", "a woman")],
    components=("mlp_out:identity", "attn_out:last", "head:all"),
    bootstrap=100,
)


_questions = tiny_questions


@pytest.fixture(scope="module")
def audit(tokenizer) -> AuditResult:
    model = tiny_model("llama", vocab_size=len(tokenizer))
    return run_audit(LoadedModel.from_model(model, tokenizer, "tiny-llama <test>"), SPEC,
                     questions=_questions(), progress=False)


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
def page(audit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert render_report(audit, out, verdict=_verdict()) == out
    return out


def test_page_is_self_contained_with_pngs_and_json_beside(audit, page):
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
    assert summary["spec_sha256"] == audit.meta["spec_sha256"]


def test_failed_rules_come_first_and_content_is_there(audit, page):
    text = page.read_text()
    failed, warned, passed = (text.index(r) for r in
                              ("max_accuracy_gap", "max_head_score", "max_flip_rate"))
    assert failed < warned < passed
    assert text.index("Verdict") < text.index("Behaviour per persona")
    assert "Passing rules (1)" in text and "Failed and warning rules (2)" in text
    assert audit.meta["noise_floor"].split("(")[0] in text
    for persona in audit.behaviour["persona"]:
        assert f"<td>{persona}</td>" in text
    assert audit.meta["versions"]["torch"] in text
    # the model name is escaped, not injected
    assert "tiny-llama &lt;test&gt;" in text and "<test>" not in text


def test_page_without_verdict_or_drift_says_so(audit, tmp_path):
    text = render_report(audit, tmp_path).read_text()  # a directory gets report.html
    assert (tmp_path / "report.html").exists()
    assert "No policy verdict is attached" in text
    assert "No drift comparison is attached" in text


def test_drift_summary_is_shown(audit, tmp_path):
    from governance.judge.drift import drift_report

    baseline = AuditResult(audit.scores.copy(), audit.attention, audit.behaviour, audit.pairs,
                           dict(audit.meta))
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["layer"] == 0) & (s["head"] == 3),
                        "score"] += 0.4
    drift = drift_report(audit, baseline, tmp_path / "drift")
    text = render_report(audit, tmp_path / "report.html", drift=drift).read_text()
    assert "Drift against the baseline" in text
    assert f"{drift.drift_share:.4g}" in text
    # drift PNGs are inlined too: 3 audit figures + head_change + layer_curves
    assert len(re.findall(r"data:image/png;base64,", text)) == 5


# -- rendering in MLflow's artifact viewer (e2e) ---------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
    "--window-size=1800,1100", "--remote-debugging-pipe",
]


def _need_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    reason = ("Debian chromium is not installed (apt-get install -y chromium); it is needed "
              "to check that the report renders inside MLflow's artifact viewer")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in,
    fd 4 out, messages separated by NUL). Records errors from every attached session."""

    def __init__(self, binary: str, user_data_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        script = (f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} '
                  f"{to_chrome_r}<&- {from_chrome_w}>&-")
        self.proc = subprocess.Popen(
            ["bash", "-c", script, binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []
        self.errors: list[dict] = []  # {session, frame, text}
        self.frames_by_session: dict[str, str] = {}
        self.context_frames: dict[tuple[str | None, int], str] = {}

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone; kill below
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass

    def _read_message(self, deadline: float) -> dict | None:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_chrome], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _handle_event(self, msg: dict) -> None:
        method, params, session = msg["method"], msg.get("params", {}), msg.get("sessionId")
        self.events.append(msg)
        if method == "Target.attachedToTarget":
            child = params["sessionId"]
            self.frames_by_session[child] = params["targetInfo"].get("url", "")
            for m in ("Runtime.enable", "Log.enable", "Page.enable"):
                self._post(m, session=child)
            self._post("Runtime.runIfWaitingForDebugger", session=child)
        elif method == "Runtime.executionContextCreated":
            ctx = params["context"]
            frame = (ctx.get("auxData") or {}).get("frameId")
            if frame:
                self.context_frames[(session, ctx["id"])] = frame
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            self._error(session, d.get("executionContextId"), text, d.get("url", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in
                            params.get("args", []))
            self._error(session, params.get("executionContextId"), text, "")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self._error(session, None, entry.get("text", ""), entry.get("url", ""))

    def _error(self, session, context_id, text, url) -> None:
        frame = self.context_frames.get((session, context_id)) if context_id else None
        self.errors.append({"session": session, "frame": frame, "text": text, "url": url})

    def _post(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        return self._next

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        ident = self._post(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if msg is None:
                raise TimeoutError(f"no DevTools reply to {method} in {timeout} s")
            if "method" in msg:
                self._handle_event(msg)
            elif msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def pump(self, seconds: float) -> None:
        """Process events for `seconds` (attachments, console messages, exceptions)."""
        deadline = time.monotonic() + seconds
        while True:
            msg = self._read_message(deadline)
            if msg is None:
                return
            if "method" in msg:
                self._handle_event(msg)

    def evaluate(self, expression: str, session: str | None = None,
                 context_id: int | None = None):
        params = {"expression": expression, "returnByValue": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.send("Runtime.evaluate", params, session)
        return result.get("result", {}).get("value")


@dataclass
class Rendered:
    screenshot: bytes
    iframe_rect: dict
    iframe_text: str
    iframe_images: list
    iframe_errors: list
    page_errors: list


def _open_artifact(devtools: DevTools, url: str, expect_text: str,
                   timeout: float = 60.0) -> Rendered:
    """Open an MLflow UI URL in a fresh tab, wait for the artifact iframe to show
    `expect_text`, and return what the iframe holds, its errors and a screenshot."""
    target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
    devtools.errors.clear()
    for method in ("Page.enable", "Runtime.enable", "Log.enable"):
        devtools.send(method, session=session)
    devtools.send("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True,
                                           "flatten": True}, session=session)
    devtools.send("Page.navigate", {"url": url}, session=session)
    deadline = time.monotonic() + timeout
    text, where = "", None
    while time.monotonic() < deadline:
        devtools.pump(1.0)
        where = _iframe_context(devtools, session)
        if where is not None:
            text = devtools.evaluate("document.body ? document.body.innerText : ''", *where) or ""
            if expect_text in text:
                break
    else:
        raise AssertionError(f"the artifact iframe never showed {expect_text!r} at {url}; "
                             f"last text: {text[:300]!r}; errors: {devtools.errors}")
    devtools.pump(2.0)  # let images decode and late errors arrive
    images = devtools.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth])", *where) or []
    rect = json.loads(devtools.evaluate(
        "JSON.stringify(document.querySelector('iframe').getBoundingClientRect())",
        session=session))
    shot = base64.b64decode(devtools.send("Page.captureScreenshot", {"format": "png"},
                                          session=session)["data"])
    iframe_sessions = {s for s in list(devtools.frames_by_session) if s != session}
    iframe_frames = _child_frames(devtools, session)
    errors = list(devtools.errors)  # the reader thread may still append
    iframe_errors = [e for e in errors
                     if e["session"] in iframe_sessions or e["frame"] in iframe_frames
                     or e["url"].startswith("blob:")]
    page_errors = [e for e in errors if e not in iframe_errors]
    devtools.send("Target.closeTarget", {"targetId": target})
    return Rendered(shot, rect, text, images, iframe_errors, page_errors)


def _child_frames(devtools: DevTools, session: str) -> set[str]:
    tree = devtools.send("Page.getFrameTree", session=session)["frameTree"]
    out: set[str] = set()
    stack = list(tree.get("childFrames", []))
    while stack:
        node = stack.pop()
        out.add(node["frame"]["id"])
        stack += node.get("childFrames", [])
    return out


def _iframe_context(devtools: DevTools, session: str):
    """(session, context id) to evaluate inside the artifact iframe, in its own process
    (an attached out-of-process frame) or in the page's process (an isolated world)."""
    # a snapshot: the reader thread adds frames as they attach
    for child in list(devtools.frames_by_session):
        if child != session:
            try:
                if devtools.evaluate("location.protocol", session=child) == "blob:":
                    return (child, None)
            except RuntimeError:
                continue
    frames = _child_frames(devtools, session)
    for frame in frames:
        try:
            ctx = devtools.send("Page.createIsolatedWorld",
                                {"frameId": frame, "worldName": "check"}, session=session)
        except RuntimeError:
            continue
        if devtools.evaluate("location.protocol", session, ctx["executionContextId"]) == "blob:":
            return (session, ctx["executionContextId"])
    return None


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
def test_report_and_evidently_render_in_mlflow_artifact_viewer(audit, tmp_path):
    binary = _need_chromium()
    from governance.judge.drift import drift_report

    baseline = AuditResult(audit.scores.copy(), audit.attention, audit.behaviour, audit.pairs,
                           dict(audit.meta))
    s = baseline.scores
    baseline.scores.loc[(s["component"] == "head") & (s["layer"] == 1), "score"] += 0.3
    drift = drift_report(audit, baseline, tmp_path / "drift")
    page = render_report(audit, tmp_path / "page" / "report.html", verdict=_verdict(),
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
            got = _open_artifact(devtools, f"{base}/{name}", expect)
            shots[name] = got
            (tmp_path / f"{name}.png").write_bytes(got.screenshot)
            assert got.iframe_errors == [], f"{name}: errors inside the iframe"
            std, inked = _not_blank(got.screenshot, got.iframe_rect)
            assert got.iframe_rect["width"] > 300 and got.iframe_rect["height"] > 200
            assert std > 10 and inked > 0.01, f"{name}: the iframe region looks blank"
        control = _open_artifact(devtools, f"{base}/uses_storage.html", "storage page")
        assert any("SecurityError" in e["text"] or "localStorage" in e["text"]
                   for e in control.iframe_errors), control
        for got in shots.values():  # MLflow's own page may log its own 404s, never ours
            assert not any("report.html" in e["text"] + e["url"] or "blob:" in e["url"]
                           for e in got.page_errors), got.page_errors
        report = shots["report.html"]
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
