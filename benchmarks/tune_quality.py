"""Task quality of one tune method on SST-2, next to the zero-shot hand prompt, on the same rows.

Builds a small clean SST-2 set (a seeded sample of GLUE train, 64 validation rows, the GLUE
dev set as test), runs the project's own tokenize, tune and evaluate stage functions on it
and prints one table row: trainable / saved parameters, training time, tokens/s, dev
accuracy of the tuned adapter and of the zero-shot prompt (rank scoring, same rows).

usage: python benchmarks/tune_quality.py BASE_DIR SST2_DIR WORK_DIR [--method prompt] [--train 1280]
           [--set prompt.learning_rate=3e-2 --set prompt.init=labels ...] [--rows 300]
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_clean(sst2: Path, out: Path, n_train: int, seed: int) -> None:
    def read(name):
        with open(sst2 / name, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    train = read("train.tsv")
    random.Random(seed).shuffle(train)
    splits = {"train": train[:n_train], "validation": train[n_train:n_train + 64], "test": read("dev.tsv")}
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps({"id": f"{split}:{i}", "source": "sst2", "location": f"sst2:{i}",
                                    "group": r["sentence"], "split": split,
                                    "sentence": r["sentence"], "label": r["label"]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("sst2", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--method", default="prompt")
    ap.add_argument("--train", type=int, default=1280, help="train examples (one epoch unless --set epochs=)")
    ap.add_argument("--rows", type=int, default=300, help="dev rows scored (the zero-shot baseline's too)")
    ap.add_argument("--set", action="append", default=[], help="tune.<key>=<yaml value>, e.g. prompt.init=labels")
    args = ap.parse_args()

    import yaml

    from pipelines import evaluate, tokenize, tune
    from pipelines.common import setup_logging
    from pipelines.config import EvaluateConfig, TokenizeConfig, TuneConfig, load_params
    from pipelines.tasks import get_task

    setup_logging()
    task = get_task("sst2")
    write_clean(args.sst2, args.work / "clean", args.train, seed=0)
    tokenize.run(TokenizeConfig(max_length=128, shard_rows=2000, num_proc=1), task, args.work / "clean",
                 args.base, args.work / "shards")
    raw = load_params(ROOT / "params.yaml").tune.model_dump()
    raw.update(method=args.method, max_train_examples=args.train, eval_examples=64,
               checkpoint_dir=str(args.work / "ckpt"))
    for item in args.set:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = yaml.safe_load(value)
    cfg = TuneConfig(**raw)
    t0 = time.time()
    stats = tune.run(cfg, args.work / "shards", args.base, args.work / "adapter", args.work / "live")
    metrics = evaluate.run(EvaluateConfig(max_rows=args.rows, batch_size=16, max_new_tokens=4), task,
                           args.work / "clean", args.base, args.work / "adapter", args.work / "eval")
    row = {"method": args.method, "settings": args.set, "recipe": cfg.recipe.model_dump(),
           "trainable": stats.trainable_parameters, "saved": stats.adapter_parameters,
           "train_examples": stats.train_examples, "steps": stats.steps, "train_seconds": stats.train_seconds,
           "tokens_per_s": stats.train_tokens_per_s, "eval_loss": stats.eval_loss,
           "tuned": metrics["tuned"], "zero_shot": metrics["zero_shot"], "rows": metrics["rows"],
           "wall_seconds": round(time.time() - t0, 1)}
    print("RESULT " + json.dumps(row))


if __name__ == "__main__":
    main()
