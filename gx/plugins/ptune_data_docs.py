"""Data Docs that render with no network.

GX's page templates load Bootstrap, jQuery, bootstrap-table, Font Awesome and the rest
from CDNs, and its logo from S3: offline, a page is unstyled, has no icons, and the
index's table of validations stays empty (bootstrap-table draws it). Here the same
files, vendored in ``custom_data_docs/assets`` (``fetch.sh`` pins them by SHA-256), are
copied into the site's ``static/vendor/`` and the pages load them by relative path.

Both pieces are classes that ``great_expectations.yml`` names for the site
(``data_docs_sites``; GX puts this directory on ``sys.path``):

- ``OfflineSiteBuilder`` builds the site as GX's ``SiteBuilder`` does, then copies the
  assets beside GX's own static files.
- ``OfflinePageView`` and ``OfflineIndexPageView`` render GX's own templates, each CDN
  address swapped for the local copy as the template is loaded. Not a custom
  ``custom_data_docs/views/page.j2``: GX's loader looks in its own templates first, so a
  custom view of the same name is never used; and copies of its templates would go stale
  silently at a GX upgrade, where a changed address shows up in the offline browser test
  (tests/test_data_docs.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from great_expectations.render.renderer.site_builder import SiteBuilder
from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import BaseLoader

ASSETS = Path(__file__).resolve().parent / "custom_data_docs" / "assets"
NOT_SERVED = {"fetch.sh", "SHA256SUMS"}  # tooling, not page assets (licences do go with the files)
# plots/offline.html, the `dvc plots show` template, holds the pinned vega builds inline:
# one copy of them in the repository. GX draws vega charts only on profiling pages.
PLOTS_TEMPLATE = Path(__file__).resolve().parents[2] / "plots" / "offline.html"
INLINED = re.compile(rb'<script data-package="([^"@]+)@[^"]+">(.*?)</script>', re.S)

# Each address great_expectations 1.24's templates load, and its copy in static/vendor/.
LOCAL = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
    # GX names 1.19.0's stylesheet (minified on the index, not on the other pages) beside 1.19.1's script
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table-filter-control.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-prefers-dark.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed.min.js",
}
# top_navbar.j2 computes the page's local images directory, then replaces it with an S3 bucket.
S3_IMAGES = '"https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"'
# favicon.j2 puts a validation page one directory short of the site (3 levels up, not 4).
FAVICON = '{{ static_images_dir + "favicon.ico" }}'
# A loaded address, with the subresource-integrity attributes two of the script tags carry:
# those make the browser fetch in CORS mode, which a file:// page cannot do, so they go
# with the address (the vendored bytes are checked against SHA256SUMS instead).
_LOADED = re.compile(r'(?P<attr>src|href)="(?P<url>https?://[^"]+)"(?:\s+integrity="[^"]*"\s+crossorigin="[^"]*")?')


def offline(template: str) -> str:
    """``template`` with every address in LOCAL pointing at the site's copy (other links kept)."""
    def local(m: re.Match) -> str:
        name = LOCAL.get(m["url"])
        return m[0] if name is None else f'{m["attr"]}="{{{{ ptune_static }}}}vendor/{name}"'

    return (_LOADED.sub(local, template).replace(S3_IMAGES, 'ptune_static ~ "images/"')
            .replace(FAVICON, "{{ ptune_static }}images/favicon.ico"))


def static_dir(document) -> str:
    """The site's ``static/`` relative to the page ``document`` becomes, as top_navbar.j2
    computes its link home: a suite's dots are directories too."""
    doc = document.to_json_dict() if hasattr(document, "to_json_dict") else document
    kind = doc.get("renderer_type") or ""
    dots = (doc.get("expectation_suite_name") or "").count(".")
    if "ValidationResults" in kind or "ProfilingResults" in kind:
        depth = dots + 4  # validations/<suite>/<run name>/<run time>/<batch>.html
    elif "ExpectationSuite" in kind:
        depth = dots + 1  # expectations/<suite>.html
    else:
        depth = 0  # index.html
    return "../" * depth + "static/"


class _OfflineLoader(BaseLoader):
    def __init__(self, inner: BaseLoader):
        self.inner = inner

    def get_source(self, environment, template):
        source, filename, uptodate = self.inner.get_source(environment, template)
        return offline(source), filename, uptodate

    def list_templates(self):
        return self.inner.list_templates()


class _Offline:
    def __init__(self, custom_styles_directory=None, custom_views_directory=None) -> None:
        super().__init__(custom_styles_directory=custom_styles_directory,
                         custom_views_directory=custom_views_directory)
        self.env.loader = _OfflineLoader(self.env.loader)

    def render(self, document, template=None, **kwargs):
        return super().render(document, template, ptune_static=static_dir(document), **kwargs)


class OfflinePageView(_Offline, DefaultJinjaPageView):
    """GX's page view (suites, validation results), loading its assets from the site."""


class OfflineIndexPageView(_Offline, DefaultJinjaIndexPageView):
    """GX's index page view, loading its assets from the site."""


def vendored() -> dict[tuple[str, ...], bytes]:
    """The files the pages load, by their path under the site's ``static/vendor/``."""
    files = {p.relative_to(ASSETS).parts: p.read_bytes() for p in sorted(ASSETS.rglob("*"))
             if p.is_file() and p.name not in NOT_SERVED}
    if PLOTS_TEMPLATE.is_file():
        files |= {(f"{name.decode()}.min.js",): body for name, body in INLINED.findall(PLOTS_TEMPLATE.read_bytes())}
    return files


class OfflineSiteBuilder(SiteBuilder):
    """GX's site builder that also writes the vendored assets into the site's static files."""

    def build(self, resource_identifiers=None, build_index: bool = True):
        built = super().build(resource_identifiers=resource_identifiers, build_index=build_index)
        static = self.target_store.store_backends["static_assets"]
        for parts, body in vendored().items():
            static.set(("static", "vendor", *parts), body)
        return built
