"""The evaluate stage's record, in two files.

``metrics.json`` holds numbers only (each system's metrics, the rows' count, trainable
parameters, tokens/s), so that ``dvc metrics show`` and ``dvc exp show`` tabulate it;
``details.json`` beside it says what the numbers are of: task, method, primary metric,
the test rows' hash and file, the decoding settings, each system's label and what could
not be computed. Both are ``cache: false`` outputs, committed with a run, so a registered
version's or an experiment's record is read from git at its commit.

Readers take the record whole, as one dict (``read``, and ``pipelines.registry.
evaluation_at`` at a commit); a ``metrics.json`` written before the split held both.
"""
from __future__ import annotations

from pathlib import Path

from pipelines.common import StageError, read_json, write_json

METRICS = "data/eval/metrics.json"
DETAILS = "data/eval/details.json"
NUMBERS = ("rows", "trainable_parameters", "tokens_per_s")  # besides each system's metrics


def split(record: dict) -> tuple[dict, dict]:
    """The record -> (numbers for metrics.json, the rest for details.json)."""
    keys = {*record["systems"], *NUMBERS}
    return ({k: record[k] for k in (*record["systems"], *NUMBERS)},
            {k: v for k, v in record.items() if k not in keys})


def join(numbers: dict, details: dict | None) -> dict:
    """metrics.json and details.json -> the record; a metrics.json from before the split is one already."""
    if _whole(numbers) or details is None:
        return numbers
    return {**details, **numbers}


def _whole(numbers: dict) -> bool:
    """A metrics.json written before the split: it names its primary metric itself."""
    return "primary_metric" in numbers


def details_path(metrics: Path) -> Path:
    """Where the details of a metrics.json are: beside it."""
    return Path(metrics).with_name(Path(DETAILS).name)


def read(metrics: Path, details: Path | None = None) -> dict:
    """The record from ``metrics`` and ``details`` (default: the details.json beside it)."""
    metrics = Path(metrics)
    if not metrics.is_file():
        raise StageError(f"{metrics}: not found; the evaluate stage writes it (`dvc repro evaluate`)")
    numbers = read_json(metrics)
    if _whole(numbers):
        return numbers
    details = Path(details) if details else details_path(metrics)
    if not details.is_file():
        raise StageError(f"{details}: not found beside {metrics}; the evaluate stage writes both "
                         "(`dvc repro evaluate`)")
    return join(numbers, read_json(details))


def write(out: Path, record: dict) -> None:
    """Write the record to ``out``/metrics.json and ``out``/details.json."""
    numbers, details = split(record)
    write_json(Path(out) / Path(DETAILS).name, details)
    write_json(Path(out) / Path(METRICS).name, numbers)
