"""collect: read a task's declared sources into one raw record file.

Each raw record keeps where it came from (``source``, ``location`` as file:line) and a
stable ``id`` (source name and line), so any later output can be traced back to the
exact line of the exact source file. Rows that cannot become records (a wrong number
of fields, an empty required field) are quarantined with their reason, never dropped.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd

from pipelines.common import StageError, atomic_dir, sha256_file
from pipelines.config import CollectConfig
from pipelines.tasks import Source, Task
from pipelines.validation import validate

log = logging.getLogger(__name__)


@dataclass
class CollectStats:
    records: int = 0
    quarantined: int = 0
    per_source: dict[str, dict] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)


def _read_delimited(source: Source, path: Path, limit: int | None
                    ) -> Iterator[tuple[int, dict | None, tuple[str, str] | None]]:
    """Yield (line, fields, problem) for every data row; problem is (reason, detail)."""
    delimiter = "\t" if source.format == "tsv" else ","
    quoting = csv.QUOTE_NONE if source.quoting == "none" else csv.QUOTE_MINIMAL
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                raise StageError(f"{path}: empty file (source {source.name!r} needs a header row)")
            missing = [c for c in source.columns if c not in header]
            if missing:
                raise StageError(f"{path}:1: source {source.name!r} lacks column(s) {missing}; "
                                 f"header is {header}")
            index = {c: header.index(c) for c in source.columns}
            n = 0
            for row in reader:
                if limit is not None and n >= limit:
                    return
                n += 1
                line = reader.line_num
                if len(row) != len(header):
                    yield line, None, ("field_count", f"expected {len(header)} fields, found {len(row)}")
                    continue
                fields = {task_field: row[i] for (col, i), task_field
                          in zip(index.items(), source.columns.values())}
                empty = [k for k, v in fields.items() if not v.strip()]
                yield line, fields, (("empty_field", f"empty {empty}") if empty else None)
    except UnicodeDecodeError as exc:
        raise StageError(f"{path}: not valid UTF-8 at byte {exc.start} (source {source.name!r}); "
                         "re-encode the file as UTF-8") from None
    except csv.Error as exc:
        raise StageError(f"{path}: malformed {source.format.upper()} (source {source.name!r}): {exc}") from None


def run(cfg: CollectConfig, task: Task, root: Path, out: Path) -> CollectStats:
    stats = CollectStats()
    reasons: Counter[str] = Counter()
    with atomic_dir(out) as staging:
        records_f = open(staging / "records.jsonl", "w", encoding="utf-8")
        quarantine_f = open(staging / "quarantine.jsonl", "w", encoding="utf-8")
        rows = []
        with records_f, quarantine_f:
            for source in task.sources:
                path = root / source.path
                if not path.is_file():
                    raise StageError(f"{source.path}: source {source.name!r} of task {task.name!r} "
                                     "does not exist")
                kept = dropped = 0
                for line, fields, problem in _read_delimited(source, path, cfg.max_records_per_source):
                    rec = {"id": f"{source.name}:{line}", "source": source.name,
                           "location": f"{source.path}:{line}"}
                    if problem:
                        reason, detail = problem
                        quarantine_f.write(json.dumps({**rec, "reason": reason, "detail": detail,
                                                       "fields": fields}, ensure_ascii=False) + "\n")
                        reasons[reason] += 1
                        dropped += 1
                        continue
                    rec.update(fields)
                    records_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    rows.append(rec)
                    kept += 1
                stats.per_source[source.name] = {"path": source.path, "sha256": sha256_file(path),
                                                 "records": kept, "quarantined": dropped}
                stats.records += kept
                stats.quarantined += dropped
                log.info("collect: %s: %d records, %d quarantined", source.path, kept, dropped)
        stats.quarantine_reasons = dict(reasons)
        if not rows:
            raise StageError(f"collect: task {task.name!r} produced no records from "
                             f"{[s.path for s in task.sources]}")
        validate("raw", pd.DataFrame(rows),
                 {"required_columns": ["id", "source", "location", *task.fields]},
                 staging / "validation.json")
    return stats
