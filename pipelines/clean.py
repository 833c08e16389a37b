"""clean: filter, scrub, deduplicate and split raw records, streaming, without leakage.

Pass 1 streams ``raw/records.jsonl`` through the steps of ``clean.filters``
(pipelines/filters.py), then exact and near-duplicate removal against everything kept
so far (pipelines/dedup.py), across sources and splits. Every removed record is
written, as the removing step saw it, with ``reason`` and ``detail`` to
``removed/<reason>.jsonl``; every step counts what came in, went out, was removed,
changed or skipped, and ``records in = records out + removed`` is checked per step,
per source and overall. A step that removes more than ``max_removed_share`` of one
source's records fails the stage before anything is written.

Splits are assigned per *group* (``Task.group_key``; for E2E the meaning
representation) by a seeded hash of the normalized group, so every reference of one
MR lands in the same split and the assignment does not move when other records come
or go. A group that different sources would put in different splits goes to the most
held-out one (test > validation > train). Pass 2 reads the kept records back and
writes them to their group's final split. Nothing of the corpus is held in memory:
indexes (hashes, LSH buckets, group -> split) are SQLite files in a scratch directory.

The output is validated with Great Expectations in chunks; what no chunk can see on
its own (an id twice in the output, a group or a text in two splits) is checked on the
stage's own on-disk index of the output and reported in the same summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import re
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterator

import pandas as pd

from pipelines.common import SPLITS, StageError, atomic_dir, read_json, scratch_prefix, write_json
from pipelines.config import CleanConfig
from pipelines.dedup import DedupIndex, MinHasher, exact_key, normalized
from pipelines.conversations import FIELD as CONVERSATION
from pipelines.filters import Drop, Outcome, apply_steps, build_steps, count_pii, pii_regex, step_names
from pipelines.tasks import Task
from pipelines import conversations, validation
from pipelines.validation import ValidationFailed, ValidationSummary, validate

log = logging.getLogger(__name__)

CHUNK_LINES = 500  # records per unit of work sent to a worker process
_REASON = re.compile(r"^[a-z0-9_]+$")


@dataclass
class CleanStats:
    records_in: int = 0
    records_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # by reason
    # Per step, in pipeline order: in, out, removed, and changed / skipped / PII kinds where they apply.
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    pii_replaced: dict[str, int] = field(default_factory=dict)  # placeholders written, by kind
    duplicate_clusters: dict[str, int] = field(default_factory=dict)  # kept records that had exact / near copies
    # in, out, removed by reason, the steps that removed any (their in and removed), splits
    per_source: dict[str, dict] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    groups_moved_to_held_out: int = 0
    accounting_balanced: bool = False


def split_of(group: str, fractions: dict[str, float], seed: int) -> str:
    """Deterministic split of a group: a seeded hash mapped onto the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}\x00{group}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    acc = 0.0
    for split in SPLITS:
        acc += fractions.get(split, 0.0)
        if u < acc:
            return split
    return max(fractions, key=lambda s: SPLITS.index(s))  # u rounding past the last bound


def group_of(value: str) -> str:
    return " ".join(value.casefold().split())


def read_fractions(raw: Path) -> dict[str, dict[str, float]]:
    """Each source's split fractions, from the ``sources.json`` that collect writes."""
    path = raw / "sources.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; it is written by the collect stage (run `dvc repro collect`)")
    fractions = {}
    for name, source in read_json(path).items():
        splits = source.get("splits") if isinstance(source, dict) else None
        if (not isinstance(splits, dict) or not splits or set(splits) - set(SPLITS)
                or any(not isinstance(v, (int, float)) or v < 0 for v in splits.values())
                or abs(sum(splits.values()) - 1) > 1e-6):
            raise StageError(f"{path}: source {name!r}: splits must map {list(SPLITS)} to fractions "
                             f"summing to 1, got {splits!r}")
        fractions[name] = splits
    return fractions


# --- pass 1, per record: run in worker processes --------------------------------------

class _Worker:
    """The per-record work of pass 1: steps, dedup keys, MinHash, group and split proposal."""

    def __init__(self, cfg: CleanConfig, task: Task, fractions: dict[str, dict[str, float]]):
        self.cfg, self.task, self.fractions = cfg, task, fractions
        self.steps = build_steps(cfg.filters, task)
        self._turn_steps: dict[int, list] = {}  # chat: the steps for conversations of so many turns
        near = cfg.dedup.near
        self.hasher = MinHasher(near) if near.enabled else None
        self.pii = pii_regex(cfg.filters.pii.kinds)  # what the output is checked for

    def process(self, lines: list[tuple[int, str]]) -> tuple[list[tuple], Counter]:
        events: Counter = Counter()
        out = []
        for lineno, line in lines:
            rec = self._parse(lineno, line)
            if self.task.chat:
                rec, outcome = self._chat_steps(rec, events)
            else:
                outcome = apply_steps(self.steps, {f: rec[f] for f in self.task.fields}, events)
                rec = {**rec, **outcome.fields}
            if outcome.drop:
                out.append(("drop", rec["source"], rec["id"], outcome.dropped_by, outcome.drop,
                            json.dumps({**rec, "reason": outcome.drop.reason, "detail": outcome.drop.detail},
                                       ensure_ascii=False)))
                continue
            if self.task.chat:  # dedup compares whole conversations, roles included; the group is the opening
                texts = [t["content"] for t in rec[CONVERSATION]]
                norm, group = normalized(conversations.as_text(rec[CONVERSATION])), group_of(
                    conversations.opening(rec[CONVERSATION]))
            else:
                texts = [rec[f] for f in self.task.text_fields]
                norm, group = normalized("\n".join(texts)), group_of(rec[self.task.group_key])
            sig = bands = None
            if self.hasher and len(norm.split()) >= self.cfg.dedup.near.min_words:
                sig = self.hasher.signature(norm)
                bands = self.hasher.band_keys(sig)
            split = split_of(group, self.fractions[rec["source"]], self.cfg.split_seed)
            label = rec[self.task.target_field] if self.task.labels else None
            meta = {"id": rec["id"], "source": rec["source"], "group": group, "split": split,
                    "key": exact_key(norm).hex(), "label": label,
                    "label_ok": label in self.task.labels if self.task.labels else True,
                    "chars": sum(map(len, texts)), "words": sum(len(t.split()) for t in texts),
                    "pii_left": sum(count_pii(t, self.pii) for t in texts)}
            out.append(("keep", sig, bands, meta,
                        json.dumps({**rec, "group": group}, ensure_ascii=False)))
        return out, events

    def _chat_steps(self, rec: dict, events: Counter) -> tuple[dict, Outcome]:
        """The steps over a conversation: each turn's content a field of its own (``turn_<i>``), so
        every turn is scrubbed and judged; the record with the turns as the steps left them."""
        turns = rec[CONVERSATION]
        names = tuple(f"turn_{i}" for i in range(len(turns)))
        if (steps := self._turn_steps.get(len(turns))) is None:
            steps = self._turn_steps[len(turns)] = build_steps(self.cfg.filters, self.task, names)
        outcome = apply_steps(steps, {n: t["content"] for n, t in zip(names, turns)}, events)
        turns = [{**t, "content": outcome.fields[n]} for n, t in zip(names, turns)]
        return {**rec, CONVERSATION: turns}, outcome

    def _parse(self, lineno: int, line: str) -> dict:
        where = f"records.jsonl:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(f"{where}: not valid JSON ({exc}); re-run the collect stage") from None
        if self.task.chat:
            turns, problem = conversations.read(rec.get(CONVERSATION))
            if problem:
                raise StageError(f"{where}: record {rec.get('id')!r}: field {CONVERSATION!r}: {problem.detail}; the "
                                 f"raw data does not belong to chat task {self.task.name!r} (re-run collect)")
            rec = {**rec, CONVERSATION: turns}
        missing = [f for f in ("id", "source", *self.task.fields)
                   if not isinstance(rec.get(f), list if f == CONVERSATION and self.task.chat else str)]
        if missing:
            raise StageError(f"{where}: record {rec.get('id')!r} lacks text field(s) {missing} of task "
                             f"{self.task.name!r}; the raw data does not belong to this task")
        if rec["source"] not in self.fractions:
            raise StageError(f"{where}: record {rec['id']!r} is from source {rec['source']!r}, which "
                             f"sources.json does not list")
        return rec


_worker: _Worker | None = None


def _init_worker(cfg: CleanConfig, task: Task, fractions: dict) -> None:
    global _worker
    _worker = _Worker(cfg, task, fractions)


def _process(lines: list[tuple[int, str]]) -> tuple[list[tuple], Counter]:
    return _worker.process(lines)


def _chunks(path: Path) -> Iterator[list[tuple[int, str]]]:
    chunk = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                chunk.append((lineno, line))
            if len(chunk) >= CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _processed(path: Path, cfg: CleanConfig, task: Task, fractions: dict) -> Iterator[tuple[list, Counter]]:
    """Chunks of processed records, in input order, with at most 2 chunks per worker in
    flight (Pool.imap would read the whole input ahead into its queue)."""
    if cfg.workers == 1:
        worker = _Worker(cfg, task, fractions)
        yield from map(worker.process, _chunks(path))
        return
    # spawn: a worker starts from a clean interpreter, not a copy of this process's state;
    # an executor (unlike multiprocessing.Pool) fails, not hangs, when a worker dies.
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(cfg, task, fractions)) as pool:
        pending: deque = deque()
        for chunk in _chunks(path):
            pending.append(pool.submit(_process, chunk))
            if len(pending) >= 2 * cfg.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- the stage -------------------------------------------------------------------------

class _Removed:
    """removed/<reason>.jsonl writers, opened on first use (removed/ exists even if empty)."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir()
        self.files: dict[str, IO] = {}

    def write(self, reason: str, line: str) -> None:
        if reason not in self.files:
            if not _REASON.match(reason):  # a reason is a file name
                raise AssertionError(f"filter reason {reason!r} is not [a-z0-9_]+")
            self.files[reason] = open(self.root / f"{reason}.jsonl", "w", encoding="utf-8")
        self.files[reason].write(line + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def run(cfg: CleanConfig, task: Task, raw: Path, out: Path) -> CleanStats:
    started = time.perf_counter()
    records = raw / "records.jsonl"
    if not records.is_file():
        raise StageError(f"{records}: missing; run the collect stage first")
    fractions = read_fractions(raw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The scratch indexes sit beside the staging directory (not in the output) and are named
    # like it, so the next run clears them too if this one is killed.
    with atomic_dir(out) as staging, \
            tempfile.TemporaryDirectory(prefix=scratch_prefix(out) + "index-", dir=out.parent) as scratch:
        scratch = Path(scratch)
        stats, step_events = _pass1(cfg, task, fractions, records, staging, scratch)
        _pass2(cfg, task, stats, staging, scratch)
        _account(stats, step_events, _step_names(cfg, task))
    log.info("clean: %d in, %d out in %.1f s; removed %s; splits %s; PII replaced %s",
             stats.records_in, stats.records_out, time.perf_counter() - started, stats.removed,
             stats.splits, stats.pii_replaced)
    return stats


def _step_names(cfg: CleanConfig, task: Task) -> list[str]:
    return (step_names(cfg.filters, task)
            + ["exact_dedup"] * cfg.dedup.exact + ["near_dedup"] * cfg.dedup.near.enabled)


def _pass1(cfg: CleanConfig, task: Task, fractions: dict, records: Path, staging: Path,
           scratch: Path) -> tuple[CleanStats, Counter]:
    """Steps and dedup; kept records go to ``scratch/kept.tsv`` as ``meta<TAB>record``."""
    stats = CleanStats()
    events: Counter = Counter()
    source_in: Counter = Counter()
    by_step: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))  # source -> step -> reasons
    examples: dict[tuple[str, str, str], str] = {}  # (source, step, reason) -> its first removal, "id: detail"
    removed = _Removed(staging / "removed")
    dedup = DedupIndex(scratch / "dedup.sqlite", cfg.dedup.near if cfg.dedup.near.enabled else None)
    groups = _GroupIndex(scratch / "groups.sqlite")

    def remove(source: str, step: str, rec_id: str, drop: Drop, line: str) -> None:
        removed.write(drop.reason, line)
        by_step[source][step][drop.reason] += 1
        examples.setdefault((source, step, drop.reason), f"{rec_id}: {drop.detail}")

    try:
        with open(scratch / "kept.tsv", "w", encoding="utf-8") as kept:
            for results, chunk_events in _processed(records, cfg, task, fractions):
                events.update(chunk_events)
                for item in results:
                    stats.records_in += 1
                    if item[0] == "drop":
                        _, source, rec_id, step, drop, line = item  # the worker counted it against its step
                        source_in[source] += 1
                        remove(source, step, rec_id, drop, line)
                        continue
                    _, sig, bands, meta, line = item
                    key = bytes.fromhex(meta["key"])
                    source_in[meta["source"]] += 1
                    if cfg.dedup.exact:
                        events["exact_dedup", "in"] += 1
                        if match := dedup.exact_match(key):
                            events["exact_dedup", "removed"] += 1
                            drop = Drop("duplicate", f"same text as {match.kept_id}{_conflict(match, meta)}")
                            remove(meta["source"], "exact_dedup", meta["id"], drop, _with_reason(line, drop))
                            continue
                    if cfg.dedup.near.enabled:
                        events["near_dedup", "in"] += 1
                        if sig is None:
                            events["near_dedup", "skipped"] += 1
                        elif match := dedup.near_match(sig, bands, meta["id"], meta["group"], meta["label"]):
                            events["near_dedup", "removed"] += 1
                            drop = Drop("near_duplicate", f"near-duplicate of {match.kept_id} (estimated Jaccard "
                                                          f"{match.similarity:.2f}){_conflict(match, meta)}")
                            remove(meta["source"], "near_dedup", meta["id"], drop, _with_reason(line, drop))
                            continue
                    if cfg.dedup.exact:
                        dedup.add_exact(key, meta["id"], meta["label"])
                    groups.propose(meta["group"], meta["split"])
                    kept.write(json.dumps(meta, ensure_ascii=False) + "\t" + line + "\n")
        stats.duplicate_clusters = dedup.clusters()
        stats.groups_moved_to_held_out = groups.moved()
    finally:
        removed.close()
        dedup.close()
        groups.close()
    if stats.records_in == 0:
        raise StageError(f"{records}: no records; check the collect stage's output")
    names, total = _step_names(cfg, task), Counter()
    for s, n in sorted(source_in.items()):
        reasons = sum(by_step[s].values(), Counter())
        total += reasons
        stats.per_source[s] = {"in": n, "out": 0, "removed": dict(sorted(reasons.items())),
                               "steps": _source_steps(n, by_step[s], names), "splits": {}}
    stats.removed = dict(sorted(total.items()))
    _check_removed_shares(cfg, stats.per_source, by_step, examples)
    return stats, events


def _source_steps(n_in: int, removed: dict[str, Counter], names: list[str]) -> dict[str, dict[str, int]]:
    """In and removed of each step that removed any of one source's ``n_in`` records."""
    steps = {}
    for name in names:
        if n := sum(removed.get(name, Counter()).values()):
            steps[name] = {"in": n_in, "removed": n}
        n_in -= n
    return steps


def _removal_limit(cfg: CleanConfig, step: str) -> tuple[float, str, str]:
    """The share of a source's records ``step`` may remove, the key it comes from, and the
    key that would set it for this step alone."""
    dedup = step in ("exact_dedup", "near_dedup")
    own_key = "clean.dedup.max_removed_share" if dedup else f"clean.filters.{step}.max_removed_share"
    own = cfg.dedup.max_removed_share if dedup else getattr(getattr(cfg.filters, step), "max_removed_share", None)
    return (own, own_key, own_key) if own is not None else (cfg.max_removed_share, "clean.max_removed_share", own_key)


def _check_removed_shares(cfg: CleanConfig, per_source: dict[str, dict], by_step: dict[str, dict[str, Counter]],
                          examples: dict[tuple[str, str, str], str]) -> None:
    """Fail, before anything is published, when a step removed more of a source's records
    than its limit: a source that loses most of its records to one rule is misread (a wrong
    column or format), mislabeled or a copy of another, and what is left of it is no sample."""
    failures = []
    for source, s in per_source.items():
        for step, n in s["steps"].items():
            limit, key, own_key = _removal_limit(cfg, step)
            if n["removed"] / n["in"] <= limit:
                continue
            top = by_step[source][step].most_common(3)
            reasons = ", ".join(f"{reason} {count}" for reason, count in top)
            scope = "deduplication" if own_key == "clean.dedup.max_removed_share" else "this step"
            allow = f"raise {key}" + (f" or set {own_key} for {scope} alone" if own_key != key else "")
            failures.append(f"source {source!r}, step {step!r}: {n['removed']} of {n['in']} records removed "
                            f"({n['removed'] / n['in']:.1%}), more than {key} = {limit}; top reasons: {reasons} "
                            f"(e.g. {examples[source, step, top[0][0]]}); if that is right, {allow}")
    if failures:
        raise StageError("clean: " + " | ".join(failures) + ". Check the source first: removing most of it "
                         "points at a wrong column mapping, format or label set, or a copy of another source")


def _conflict(match, meta: dict) -> str:
    if match.kept_label == meta["label"]:
        return ""
    return f"; labels differ: {meta['label']!r} here, {match.kept_label!r} kept"


def _with_reason(line: str, drop: Drop) -> str:
    return json.dumps({**json.loads(line), "reason": drop.reason, "detail": drop.detail}, ensure_ascii=False)


class _GroupIndex:
    """group -> the splits proposed for it (a bit mask); the final split is the most held-out."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;
            CREATE TABLE IF NOT EXISTS grp (g TEXT PRIMARY KEY, mask INTEGER NOT NULL) WITHOUT ROWID;
            BEGIN;
        """)

    def propose(self, group: str, split: str) -> None:
        self.db.execute("INSERT INTO grp VALUES (?, ?) ON CONFLICT (g) DO UPDATE SET mask = mask | excluded.mask",
                        (group, 1 << SPLITS.index(split)))

    def final(self, group: str) -> str:
        (mask,) = self.db.execute("SELECT mask FROM grp WHERE g = ?", (group,)).fetchone()
        return SPLITS[mask.bit_length() - 1]

    def moved(self) -> int:
        """Groups proposed more than one split (by different sources)."""
        return self.db.execute("SELECT COUNT(*) FROM grp WHERE mask & (mask - 1) != 0").fetchone()[0]

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()


def _pass2(cfg: CleanConfig, task: Task, stats: CleanStats, staging: Path, scratch: Path) -> None:
    """Kept records to their group's final split; GX in chunks; cross-chunk checks on an index."""
    groups = _GroupIndex(scratch / "groups.sqlite")
    written = _OutputIndex(scratch / "written.sqlite")
    by_split: Counter = Counter()
    by_source: dict[str, Counter] = defaultdict(Counter)
    checker = _ChunkedValidation(cfg, task, list(stats.per_source), staging / "validation.json", scratch)
    files = {s: open(staging / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    try:
        with open(scratch / "kept.tsv", encoding="utf-8") as kept:
            for line in kept:
                meta_json, rec_json = line.rstrip("\n").split("\t", 1)
                meta = json.loads(meta_json)
                split = groups.final(meta["group"])
                # The record is a JSON object: the split goes in before its closing brace.
                files[split].write(f'{rec_json[:-1]}, "split": "{split}"}}\n')
                written.add(meta, split)
                by_split[split] += 1
                by_source[meta["source"]][split] += 1
                checker.add(meta, split)
        for f in files.values():
            f.close()
        stats.records_out = sum(by_split.values())
        stats.splits = {s: by_split[s] for s in SPLITS}
        stats.groups = written.groups_per_split()
        for source, counts in by_source.items():
            stats.per_source[source]["out"] = sum(counts.values())
            stats.per_source[source]["splits"] = {s: counts[s] for s in SPLITS}
        if stats.records_out == 0:
            raise StageError(f"clean: every record was removed ({stats.removed}); check clean.filters "
                             "in params.yaml against the removed/ files")
        checker.finish(written)
    finally:
        for f in files.values():
            f.close()
        groups.close()
        written.close()


class _OutputIndex:
    """What pass 2 wrote: copies per id, and the splits each group and each text landed in."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript("""
            PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;
            CREATE TABLE id (id TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE grp (g TEXT PRIMARY KEY, mask INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE txt (key BLOB PRIMARY KEY, mask INTEGER NOT NULL) WITHOUT ROWID;
            BEGIN;
        """)

    def add(self, meta: dict, split: str) -> None:
        bit = 1 << SPLITS.index(split)
        self.db.execute("INSERT INTO id VALUES (?, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1", (meta["id"],))
        for table, column, value in (("grp", "g", meta["group"]), ("txt", "key", bytes.fromhex(meta["key"]))):
            self.db.execute(f"INSERT INTO {table} VALUES (?, ?) ON CONFLICT ({column}) "
                            f"DO UPDATE SET mask = mask | excluded.mask", (value, bit))

    def groups_per_split(self) -> dict[str, int]:
        return {s: self.db.execute("SELECT COUNT(*) FROM grp WHERE mask & ? != 0", (1 << i,)).fetchone()[0]
                for i, s in enumerate(SPLITS)}

    CHECKS = {  # name: (column, SQL selecting the offending values, what one means)
        "output_ids_unique": ("id", "SELECT id FROM id WHERE n > 1", "ids written more than once"),
        "groups_in_one_split": ("group", "SELECT g FROM grp WHERE mask & (mask - 1) != 0",
                                "groups in more than one split"),
        "texts_in_one_split": ("text", "SELECT hex(key) FROM txt WHERE mask & (mask - 1) != 0",
                               "normalized texts in more than one split (train/test overlap)"),
    }

    def violations(self, sql: str) -> tuple[int, list]:
        (count,) = self.db.execute(f"SELECT COUNT(*) FROM ({sql})").fetchone()
        return count, [r[0] for r in self.db.execute(f"{sql} LIMIT 5")]

    def close(self) -> None:
        self.db.close()


class _ChunkedValidation:
    """GX's ``clean`` suite over light frames of ``validation.CHUNK_ROWS`` rows, and the
    checks no single frame can make, on the index of what was written."""

    def __init__(self, cfg: CleanConfig, task: Task, sources: list[str], result_path: Path, scratch: Path):
        f = cfg.filters
        length = f.length if "length" in f.order and f.length.enabled else None
        self.parameters = {
            "min_rows": 1, "sources": sources,
            "min_chars": length.min_chars if length else 0, "max_chars": length.max_chars if length else None,
            "min_words": length.min_words if length else 0, "max_words": length.max_words if length else None,
            # PII the scrubber missed or a later step reassembled; unchecked when scrubbing is off
            "max_pii_left": 0 if "pii" in f.order and f.pii.enabled else None,
        }
        self.result_path, self.scratch = result_path, scratch
        self.columns: dict[str, list] = defaultdict(list)
        self.summaries: list[ValidationSummary] = []

    def add(self, meta: dict, split: str) -> None:
        c = self.columns
        c["id"].append(meta["id"])
        c["source"].append(meta["source"])
        c["split"].append(split)
        c["text_chars"].append(meta["chars"])
        c["text_words"].append(meta["words"])
        c["label_ok"].append(meta["label_ok"])
        c["pii_left"].append(meta["pii_left"])
        if len(c["id"]) >= validation.CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.columns:
            return
        frame, self.columns = pd.DataFrame(self.columns), defaultdict(list)
        path = self.scratch / f"validation-{len(self.summaries)}.json"
        try:
            self.summaries.append(validate("clean", frame, self.parameters, path))
        except ValidationFailed as exc:
            self.summaries.append(exc.summary)

    def finish(self, written: _OutputIndex) -> None:
        self._flush()
        failures: dict[tuple, dict] = {}
        for batch in self.summaries:
            for f in batch.failures:
                merged = failures.setdefault((f["expectation"], f["column"]), {**f, "unexpected_count": 0,
                                                                             "unexpected_sample": [], "batches": 0})
                merged["batches"] += 1
                merged["unexpected_count"] += f["unexpected_count"] or 0
                merged["unexpected_sample"] = (merged["unexpected_sample"] + f["unexpected_sample"])[:5]
        for f in failures.values():
            f["observed"] = (f"{f['unexpected_count']} unexpected in {f['batches']} of {len(self.summaries)} "
                             f"batches, e.g. {f['unexpected_sample']!r}" if f["unexpected_count"]
                             else f["observed"])
        index_checks = written.CHECKS
        for name, (column, sql, meaning) in index_checks.items():
            count, sample = written.violations(sql)
            if count:
                failures[(name, column)] = {
                    "expectation": name, "column": column, "kwargs": {}, "observed_value": count,
                    "unexpected_count": count, "unexpected_sample": sample, "missing": None, "error": None,
                    "observed": f"{count} {meaning}, e.g. {sample!r}"}
        evaluated = (self.summaries[0].evaluated if self.summaries else 0) + len(index_checks)
        summary = ValidationSummary(suite="clean", success=not failures, evaluated=evaluated,
                                    successful=evaluated - len(failures),
                                    rows=sum(s.rows for s in self.summaries), failures=list(failures.values()))
        write_json(self.result_path, {**asdict(summary), "parameters": self.parameters,
                                      "batches": len(self.summaries), "index_checks": list(index_checks)})
        if not summary.success:
            raise ValidationFailed(summary)
        log.info("%s (in %d batches, plus %d index checks)", summary, len(self.summaries), len(index_checks))


def _account(stats: CleanStats, events: Counter, names: list[str]) -> None:
    """Per step, per source and overall: in = out + removed, and each step's out is the
    next step's in. A failure here is a bug in the stage, not in the data."""
    flow = stats.records_in
    for name in names:
        n_in, n_removed = events[name, "in"], events[name, "removed"]
        if n_in != flow:
            raise AssertionError(f"clean: step {name!r} saw {n_in} records but {flow} reached it")
        flow = n_in - n_removed
        extra = {k: v for (step, k), v in sorted(events.items()) if step == name and k not in ("in", "removed")}
        stats.steps[name] = {"in": n_in, "out": flow, "removed": n_removed, **extra}
    stats.pii_replaced = {k: v for (step, k), v in sorted(events.items()) if step == "pii" and k.isupper()}
    if flow != stats.records_out or stats.records_in != stats.records_out + sum(stats.removed.values()):
        raise AssertionError(f"clean: accounting broken: {stats.records_in} in, {stats.records_out} out, "
                             f"{sum(stats.removed.values())} removed, {flow} after the last step")
    for source, s in stats.per_source.items():
        if s["in"] != s["out"] + sum(s["removed"].values()):
            raise AssertionError(f"clean: accounting broken for source {source!r}: {s}")
    stats.accounting_balanced = True
