"""`dvc plots show` renders offline: .dvc/config names plots/offline.html as the page
template, which inlines the pinned vega builds instead of loading them from a CDN."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import OFFLINE, RENDER, chromium, needs_chromium
from tests.conftest import ROOT, git

TEMPLATE = ROOT / "plots" / "offline.html"
VENDOR = ROOT / "plots" / "vendor"
INLINED = re.compile(rb'<script data-package="([^"]+)">(.*?)</script>', re.S)
EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=", re.I)
LOSS_TSV = "step\tloss\n1\t2.31\n2\t1.87\n3\t1.52\n4\t1.40\n"


def inlined_libraries(html: bytes) -> dict[str, bytes]:
    return {spec.decode(): body for spec, body in INLINED.findall(html)}


def pinned_hashes() -> dict[str, str]:
    lines = (VENDOR / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


def test_template_inlines_the_builds_dvc_render_expects():
    from dvc_render.vega import VegaRenderer

    # The versions dvc_render would load from its CDN: a dvc upgrade that moves them
    # fails here, and plots/vendor/fetch.sh --update is the fix.
    expected = set(re.findall(r"cdn\.jsdelivr\.net/npm/([\w.@-]+)", VegaRenderer.SCRIPTS))
    libraries = inlined_libraries(TEMPLATE.read_bytes())
    assert set(libraries) == expected

    pins = pinned_hashes()
    for spec, body in libraries.items():
        name = spec.rsplit("@", 1)[0]
        assert hashlib.sha256(body).hexdigest() == pins[f"{name}.min.js"], \
            f"{spec} in {TEMPLATE} is not the pinned npm build: rerun plots/vendor/fetch.sh"
        assert (VENDOR / f"LICENSE.{name}").is_file()
    provenance = (VENDOR / "PROVENANCE.md").read_text()
    assert all(digest in provenance for digest in pins.values()), "PROVENANCE.md is out of date with SHA256SUMS"


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory) -> Path:
    """`dvc plots show` in a one-plot project that carries the repo's .dvc/config and template."""
    project = tmp_path_factory.mktemp("plots") / "project"
    (project / "plots").mkdir(parents=True)
    shutil.copy2(TEMPLATE, project / "plots" / "offline.html")
    (project / "loss.tsv").write_text(LOSS_TSV)
    (project / "dvc.yaml").write_text("plots:\n  - loss.tsv:\n      x: step\n      y: loss\n")
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    out = dvc(project, "plots", "show")
    page = project / "dvc_plots" / "index.html"
    assert page.as_uri() in out
    return page


def dvc(project: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_plots_page_has_no_cdn_scripts(plots_page):
    html = plots_page.read_text(encoding="utf-8")
    assert not EXTERNAL_SCRIPT.search(html), "the page loads a script from elsewhere: it will be blank offline"
    assert inlined_libraries(plots_page.read_bytes()) == inlined_libraries(TEMPLATE.read_bytes())
    assert "vegaEmbed('#loss_tsv', spec)" in html


@needs_chromium
def test_plots_page_draws_with_no_network(plots_page):
    proc = chromium(*OFFLINE, *RENDER, "--dump-dom", plots_page.as_uri(), timeout=60)
    charts = re.findall(r'<(?:canvas|svg)\b[^>]*class="marks"[^>]*>', proc.stdout)
    assert len(charts) == 1, f"expected one drawn chart, got {charts}; chromium said:\n{proc.stderr[-2000:]}"
    assert charts[0].startswith("<svg") or re.search(r'width="[1-9]', charts[0]), f"the chart has no size: {charts[0]}"
