"""What one decode step of the base model costs at each batch size: the ceiling any
batching scheme works under on this machine.

A step feeds one token per row over a KV cache of ``--context`` entries (the length of an
E2E prompt and half an answer) through the plain transformers forward: no engine, no
adapter, no HTTP. Tokens/s at batch ``b`` is ``b`` over the step's time; the ratio column
is that against batch 1. Where the time of a step hardly grows with the batch (a GPU,
memory- or launch-bound), one mixed batch over many adapters beats a batch per adapter by
about the number of adapters; where it grows in proportion (compute-bound), batching in
any arrangement gains little over the largest batch a single adapter fills.

usage: python benchmarks/decode_step.py [--project .] [--batches 1,4,8,13,16,32] [--context 90] [--steps 10]
           [--out benchmarks/results/decode_step.json]
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch


@torch.inference_mode()
def step_seconds(model, batch: int, context: int, steps: int) -> float:
    """Median seconds of one decode step at ``batch`` rows (after one untimed step)."""
    ids = torch.randint(100, 1000, (batch, context))
    cache = model(input_ids=ids, use_cache=True).past_key_values
    times = []
    for i in range(steps + 1):
        token = torch.randint(100, 1000, (batch, 1))
        mask = torch.ones(batch, context + i + 1, dtype=torch.long)
        start = time.perf_counter()
        model(input_ids=token, cache=cache, attention_mask=mask, use_cache=True,
              position_ids=torch.full((batch, 1), context + i))
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[steps // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".")
    ap.add_argument("--batches", default="1,4,8,13,16,32")
    ap.add_argument("--context", type=int, default=90)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/decode_step.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    base = Path(args.project).resolve() / "data/models/base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows, one = [], None
    for b in (int(x) for x in args.batches.split(",")):
        s = step_seconds(model, b, args.context, args.steps)
        one = one or b / s
        rows.append({"batch": b, "step_ms": round(1000 * s, 1), "tokens_per_s": round(b / s, 1),
                     "ratio_vs_batch_1": round((b / s) / one, 2)})
        print(f"batch {b:3d}: step {1000 * s:6.1f} ms, {b / s:6.1f} tokens/s ({(b / s) / one:.2f}x batch 1)", flush=True)
    record = {"date": date.today().isoformat(), "device": "cpu", "torch_threads": torch.get_num_threads(),
              "load_average_before": load, "context": args.context, "steps": rows}
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
