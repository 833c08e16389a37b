"""tokenize: render each clean record's source and target, tokenize them with the base
model's tokenizer, mask the source out of the labels, and write verified Arrow shards.

- Text: ``prompts.PromptFormat`` (the task's Jinja2 templates; optionally the base
  model's chat template and ``few_shot`` demonstrations drawn, seeded, from a bounded
  pool of train records, never from the example's own group nor from validation/test).
- Labels: ``IGNORE`` on the source (demonstrations included); the target and the EOS
  token appended to it, so a tuned model learns to stop, carry the loss.
- Too long for ``max_length``: ``truncation: source`` removes demonstrations (earliest
  first), then cuts the start of the prompt, keeping the chat markup and the cue just
  before the target; the target is never cut. ``drop`` removes the example. An example
  whose target alone does not fit is dropped either way. Every case is counted per reason
  in the stats and listed in ``truncated.jsonl`` / ``dropped.jsonl``.
- Throughput: chunks of ``CHUNK`` JSONL lines go to ``num_proc`` forked workers (each a
  batched call of the Rust tokenizer); results are consumed in input order, so the
  shards are byte-identical for any ``num_proc``.
- Memory: everything streams. In flight at most 2 x num_proc chunks, one shard's rows,
  ``OPEN_ROWS`` packed rows, ``validation.CHUNK_ROWS`` validation aggregates; length statistics
  come from a histogram (lengths are bounded by max_length), not a list.
- Packing (``pack``, train only): examples are packed first-fit into rows of at most
  max_length tokens with ``position_ids`` restarting per example and ``seq_lens``, which
  ``shards.PackedCollator`` turns into a block-diagonal attention mask.
- Output: ``<split>/shard-NNNNN.arrow`` and ``manifest.json`` (see ``pipelines/shards.py``),
  validated by the GX suite ``shards`` on per-example aggregates before the directory
  replaces the previous one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.base_model import load_config, load_tokenizer
from pipelines import conversations
from pipelines.common import SPLITS, StageError, atomic_dir, write_json
from pipelines.config import TokenizeConfig
from pipelines.prompts import Demo, PromptFormat, draw_demos
from pipelines.shards import (FORMAT, IGNORE, PACKED_SCHEMA, SCHEMA, ShardWriter, file_entry,
                              tokenizer_fingerprint)
from pipelines.tasks import Task
from pipelines import validation
from pipelines.validation import validate

log = logging.getLogger(__name__)

CHUNK = 1000  # records per worker task: amortizes a task's IPC; 2 x num_proc in flight stay a few MB
DEMO_POOL = 256  # train records kept as candidate demonstrations: variety at bounded memory
OPEN_ROWS = 32  # packed rows open at once: rows end up near full, memory stays bounded
# Output shaped by these params; num_proc changes only the speed, so it stays out of the manifest.
OUTPUT_PARAMS = ("max_length", "truncation", "shard_rows", "few_shot", "seed", "pack")


@dataclass
class TokenizeStats:
    examples: dict[str, int]  # examples written, per split
    rows: dict[str, int]  # shard rows per split (fewer than examples where packed)
    tokens: dict[str, int]
    truncated: dict[str, int]  # per reason: demonstrations | source
    dropped: dict[str, int]  # per reason: too_long | target_too_long | empty_target
    length: dict[str, dict[str, int]]  # per split: p50/p90/p99/max tokens per example (nearest rank)
    packing_efficiency: float | None  # train: tokens / (rows x max_length), when packed
    seconds: float
    tokens_per_s: float


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


@dataclass
class Encoded:
    """A chunk of examples: token ids of all examples end to end, and where each starts."""
    split: str
    ids: list[str]
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE on the source
    offsets: np.ndarray  # int64, len(ids) + 1
    source_len: np.ndarray  # int32
    non_text: np.ndarray  # int32: values substituted into the texts that were not text (PromptFormat.example)
    dropped: list[dict]
    truncated: list[dict]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def record_batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [pa.array(self.ids, pa.string()), _lists(self.offsets, self.input_ids),
             _lists(self.offsets, self.labels)], schema=SCHEMA)

    def aggregates(self) -> dict[str, np.ndarray]:
        """What the GX suite checks, one row per example (every example has >= 2 tokens)."""
        if not self.ids:
            return {k: np.zeros(0, np.int64) for k in ("length", "min_id", "max_id", "label_tokens",
                                                       "source_tokens", "non_text_values")}
        starts = self.offsets[:-1]
        return {"length": self.lengths, "min_id": np.minimum.reduceat(self.input_ids, starts),
                "max_id": np.maximum.reduceat(self.input_ids, starts),
                "label_tokens": np.add.reduceat((self.labels != IGNORE).astype(np.int64), starts),
                "source_tokens": self.source_len, "non_text_values": self.non_text}


class Rendered(NamedTuple):
    """A clean record and what the prompt format makes of it (``prompts.Example``)."""
    record: dict
    prompt: str
    target: str
    non_text: int


def _record(path: str, n: int, line: str) -> dict:
    """JSONL line ``n`` of ``path`` as a record with an id; a StageError naming the file and line if not."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}:{n}: not a JSON record ({exc}); re-run the clean stage") from None
    if not isinstance(record, dict) or "id" not in record:
        raise StageError(f"{path}:{n}: not a record with an id ({line[:60].strip()!r}); re-run the clean stage")
    return record


def rendered(fmt: PromptFormat, path: str, n: int, line: str) -> Rendered:
    """The record, prompt, target and non-text count of JSONL line ``n`` of ``path``; any fault in it is
    a StageError naming the file and line (and, from ``prompts``, the record and field)."""
    record = _record(path, n, line)
    try:
        return Rendered(record, *fmt.example(record))
    except StageError as exc:
        raise StageError(f"{path}:{n}: {exc}") from None


class Encoder:
    """JSONL lines -> ``Encoded``; runs in the stage's process or in a forked worker."""

    def __init__(self, fmt: PromptFormat, tokenizer, cfg: TokenizeConfig, pool: list[Demo],
                 pool_non_text: dict[str, int] | None = None):
        self.fmt, self.cfg, self.pool = fmt, cfg, pool
        self.pool_non_text = pool_non_text or {}
        # The Rust tokenizer itself: the same ids as tokenizer(texts, add_special_tokens=False)
        # (a test checks), without building a BatchEncoding per call.
        self.backend = tokenizer.backend_tokenizer
        self.eos = tokenizer.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, job: tuple[str, str, int, list[str]]) -> Encoded:
        if self.fmt.task.chat:
            return self._conversations(job)
        split, path, first_line, lines = job
        records, prompts, targets, non_text = [], [], [], []
        for n, line in enumerate(lines, first_line):
            if line.strip():
                record, prompt, target, k = rendered(self.fmt, path, n, line)
                records.append(record)
                prompts.append(prompt)
                targets.append(target)
                non_text.append(k)
        demos = ([draw_demos(self.pool, r, self.cfg.few_shot, self.cfg.seed) for r in records]
                 if self.cfg.few_shot else [[]] * len(records))
        non_text = [k + sum(self.pool_non_text.get(d.id, 0) for d in ds) for k, ds in zip(non_text, demos)]
        sources = ([self.fmt.source(p, d) for p, d in zip(prompts, demos)]
                   if self.cfg.few_shot or self.fmt.chat else prompts)
        source_ids = self.encode(sources)
        unique = list(dict.fromkeys(targets))  # classification targets repeat: tokenize each once
        target_ids = dict(zip(unique, self.encode(unique)))

        flat: list[int] = []
        offsets, source_len, kept_non_text, ids, dropped, truncated = [0], [], [], [], [], []
        for rec, prompt, target, d, full, k in zip(records, prompts, targets, demos, source_ids, non_text):
            t, s = target_ids[target], full
            room = self.cfg.max_length - len(t) - 1  # the EOS token
            reason = None
            if not target.strip():
                s, reason = None, "empty_target"
            elif len(s) > room:
                s, reason = self._fit(prompt, d, room)
            if s is None:
                dropped.append({"id": rec["id"], "split": split, "reason": reason, "record": rec})
                continue
            if reason:
                truncated.append({"id": rec["id"], "split": split, "reason": reason,
                                  "tokens_before": len(full) + len(t) + 1,
                                  "tokens_after": len(s) + len(t) + 1})
            flat += s
            flat += t
            flat.append(self.eos)
            offsets.append(len(flat))
            source_len.append(len(s))
            kept_non_text.append(k)
            ids.append(str(rec["id"]))
        values = np.array(flat, dtype=np.int32)
        offs = np.array(offsets, dtype=np.int64)
        lens = np.diff(offs)
        within = np.arange(len(values)) - np.repeat(offs[:-1], lens)
        labels = np.where(within < np.repeat(np.array(source_len, np.int64), lens), IGNORE, values)
        return Encoded(split, ids, values, labels.astype(np.int32), offs, np.array(source_len, np.int32),
                       np.array(kept_non_text, np.int32), dropped, truncated)

    def _conversations(self, job: tuple[str, str, int, list[str]]) -> Encoded:
        """A chat task's records: each conversation in the chat template, the loss on every
        assistant turn (``conversations.render``) and nothing else. The template closes each
        turn (ChatML's ``<|im_end|>``), so no EOS is appended. Too long: whole earliest
        exchanges (a user turn and its answer) go first, the system prompt stays and the last
        exchange, whose answer evaluate scores, is never cut; if that alone does not fit, the
        conversation is dropped."""
        split, path, first_line, lines = job
        flat: list[int] = []
        labels: list[int] = []
        offsets, source_len, ids, dropped, truncated = [0], [], [], [], []
        for n, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            record = _record(path, n, line)
            try:
                turns = self.fmt.turns(record)  # checked, with the task's system prompt where it has none
            except StageError as exc:
                raise StageError(f"{path}:{n}: {exc}") from None
            system, body = (turns[:1], turns[1:]) if turns[0]["role"] == "system" else ([], turns)
            tokens, mask = self._render_masked(turns)
            before, reason = len(tokens), None
            while len(tokens) > self.cfg.max_length:
                if self.cfg.truncation == "drop":
                    tokens, reason = None, "too_long"
                    break
                if len(body) <= 2:  # only the scored exchange is left
                    tokens, reason = None, "target_too_long"
                    break
                body, reason = body[2:], "turns"
                tokens, mask = self._render_masked(system + body)
            if tokens is None:
                dropped.append({"id": record["id"], "split": split, "reason": reason, "record": record})
                continue
            if reason:
                truncated.append({"id": record["id"], "split": split, "reason": reason, "tokens_before": before,
                                  "tokens_after": len(tokens)})
            flat += tokens
            labels += [t if m else IGNORE for t, m in zip(tokens, mask)]
            offsets.append(len(flat))
            source_len.append(mask.index(True))
            ids.append(str(record["id"]))
        return Encoded(split, ids, np.array(flat, np.int32), np.array(labels, np.int32), np.array(offsets, np.int64),
                       np.array(source_len, np.int32), np.zeros(len(ids), np.int32), dropped, truncated)

    def _render_masked(self, turns: list[dict]) -> tuple[list[int], list[bool]]:
        """A conversation's token ids, and for each whether it belongs to an assistant turn (where it starts)."""
        text, spans = conversations.render(self.fmt.tokenizer, turns)
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]

    def _fit(self, prompt: str, demos: list[Demo], room: int) -> tuple[list[int] | None, str]:
        """A shorter source that fits ``room`` tokens, and why; (None, reason) to drop."""
        if room < 1:
            return None, "target_too_long"
        if self.cfg.truncation == "drop":
            return None, "too_long"
        for j in range(1, len(demos) + 1):  # the demonstrations farthest from the prompt go first
            ids = self.encode([self.fmt.source(prompt, demos[j:])])[0]
            if len(ids) <= room:
                return ids, "demonstrations"
        before, body, after = self.encode(list(self.fmt.split_source(prompt)))
        keep = room - len(before) - len(after)
        if keep < 1:  # the chat markup and the target leave no room for any of the prompt
            return None, "target_too_long"
        return before + body[len(body) - keep:] + after, "source"


class Packer:
    """First-fit packing into rows of at most ``max_length`` tokens, streaming: at most
    ``OPEN_ROWS`` rows are open; an example that fits none closes the fullest."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.open: list[list] = []  # [tokens used, [(id, input_ids, labels), ...]]

    def add(self, enc: Encoded) -> Iterator[pa.RecordBatch]:
        done = []
        for i, ex_id in enumerate(enc.ids):
            a, b = enc.offsets[i], enc.offsets[i + 1]
            n = int(b - a)
            k = next((k for k, row in enumerate(self.open) if row[0] + n <= self.max_length), None)
            if k is None:
                if len(self.open) == OPEN_ROWS:
                    done.append(self.open.pop(max(range(OPEN_ROWS), key=lambda j: self.open[j][0])))
                self.open.append([0, []])
                k = len(self.open) - 1
            row = self.open[k]
            row[0] += n
            row[1].append((ex_id, enc.input_ids[a:b], enc.labels[a:b]))
            if row[0] == self.max_length:
                done.append(self.open.pop(k))
        if done:
            yield self._batch(done)

    def close(self) -> Iterator[pa.RecordBatch]:
        if self.open:
            yield self._batch(self.open)
        self.open = []

    @staticmethod
    def _batch(rows: list[list]) -> pa.RecordBatch:
        examples = [ex for _, exs in rows for ex in exs]
        lens = np.array([len(ex[1]) for ex in examples], np.int64)
        offsets = np.concatenate([[0], np.cumsum([used for used, _ in rows])])
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        positions = np.arange(int(lens.sum())) - starts
        seq_lens = pa.array([[len(ex[1]) for ex in exs] for _, exs in rows], pa.list_(pa.int32()))
        return pa.RecordBatch.from_arrays(
            [pa.array([[ex[0] for ex in exs] for _, exs in rows], pa.list_(pa.string())),
             _lists(offsets, np.concatenate([ex[1] for ex in examples])),
             _lists(offsets, np.concatenate([ex[2] for ex in examples])),
             _lists(offsets, positions), seq_lens], schema=PACKED_SCHEMA)


def percentiles(hist: np.ndarray) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max from a histogram of lengths (exact, O(max_length))."""
    n = int(hist.sum())
    if not n:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    cum = np.cumsum(hist)
    rank = {f"p{q}": int(np.searchsorted(cum, math.ceil(q / 100 * n))) for q in (50, 90, 99)}
    return {**rank, "max": int(np.flatnonzero(hist)[-1])}


class _Split:
    """One split's shard writer, packer and length histogram."""

    def __init__(self, out: Path, cfg: TokenizeConfig, packed: bool):
        self.packer = Packer(cfg.max_length) if packed else None
        self.writer = ShardWriter(out, PACKED_SCHEMA if packed else SCHEMA, cfg.shard_rows)
        self.hist = np.zeros(cfg.max_length + 1, np.int64)
        self.examples = 0

    def add(self, enc: Encoded) -> None:
        self.hist += np.bincount(enc.lengths, minlength=len(self.hist))
        self.examples += len(enc.ids)
        for batch in self.packer.add(enc) if self.packer else [enc.record_batch()]:
            self.writer.write(batch)

    def close(self) -> dict:
        for batch in self.packer.close() if self.packer else []:
            self.writer.write(batch)
        shards = self.writer.close()
        return {"examples": self.examples, "rows": sum(s["rows"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards), "packed": self.packer is not None,
                "length": percentiles(self.hist), "shards": shards}


class _Checks:
    """The GX ``shards`` suite over per-example aggregates, ``validation.CHUNK_ROWS`` at a time."""

    def __init__(self, params: dict, path: Path):
        self.params, self.path = params, path
        self.parts: list[pd.DataFrame] = []
        self.pending = self.rows = self.calls = 0
        self.summary = None

    def add(self, enc: Encoded) -> None:
        self.parts.append(pd.DataFrame({**enc.aggregates(), "split": enc.split}))
        self.pending += len(enc.ids)
        if self.pending >= validation.CHUNK_ROWS:
            self._run()

    def _run(self) -> None:
        frame = pd.concat(self.parts, ignore_index=True) if self.parts else pd.DataFrame()
        self.summary = validate("shards", frame, self.params, self.path)  # raises on failure
        self.rows += len(frame)
        self.calls += 1
        self.parts, self.pending = [], 0

    def close(self) -> None:
        if self.pending or not self.calls:
            self._run()
        write_json(self.path, {**asdict(self.summary), "rows": self.rows, "batches": self.calls,
                               "parameters": self.params})


def _jobs(sources: dict[str, Path]) -> Iterator[tuple[str, str, int, list[str]]]:
    for split, path in sources.items():
        with open(path, encoding="utf-8") as f:
            lines: list[str] = []
            first = 1
            for n, line in enumerate(f, 1):
                lines.append(line)
                if len(lines) == CHUNK:
                    yield split, str(path), first, lines
                    lines, first = [], n + 1
            if lines:
                yield split, str(path), first, lines


_WORKER: Encoder | None = None


def _start_worker(encoder: Encoder) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already; no nested threads
    _WORKER = encoder


def _work(job):
    return _WORKER(job)


def _ordered(encoder: Encoder, jobs: Iterator, num_proc: int) -> Iterator[Encoded]:
    """``map(encoder, jobs)`` over ``num_proc`` processes, in input order, 2 x num_proc in flight."""
    if num_proc == 1:
        yield from map(encoder, jobs)
        return
    # fork: workers inherit the loaded tokenizer and templates instead of re-importing them.
    with mp.get_context("fork").Pool(num_proc, initializer=_start_worker, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(_work, (job,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def demo_pool(fmt: PromptFormat, train: Path, cfg: TokenizeConfig) -> tuple[list[Demo], dict[str, int]]:
    """``DEMO_POOL`` train records by seeded reservoir sampling (one streaming pass), and each
    one's ``non_text`` count (see ``PromptFormat.example``)."""
    rng = random.Random(cfg.seed)
    pool: list[tuple[int, str]] = []  # (line number, line)
    with open(train, encoding="utf-8") as f:
        for n, numbered in enumerate((k, line) for k, line in enumerate(f, 1) if line.strip()):
            if n < DEMO_POOL:
                pool.append(numbered)
            elif (j := rng.randrange(n + 1)) < DEMO_POOL:
                pool[j] = numbered
    demos, non_text = [], {}
    for n, line in pool:
        record, prompt, target, k = rendered(fmt, str(train), n, line)
        demos.append(Demo(str(record["id"]), str(record.get("group", record["id"])), prompt, target))
        non_text[demos[-1].id] = k
    if len({d.group for d in demos}) <= cfg.few_shot:
        raise StageError(f"params.yaml: tokenize.few_shot={cfg.few_shot}: {train} offers "
                         f"{len({d.group for d in demos})} groups to draw from; each example needs "
                         f"{cfg.few_shot} from groups other than its own. Lower few_shot")
    return demos, non_text


def run(cfg: TokenizeConfig, task: Task, clean: Path, base: Path, out: Path) -> TokenizeStats:
    t0 = time.perf_counter()
    sources = {split: Path(clean) / f"{split}.jsonl" for split in SPLITS}
    for path in sources.values():
        if not path.is_file():
            raise StageError(f"{path}: missing; run the clean stage first")
    tok = load_tokenizer(base)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise StageError(f"{base}: tokenize needs a fast (Rust) tokenizer; this one is {type(tok).__name__}")
    if tok.eos_token_id is None:
        raise StageError(f"{base}: the tokenizer has no end-of-sequence token; targets need one")
    # Token ids must index the model's embedding matrix, not merely the tokenizer's
    # vocabulary: a tokenizer paired with the wrong model is caught here, by validation.
    model_vocab = load_config(base).vocab_size
    fmt = PromptFormat(task, tok, task.chat_template)
    if task.chat and cfg.few_shot:
        raise StageError(f"params.yaml: tokenize.few_shot={cfg.few_shot}: task {task.name!r} is a chat task, whose "
                         "conversations carry their own context; set few_shot to 0")
    pool, pool_non_text = demo_pool(fmt, sources["train"], cfg) if cfg.few_shot else ([], {})
    encoder = Encoder(fmt, tok, cfg, pool, pool_non_text)
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    truncated, dropped = Counter(), Counter()

    with atomic_dir(out) as staging:
        splits = {s: _Split(staging / s, cfg, packed=cfg.pack and s == "train") for s in SPLITS}
        checks = _Checks({"max_length": cfg.max_length, "vocab_size": model_vocab}, staging / "validation.json")
        with open(staging / "dropped.jsonl", "w", encoding="utf-8") as dropped_f, \
                open(staging / "truncated.jsonl", "w", encoding="utf-8") as truncated_f, \
                contextlib.closing(_ordered(encoder, _jobs(sources), num_proc)) as chunks:
            for enc in chunks:
                for row in enc.dropped:
                    dropped[row["reason"]] += 1
                    dropped_f.write(json.dumps(row, ensure_ascii=False) + "\n")
                for row in enc.truncated:
                    truncated[row["reason"]] += 1
                    truncated_f.write(json.dumps(row, ensure_ascii=False) + "\n")
                checks.add(enc)
                splits[enc.split].add(enc)
        info = {s: split.close() for s, split in splits.items()}
        checks.close()
        if pool:  # what few-shot sources were drawn from, for audit and for evaluation prompts
            with open(staging / "demonstrations.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in pool)
        manifest = {
            "format": FORMAT,
            "task": task.name,
            "task_declaration": task.declaration(),  # the adapter keeps its task wherever it goes
            "tokenizer": {"path": str(base), "sha256": tokenizer_fingerprint(base), "vocab_size": len(tok),
                          "model_vocab_size": model_vocab, "eos_token_id": tok.eos_token_id,
                          "pad_token_id": tok.pad_token_id},
            "template_sha256": fmt.hash,
            "max_length": cfg.max_length,
            "packed": cfg.pack,
            # chat_template: the declaration's switch, where evaluate and the server read how the text was shaped
            "params": {**{k: getattr(cfg, k) for k in OUTPUT_PARAMS}, "chat_template": fmt.chat},
            "splits": info,
            "stats": {"truncated": dict(sorted(truncated.items())), "dropped": dict(sorted(dropped.items()))},
            "files": {p.name: file_entry(p) for p in sorted(staging.iterdir()) if p.is_file()},
        }
        write_json(staging / "manifest.json", manifest)  # last: its presence means the rest is complete

    seconds = time.perf_counter() - t0
    total = sum(i["tokens"] for i in info.values())
    train = info["train"]
    stats = TokenizeStats(
        examples={s: i["examples"] for s, i in info.items()}, rows={s: i["rows"] for s, i in info.items()},
        tokens={s: i["tokens"] for s, i in info.items()}, truncated=dict(truncated), dropped=dict(dropped),
        length={s: i["length"] for s, i in info.items()},
        packing_efficiency=round(train["tokens"] / (train["rows"] * cfg.max_length), 4)
        if cfg.pack and train["rows"] else None,
        seconds=round(seconds, 2), tokens_per_s=round(total / seconds, 1))
    log.info("tokenize: %s examples (%s), %s tokens in %.1f s (%.0f tokens/s, %d processes); truncated %s, "
             "dropped %s; train lengths p50 %s, p99 %s, max %s -> %s", f"{sum(stats.examples.values()):,}",
             ", ".join(f"{s} {n:,}" for s, n in stats.examples.items()), f"{total:,}", stats.seconds,
             stats.tokens_per_s, num_proc, stats.truncated or "none", stats.dropped or "none",
             *(stats.length["train"][q] for q in ("p50", "p99", "max")), out)
    return stats
