"""The Prefect UI in a real browser: headless Chromium renders the page of the run that
tests/test_prefect_server.py triggered (same server, same run) and shows its stages.

Screenshots are kept in .ptune/test-artifacts/ (gitignored) for a person to look at."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_prefect_server import TASKS, prefect_stack, retrain_run  # noqa: F401 (shared fixtures)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None,
                                 reason="no `chromium` on PATH (Debian: apt-get install -y chromium)")]

ARTIFACTS = ROOT / ".ptune" / "test-artifacts"
# ../shared/ENVIRONMENT.md: headless without a sandbox, GPU or any call home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900"]
RENDER = ["--virtual-time-budget=30000", "--run-all-compositor-stages-before-draw"]  # the SPA fetches, then draws


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        # Its own process group: on a timeout the GPU and renderer children go too, not just the parent.
        proc = subprocess.Popen(["chromium", *FLAGS, *RENDER, f"--user-data-dir={profile}", *args],
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


def keep(name: str, png: bytes) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    print(f"screenshot: {path}")
    return path


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class DevTools:
    """Just enough of the Chrome DevTools Protocol to click a tab and read the page."""

    def __init__(self):
        self.profile = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={self.profile.name}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        try:
            self._connect()
        except BaseException:
            _kill_group(self.proc)
            raise

    def _connect(self):
        from websockets.sync.client import connect

        for line in self.proc.stderr:
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                break
        else:
            raise AssertionError(f"chromium exited {self.proc.wait()} without a DevTools endpoint")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.calls:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text_once(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed what was expected; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def close(self):
        try:
            self.ws.close()
        finally:
            _kill_group(self.proc)  # the whole group: no renderer or GPU process outlives the test
            self.profile.cleanup()


@pytest.fixture
def run_page(prefect_stack, retrain_run) -> str:
    return f"{prefect_stack.ui}/runs/flow-run/{retrain_run['id']}"


def test_the_run_page_renders_the_run(run_page, retrain_run):
    """The flags of ENVIRONMENT.md as they are: one screenshot, one DOM dump."""
    shot = Path(tempfile.mkdtemp()) / "run.png"
    proc = chromium(f"--screenshot={shot}", run_page)
    assert shot.is_file(), proc.stderr[-3000:]
    png = shot.read_bytes()
    assert png_size(png) == (1400, 900) and len(png) > 50_000  # a drawn page, not a blank one
    keep("prefect-run-page.png", png)

    dom = chromium("--dump-dom", run_page).stdout
    assert retrain_run["name"] in dom and "Completed" in dom
    assert "Can't connect to Server API" not in dom
    assert "Running stage 'base_model':" in dom  # the logs tab, open by default: the first stage's log


def test_the_run_page_lists_every_stage_as_a_completed_task(run_page, retrain_run):
    browser = DevTools()
    try:
        browser.call("Page.navigate", url=run_page)
        browser.text_once(lambda t: retrain_run["name"] in t and "Task Runs" in t)
        clicked = browser.js("(() => { const tab = [...document.querySelectorAll('[role=tablist] *')]"
                             ".find(e => e.children.length === 0 && e.textContent.trim() === 'Task Runs');"
                             " if (tab) tab.click(); return !!tab; })()")
        assert clicked, "no 'Task Runs' tab on the run page"
        text = browser.text_once(lambda t: all(f"\n{name}\n" in t for name in TASKS))
        keep("prefect-run-task-runs.png", base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    listed = [line for line in text.splitlines() if line in TASKS]
    assert listed == ["publish-comparison", "register-version", "publish-gate", "register", "package", "publish-metrics",
                      "evaluate", "baselines", "tune",
                      "tokenize", "clean", "collect", "base_model"]  # newest first, as the UI sorts them
    assert f"{len(TASKS)} Task runs\n({len(TASKS)} Completed)" in text
