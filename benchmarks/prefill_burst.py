"""Running rows while a burst of long prompts prefills: the engine's per-step prefill budget
against prefilling everything admitted in the step it is admitted (the engine before it).

``--running`` requests with 1-shot E2E prompts decode; once every one has its first tokens,
``--burst`` k-shot prompts (``--shots`` demonstrations, ~1,100 tokens at 15) arrive at once.
Reported per side: the running rows' longest wait between two of their tokens during the
burst (what a streaming client sees as a stall) and its 99th percentile over the whole run,
the burst's time to first token (p50, max), and generated tokens/s over the whole run. The
reference is the same engine with ``_prefill_some`` looping until nothing admitted is left,
which is what a step did before the budget. Same rows, batch and greedy settings; the
answers are compared token for token. Each side runs twice, alternating; the second is kept.

usage: python benchmarks/prefill_burst.py [--model data/models/base] [--running 8] [--burst 16]
           [--shots 15] [--csv data/sources/e2e/devel-fixed.no-ol.csv]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from long_prompts import AllAtOnce, prompts
from serving.engine import BASE, Engine
from serving.types import Decoding, Finished, Request, Token


def run(engine: Engine, running: list, burst: list, running_tokens: int, burst_tokens: int) -> dict:
    times: dict[int, list[float]] = {}
    answers: dict[int, tuple] = {}

    def on_event(i: int):
        def record(e) -> None:
            if isinstance(e, Token):
                times[i].append(time.perf_counter())
            elif isinstance(e, Finished):
                answers[i] = e.token_ids
        return record

    t0 = time.perf_counter()
    for i, ids in enumerate(running):
        times[i] = []
        engine.submit(Request(BASE, ids, Decoding(max_tokens=running_tokens)), on_event(i))
    while any(len(times[i]) < 2 for i in range(len(running))):
        engine.step()
    arrival = time.perf_counter()
    for j, ids in enumerate(burst, start=len(running)):
        times[j] = []
        engine.submit(Request(BASE, ids, Decoding(max_tokens=burst_tokens)), on_event(j))
    while engine.step():
        pass
    end = time.perf_counter()
    burst_done = max(times[j][0] for j in range(len(running), len(running) + len(burst)))
    gaps, burst_gaps = [], []
    for i in range(len(running)):
        for t1, t2 in zip(times[i], times[i][1:]):
            gaps.append(t2 - t1)
            if t2 > arrival and t1 < burst_done:  # a wait that overlaps the burst's prefills
                burst_gaps.append(t2 - t1)
    ttft = [times[j][0] - arrival for j in range(len(running), len(running) + len(burst))]
    tokens = sum(map(len, times.values()))
    return {"answers": [answers[i] for i in range(len(times))], "record": {
        "wall_s": round(end - t0, 2), "tokens": tokens, "tokens_per_s": round(tokens / (end - t0), 1),
        "running_max_gap_during_burst_s": round(max(burst_gaps), 2),
        "running_p99_gap_s": round(statistics.quantiles(gaps, n=100)[98], 2),
        "running_median_gap_ms": round(1000 * statistics.median(gaps)),
        "burst_ttft_p50_s": round(statistics.median(ttft), 2), "burst_ttft_max_s": round(max(ttft), 2),
        "burst_prefilled_s": round(burst_done - arrival, 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/models/base")
    ap.add_argument("--running", type=int, default=8)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--shots", type=int, default=15)
    ap.add_argument("--running-tokens", type=int, default=160)
    ap.add_argument("--burst-tokens", type=int, default=32)
    ap.add_argument("--csv", default="data/sources/e2e/devel-fixed.no-ol.csv")
    ap.add_argument("--out", default="benchmarks/results/prefill_burst.json")
    args = ap.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    batch = args.running + args.burst
    budgeted = Engine(Path(args.model), max_batch=batch, device="cpu", dtype=torch.float32)
    reference = AllAtOnce(Path(args.model), max_batch=batch, device="cpu", dtype=torch.float32)
    encode = budgeted.encode
    running = [encode(t) for t in prompts(args.csv, args.running, 1)]
    burst = [encode(t) for t in prompts(args.csv, args.burst, args.shots)]
    for e in (budgeted, reference):  # warm-up, on neither side's clock
        e.generate([Request(BASE, burst[0][-50:], Decoding(max_tokens=4))])

    sides = {}
    for name, engine in (("budget", budgeted), ("all_at_once", reference)) * 2:
        sides[name] = run(engine, running, burst, args.running_tokens, args.burst_tokens)
        print(name, json.dumps(sides[name]["record"]), flush=True)
    ours, theirs = sides["budget"], sides["all_at_once"]
    record = {
        "date": date.today().isoformat(), "device": "cpu", "torch_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)), "load_average_before": load, "model": args.model,
        "running": args.running, "burst": args.burst, "shots": args.shots,
        "running_prompt_tokens_mean": round(sum(map(len, running)) / len(running)),
        "burst_prompt_tokens_mean": round(sum(map(len, burst)) / len(burst)),
        "running_tokens": args.running_tokens, "burst_tokens": args.burst_tokens,
        "prefill_tokens": budgeted.prefill_tokens,
        "budget": ours["record"], "all_at_once": theirs["record"],
        "identical_answers": sum(a == b for a, b in zip(ours["answers"], theirs["answers"])),
        "answers": len(ours["answers"]),
    }
    record["ratio_max_gap"] = round(theirs["record"]["running_max_gap_during_burst_s"]
                                    / ours["record"]["running_max_gap_during_burst_s"], 2)
    record["ratio_tokens_per_s"] = round(ours["record"]["tokens_per_s"] / theirs["record"]["tokens_per_s"], 2)
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
