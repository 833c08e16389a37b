"""Generation throughput of the evaluate stage: the serving engine's continuous batch
(``pipelines.scoring.generate``, left-padded rows sharing one KV cache) against one
``model.generate()`` call per example, on the same E2E rows, the same model and the same
greedy settings.

Tokens/s counts generated tokens (an end-of-sequence token included), over the wall time
of all rows; both sides count the same way.
CPU time (user + sys of this process, all threads) is reported beside wall time, since on
a shared machine wall time measures the neighbours too. The texts of the two runs are
compared: batching must not change what is generated (float reductions over padded
batches may flip a rare near-tie, reported as the share of identical outputs).

usage: python benchmarks/generate_speed.py MODEL_DIR [--rows 48] [--batch 16] [--max-new-tokens 40]
           [--csv data/sources/e2e/devel-fixed.no-ol.csv] [--threads N]
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch

from pipelines.config import EvaluateConfig
from pipelines.scoring import first_line, generate
from pipelines.prompts import render_prompt
from pipelines.tasks import get_task
from serving.engine import BASE, Engine


def rows(path: str, n: int) -> list[dict]:
    """The first ``n`` distinct meaning representations of the E2E file."""
    seen: dict[str, dict] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            seen.setdefault(r["mr"], {"mr": r["mr"], "ref": r["ref"]})
            if len(seen) == n:
                break
    return list(seen.values())


def clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--csv", default="data/sources/e2e/devel-fixed.no-ol.csv")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared CPU, "
                    "where spinning OpenMP threads of several processes slow each other down many times")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    engine = Engine(args.model, max_batch=args.batch, device="cpu")
    task = get_task("e2e")
    prompts = [render_prompt(task, r) for r in rows(args.csv, args.rows)]
    cfg = EvaluateConfig(batch_size=args.batch, max_new_tokens=args.max_new_tokens)
    generate(engine, BASE, prompts[:2], cfg)  # warm-up: first-call allocations on neither side's clock

    (batched, b_tokens), b_wall, b_cpu = clock(lambda: generate(engine, BASE, prompts, cfg))
    print(f"batched: {b_tokens} tokens in {b_wall:.1f} s", flush=True)

    @torch.no_grad()
    def one_at_a_time():
        texts, tokens = [], 0
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            cont = out[0, enc.input_ids.shape[1]:]
            tokens += cont.shape[0]  # one row: generate stops at its EOS, nothing is padding
            texts.append(first_line(tok.decode(cont, skip_special_tokens=True)))
        return texts, tokens

    (single, s_tokens), s_wall, s_cpu = clock(one_at_a_time)
    same = sum(a == b for a, b in zip(batched, single)) / len(prompts)
    print(f"model {args.model}, {len(prompts)} E2E rows, greedy, max_new_tokens {args.max_new_tokens}, "
          f"torch threads {torch.get_num_threads()}, cores {len(os.sched_getaffinity(0))}")
    print("| decoding | generated tokens | wall s | tokens/s | CPU s | tokens per CPU s |")
    print("|---|---|---|---|---|---|")
    print(f"| one `generate()` per row | {s_tokens} | {s_wall:.1f} | {s_tokens / s_wall:.1f} | {s_cpu:.1f} | "
          f"{s_tokens / s_cpu:.1f} |")
    print(f"| engine, continuous batch of {args.batch} | {b_tokens} | {b_wall:.1f} | {b_tokens / b_wall:.1f} | "
          f"{b_cpu:.1f} | {b_tokens / b_cpu:.1f} |")
    print(f"speed-up (tokens/s, wall): {(b_tokens / b_wall) / (s_tokens / s_wall):.2f}x; "
          f"per CPU second: {(b_tokens / b_cpu) / (s_tokens / s_cpu):.2f}x; identical outputs: {same:.0%}")


if __name__ == "__main__":
    main()
