"""The Prefect UI in a real browser: headless Chromium renders the page of the run that
tests/test_prefect_server.py triggered (same server, same run) and shows its stages.

Screenshots are kept in .ptune/test-artifacts/ (gitignored) for a person to look at."""
from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import pytest

from tests.browser import RENDER, DevTools, chromium, needs_chromium
from tests.conftest import ROOT
from tests.test_prefect_server import TASK_RUNS, prefect_stack, retrain_run  # noqa: F401 (shared fixtures)

pytestmark = [pytest.mark.slow, needs_chromium]

ARTIFACTS = ROOT / ".ptune" / "test-artifacts"


def keep(name: str, png: bytes) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(png)
    print(f"screenshot: {path}")
    return path


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.fixture
def run_page(prefect_stack, retrain_run) -> str:
    return f"{prefect_stack.ui}/runs/flow-run/{retrain_run['id']}"


def test_the_run_page_renders_the_run(run_page, retrain_run):
    """The flags of ENVIRONMENT.md as they are: one screenshot, one DOM dump."""
    shot = Path(tempfile.mkdtemp()) / "run.png"
    proc = chromium(*RENDER, f"--screenshot={shot}", run_page)
    assert shot.is_file(), proc.stderr[-3000:]
    png = shot.read_bytes()
    assert png_size(png) == (1400, 900) and len(png) > 50_000  # a drawn page, not a blank one
    keep("prefect-run-page.png", png)

    dom = chromium(*RENDER, "--dump-dom", run_page).stdout
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
        text = browser.text_once(lambda t: all(f"\n{name}\n" in t for name in TASK_RUNS))
        keep("prefect-run-task-runs.png", base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        browser.close()
    listed = [line for line in text.splitlines() if line in TASK_RUNS]
    assert listed == ["publish-comparison", "register-version", "publish-gate", "register", "package", "publish-metrics",
                      "evaluate", "baselines", "tune",
                      "tokenize", "clean", "collect", "base_model"]  # newest first, as the UI sorts them
    assert f"{len(TASK_RUNS)} Task runs\n({len(TASK_RUNS)} Completed)" in text
