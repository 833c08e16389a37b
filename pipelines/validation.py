"""Great Expectations validation of every stage's output.

The suites live in git as JSON in a GX 1.x file context (``gx/expectations/<suite>.json``)
and are read-only at run time; values that depend on params (``max_length``,
``min_chars`` ...) are GX suite parameters (``{"$PARAMETER": "max_length"}``) supplied
by the stage. A stage calls ``validate`` on a DataFrame it derives from its output;
the summary is always written next to the output, and a failure raises
``ValidationFailed`` whose message says which expectation failed on which column,
with the observed or unexpected values.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from pipelines.common import StageError

log = logging.getLogger(__name__)
# GX logs its own import-time bookkeeping at INFO; a stage's log should show the verdict.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

GX_ROOT = Path(__file__).resolve().parents[1]  # the project root holds gx/


@dataclass
class ValidationSummary:
    suite: str
    success: bool
    evaluated: int
    successful: int
    rows: int
    failures: list[dict] = field(default_factory=list)

    def to_markdown(self) -> str:
        head = (f"### Validation `{self.suite}`: {'passed' if self.success else 'FAILED'}\n\n"
                f"{self.successful}/{self.evaluated} expectations met on {self.rows} rows.\n")
        if not self.failures:
            return head
        lines = ["", "| expectation | column | observed / unexpected |", "|---|---|---|"]
        for f in self.failures:
            lines.append(f"| {f['expectation']} | {f.get('column') or ''} | {f['observed']} |")
        return head + "\n".join(lines) + "\n"

    def __str__(self) -> str:
        if self.success:
            return f"validation {self.suite}: passed ({self.evaluated} expectations, {self.rows} rows)"
        parts = [f"validation failed: suite {self.suite!r}, {self.evaluated - self.successful} of "
                 f"{self.evaluated} expectations unmet on {self.rows} rows:"]
        for f in self.failures:
            col = f" column {f['column']!r}" if f.get("column") else ""
            parts.append(f"  - {f['expectation']}{col} {f['kwargs']}: {f['observed']}")
        return "\n".join(parts)


class ValidationFailed(StageError):
    def __init__(self, summary: ValidationSummary):
        super().__init__(str(summary))
        self.summary = summary


@lru_cache(maxsize=1)
def _context():
    import great_expectations as gx

    return gx.get_context(mode="file", project_root_dir=str(GX_ROOT))


def _observed(result: dict) -> str:
    if result.get("observed_value") is not None:
        return f"observed {result['observed_value']!r}"
    if result.get("unexpected_count"):
        sample = result.get("partial_unexpected_list") or []
        return f"{result['unexpected_count']} unexpected, e.g. {sample[:5]!r}"
    return "not met"


def validate(suite: str, df: pd.DataFrame, parameters: dict, result_path: Path) -> ValidationSummary:
    """Validate ``df`` with ``gx/expectations/<suite>.json``; write the summary; raise on failure."""
    ctx = _context()
    try:
        expectations = ctx.suites.get(suite)
    except Exception as exc:  # GX raises its own not-found types
        raise StageError(f"gx/expectations/{suite}.json: cannot load suite {suite!r}: {exc}") from None
    try:  # declared in gx/great_expectations.yml: nothing is written to the context at run time
        batch_def = ctx.data_sources.get("ptune").get_asset(suite).get_batch_definition("whole")
    except Exception as exc:
        raise StageError(f"gx/great_expectations.yml: no dataframe asset {suite!r} with batch "
                         f"definition 'whole' in data source 'ptune': {exc}") from None
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(expectations, expectation_parameters=parameters)

    failures = []
    for r in result.results:
        if r.success:
            continue
        kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k not in ("column", "batch_id")}
        info = r.exception_info or {}
        failures.append({"expectation": r.expectation_config.type,
                         "column": r.expectation_config.kwargs.get("column"),
                         "kwargs": json.loads(json.dumps(kwargs, default=str)),
                         "observed": f"error: {info.get('exception_message')}"
                         if info.get("raised_exception") else _observed(r.result or {})})
    summary = ValidationSummary(suite=suite, success=bool(result.success),
                                evaluated=len(result.results),
                                successful=sum(1 for r in result.results if r.success),
                                rows=len(df), failures=failures)
    result_path = Path(result_path)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps({**asdict(summary), "parameters": parameters}, indent=2, default=str) + "\n")
    os.replace(tmp, result_path)
    if not summary.success:
        raise ValidationFailed(summary)
    log.info("%s", summary)
    return summary
