"""tokenize: render each record's prompt and target, tokenize with the base model's
tokenizer, mask the prompt out of the labels, and write checksummed Arrow shards.

Loss falls only on the target (and its end-of-sequence token). When an example is
longer than ``tokenize.max_length`` the policy decides: ``source`` keeps the target
whole and drops tokens from the *start* of the prompt (the cue just before the target
survives); ``drop`` removes the example. Either way it is counted in the metrics.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.common import StageError, atomic_dir, sha256_file, sha256_text, write_json
from pipelines.config import TokenizeConfig
from pipelines.prompts import render_prompt, render_target, template_hash
from pipelines.shards import write_shard
from pipelines.tasks import Task
from pipelines.validation import validate

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE = -100  # the label value torch's cross-entropy skips
BATCH = 1024  # records per fast-tokenizer call: large enough to amortize, small in memory


@dataclass
class TokenizeStats:
    examples: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped: int = 0
    length: dict[str, float] = field(default_factory=dict)  # p50/p90/p99/max over all splits


def tokenizer_fingerprint(tok) -> str:
    path = Path(tok.name_or_path) / "tokenizer.json"
    if path.is_file():
        return sha256_file(path)
    return sha256_text(json.dumps(sorted(tok.get_vocab().items())))


def encode_batch(task: Task, tok, records: list[dict], max_length: int, policy: str):
    """-> (rows for the shard, n truncated, dropped records)."""
    prompts = tok([render_prompt(task, r) for r in records], add_special_tokens=False).input_ids
    targets = tok([render_target(task, r) for r in records], add_special_tokens=False).input_ids
    rows = {"id": [], "input_ids": [], "labels": []}
    truncated, dropped = 0, []
    for rec, p, t in zip(records, prompts, targets):
        t = t + [tok.eos_token_id]
        if len(p) + len(t) > max_length:
            room = max_length - len(t)
            if policy == "drop" or room < 1:
                dropped.append(rec)
                continue
            p = p[len(p) - room:]
            truncated += 1
        rows["id"].append(rec["id"])
        rows["input_ids"].append(p + t)
        rows["labels"].append([IGNORE] * len(p) + t)
    return rows, truncated, dropped


def run(cfg: TokenizeConfig, task: Task, clean: Path, base: Path, out: Path) -> TokenizeStats:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    # Token ids must index the model's embedding matrix, not merely the tokenizer's
    # vocabulary: a tokenizer paired with the wrong model is caught here, by validation.
    model_vocab = AutoConfig.from_pretrained(base).vocab_size
    if tok.eos_token_id is None:
        raise StageError(f"{base}: the tokenizer has no end-of-sequence token; targets need one")
    stats = TokenizeStats()
    lengths: list[int] = []
    checks: list[pd.DataFrame] = []
    manifest = {
        "task": task.name,
        "tokenizer": {"path": str(base), "sha256": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                      "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                      "model_vocab_size": model_vocab},
        "template_sha256": template_hash(task),
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "splits": {},
    }
    with atomic_dir(out) as staging:
        dropped_f = open(staging / "dropped.jsonl", "w", encoding="utf-8")
        for split in SPLITS:
            (staging / split).mkdir()
            src = clean / f"{split}.jsonl"
            if not src.is_file():
                raise StageError(f"{src}: missing; run the clean stage first")
            with open(src, encoding="utf-8") as f:
                records = [json.loads(line) for line in f]
            shards, n_rows, n_tokens = [], 0, 0
            buffer = {"id": [], "input_ids": [], "labels": []}

            def flush():
                nonlocal buffer
                if buffer["id"]:
                    shards.append(write_shard(staging / split / f"shard-{len(shards):05d}.arrow", buffer))
                buffer = {"id": [], "input_ids": [], "labels": []}

            for i in range(0, len(records), BATCH):
                rows, truncated, dropped = encode_batch(task, tok, records[i:i + BATCH],
                                                        cfg.max_length, cfg.truncation)
                stats.truncated += truncated
                stats.dropped += len(dropped)
                for rec in dropped:
                    dropped_f.write(json.dumps({**rec, "reason": "too_long_for_max_length"},
                                               ensure_ascii=False) + "\n")
                lens = [len(x) for x in rows["input_ids"]]
                lengths += lens
                n_rows += len(lens)
                n_tokens += sum(lens)
                checks.append(pd.DataFrame({
                    "length": lens,
                    "min_id": [min(x) for x in rows["input_ids"]],
                    "max_id": [max(x) for x in rows["input_ids"]],
                    "label_tokens": [sum(1 for v in x if v != IGNORE) for x in rows["labels"]],
                    "source_tokens": [sum(1 for v in x if v == IGNORE) for x in rows["labels"]],
                    "split": split,
                }))
                for k in buffer:
                    buffer[k] += rows[k]
                while len(buffer["id"]) >= cfg.shard_rows:
                    rest = {k: v[cfg.shard_rows:] for k, v in buffer.items()}
                    buffer = {k: v[:cfg.shard_rows] for k, v in buffer.items()}
                    flush()
                    buffer = rest
            flush()
            manifest["splits"][split] = {"rows": n_rows, "tokens": n_tokens, "shards": shards}
            stats.examples[split], stats.tokens[split] = n_rows, n_tokens
        dropped_f.close()
        if lengths:
            q = np.percentile(lengths, [50, 90, 99])
            stats.length = {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                            "max": int(max(lengths))}
        manifest["stats"] = {"truncated": stats.truncated, "dropped": stats.dropped, "length": stats.length}
        write_json(staging / "manifest.json", manifest)
        validate("shards", pd.concat(checks, ignore_index=True) if checks else pd.DataFrame(),
                 {"max_length": cfg.max_length, "vocab_size": model_vocab}, staging / "validation.json")
    log.info("tokenize: %s examples, %s tokens, %d truncated, %d dropped, lengths %s",
             stats.examples, stats.tokens, stats.truncated, stats.dropped, stats.length)
    return stats
