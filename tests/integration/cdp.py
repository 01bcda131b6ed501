"""A minimal Chrome DevTools Protocol client: open a page in headless Chromium, watch it.

Just enough to load a file:// page, collect console errors, exceptions, failed
loads and every request it made, evaluate an expression and take a screenshot.
No pytest here; tests decide what counts as a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

# Local DevTools endpoints must never go through a proxy from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def chromium_executable() -> str | None:
    """Debian's `chromium` (or another Chromium/Chrome on PATH); None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """Headless Chromium in its own process group, so closing it kills every child."""

    def __init__(self, executable: str, user_data_dir: Path, log_path: Path | None = None):
        self.executable = executable
        self.user_data_dir = Path(user_data_dir)
        self.log_path = log_path or self.user_data_dir.parent / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def start(self, timeout: float = 60.0) -> int:
        """Launch and return the DevTools port Chromium chose (from DevToolsActivePort)."""
        self.user_data_dir.mkdir(parents=True, exist_ok=True)
        marker = self.user_data_dir / "DevToolsActivePort"
        marker.unlink(missing_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.executable, "--headless", "--no-sandbox", "--disable-gpu",
                 "--remote-debugging-port=0", f"--user-data-dir={self.user_data_dir}",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                 "--hide-scrollbars", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            lines = marker.read_text().splitlines() if marker.exists() else []
            if lines and lines[0].strip().isdigit():
                self.port = int(lines[0])
                return self.port
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no DevToolsActivePort in {timeout:.0f}s")

    def page_websocket(self) -> str:
        """The websocket URL of a page target (a new about:blank one if there is none)."""
        base = f"http://127.0.0.1:{self.port}"
        with _HTTP.open(f"{base}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            request = urllib.request.Request(f"{base}/json/new?about:blank", method="PUT")
            with _HTTP.open(request, timeout=10) as resp:
                pages = [json.load(resp)]
        return pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        """Kill the whole process group (renderers, zygotes), then reap it."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CdpPage:
    """One page target: commands by id, events kept in arrival order."""

    def __init__(self, websocket_url: str):
        self.ws: ClientConnection = connect(websocket_url, max_size=None, proxy=None,
                                            open_timeout=15)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        """Send a command and return its result (raises on a protocol error)."""
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline - time.monotonic())
            if msg is None:
                raise TimeoutError(f"no answer to {method} in {timeout:.0f}s")
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method} failed: {msg['error']}")
                return msg.get("result", {})

    def _recv(self, timeout: float) -> dict[str, Any] | None:
        if timeout <= 0:
            return None
        try:
            msg = json.loads(self.ws.recv(timeout=timeout))
        except TimeoutError:
            return None
        if "method" in msg:
            self.events.append(msg)
        return msg

    def wait_for(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first `event` seen (already received or arriving within `timeout`)."""
        seen = next((e for e in self.events if e["method"] == event), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            msg = self._recv(deadline - time.monotonic())
            if msg is None:
                raise TimeoutError(f"no {event} in {timeout:.0f}s")
            if msg.get("method") == event:
                seen = msg
        return seen

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console messages, lazy loads)."""
        deadline = time.monotonic() + seconds
        while self._recv(deadline - time.monotonic()) is not None:
            pass

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Enable the domains that report problems, navigate, wait for the load event."""
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired", timeout)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and failed loads."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: "
                           + " ".join(str(a.get("value", a.get("description")))
                                      for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif e["method"] == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')} {p.get('blockedReason', '')}")
        return out

    def requested_urls(self) -> list[str]:
        """Every URL the page asked for (data: URIs included)."""
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, width: int = 1280, max_height: int = 16000) -> Path:
        """A full-page PNG (at most max_height px tall) written to `path`."""
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        height = min(int(size["height"]) + 1, max_height)
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.ws.close()
