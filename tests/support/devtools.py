"""A minimal Chrome DevTools Protocol driver for headless Chromium, used by the e2e test in
tests/test_report.py to check that the report renders inside MLflow's artifact viewer.

Chromium is driven on a pipe (--remote-debugging-pipe: no port, no extra package). The driver
reads console errors and uncaught exceptions from every frame, the sandboxed artifact iframe
included, reads the iframe's own document, and takes a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
    "--window-size=1280,800", "--remote-debugging-pipe",
]


def need_chromium() -> str:
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
    check: object = None  # what the `check` expression returned inside the iframe


VIEWPORT = (1280, 800)  # a laptop's browser window: what the report must fit

# inside the artifact iframe: does every findings table fit its frame, and where do the
# verdict and the failed rules start?
FITS = """(() => {
  const width = document.documentElement.clientWidth, height = window.innerHeight;
  const tables = Array.from(document.querySelectorAll('table.findings'))
    .filter(t => t.getClientRects().length);
  const clipped = tables.filter(t => t.scrollWidth > t.clientWidth + 1
    || t.getBoundingClientRect().right > width + 1).map(t => t.scrollWidth);
  const top = sel => { const e = document.querySelector(sel);
    return e ? e.getBoundingClientRect().top : null; };
  return {width, height, tables: tables.length, clipped,
          verdict_top: top('h2.verdict'), flagged_top: top('h3.flagged')};
})()"""


def _new_tab(devtools: DevTools) -> tuple[str, str]:
    """A fresh tab of `VIEWPORT` size with page, runtime and log events on: its target and
    session ids."""
    target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
    devtools.errors.clear()
    for method in ("Page.enable", "Runtime.enable", "Log.enable"):
        devtools.send(method, session=session)
    devtools.send("Emulation.setDeviceMetricsOverride",
                  {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1,
                   "mobile": False}, session=session)
    return target, session


def open_artifact(devtools: DevTools, url: str, expect_text: str, timeout: float = 60.0,
                  check: str | None = None) -> Rendered:
    """Open an MLflow UI URL in a fresh tab of `VIEWPORT` size, wait for the artifact iframe
    to show `expect_text`, and return what the iframe holds, its errors, a screenshot and
    the value of the JavaScript expression `check` evaluated inside the iframe."""
    target, session = _new_tab(devtools)
    devtools.send("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True,
                                           "flatten": True}, session=session)
    devtools.send("Page.navigate", {"url": url}, session=session)
    deadline = time.monotonic() + timeout
    text, where = "", None
    while time.monotonic() < deadline:
        devtools.pump(1.0)
        where = iframe_context(devtools, session)
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
    checked = devtools.evaluate(check, *where) if check else None
    rect = json.loads(devtools.evaluate(
        "JSON.stringify(document.querySelector('iframe').getBoundingClientRect())",
        session=session))
    shot = base64.b64decode(devtools.send("Page.captureScreenshot", {"format": "png"},
                                          session=session)["data"])
    iframe_sessions = {s for s in list(devtools.frames_by_session) if s != session}
    iframe_frames = child_frames(devtools, session)
    errors = list(devtools.errors)  # the reader thread may still append
    iframe_errors = [e for e in errors
                     if e["session"] in iframe_sessions or e["frame"] in iframe_frames
                     or e["url"].startswith("blob:")]
    page_errors = [e for e in errors if e not in iframe_errors]
    devtools.send("Target.closeTarget", {"targetId": target})
    return Rendered(shot, rect, text, images, iframe_errors, page_errors, checked)


def child_frames(devtools: DevTools, session: str) -> set[str]:
    tree = devtools.send("Page.getFrameTree", session=session)["frameTree"]
    out: set[str] = set()
    stack = list(tree.get("childFrames", []))
    while stack:
        node = stack.pop()
        out.add(node["frame"]["id"])
        stack += node.get("childFrames", [])
    return out


def iframe_context(devtools: DevTools, session: str):
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
    frames = child_frames(devtools, session)
    for frame in frames:
        try:
            ctx = devtools.send("Page.createIsolatedWorld",
                                {"frameId": frame, "worldName": "check"}, session=session)
        except RuntimeError:
            continue
        if devtools.evaluate("location.protocol", session, ctx["executionContextId"]) == "blob:":
            return (session, ctx["executionContextId"])
    return None


@dataclass
class Page:
    screenshot: bytes
    text: str
    errors: list
    check: object = None


def open_page(devtools: DevTools, url: str, expect_text: str, timeout: float = 60.0,
              check: str | None = None) -> Page:
    """Open an MLflow UI page (no artifact iframe) in a fresh tab of `VIEWPORT` size, wait
    until it shows `expect_text`, and return its text, errors, a screenshot and the value of
    the JavaScript expression `check`."""
    target, session = _new_tab(devtools)
    devtools.send("Page.navigate", {"url": url}, session=session)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        devtools.pump(1.0)
        text = devtools.evaluate("document.body ? document.body.innerText : ''",
                                 session=session) or ""
        if expect_text in text:
            break
    else:
        raise AssertionError(f"{url} never showed {expect_text!r}; last text: {text[:300]!r}")
    devtools.pump(1.0)  # let late layout settle
    checked = devtools.evaluate(check, session=session) if check else None
    shot = base64.b64decode(devtools.send("Page.captureScreenshot", {"format": "png"},
                                          session=session)["data"])
    errors = list(devtools.errors)
    devtools.send("Target.closeTarget", {"targetId": target})
    return Page(shot, text, errors, checked)
