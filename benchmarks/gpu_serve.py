"""The serving engine on a GPU (or wherever it is run): generated tokens/s of 16 concurrent
clients over adapters of four methods plus the base, against (a) one request at a time,
one ``PeftModel`` per adapter, and (b) the requests grouped per adapter and batched per group,
both through the decoding ``evaluate`` used before the engine (``serve_throughput.old_decode``);
and evaluate's own case, one adapter over all rows at once (``Engine.generate``, stepped in
the caller's thread as ``evaluate`` steps it) at one or more ``max_batch`` sizes, against the
pre-engine decoding in batches of 16 (``evaluate.batch_size``), the same rows.

This is issue 19's measurement (``benchmarks/serve_throughput.py``) without the HTTP server
and the registry, so that it runs in one call on a lent GPU machine where neither the
trained checkpoint (it does not travel) nor the server's packages are: the engine is driven
in-process by one thread per client, each sending its requests one after another and
waiting for each answer, as the `openai` clients do against `ptune serve`. The base model
has random weights from ``CONFIG_DIR``'s config.json (seeded; throughput does not depend on
the values) and the adapters are untrained, built by the tune stage's factory with random
LoRA B, so every name answers differently. Greedy answers are compared request by request:
in bf16 a batch's shape can flip a near-tie (random weights make near-ties common), so the
counts are reported, not asserted.

Scoring: each name's answers to the first ``--score-rows`` inputs, generated with their
token log-probabilities, then scored whole as prompt + answer (``echo`` with ``logprobs``,
what lm-evaluation-harness' log-likelihood requests ask for): the two log-probabilities of
each answer token should agree up to the rounding of the two forwards' shapes (reported:
the largest difference, and the scored tokens/s).

Phases run in the order of what they tell (served; scoring; evaluate's case; (b); (a)), and the JSON
is rewritten after each (``"phases"`` says which ran), so a time limit keeps what was
measured. (a) runs on the first ``--alone`` requests only where asked (one request at a
time is the slow side: 128 requests of 64 tokens would take minutes on any device), and its
tokens/s and identical answers count those.

usage: python benchmarks/gpu_serve.py CONFIG_DIR [--clients 16] [--per-client 8] [--max-tokens 64]
           [--max-batch 16] [--alone N] [--generate-adapter prefix] [--generate-batches 16,64]
           [--device cuda] [--dtype bfloat16] [--out gpu_serve.json]
CONFIG_DIR holds a causal LM's config.json and tokenizer files (data/models/base has them).
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

from serve_setup import E2E_CSV, PREFIX_TEXTS, PROMPT_TEXTS, ROOT
from serve_throughput import figures, load_models, old_decode

METHODS = ["lora", "prompt", "ptuning", "prefix"]


def build(config_dir: Path, out: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A random-weight base in ``out/base`` and one untrained adapter per method -> name -> dir."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipelines.config import load_params
    from pipelines.methods import build_peft_config, init_prefix_from_text

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(config_dir)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=dtype).save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    tune = load_params(ROOT / "params.yaml").tune
    adapters = {}
    for i, method in enumerate(METHODS):
        updates = {"method": method}
        if method == "prompt":
            updates["prompt"] = tune.prompt.model_copy(update={"init": "text", "init_text": PROMPT_TEXTS[0]})
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        model = get_peft_model(base, build_peft_config(tune.model_copy(update=updates), out / "base"))
        if method == "prefix":
            init_prefix_from_text(model, tok, PREFIX_TEXTS[0])
        if method == "lora":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
        model.save_pretrained(out / method)
        adapters[method] = out / method
    return adapters


def build_in_child(config_dir: Path, out: Path, dtype: torch.dtype) -> dict[str, Path]:
    """``build`` in a child process, so that this one runs no torch work before the engine's thread.

    Why: with torch's OpenMP (libgomp), each thread that runs a parallel region keeps a team
    of workers, and once a process manages more such threads than it has CPUs, libgomp cuts
    their spinning to ~100 iterations: every parallel region then wakes its workers through
    the kernel. Building the models here, on the main thread, and stepping on the engine's
    made the engine 40% slower on 2 CPU cores (110.6 -> 67.2 tokens/s, 16 clients; the same
    as ``OMP_WAIT_POLICY=PASSIVE``), which this benchmark would have charged to the engine.
    On a GPU the CPU threads do little torch work, but the measurement stays the same there."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build, (config_dir, out, dtype))


def inputs(n: int) -> list[str]:
    """``n`` E2E prompts, as the adapters were trained on (the e2e task's template)."""
    from pipelines.prompts import render_prompt
    from pipelines.tasks import get_task

    task, seen = get_task("e2e"), {}
    with open(ROOT / E2E_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            seen.setdefault(row["mr"], row)  # the prompt renders the MR only; the reference rides along
            if len(seen) == n:
                break
    return [render_prompt(task, row) for row in seen.values()]


def drive(engine, jobs: list[list[tuple[str, str]]], max_tokens: int) -> tuple[list[dict], float]:
    """One thread per client, each request submitted after the last one answered."""
    from serving.types import Decoding, Finished, Token

    results, errors, lock = [], [], threading.Lock()

    def client(mine):
        for name, prompt in mine:
            first, done = [], {}
            start = time.perf_counter()

            def on_event(e, first=first, done=done):
                if isinstance(e, Token) and not first:
                    first.append(time.perf_counter())
                elif isinstance(e, Finished):
                    done["f"] = e

            from serving.types import Request

            h = engine.submit(Request(name, engine.encode(prompt), Decoding(max_tokens=max_tokens)), on_event)
            h.done.wait()
            end = time.perf_counter()
            f = done["f"]
            if f.reason not in ("stop", "length"):  # reported after the run, which then fails
                with lock:
                    errors.append(f"{name}: finished {f.reason}: {f.error}")
                continue
            with lock:
                results.append({"model": name, "prompt": prompt, "text": f.text, "tokens": f.completion_tokens,
                                "start": start, "end": end, "ttft": (first[0] if first else end) - start})

    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[:5]}")
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config_dir", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--alone", type=int, default=0, help="(a) on the first N requests only (0: all)")
    ap.add_argument("--score-rows", type=int, default=8, help="inputs per name in the scoring phase")
    ap.add_argument("--generate-adapter", default="prefix", choices=METHODS)
    ap.add_argument("--generate-batches", default="16,64", help="evaluate's case: the engine's max_batch sizes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--out", type=Path, default=Path("gpu_serve.json"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from serving.engine import BASE, Engine
    from serving.types import Decoding, Prompt, Request, Token

    record = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name()
              if args.device.startswith("cuda") else "cpu", "dtype": args.dtype, "config": str(args.config_dir),
              "weights": "random (seeded)", "clients": args.clients, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "phases": []}

    def done(phase: str, **fields) -> None:
        record.update(fields)
        record["phases"].append(phase)
        if args.device.startswith("cuda"):
            record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{phase}: {json.dumps(fields)}", flush=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="ptune-gpu-serve-") as tmp:
        tmp = Path(tmp)
        adapters = build_in_child(args.config_dir, tmp, dtype)
        names = [*adapters, BASE]
        texts = inputs(args.clients * args.per_client)
        jobs = [[(names[(c * args.per_client + j) % len(names)], texts[c * args.per_client + j])
                 for j in range(args.per_client)] for c in range(args.clients)]
        work = [job for client in jobs for job in client]

        engine = Engine(tmp / "base", max_batch=args.max_batch, device=args.device, dtype=dtype).start()
        for name, path in adapters.items():
            engine.add(name, path)
        drive(engine, [[(n, texts[0])] for n in names], 4)  # off the clock: first calls, allocations
        served, wall = drive(engine, jobs, args.max_tokens)
        engine.close()
        del engine
        s_tokens = sum(r["tokens"] for r in served)
        done("served", requests=len(served), adapters={n: n for n in adapters} | {BASE: "base"}, served={
            "tokens": s_tokens, "wall_s": round(wall, 2), "tokens_per_s": round(s_tokens / wall, 1)})

        # scoring: generated with logprobs, then prompt + answer scored whole (echo)
        engine = Engine(tmp / "base", max_batch=args.max_batch, device=args.device, dtype=dtype)
        for name, path in adapters.items():
            engine.add(name, path)

        def events(requests: list) -> list[list]:
            got = [[] for _ in requests]
            for r, mine in zip(requests, got):
                engine.submit(r, mine.append)
            while engine.step():
                pass
            return got

        pairs = [(n, engine.encode(p)) for n in names for p in texts[:args.score_rows]]
        made = events([Request(n, ids, Decoding(max_tokens=args.max_tokens, logprobs=0)) for n, ids in pairs])
        answers = [[e.logprob for e in got if isinstance(e, Token)] for got in made]
        whole = [Request(n, ids + tuple(lp.token_id for lp in a), Decoding(max_tokens=1, logprobs=0, prompt_logprobs=True))
                 for (n, ids), a in zip(pairs, answers)]
        sync()
        t0 = time.perf_counter()
        scored = events(whole)
        sync()
        sc_wall = time.perf_counter() - t0
        worst: dict[str, float] = {}
        for (n, ids), a, got in zip(pairs, answers, scored):
            (prompt,) = [e for e in got if isinstance(e, Prompt)]
            for lp, again in zip(a, prompt.logprobs[len(ids):]):
                worst[n] = max(worst.get(n, 0.0), abs(lp.logprob - again.logprob))
        engine.close()
        del engine
        sc_tokens = sum(len(r.prompt_ids) for r in whole)
        done("scoring", scoring={"requests": len(whole), "scored_tokens": sc_tokens, "wall_s": round(sc_wall, 3),
                                 "scored_tokens_per_s": round(sc_tokens / sc_wall, 1),
                                 "max_abs_logprob_difference": {n: float(f"{v:.3g}") for n, v in worst.items()}})

        # evaluate's case: one adapter, every row submitted at once, stepped in this thread
        gen_name, engine_runs = args.generate_adapter, []
        for size in [int(x) for x in args.generate_batches.split(",")]:
            engine = Engine(tmp / "base", max_batch=size, device=args.device, dtype=dtype)
            engine.add(gen_name, adapters[gen_name])
            requests = [Request(gen_name, engine.encode(p), Decoding(max_tokens=args.max_tokens)) for p in texts]
            engine.generate(requests[:2])  # off the clock
            t0 = time.perf_counter()
            outs = engine.generate(requests)
            g_wall = time.perf_counter() - t0
            engine.close()
            del engine
            engine_runs.append({"max_batch": size, "tokens": sum(o[0].completion_tokens for o in outs),
                                "wall_s": round(g_wall, 2), "texts": [o[0].text for o in outs]})

        models, tok, eos = load_models(tmp / "base", adapters, dtype, args.device)
        if dtype != torch.float32:  # a prompt encoder loads in float32 over a bf16 base: one dtype for generate
            models = {n: m.to(dtype) for n, m in models.items()}
        models[BASE] = models.pop("base")
        for n in names:
            old_decode(models[n], tok, [texts[0]], 2, eos)

        t0 = time.perf_counter()
        old = []
        order = sorted(texts, key=lambda p: -len(p))  # longest first, as evaluate batched before the engine
        for i in range(0, len(order), 16):
            old += old_decode(models[gen_name], tok, order[i:i + 16], args.max_tokens, eos)
        sync()
        o_wall = time.perf_counter() - t0
        old_text = dict(zip(order, (t for t, _ in old)))
        o_tokens = sum(k for _, k in old)
        done("evaluate", generate={
            "adapter": gen_name, "rows": len(texts),
            "before_engine": {"batch": 16, "tokens": o_tokens, "wall_s": round(o_wall, 2),
                              "tokens_per_s": round(o_tokens / o_wall, 1)},
            "engine": [{"max_batch": r["max_batch"], "tokens": r["tokens"], "wall_s": r["wall_s"],
                        "tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
                        "ratio_vs_before_engine": round(r["tokens"] / r["wall_s"] / (o_tokens / o_wall), 2),
                        "identical": f"{sum(t == old_text[p] for p, t in zip(texts, r['texts']))}/{len(texts)}"}
                       for r in engine_runs]})

        t0 = time.perf_counter()
        grouped = {}
        for n in names:
            mine = sorted((p for m, p in work if m == n), key=lambda p: -len(p))
            for i in range(0, len(mine), args.max_batch):
                chunk = mine[i:i + args.max_batch]
                answers = old_decode(models[n], tok, chunk, args.max_tokens, eos)
                grouped.update({(n, p): a for p, a in zip(chunk, answers)})
        sync()
        b_wall = time.perf_counter() - t0
        b_tokens = sum(t for _, t in grouped.values())
        same_b = sum(r["text"] == grouped[(r["model"], r["prompt"])][0] for r in served)
        done("per_adapter_batching", per_adapter_batching={
            "tokens": b_tokens, "wall_s": round(b_wall, 2), "tokens_per_s": round(b_tokens / b_wall, 1)})

        subset = work[:args.alone] if args.alone else work
        t0 = time.perf_counter()
        alone = {(n, p): old_decode(models[n], tok, [p], args.max_tokens, eos)[0] for n, p in subset}
        sync()
        a_wall = time.perf_counter() - t0
    a_tokens = sum(t for _, t in alone.values())
    same_a = sum(r["text"] == alone[(r["model"], r["prompt"])][0] for r in served if (r["model"], r["prompt"]) in alone)
    done("one_at_a_time", one_at_a_time_requests=len(alone),
         **figures(served, wall, (a_tokens, a_wall, same_a), (b_tokens, b_wall, same_b), len(alone)))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
