"""Headless Chromium for the tests that look at a page as a user would: the Prefect UI's run
page, the DVC plots page, the Data Docs site.

``chromium(...)`` runs it once (a screenshot, a DOM dump); ``DevTools`` drives one page over
the Chrome DevTools protocol (navigate, click, read the text, list every request it made).
Flags as ../shared/ENVIRONMENT.md gives them: headless, no sandbox, GPU or call home.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="no `chromium` on PATH (Debian: apt-get install -y chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900"]
# A proxy on a closed port: any fetch from the network fails, loopback and file: still load.
OFFLINE = ["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]
RENDER = ["--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw"]  # fetch, then draw


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """One headless run with ``args`` after the standard flags (``--dump-dom URL``, ...)."""
    with tempfile.TemporaryDirectory() as profile:
        # Its own process group: on a timeout the GPU and renderer children go too, not just the parent.
        proc = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={profile}", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            _kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class DevTools:
    """Just enough of the Chrome DevTools protocol to load a page, click it, read it and list
    the requests it made. ``offline=True`` sends every network fetch to a closed port."""

    def __init__(self, offline: bool = False):
        self.profile = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(["chromium", *FLAGS, *(OFFLINE if offline else []),
                                      f"--user-data-dir={self.profile.name}", "--remote-debugging-port=0",
                                      "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.ws = None
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        self.calls = 0
        self.events: list[dict] = []
        self.call("Network.enable")
        self.call("Page.enable")

    def _connect(self) -> None:
        from websockets.sync.client import connect

        for line in self.proc.stderr:
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                break
        else:
            raise AssertionError(f"chromium exited {self.proc.wait()} without a DevTools endpoint")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/json/list", timeout=10))
        self.ws = connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None)

    def call(self, method: str, **params) -> dict:
        """Send one command and wait for its answer; the events that come first are kept."""
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.calls:
                assert "error" not in msg, msg["error"]
                return msg["result"]
            self.events.append(msg)

    def js(self, expression: str, awaited: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=awaited, returnByValue=True)
        return result["result"].get("value")

    def load(self, url: str, timeout: float = 60) -> None:
        """Navigate to ``url`` and wait for its load event (``requests`` then lists what it fetched)."""
        self.events = []
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, f"{url} never finished loading"
            self.events.append(json.loads(self.ws.recv(timeout=timeout)))

    def requests(self) -> tuple[list[str], list[str]]:
        """(every URL requested since the last ``load``, the requests that failed, with why)."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}
        failed = [f"{urls.get(e['params']['requestId'])}: {e['params']['errorText']}"
                  for e in self.events if e.get("method") == "Network.loadingFailed"]
        return list(urls.values()), failed

    def text_once(self, predicate, timeout: float = 60) -> str:
        """The page's text, once ``predicate`` holds for it (a single-page app draws late)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed what was expected; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def close(self) -> None:
        try:
            if self.ws is not None:
                self.ws.close()
        finally:
            _kill_group(self.proc)  # the whole group: no renderer or GPU process outlives the test
            self.profile.cleanup()
