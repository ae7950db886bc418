"""Headless Chromium driven over the DevTools protocol, for tests that must run a page's
scripts and act on it (type a key, click "Try it out"), which ``--dump-dom`` cannot.

Every host but 127.0.0.1 is unresolvable, as on a cluster without internet; every
request the pages make is kept (``requests``), and so are console and log lines
(``messages``: a CSP violation is one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

__all__ = ["Chromium", "chromium_binary"]


def chromium_binary() -> str | None:
    """Debian's chromium, or another Chromium-based browser on the PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    def __init__(self) -> None:
        binary = chromium_binary()
        if binary is None:
            pytest.skip("no chromium binary (apt-get install chromium) to run the docs pages")
        self.profile = tempfile.mkdtemp(prefix="cdp-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={self.profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.connection = contextlib.ExitStack()
        try:
            self.ws = self.connection.enter_context(connect(self._page_socket(), max_size=None, open_timeout=30))
            for domain in ("Runtime", "Log", "Network", "Page"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _page_socket(self) -> str:
        active = Path(self.profile) / "DevToolsActivePort"  # the port chromium chose
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if active.is_file() and len(active.read_text().split()) >= 2:
                port = active.read_text().split()[0]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                        pages = [t for t in json.load(r) if t["type"] == "page"]
                    if pages:
                        return pages[0]["webSocketDebuggerUrl"]
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("chromium did not start")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def eval(self, expression: str, timeout_s: float = 60) -> Any:
        """The value of ``expression`` (a promise is awaited) in the page."""
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                      timeout=int(timeout_s * 1000))
        if "exceptionDetails" in r:
            raise AssertionError(r["exceptionDetails"].get("exception", {}).get("description") or r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except AssertionError:  # the page is between documents
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}: {self.messages()[-10:]}")

    def requests(self) -> list[str]:
        """The URLs the page asked for that went out: not those the browser refused to
        send (a CSP blocks them before any connection)."""
        blocked = {e["params"]["requestId"] for e in self.events
                   if e["method"] == "Network.loadingFailed" and e["params"].get("blockedReason")}
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent" and e["params"]["requestId"] not in blocked]

    def messages(self) -> list[str]:
        out = []
        for e in self.events:
            if e["method"] == "Log.entryAdded":
                out.append(f"{e['params']['entry']['level']}: {e['params']['entry'].get('text')}")
            elif e["method"] == "Runtime.consoleAPICalled":
                out.append(f"console.{e['params']['type']}: "
                           + " ".join(str(a.get("value", a.get("description"))) for a in e["params"]["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        return out

    def close(self) -> None:
        self.connection.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
