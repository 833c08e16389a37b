"""clean: normalize, filter, deduplicate and split raw records without leakage.

Cleaning is a list of filters of one signature, ``(record) -> None | reason``; each
drop is counted per reason and the dropped record is written, whole, to
``removed/<reason>.jsonl``. Accounting holds exactly: records in = records out +
records removed.

Splits are assigned per *group* (``Task.group_key``; for E2E the meaning
representation), by a seeded hash of the normalized group, so every reference of one
MR lands in the same split, and the assignment does not move when other records are
added or removed. A group that different sources would put in different splits goes
to the most held-out one (test > validation > train) and is counted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from pipelines.common import StageError, atomic_dir
from pipelines.config import CleanConfig
from pipelines.tasks import Task
from pipelines.validation import validate

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_WS = re.compile(r"\s+")

Filter = Callable[[dict], str | None]


@dataclass
class CleanStats:
    records_in: int = 0
    records_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    groups_moved_to_held_out: int = 0


def normalize(text: str) -> str:
    """NFKC, and all runs of whitespace (newlines and tabs included) to one space."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def make_filters(cfg: CleanConfig, task: Task) -> list[tuple[str, Filter]]:
    def text_chars(rec: dict) -> int:
        return sum(len(rec[f]) for f in task.text_fields)

    filters: list[tuple[str, Filter]] = [
        ("too_short", lambda r: f"{text_chars(r)} < {cfg.min_chars} chars"
         if text_chars(r) < cfg.min_chars else None),
        ("too_long", lambda r: f"{text_chars(r)} > {cfg.max_chars} chars"
         if text_chars(r) > cfg.max_chars else None),
    ]
    if task.labels:
        filters.append(("bad_label", lambda r: f"label {r[task.target_field]!r} not in "
                        f"{sorted(task.labels)}" if r[task.target_field] not in task.labels else None))
    return filters


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


def run(cfg: CleanConfig, task: Task, raw: Path, out: Path) -> CleanStats:
    stats = CleanStats()
    filters = make_filters(cfg, task)
    fractions = {s.name: s.splits for s in task.sources}
    removed: dict[str, list[dict]] = defaultdict(list)
    kept: list[dict] = []
    seen: dict[str, str] = {}  # exact-dedup key -> id of the first record kept

    with open(raw / "records.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            stats.records_in += 1
            for name in task.fields:
                rec[name] = normalize(rec[name])
            for reason, keep in filters:
                detail = keep(rec)
                if detail:
                    removed[reason].append({**rec, "reason": reason, "detail": detail})
                    break
            else:
                key = hashlib.sha256("\x1f".join(rec[f].lower() for f in task.fields).encode()).hexdigest()
                if key in seen:
                    removed["duplicate"].append({**rec, "reason": "duplicate", "detail": f"same as {seen[key]}"})
                    continue
                seen[key] = rec["id"]
                rec["group"] = rec[task.group_key].lower()
                rec["split"] = split_of(rec["group"], fractions[rec["source"]], cfg.split_seed)
                kept.append(rec)

    # Leakage guard across sources: one group, one split (the most held-out one).
    group_split: dict[str, str] = {}
    for rec in kept:
        prev = group_split.get(rec["group"])
        if prev is None or SPLITS.index(rec["split"]) > SPLITS.index(prev):
            group_split[rec["group"]] = rec["split"]
    moved = {r["group"] for r in kept if r["split"] != group_split[r["group"]]}
    stats.groups_moved_to_held_out = len(moved)
    for rec in kept:
        rec["split"] = group_split[rec["group"]]

    stats.records_out = len(kept)
    stats.removed = {k: len(v) for k, v in sorted(removed.items())}
    if stats.records_in != stats.records_out + sum(stats.removed.values()):
        raise AssertionError("clean: accounting broken (in != out + removed)")  # a bug, not input
    by_split = Counter(r["split"] for r in kept)
    stats.splits = {s: by_split.get(s, 0) for s in SPLITS}
    stats.groups = {s: len({r["group"] for r in kept if r["split"] == s}) for s in SPLITS}
    per_source: dict[str, Counter] = defaultdict(Counter)
    for r in kept:
        per_source[r["source"]]["kept"] += 1
    for reason, rows in removed.items():
        for r in rows:
            per_source[r["source"]][reason] += 1
    stats.per_source = {k: dict(v) for k, v in sorted(per_source.items())}
    if not kept:
        raise StageError(f"clean: every record was removed ({stats.removed}); "
                         "check clean.min_chars / clean.max_chars in params.yaml")

    with atomic_dir(out) as staging:
        for split in SPLITS:
            rows = [r for r in kept if r["split"] == split]
            with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (staging / "removed").mkdir()
        for reason, rows in removed.items():
            with open(staging / "removed" / f"{reason}.jsonl", "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        df = pd.DataFrame({
            "id": [r["id"] for r in kept],
            "split": [r["split"] for r in kept],
            "text_chars": [sum(len(r[f]) for f in task.text_fields) for r in kept],
            "group": [r["group"] for r in kept],
            "label_ok": [(r[task.target_field] in task.labels) if task.labels else True for r in kept],
        })
        df["group_splits"] = df.groupby("group")["split"].transform("nunique")
        validate("clean", df.drop(columns="group"),
                 {"min_chars": cfg.min_chars, "max_chars": cfg.max_chars, "min_rows": 1},
                 staging / "validation.json")
    log.info("clean: %d in, %d out, removed %s, splits %s", stats.records_in, stats.records_out,
             stats.removed, stats.splits)
    return stats
