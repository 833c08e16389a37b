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


# The E2E challenge's test set: 630 MRs with 4,693 references (Novikova et al. 2017).
E2E_CHALLENGE = (630, 4693)
BLEU_CAVEAT = "These BLEU scores are not comparable with the Prefix-Tuning paper's Table 1"


def bleu_caveat(task: str, metrics, scored: float | None, rows: int | None, split: float | None = None,
                bold: bool = False, short: bool = False) -> str | None:
    """Why an E2E BLEU figure is not the paper's, for wherever one is shown (the evaluation
    report, ``ptune compare``, ``ptune registry``, the model card); None where none is.
    Multi-reference BLEU rises with the references per MR, and this project's test rows have
    fewer than the challenge's. ``scored``: the mean references of the ``rows`` scored (None:
    a record from before evaluate kept it); ``split``: of the whole test split; ``short``: one
    line for a terminal."""
    if task != "e2e" or "bleu" not in metrics:
        return None
    mrs, refs = E2E_CHALLENGE
    if short:
        here = (f"{scored:.1f} references per MR in the rows scored against {refs / mrs:.2f}" if scored is not None
                else f"fewer references per MR in the rows scored than the {refs / mrs:.2f}")
        return (f"E2E BLEU here is not comparable with the Prefix-Tuning paper's Table 1: {here} in the challenge's "
                "test set, and multi-reference BLEU rises with them.")
    challenge = f"{refs / mrs:.2f} ({refs:,} for {mrs} MRs)"
    if split is not None and scored is not None:
        ours = (f"this project's test split of the cleaned E2E development set has {split:.1f} references per MR "
                f"({scored:.1f} on the {rows} MRs scored here), the challenge's test set {challenge}")
    elif scored is not None:
        ours = f"the {rows} MRs scored here have {scored:.1f} references each on average, the challenge's {challenge}"
    else:
        ours = f"this project's test rows have fewer references per MR than the challenge's {challenge}"
    lead = f"**{BLEU_CAVEAT}**" if bold else BLEU_CAVEAT
    return (f"{lead} (Li & Liang 2021) nor with the E2E challenge's results: {ours}, and multi-reference BLEU "
            "rises with the number of references.")
