"""Great Expectations validation of every stage's output.

The suites live in git as JSON in a GX 1.x file context (``gx/expectations/<suite>.json``).
Each suite has a dataframe asset of the same name with a whole-dataframe batch
definition ``whole`` under the pandas data source ``ptune`` in ``gx/great_expectations.yml``
(``python -m pipelines.validation declare <suite>`` adds one). Values that depend on
params (``max_length``, ``min_chars`` ...) are GX suite parameters
(``{"$PARAMETER": "max_length"}``) supplied by the stage.

Each call runs the suite's GX Checkpoint, whose action (``UpdateDataDocsAction``) adds
the result's page to the Data Docs site; ``build_docs`` (``make docs``) rebuilds the
site from every stored result. GX keeps its results and the site under
``gx/uncommitted/``, which git and DVC ignore, so a run changes nothing they track; the
validation definition and checkpoint of a run live in in-memory stores (see the yml).
Stages in concurrent processes take a file lock around a checkpoint run: each rewrites
the site's index from all stored results, and none may read a result another is still
writing. The pages load their CSS and scripts from the site itself, not from CDNs, so
they render offline (``gx/plugins/ptune_data_docs.py``). The record of a run that the
pipeline reads is the summary that ``validate`` writes next to the stage's output.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from pipelines.common import StageError, write_json

log = logging.getLogger(__name__)
# GX logs its bookkeeping at INFO while it is imported ("Skipping registering function ...",
# ~200 lines a stage), burying the stage's own summary; quieted before anything imports it,
# unless logging was configured for it already.
if logging.getLogger("great_expectations").level == logging.NOTSET:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GX_DIR = PROJECT_ROOT / "gx"
DATA_SOURCE = "ptune"
BATCH = "whole"
SITE = "local_site"
# The site's directory in a project (data_docs_sites.local_site.base_directory in the yml).
SITE_DIR = Path("gx/uncommitted/data_docs/local_site")
SAMPLE = 5  # unexpected values kept per failure: enough to recognise the fault, short enough to read
# Rows per GX call for the stages that validate as they stream (collect, clean, tokenize):
# a light frame of ~10 MB and ~50 ms a call, whatever the corpus size.
CHUNK_ROWS = 50_000


@dataclass
class ValidationSummary:
    suite: str
    success: bool
    evaluated: int
    successful: int
    rows: int
    # Each: expectation, column, kwargs (parameters resolved), observed_value, unexpected_count,
    # unexpected_sample, missing (columns), error (GX could not evaluate it, e.g. no such column),
    # and observed: those in one readable phrase.
    failures: list[dict] = field(default_factory=list)

    def to_markdown(self) -> str:
        head = (f"### Validation `{self.suite}`: {'passed' if self.success else 'FAILED'}\n\n"
                f"{self.successful}/{self.evaluated} expectations met on {self.rows} rows.\n")
        if not self.failures:
            return head
        lines = ["", "| expectation | column | arguments | observed / unexpected |", "|---|---|---|---|"]
        for f in self.failures:
            cells = [f["expectation"], f.get("column") or "", _kwargs_text(f["kwargs"]), f["observed"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return head + "\n".join(lines) + "\n"

    def __str__(self) -> str:
        if self.success:
            return f"validation {self.suite}: passed ({self.evaluated} expectations, {self.rows} rows)"
        parts = [f"validation failed: suite {self.suite!r}, {self.evaluated - self.successful} of "
                 f"{self.evaluated} expectations unmet on {self.rows} rows:"]
        for f in self.failures:
            col = f" on column {f['column']!r}" if f.get("column") else ""
            args = f" ({_kwargs_text(f['kwargs'])})" if f["kwargs"] else ""
            parts.append(f"  - {f['expectation']}{col}{args}: {f['observed']}")
        return "\n".join(parts)


class ValidationFailed(StageError):
    def __init__(self, summary: ValidationSummary):
        super().__init__(str(summary))
        self.summary = summary


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _observed_text(f: dict) -> str:
    if f.get("error"):
        return f"could not be evaluated: {f['error']}"
    if f.get("unexpected_count"):
        return f"{f['unexpected_count']} unexpected, e.g. {f['unexpected_sample']!r}"
    if f.get("missing"):
        return f"missing {f['missing']!r}"
    if f.get("observed_value") is not None:
        return f"observed {f['observed_value']!r}"
    return "not met"


@lru_cache(maxsize=1)
def _context(root: Path):
    if not (root / "gx" / "great_expectations.yml").is_file():
        # get_context would scaffold a fresh, empty project here instead of failing.
        raise StageError(f"{root / 'gx'}/great_expectations.yml is missing: the GX project must be "
                         f"checked out with the code")
    import great_expectations as gx

    return gx.get_context(mode="file", project_root_dir=str(root))


def _site_lock() -> FileLock:
    """Held while GX writes results or pages: concurrent stages serialise their checkpoint runs."""
    runtime = GX_DIR / "uncommitted"
    runtime.mkdir(parents=True, exist_ok=True)
    return FileLock(str(runtime / "data_docs.lock"))


def _definition(ctx, suite: str):
    """The run's ValidationDefinition, kept in the in-memory store for later calls."""
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    try:
        return ctx.validation_definitions.get(suite)
    except DataContextError:
        pass
    try:
        expectations = ctx.suites.get(suite)
    except DataContextError:
        known = sorted(p.stem for p in (GX_DIR / "expectations").glob("*.json"))
        raise StageError(f"gx/expectations/{suite}.json: no suite {suite!r} (known: {known})") from None
    try:
        batch_def = ctx.data_sources.get(DATA_SOURCE).get_asset(suite).get_batch_definition(BATCH)
    except (LookupError, ValueError) as exc:
        raise StageError(f"gx/great_expectations.yml: suite {suite!r} has no dataframe asset {suite!r} with "
                         f"batch definition {BATCH!r} in data source {DATA_SOURCE!r} ({exc}); add it with "
                         f"`python -m pipelines.validation declare {suite}`") from None
    return ctx.validation_definitions.add(gx.ValidationDefinition(name=suite, data=batch_def, suite=expectations))


def _checkpoint(ctx, suite: str):
    """The suite's Checkpoint (its validation definition, and GX's action that adds the
    result's page to the Data Docs), kept in the in-memory store for later calls."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.exceptions import DataContextError

    try:
        return ctx.checkpoints.get(suite)
    except DataContextError:
        pass
    return ctx.checkpoints.add(gx.Checkpoint(
        name=suite, validation_definitions=[_definition(ctx, suite)], result_format="SUMMARY",
        actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[SITE])]))


def _parameter_names(definition) -> set[str]:
    """Names used as ``{"$PARAMETER": name}`` in the suite (plain names; no GX expressions)."""
    return {v["$PARAMETER"] for e in definition.suite.expectations
            for v in e.configuration.kwargs.values() if isinstance(v, dict) and "$PARAMETER" in v}


def _failure(r) -> dict:
    data = r.to_json_dict()  # plain JSON types: numpy scalars and NaN converted
    kwargs = data["expectation_config"]["kwargs"]  # suite parameters already substituted
    result = data["result"] or {}
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    failure = {"expectation": data["expectation_config"]["type"],
               "column": ", ".join(columns) or None,
               "kwargs": {k: v for k, v in kwargs.items() if k not in ("column", "column_A", "column_B", "batch_id")},
               "observed_value": result.get("observed_value"),
               "unexpected_count": result.get("unexpected_count"),
               "unexpected_sample": (result.get("partial_unexpected_list") or [])[:SAMPLE],
               # column-set expectations: the required columns the frame lacks
               "missing": ((result.get("details") or {}).get("mismatched") or {}).get("missing"),
               "error": _error(r.exception_info or {})}
    return {**failure, "observed": _observed_text(failure)}


def _error(info: dict) -> str | None:
    """GX's message for an expectation it could not evaluate, else None.

    ``exception_info`` is flat for an expectation-level error and keyed by metric for a
    metric that raised (a missing column, a type the metric cannot compare).
    """
    entries = [info] if "raised_exception" in info else info.values()
    return next((e["exception_message"] for e in entries if isinstance(e, dict) and e.get("exception_message")),
                None)


def validate(suite: str, df: pd.DataFrame, parameters: dict[str, Any], result_path: Path) -> ValidationSummary:
    """Validate ``df`` with ``gx/expectations/<suite>.json`` and its suite ``parameters``.

    Writes the summary (with the parameters) to ``result_path`` in every case, then
    raises ``ValidationFailed`` if any expectation is unmet.
    """
    from great_expectations.compatibility.pydantic import ValidationError
    from great_expectations.exceptions import SuiteParameterError

    ctx = _context(PROJECT_ROOT)
    checkpoint = _checkpoint(ctx, suite)
    needed = _parameter_names(checkpoint.validation_definitions[0])
    if needed != set(parameters):
        raise StageError(f"validate({suite!r}): gx/expectations/{suite}.json takes parameters {sorted(needed)}, "
                         f"got {sorted(parameters)}; pass exactly the suite's parameters")
    try:
        with _site_lock():
            run = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=parameters)
    except (SuiteParameterError, ValidationError) as exc:
        raise StageError(f"validate({suite!r}): GX rejected parameters {parameters}: {exc}") from None
    ((key, result),) = run.run_results.items()

    summary = ValidationSummary(suite=suite, success=bool(result.success), evaluated=len(result.results),
                                successful=sum(1 for r in result.results if r.success), rows=len(df),
                                failures=[_failure(r) for r in result.results if not r.success])
    write_json(Path(result_path), {**asdict(summary), "parameters": parameters})
    for site in ctx.get_docs_sites_urls(resource_identifier=key, site_names=[SITE]):
        log.info("validation %s: Data Docs page %s", suite, site["site_url"])
    if not summary.success:
        raise ValidationFailed(summary)
    log.info("%s", summary)
    return summary


def build_docs() -> tuple[Path, int]:
    """The Data Docs site rebuilt from the stored results (the newest the yml's
    ``validation_results_limit`` keeps), with a page per suite: (the index page, the
    number of stored results). The site is cleaned first, so it shows exactly those."""
    ctx = _context(PROJECT_ROOT)
    with _site_lock():
        ctx.clean_data_docs(site_name=SITE)
        ctx.build_data_docs(site_names=[SITE])
    return PROJECT_ROOT / SITE_DIR / "index.html", len(ctx.validation_results_store.list_keys())


def latest_page(root: Path, suite: str) -> Path | None:
    """The newest Data Docs page of a ``suite`` result in the project at ``root``, if any.

    GX writes it to ``validations/<suite, a directory per dot>/<run name>/<run time>/<batch>.html``;
    run times (``20261205T130455.937948Z``) sort as text.
    """
    pages = (root / SITE_DIR / "validations" / Path(*suite.split("."))).glob("*/*/*.html")
    return max(pages, key=lambda p: (p.parent.name, p.name), default=None)


def declare(suite: str) -> None:
    """Add the dataframe asset and batch definition a new suite needs to gx/great_expectations.yml.

    A one-off when a suite is added, not a run-time step: GX rewrites the yml.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", suite):
        raise StageError(f"suite name {suite!r}: use lower-case letters, digits and '_'")
    from great_expectations.exceptions import DataContextError

    ctx = _context(PROJECT_ROOT)
    try:
        ctx.suites.get(suite)
    except DataContextError:
        raise StageError(f"gx/expectations/{suite}.json: write the suite before declaring it") from None
    source = ctx.data_sources.get(DATA_SOURCE)
    asset = (source.get_asset(suite) if suite in {a.name for a in source.assets}
             else source.add_dataframe_asset(suite))
    if BATCH not in {b.name for b in asset.batch_definitions}:
        asset.add_batch_definition_whole_dataframe(BATCH)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.validation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("declare", help="add the asset a new suite in gx/expectations needs").add_argument("suite")
    args = parser.parse_args(argv)
    declare(args.suite)
    print(f"gx/great_expectations.yml: asset {args.suite!r} with batch definition {BATCH!r}")


if __name__ == "__main__":
    main()
