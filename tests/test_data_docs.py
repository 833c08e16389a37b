"""Great Expectations Data Docs: each validation runs as a Checkpoint whose action adds its
page; `ptune docs` rebuilds the site; the pages load nothing from the network (headless
Chromium with every fetch refused); the retrain flow's artifact links the stage's page.

In-process validations here write to this session's copy of gx/ (tests/conftest.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines import validation
from pipelines.validation import SITE_DIR, ValidationFailed, latest_page, validate
from tests.browser import DevTools, needs_chromium
from tests.conftest import ROOT
from tests.test_validation import copy_project

ASSETS = ROOT / "gx" / "plugins" / "custom_data_docs" / "assets"
TUNE_OK = pd.DataFrame({"step": [0, 10], "loss": [2.0, 1.5]})
TUNE_BAD = pd.DataFrame({"step": [1], "loss": [500.0]})
# What the page loads: <script src>, <link href>, <img src> (an <a href> is a link to follow).
LOADED = re.compile(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="([^"]+)"', re.S)


def site(root: Path) -> Path:
    return root / SITE_DIR


def loaded(page: Path) -> list[str]:
    return LOADED.findall(page.read_text(encoding="utf-8"))


def test_a_checkpoint_run_adds_the_results_page_and_lists_it_on_the_index(gx_project, tmp_path):
    summary = validate("tune", TUNE_OK, {}, tmp_path / "ok.json")
    page = latest_page(gx_project, "tune")
    assert page is not None and page.is_relative_to(site(gx_project) / "validations" / "tune")
    html = page.read_text(encoding="utf-8")
    assert "expect_column_values_to_be_between" not in html  # rendered prose, not raw names
    assert "values must be greater than or equal to" in html and html.rstrip().endswith("</html>")
    index = (site(gx_project) / "index.html").read_text(encoding="utf-8")
    assert page.relative_to(site(gx_project)).as_posix() in index
    assert (site(gx_project) / "expectations" / "tune.html").is_file()
    assert summary.success and json.loads((tmp_path / "ok.json").read_text())["success"] is True


def test_a_failed_validation_gets_its_page_and_the_same_message(gx_project, tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("tune", TUNE_BAD, {}, tmp_path / "bad.json")
    assert str(err.value).startswith("validation failed: suite 'tune', 1 of 4 expectations unmet on 1 rows:")
    assert "expect_column_values_to_be_between on column 'loss' (min_value=0.0, max_value=100.0): " \
           "1 unexpected, e.g. [500.0]" in str(err.value)
    page = latest_page(gx_project, "tune")
    assert "500.0" in page.read_text(encoding="utf-8")  # the unexpected value, on the page
    assert json.loads((tmp_path / "bad.json").read_text())["success"] is False


def test_the_pages_load_only_files_of_the_site(gx_project, tmp_path):
    validate("tune", TUNE_OK, {}, tmp_path / "v.json")
    pages = [site(gx_project) / "index.html", site(gx_project) / "expectations" / "tune.html",
             latest_page(gx_project, "tune")]
    for page in pages:
        urls = loaded(page)
        assert len(urls) >= 15, f"{page}: {urls}"
        for url in urls:
            assert "://" not in url, f"{page} loads {url} from elsewhere: blank offline"
            assert (page.parent / url.split("?")[0]).resolve().is_file(), f"{page} loads {url}, which the site lacks"


def test_every_address_gx_loads_is_swapped_for_a_local_copy():
    """Each of GX's own templates, as the offline views load them: nothing left that a page
    would fetch from a CDN (a GX upgrade that adds or moves one fails here)."""
    import great_expectations

    spec = importlib.util.spec_from_file_location("ptune_data_docs", ROOT / "gx" / "plugins" / "ptune_data_docs.py")
    ptune_data_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ptune_data_docs)

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    swapped = 0
    for path in sorted(templates.glob("*.j2")):
        source = path.read_text(encoding="utf-8")
        offline = ptune_data_docs.offline(source)
        assert not re.search(r"<(?:script|link|img)\b[^>]*?\b(?:src|href)=\"https?://", offline, re.S), path.name
        assert "amazonaws.com" not in offline and "crossorigin" not in offline, path.name
        swapped += source != offline
    assert swapped >= 4  # page, index_page, page_minimal, js_script_imports, top_navbar, favicon
    assert set(ptune_data_docs.LOCAL.values()) <= {"/".join(k) for k in ptune_data_docs.vendored()}


def test_vendored_assets_are_the_pinned_npm_files_with_their_licences():
    pins = dict(reversed(line.split("  ")) for line in (ASSETS / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()}
    assert files - {"fetch.sh", "SHA256SUMS", "PROVENANCE.md"} == {n for n in pins if not n.endswith(".tgz")}
    for name, digest in pins.items():
        if not name.endswith(".tgz"):
            assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, \
                f"{name} is not the pinned build: rerun gx/plugins/custom_data_docs/assets/fetch.sh"
    provenance = (ASSETS / "PROVENANCE.md").read_text()
    assert all(digest in provenance for name, digest in pins.items() if name.endswith(".tgz"))


def test_the_site_directory_is_the_ymls():
    config = yaml.safe_load((ROOT / "gx" / "great_expectations.yml").read_text())
    site_config = config["data_docs_sites"][validation.SITE]
    assert Path("gx", site_config["store_backend"]["base_directory"]) == SITE_DIR
    assert config["stores"]["validation_results_store"]["store_backend"]["base_directory"].startswith("uncommitted/")
    ignored = subprocess.run(["git", "check-ignore", "-q", "gx/uncommitted/data_docs/x.html"], cwd=ROOT)
    assert ignored.returncode == 0, "git must ignore gx/uncommitted/"
    assert "/gx/uncommitted/" in (ROOT / ".dvcignore").read_text().splitlines()


def test_make_docs_rebuilds_the_site_from_the_stored_results(gx_project, tmp_path):
    validate("tune", TUNE_OK, {}, tmp_path / "v.json")
    page = latest_page(gx_project, "tune")
    shutil.rmtree(site(gx_project))
    stale = site(gx_project) / "validations" / "gone" / "__none__" / "20200101T000000.000000Z" / "x.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html></html>")  # a page whose result is no longer stored
    from pipelines.cli import main

    assert main(["docs"]) == 0
    index, results = validation.build_docs()
    assert index == site(gx_project) / "index.html" and index.is_file() and results >= 1
    assert page.is_file() and (site(gx_project) / "static" / "vendor" / "bootstrap.min.css").is_file()
    assert not stale.exists()


def test_concurrent_stages_each_get_a_whole_page_and_the_index_lists_all(tmp_path):
    """Two processes validating at once on one GX project (as parallel stages do): every
    result has its page, complete, and the index lists every one."""
    root = copy_project(tmp_path)
    script = """
import pandas as pd
from pipelines.validation import validate
for i in range(3):
    validate("tune", pd.DataFrame({"step": [0, i], "loss": [2.0, 1.5]}), {}, __import__("pathlib").Path("v.json"))
"""
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=root, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    pages = sorted((site(root) / "validations" / "tune").glob("*/*/*.html"))
    results = sorted((root / "gx" / "uncommitted" / "validations" / "tune").glob("*/*/*.json"))
    assert len(pages) == len(results) == 6
    assert all(p.read_text(encoding="utf-8").rstrip().endswith("</html>") for p in pages)
    index = (site(root) / "index.html").read_text(encoding="utf-8")
    assert all(p.relative_to(site(root)).as_posix() in index for p in pages)


def test_the_validation_artifact_links_the_stages_page(gx_project, tmp_path):
    from flows.retrain import _validation_markdown

    summary = validate("tune", TUNE_OK, {}, tmp_path / "v.json")
    md = _validation_markdown("tune", summary, gx_project)
    page = latest_page(gx_project, "tune")
    assert f"]({page.as_uri()})" in md and "a file:// URL" in md
    assert md.startswith("### Validation of `tune`: passed")
    none_yet = _validation_markdown("tune", summary, tmp_path)
    assert "no page of suite `tune`" in none_yet and "`make docs`" in none_yet


# What a page shows once its assets work: Bootstrap's CSS (a sticky navbar), its scripts,
# bootstrap-table, vega and Font Awesome's icon font.
FACTS = """(async () => {
  await document.fonts.ready;
  await Promise.all([...document.fonts].filter(f => f.family.includes('Font Awesome')).map(f => f.load().catch(() => null)));
  const sheets = [...document.querySelectorAll('link[rel=stylesheet]')];
  return {
    stylesheets: sheets.length, unloaded: sheets.filter(l => !l.sheet).map(l => l.href),
    navbar: getComputedStyle(document.querySelector('nav.navbar')).position,
    jquery: typeof window.jQuery === 'function',
    bootstrap: !!(window.jQuery && jQuery.fn.collapse && jQuery.fn.bootstrapTable && jQuery.fn.datepicker),
    vega: typeof window.vegaEmbed === 'function',
    icons: [...document.fonts].filter(f => f.family.includes('Font Awesome') && f.status === 'loaded').length,
    tableRows: document.querySelectorAll('.bootstrap-table tbody tr').length,
    text: document.body.innerText,
  };
})()"""


def visit(browser: DevTools, url: str) -> tuple[dict, list[str], list[str]]:
    """(what the page shows, every URL it requested, the requests that failed)."""
    browser.load(url)
    return browser.js(FACTS, awaited=True), *browser.requests()


@needs_chromium
def test_the_pages_render_in_a_browser_with_no_network(gx_project, tmp_path):
    with pytest.raises(ValidationFailed):
        validate("tune", TUNE_BAD, {}, tmp_path / "v.json")
    page = latest_page(gx_project, "tune")
    browser = DevTools(offline=True)
    try:
        shown = {name: visit(browser, path.as_uri()) for name, path in
                 [("index", site(gx_project) / "index.html"), ("validation", page),
                  ("suite", site(gx_project) / "expectations" / "tune.html")]}
    finally:
        browser.close()
    for name, (facts, urls, failed) in shown.items():
        assert not failed, f"{name} page: failed requests {failed}"
        assert all(u.startswith(("file://", "data:")) for u in urls), f"{name} page fetched {urls}"
        assert facts["stylesheets"] >= 6 and not facts["unloaded"], f"{name} page: {facts['unloaded']}"
        assert facts["navbar"] == "sticky", f"{name} page: Bootstrap's CSS is not applied"
        assert facts["jquery"] and facts["bootstrap"] and facts["vega"], f"{name} page: {facts}"
    assert shown["validation"][0]["icons"] >= 1, "the validation page's status icons did not load"
    # bootstrap-table draws the index's list of validations from data in the page
    assert shown["index"][0]["tableRows"] >= 1 and "tune" in shown["index"][0]["text"]
    assert "Failed" in shown["validation"][0]["text"] or "failed" in shown["validation"][0]["text"].lower()
