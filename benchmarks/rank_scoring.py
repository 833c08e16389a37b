"""Rank scoring (classification tasks) through the engine, against plain forward passes.

Since 2026-12-07 `evaluate` and `baselines` rank a classification task's labels with
``Engine.score`` (left-padded prefills keeping every position's logits, the path a served
completion's ``echo`` takes). Before, they ran the model's forward over right-padded batches
of (prompt, option) pairs; that path is kept here as the reference (``forward_scores``),
measured in the same run on the same rows: the scores' largest difference, the picks that
agree, accuracy, and the wall time of each.

usage: python benchmarks/rank_scoring.py [--base data/models/base] [--rows 300] [--batch 16]
Rows: SST-2's dev split (data/sources/sst2/dev.tsv) with the sst2 task's zero-shot prompt.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from pipelines import scoring
from pipelines.base_model import load_model, load_tokenizer
from pipelines.baselines import HardPrompts
from pipelines.tasks import get_task
from serving.engine import BASE, Engine
from serve_setup import ROOT, load_average


@torch.no_grad()
def forward_scores(model, tok, prompts: list[str], options: list[str], batch: int) -> torch.Tensor:
    """The pre-engine rank scoring: right-padded (prompt + option) rows, one forward a batch."""
    scores = torch.empty(len(prompts), len(options))
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        p_ids = [tok(prompts[i], add_special_tokens=False).input_ids for i, _ in chunk]
        o_ids = [tok(options[j], add_special_tokens=False).input_ids for _, j in chunk]
        n = max(len(p) + len(o) for p, o in zip(p_ids, o_ids))
        ids = torch.full((len(chunk), n), tok.pad_token_id)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for k, (p, o) in enumerate(zip(p_ids, o_ids)):
            ids[k, :len(p) + len(o)] = torch.tensor(p + o)
            mask[k, :len(p) + len(o)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for k, ((i, j), p, o) in enumerate(zip(chunk, p_ids, o_ids)):
            scores[i, j] = logp[k, torch.arange(len(p) - 1, len(p) + len(o) - 1), torch.tensor(o)].sum()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="data/models/base")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    task = get_task("sst2", ROOT / "tasks")
    with open(ROOT / "data/sources/sst2/dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:args.rows]
    tok = load_tokenizer(Path(args.base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [HardPrompts(task, tok, [], 0, 0).source(dict(r), 0) for r in rows]
    options = list(task.labels.values())
    load = load_average()

    model = load_model(Path(args.base), torch.float32).eval()
    t0 = time.perf_counter()
    reference = forward_scores(model, tok, prompts, options, args.batch)
    t_ref = time.perf_counter() - t0
    del model
    engine = Engine(Path(args.base), max_batch=args.batch, device="cpu", dtype=torch.float32, bounded_context=False)
    t0 = time.perf_counter()
    engine_scores = scoring.rank_scores(engine, BASE, prompts, options)
    t_engine = time.perf_counter() - t0
    engine.close()

    labels, gold = list(task.labels), [r["label"] for r in rows]

    def accuracy(s: torch.Tensor) -> float:
        return sum(labels[int(i)] == g for i, g in zip(s.argmax(1), gold)) / len(gold)

    tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) / len(prompts)
    print(f"{len(rows)} rows (~{tokens:.0f} prompt tokens), load before {load}: max |score difference| "
          f"{float((reference - engine_scores).abs().max()):.2e}; same picks "
          f"{int((reference.argmax(1) == engine_scores.argmax(1)).sum())}/{len(rows)}; accuracy forward "
          f"{accuracy(reference):.4f}, engine {accuracy(engine_scores):.4f}; wall forward {t_ref:.1f} s, engine "
          f"{t_engine:.1f} s ({t_ref / t_engine:.2f}x)")


if __name__ == "__main__":
    main()
