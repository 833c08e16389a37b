"""Decoding with long prompts: the serving engine (``pipelines.scoring.generate``, the path
``evaluate``, ``baselines`` and ``ptune serve`` share) against transformers' batched
``model.generate()`` over the same rows, batch size and greedy settings, decoding timed
apart from prefill.

Long prompts are where a decode step's cost is the KV cache more than the weights: k-shot E2E
prompts (``--shots`` demonstrations, each an ``Attributes: ... Description: ...`` pair from
other rows, before the row's own prompt) reach ~1,000 tokens at 15 shots, the length of the
1-shot Stack Exchange chat baseline. ``generate`` runs batches of ``--batch`` rows, longest
first, left-padded, over transformers' ``DynamicCache``; the engine admits the same rows
into one continuous batch of the same size. Generated tokens are counted as ids (an EOS
included) and compared token for token; CPU time is split into user and system time (memory
allocation shows up as system time: page faults on fresh buffers). Decoding is timed per step
apart from the first (the prefill; the engine prefills every row in its first step here,
``AllAtOnce``, as it did before its per-step prefill budget, which
``benchmarks/prefill_burst.py`` measures): the engine's steps, marked in this thread, and
``generate``'s forwards, marked by a logits processor; with one batch of rows that do not stop
early (k-shot prompts run on to ``--max-new-tokens``), every step decodes every row. Each side
runs twice, alternating; the second run of each is reported.

usage: python benchmarks/long_prompts.py [--model data/models/base] [--rows 16] [--batch 16]
           [--shots 15] [--max-new-tokens 64] [--csv data/sources/e2e/devel-fixed.no-ol.csv]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from pipelines.prompts import render_prompt
from pipelines.tasks import get_task
from serving.engine import BASE, Engine
from serving.types import Decoding, Finished, Request


class AllAtOnce(Engine):
    """The engine, every admitted request prefilled in the step that admits it (in forwards of
    at most ``prefill_tokens``), as before the per-step prefill budget: here so that the first
    step is the whole prefill and every later step decodes every row."""

    def _prefill_some(self):
        done = []
        while self._prefilling:
            done += super()._prefill_some()
        return done


def prompts(path: str, rows: int, shots: int) -> list[str]:
    """``rows`` k-shot prompts: each distinct meaning representation after ``shots`` others with a reference."""
    task, seen = get_task("e2e"), {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            seen.setdefault(r["mr"], {"mr": r["mr"], "ref": r["ref"]})
            if len(seen) == rows + shots:
                break
    records = list(seen.values())
    demos = [render_prompt(task, r) + " " + r["ref"] + "\n\n" for r in records[rows:]]
    # each row its own rotation of the demonstrations, so rows differ in more than their tail
    return ["".join(demos[i % shots:] + demos[:i % shots]) + render_prompt(task, r)
            for i, r in enumerate(records[:rows])]


def clock(fn):
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out = fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, {"wall_s": round(time.perf_counter() - t0, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
                 "sys_s": round(r1.ru_stime - r0.ru_stime, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/models/base")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shots", type=int, default=15)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--csv", default="data/sources/e2e/devel-fixed.no-ol.csv")
    ap.add_argument("--out", default="benchmarks/results/long_prompts.json")
    args = ap.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    engine = AllAtOnce(Path(args.model), max_batch=args.batch, device="cpu", dtype=torch.float32)
    tok, model = engine.tokenizer, engine._base.model
    texts = prompts(args.csv, args.rows, args.shots)
    ids = [engine.encode(t) for t in texts]
    engine.generate([Request(BASE, ids[0][-50:], Decoding(max_tokens=4))])  # warm-up, on neither side's clock

    rows = len(ids)
    greedy = Decoding(max_tokens=args.max_new_tokens, temperature=0.0)

    def served() -> tuple[list, list[float]]:
        """The engine's steps in this thread: the first prefills every row (all fit in one batch)."""
        done: dict[int, tuple] = {}
        for i, p in enumerate(ids):
            engine.submit(Request(BASE, p, greedy),
                          lambda e, i=i: isinstance(e, Finished) and done.update({i: e.token_ids}))
        marks = [time.perf_counter()]
        while engine.step():
            marks.append(time.perf_counter())
        return [done[i] for i in range(rows)], marks

    @torch.inference_mode()
    def batched() -> tuple[list, list[float]]:
        """One ``generate`` per batch; a logits processor marks the end of each forward."""
        out: dict[int, tuple] = {}
        marks = [time.perf_counter()]

        def mark(input_ids, scores):
            marks.append(time.perf_counter())
            return scores

        order = sorted(range(rows), key=lambda i: -len(ids[i]))
        for at in range(0, rows, args.batch):
            part = order[at:at + args.batch]
            width = max(len(ids[i]) for i in part)
            x = torch.full((len(part), width), tok.pad_token_id)
            mask = torch.zeros_like(x)
            for row, i in enumerate(part):
                x[row, width - len(ids[i]):], mask[row, width - len(ids[i]):] = torch.tensor(ids[i]), 1
            gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=engine.eos,
                                 logits_processor=LogitsProcessorList([mark]))
            for row, i in enumerate(part):
                seq = gen[row, width:].tolist()
                ends = [k for k, t in enumerate(seq) if t in engine.eos]
                out[i] = tuple(seq[:ends[0] + 1] if ends else seq)
        return [out[i] for i in range(rows)], marks

    sides = {}
    for name, fn in (("engine", served), ("generate", batched)) * 2:  # the second of each is kept:
        (outputs, marks), times = clock(fn)  # the first pays the allocator's first touch of memory
        tokens = sum(map(len, outputs))
        # the decode steps: after the first step (engine: prefill, first pick, one step; generate:
        # prefill and first pick), each row one token per step while every row runs (no EOS here)
        decode_s, steps = marks[-1] - marks[1], len(marks) - 2
        sides[name] = {"outputs": outputs, "record": {
            "tokens": tokens, **times, "tokens_per_s": round(tokens / times["wall_s"], 1),
            "first_step_s": round(marks[1] - marks[0], 2), "decode_steps": steps,
            "decode_step_ms": round(1000 * decode_s / steps, 1)}}
    engine.close()
    ours, theirs = sides["engine"]["outputs"], sides["generate"]["outputs"]
    if args.batch < rows:
        print("note: more rows than one batch: the decode figures mix batches")
    record = {
        "date": date.today().isoformat(), "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)), "load_average_before": load, "model": args.model,
        "rows": len(ids), "batch": args.batch, "shots": args.shots, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids)), "prompt_tokens_max": max(map(len, ids)),
        "engine": sides["engine"]["record"], "generate": sides["generate"]["record"],
        "identical_outputs": sum(a == b for a, b in zip(ours, theirs)),
    }
    ours_r, theirs_r = record["engine"], record["generate"]
    record["ratio_vs_generate_tokens_per_s"] = round(ours_r["tokens_per_s"] / theirs_r["tokens_per_s"], 2)
    record["ratio_vs_generate_decode_step"] = round(theirs_r["decode_step_ms"] / ours_r["decode_step_ms"], 2)
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
