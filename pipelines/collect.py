"""collect: read a task's declared sources into one raw record file.

Sources are declared per task in params.yaml (``collect.sources.<task>``): files or
globs under the project, http(s) URLs pinned by sha256, Hugging Face datasets, any
fsspec URL; as csv, tsv, jsonl, parquet, txt or Stack Exchange Posts.xml.
``pipelines/sources.py`` reads them, streaming.

Each raw record keeps where it came from (``source``; ``location``, file:line or
file:row) and a stable ``id`` (source name and line, row index or post Id, or the
source's own id column), so any later output traces back to the exact place in the
exact file. A row that cannot become a record is quarantined with its reason and its
raw text, never dropped: per source, rows read = records + quarantined. A task field is
text: a string, not null, a number, a list or an object (a label may be a number or
boolean standing for one of the task's labels). A source with more than
``max_quarantined_share`` of its rows quarantined fails the stage: its format or columns
changed, and what is left of it is no sample of it.

Outputs: ``records.jsonl``, ``quarantine.jsonl``, ``sources.json`` (each source's uri,
format, files with their sha256, splits and counts; the clean stage takes the splits
from here) and ``validation.json``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from pipelines import conversations, sources, validation
from pipelines.common import StageError, atomic_dir, read_json, write_json
from pipelines.config import CollectConfig, SourceConfig
from pipelines.prompts import render
from pipelines.tasks import Task, label_key
from pipelines.validation import validate

log = logging.getLogger(__name__)

PREVIEW = 1000  # characters of each value kept in quarantine.jsonl: enough to judge the row, bounded
RAW_KEPT = 4000  # characters of a quarantined row's raw text kept: enough to fix a row by hand, bounded
TOP_REASONS = 3  # reasons named when a source has too many rows quarantined


@dataclass
class CollectStats:
    records: int = 0
    quarantined: int = 0
    skipped: int = 0  # what the format says is no record: blank lines, answers and tag wikis in Posts.xml
    per_source: dict[str, dict] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)


class _Ids:
    """The ids already written, in a scratch SQLite file.

    On disk rather than in a Python set: a set of ids (or even of 8-byte hashes, ~70
    bytes each with the set's overhead) grows with the corpus, while SQLite's page
    cache stays bounded, and the exact ids (no hash collisions) let a duplicate name
    the location of the first one.
    """

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                              "CREATE TABLE ids (id TEXT PRIMARY KEY, location TEXT) WITHOUT ROWID;")

    def first_location(self, rec_id: str, location: str) -> str | None:
        """Register ``rec_id``; None if new, else where it was first seen."""
        try:
            self.db.execute("INSERT INTO ids VALUES (?, ?)", (rec_id, location))
            return None
        except sqlite3.IntegrityError:
            return self.db.execute("SELECT location FROM ids WHERE id = ?", (rec_id,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()


class _RawValidation:
    """GX validation of the records, a chunk at a time, so memory does not grow with the corpus.

    Each chunk is a light frame: the record's id, source and location, its field values
    cut short (enough for the schema check), and derived columns. Id uniqueness across
    chunks is the stage's own check (``_Ids``); GX checks it within each chunk.
    """

    CUT = 64  # characters of each field value in the frame

    def __init__(self, cfg: CollectConfig, task: Task, source_names: list[str], path: Path):
        self.fields, self.chunk_rows, self.path = task.fields, validation.CHUNK_ROWS, path
        self.required = task.required_fields
        self.parameters = {"required_columns": ["id", "source", "location", *task.fields],
                           "sources": source_names, "max_record_bytes": cfg.max_record_bytes}
        self.rows: list[dict] = []
        self.validated = self.chunks = 0

    def add(self, record: dict, size: int) -> None:
        values = {f: conversations.as_text(record[f]) if isinstance(record[f], list) else record[f]
                  for f in self.fields}
        self.rows.append({"id": record["id"], "source": record["source"], "location": record["location"],
                          **{f: values[f][:self.CUT] for f in self.fields},
                          "id_source": record["id"].partition(":")[0],
                          "empty_fields": sum(not values[f].strip() for f in self.required),
                          "record_bytes": size})
        if len(self.rows) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        validate("raw", pd.DataFrame(self.rows), self.parameters, self.path)
        self.validated += len(self.rows)
        self.chunks += 1
        self.rows = []

    def finish(self) -> None:
        if self.rows:
            self._flush()
        write_json(self.path, {**read_json(self.path), "rows": self.validated, "chunks": self.chunks})


def _preview(values: dict | None) -> dict | None:
    if values is None:
        return None
    return {k: (v[:PREVIEW] + f"... [{len(v) - PREVIEW:,} more characters]"
                if isinstance(v, str) and len(v) > PREVIEW else v) for k, v in values.items()}


def _kept(raw: str | None) -> str | None:
    if raw is None or len(raw) <= RAW_KEPT:
        return raw
    return raw[:RAW_KEPT] + f"... [{len(raw) - RAW_KEPT:,} more characters]"


def _kind(value: Any) -> str:
    """What a value is, in JSON's terms: 'null', 'a number (12345)', 'an array', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _field_text(value: Any, labels: dict[str, str] | None) -> str | None:
    """A source value as the text of a task field (``labels``: of the label field); None if it is not one."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):  # a Parquet text column written without its UTF8 annotation
        return value.decode("utf-8", "surrogateescape")
    return label_key(value, labels) if labels else None


class Fields(NamedTuple):
    """A row's task fields (None if it is quarantined), their size in bytes, and the
    quarantine (reason, detail) if it is."""
    fields: dict[str, str] | None
    size: int
    problem: tuple[str, str] | None


def task_fields(src: SourceConfig, values: dict, max_bytes: int, task: Task) -> Fields:
    """The task fields of a row read from ``src``, their size, or why it is quarantined.

    A number or boolean in a classification task's label field may stand for one of its
    labels. An optional field the row lacks, holds as null, or ``columns`` does not map is "".
    A chat task's one field is the conversation (``conversations.read``), or the one its
    source's ``turns`` build from text columns.
    """
    if task.chat and not src.turns:
        column = next(c for c, name in src.columns.items() if name == conversations.FIELD)
        if column not in values:
            return Fields(None, 0, ("missing_field", f"no value for column {column!r}"))
        turns, problem = conversations.read(values[column])
        if problem:
            return Fields(None, 0, (problem.reason, f"field {conversations.FIELD!r}: {problem.detail}"))
        contents = {f"{conversations.FIELD}[{i}]": t["content"] for i, t in enumerate(turns)}
        return _checked({conversations.FIELD: turns}, contents, max_bytes, ())
    fields = {}
    for column, name in src.columns.items():
        optional = name in task.optional_fields
        if column not in values or (optional and values[column] is None):
            if optional:
                fields[name] = ""
                continue
            return Fields(None, 0, ("missing_field", f"no value for column {column!r}"))
        value = values[column]
        is_label = bool(task.labels) and name == task.target_field
        text = _field_text(value, task.labels if is_label else None)
        if text is None:
            where = f"field {name!r}" + (f" (column {column!r})" if column != name else "")
            wanted = (f"a string, or a number or boolean standing for one of the labels {sorted(task.labels)}"
                      if is_label else "a string" + (" or null" if optional else ""))
            return Fields(None, 0, ("bad_value", f"{where} is {_kind(value)}, not {wanted}"))
        fields[name] = text
    for name in task.optional_fields:
        fields.setdefault(name, "")
    if task.chat:  # flat columns, built into a conversation by the source's turns
        checked = _checked(fields, fields, max_bytes, tuple(fields))
        if checked.problem:
            return checked
        turns = [{"role": t.role, "content": render(t.content, fields, f"turns.{i}")} for i, t in enumerate(src.turns)]
        if empty := [i for i, t in enumerate(turns) if not t["content"].strip()]:
            return Fields(None, checked.size, ("empty_content", f"turn(s) {empty} of `turns` render empty"))
        return Fields({conversations.FIELD: turns}, checked.size, None)
    return _checked(fields, fields, max_bytes, task.required_fields)


def _checked(fields: dict, texts: dict[str, str], max_bytes: int, required: tuple[str, ...]) -> Fields:
    """``fields`` as a record's, or why not: each of ``texts`` (name -> text: the fields, or a
    conversation's turns) decodable and free of NUL bytes, all of them within ``max_bytes``, the
    ``required`` fields not blank."""
    for name, text in texts.items():
        if bad := sources.undecodable(text):
            return Fields(None, 0, ("invalid_utf8", f"field {name!r}: {bad}"))
        if (nul := text.find("\x00")) >= 0:
            return Fields(None, 0, ("nul_byte", f"field {name!r} holds a NUL byte at character {nul + 1}"))
    size = sum(len(t.encode("utf-8")) for t in texts.values())
    if size > max_bytes:
        return Fields(None, size,
                      ("too_large", f"{size:,} bytes, over collect.max_record_bytes ({max_bytes:,})"))
    if empty := [k for k in required if not fields[k].strip()]:
        return Fields(None, size,
                      ("empty_field", f"field(s) {', '.join(map(repr, empty))} empty or only whitespace"))
    return Fields(fields, size, None)


def _own_id(src: SourceConfig, values: dict) -> tuple[str | None, tuple[str, str] | None]:
    """(the row's id from ``src.id_column``, problem): a string or an integer, not blank."""
    value = values.get(src.id_column)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ("missing_id", f"no value in id column {src.id_column!r}")
    if not isinstance(value, str):
        return None, ("bad_value", f"id column {src.id_column!r} holds {_kind(value)}, not a string or an integer")
    return value.strip(), None


class _Sink:
    """Where rows go: a record (id checked unique, validated) or a quarantine entry."""

    def __init__(self, cfg: CollectConfig, task: Task, source_names: list[str], staging: Path, scratch: Path):
        self.max_bytes = cfg.max_record_bytes
        self.task = task
        self.first: dict[tuple[str, str], str] = {}  # (source, reason) -> its first row's location and detail
        self.records = open(staging / "records.jsonl", "w", encoding="utf-8")
        # A quarantined value may hold undecodable bytes (as surrogates): written escaped, not refused.
        self.quarantine = open(staging / "quarantine.jsonl", "w", encoding="utf-8", errors="backslashreplace")
        self.ids = _Ids(scratch / "ids.sqlite")
        self.checks = _RawValidation(cfg, task, source_names, staging / "validation.json")

    def take(self, src: SourceConfig, file: sources.SourceFile, row: sources.SourceRow) -> str | None:
        """Write ``row`` as a record, or quarantine it; the quarantine reason, or None."""
        rec_id = f"{src.name}:{file.key + ':' if file.key else ''}{row.key}"
        fields, size, problem = None, 0, row.problem
        if problem is None:
            fields, size, problem = task_fields(src, row.fields, self.max_bytes, self.task)
        if problem is None and src.id_column:
            own, problem = _own_id(src, row.fields)
            if own is not None:
                rec_id = f"{src.name}:{own}"
        if problem is None and (first := self.ids.first_location(rec_id, row.location)):
            problem = ("duplicate_id", f"id {rec_id!r} already used at {first}")
        if problem:
            reason, detail = problem
            self.first.setdefault((src.name, reason), f"{row.location}: {detail}")
            self.quarantine.write(json.dumps({"id": rec_id, "source": src.name, "location": row.location,
                                              "reason": reason, "detail": detail, "fields": _preview(row.fields),
                                              "raw": _kept(row.raw)}, ensure_ascii=False, default=str) + "\n")
            return reason
        record = {"id": rec_id, "source": src.name, "location": row.location, **fields}
        self.records.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.checks.add(record, size)
        return None

    def close(self) -> None:
        self.records.close()
        self.quarantine.close()
        self.ids.close()


def _collect_source(src: SourceConfig, cfg: CollectConfig, root: Path, scratch: Path, sink: _Sink
                    ) -> tuple[dict, dict]:
    """Read one source into ``sink``: (its sources.json entry, its stats)."""
    t0 = time.perf_counter()
    ctx = sources.ReadContext(cfg.max_record_bytes, scratch)
    outcomes: Counter[str] = Counter()  # "record" or the quarantine reason
    files: list[dict] = []
    cap = cfg.max_records_per_source
    for file in sources.open_files(src, root, root / cfg.download_dir):
        if cap is not None and outcomes.total() >= cap:
            break
        try:
            files += _checked_hashes(src, file)
            rows = sources.read(src, file, ctx)
            for row in rows:
                outcomes[sink.take(src, file, row) or "record"] += 1
                if cap is not None and outcomes.total() >= cap:
                    rows.close()
                    break
        except OSError as exc:
            raise StageError(f"{file.display}: cannot read (source {src.name!r}): {exc.strerror or exc}") from None
    kept = outcomes.pop("record", 0)
    dropped = dict(sorted(outcomes.items()))
    skipped = dict(sorted(ctx.skipped.items()))
    if kept + sum(dropped.values()) == 0:
        raise StageError(f"{src.uri}: source {src.name!r} holds no rows (skipped: {skipped or 'nothing'})")
    log.info("collect: %s (%s): %d records, %d quarantined %s, skipped %s in %.1f s", src.name, src.uri,
             kept, sum(dropped.values()), dropped, skipped, time.perf_counter() - t0)
    entry = {"uri": src.uri, "format": src.format, "files": files, "splits": dict(src.splits),
             "records": kept, "quarantined": sum(dropped.values()), "skipped": skipped}
    return entry, {"rows": kept + sum(dropped.values()), "records": kept, "quarantined": sum(dropped.values()),
                   "quarantine_reasons": dropped, "skipped": skipped}


def run(cfg: CollectConfig, task: Task, root: Path, out: Path) -> CollectStats:
    if problems := cfg.source_problems(task.name, task.required_fields, task.chat):
        raise StageError("; ".join(problems))
    declared = cfg.sources[task.name]
    stats = CollectStats()
    described: dict[str, dict] = {}
    failed_quarantine = out.parent / f"{out.name}.quarantine-failed.jsonl"
    with atomic_dir(out) as staging:
        scratch = staging / ".scratch"
        scratch.mkdir()
        sink = _Sink(cfg, task, [s.name for s in declared], staging, scratch)
        try:
            for src in declared:
                described[src.name], stats.per_source[src.name] = _collect_source(src, cfg, root, scratch, sink)
        finally:
            sink.close()
        if over := [problem for i, src in enumerate(declared)
                    if (problem := _too_much_quarantined(cfg, task.name, i, src, stats.per_source[src.name],
                                                         sink.first))]:
            # Kept beside the output, which is not written: the rows to look at before fixing the source.
            os.replace(staging / "quarantine.jsonl", failed_quarantine)
            raise StageError(f"{'; '.join(over)}. The quarantined rows are in {failed_quarantine}")
        shutil.rmtree(scratch)
        reasons: Counter[str] = Counter()
        for s in stats.per_source.values():
            stats.records += s["records"]
            stats.quarantined += s["quarantined"]
            stats.skipped += sum(s["skipped"].values())
            reasons.update(s["quarantine_reasons"])
        stats.quarantine_reasons = dict(sorted(reasons.items()))
        if not stats.records:
            raise StageError(f"collect: task {task.name!r} produced no records; every row was quarantined "
                             f"{stats.quarantine_reasons}: check the sources' `columns` and `format`")
        write_json(staging / "sources.json", described)
        sink.checks.finish()
    failed_quarantine.unlink(missing_ok=True)
    return stats


def _too_much_quarantined(cfg: CollectConfig, task: str, index: int, src: SourceConfig, counts: dict,
                          first: dict[tuple[str, str], str]) -> str | None:
    """Why the share of ``src``'s rows quarantined is over its limit; None when it is not."""
    limit, key = ((src.max_quarantined_share, f"collect.sources.{task}.{index}.max_quarantined_share")
                  if src.max_quarantined_share is not None else (cfg.max_quarantined_share,
                                                                 "collect.max_quarantined_share"))
    rows, quarantined = counts["rows"], counts["quarantined"]
    if quarantined <= limit * rows:
        return None
    top = sorted(counts["quarantine_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
    reasons = ", ".join(f"{reason} {n:,} (first: {first[(src.name, reason)]})" for reason, n in top)
    return (f"source {src.name!r} ({src.uri}): {quarantined:,} of {rows:,} rows ({quarantined / rows:.1%}) "
            f"quarantined, over {key} ({limit}): {reasons}; fix the source or its declaration (columns, format, "
            f"quoting), or raise {key} if so many bad rows are expected")


def _checked_hashes(src: SourceConfig, file: sources.SourceFile) -> list[dict]:
    hashes = sources.file_hashes(file)
    if src.sha256 and not file.sha256 and hashes[0]["sha256"] != src.sha256:  # (a download is checked as it arrives)
        raise StageError(f"{file.display}: sha256 mismatch (source {src.name!r}): expected {src.sha256}, got "
                         f"{hashes[0]['sha256']}; the file changed, or `sha256` in collect.sources is wrong")
    return hashes
