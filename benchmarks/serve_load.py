"""A load test of `ptune serve` (loopback only, bounded in clients and time), and the
memory an adapter costs.

1. Memory: `ptune serve` over a registry of one adapter, then over one of eight (two each
   of LoRA, prompt tuning, P-tuning, prefix tuning), each after one request per adapter:
   the resident memory (VmRSS) of the second at most the first's + 50 MB.
2. Expected answers: each (adapter, input) pair of the test, asked alone, one at a time.
3. Load: 64 clients stream requests over the 8 adapters for 2 minutes, each asking for a
   pseudo-random pair and checking the answer against that pair's answer from step 2 (a
   response of another adapter or another request would differ: the adapters differ).
   No error, no mismatch; the server's RSS sampled every 2 s must stay flat.

usage: python benchmarks/serve_load.py [--project .] [--clients 64] [--seconds 120]
           [--max-tokens 24] [--out benchmarks/results/serve_load.json]
The project must have run `make run`. Figures go to benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from serve_setup import build_adapters, build_registry, load_average, mrs, rss_mb, serving

METHODS = ["lora", "prompt", "ptuning", "prefix"] * 2
INPUTS = 4  # inputs per adapter: 32 pairs


def ask(api, model: str, prompt: str, max_tokens: int) -> str:
    text = ""
    for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    return text


def client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def warm_rss(url: str, pid: int, names: list[str], prompt: str, max_tokens: int) -> float:
    api = client(url)
    for name in names:
        ask(api, name, prompt, max_tokens)
    time.sleep(1)
    return rss_mb(pid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()
    project = Path(args.project).resolve()
    base = project / "data/models/base"
    inputs = mrs(project, INPUTS)

    with tempfile.TemporaryDirectory(prefix="ptune-load-") as tmp:
        tmp = Path(tmp)
        adapters = build_adapters(project, tmp / "adapters", METHODS)
        names = list(adapters)
        first = names[0]
        build_registry(project, {first: adapters[first]}, tmp / "one")
        build_registry(project, adapters, tmp / "eight")

        with serving(tmp / "one", base, tmp / "one.log") as (url, proc):
            rss_one = warm_rss(url, proc.pid, [first], inputs[0], args.max_tokens)
        print(f"RSS, 1 adapter: {rss_one:.0f} MiB", flush=True)

        with serving(tmp / "eight", base, tmp / "eight.log") as (url, proc):
            rss_eight = warm_rss(url, proc.pid, names, inputs[0], args.max_tokens)
            print(f"RSS, 8 adapters: {rss_eight:.0f} MiB (+{rss_eight - rss_one:.0f})", flush=True)

            api = client(url)
            expected = {(n, mr): ask(api, n, mr, args.max_tokens) for n in names for mr in inputs}
            distinct = len({expected[(n, inputs[0])] for n in names})
            print(f"expected answers: {len(expected)} pairs; {distinct} distinct answers of the 8 adapters "
                  "to the first input", flush=True)

            stop = threading.Event()
            lock = threading.Lock()
            done, errors, mismatches, latency = [0], [], [], []
            rss: list[tuple[float, float]] = []

            def load(seed: int) -> None:
                rng, api = random.Random(seed), client(url)
                while not stop.is_set():
                    pair = (rng.choice(names), rng.choice(inputs))
                    t0 = time.perf_counter()
                    try:
                        text = ask(api, *pair, args.max_tokens)
                    except Exception as exc:  # counted: the test fails on any
                        with lock:
                            errors.append(f"{pair[0]}: {exc!r}")
                        continue
                    with lock:
                        done[0] += 1
                        latency.append(time.perf_counter() - t0)
                        if text != expected[pair]:
                            mismatches.append({"model": pair[0], "mr": pair[1], "got": text, "want": expected[pair]})

            def sample() -> None:
                t0 = time.perf_counter()
                while not stop.wait(2.0):
                    rss.append((time.perf_counter() - t0, rss_mb(proc.pid)))

            started = time.perf_counter()
            load_before = load_average()
            threads = [threading.Thread(target=load, args=(i,)) for i in range(args.clients)]
            threads.append(threading.Thread(target=sample))
            for t in threads:
                t.start()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started

    third = max(1, len(rss) // 3)
    early = max(r for _, r in rss[:third])
    late = max(r for _, r in rss[-third:])
    record = {
        "date": date.today().isoformat(), "device": "cpu", "load_average_before": load_before,
        "clients": args.clients, "adapters": dict(zip(names, METHODS)), "seconds": round(wall, 1),
        "max_tokens": args.max_tokens, "requests": done[0], "errors": len(errors), "mismatches": len(mismatches),
        "latency_p50_s": round(statistics.median(latency), 2) if latency else None,
        "latency_max_s": round(max(latency), 2) if latency else None,
        "rss_one_adapter_mib": round(rss_one), "rss_eight_adapters_mib": round(rss_eight),
        "rss_eight_minus_one_mib": round(rss_eight - rss_one),
        "rss_first_third_max_mib": round(early), "rss_last_third_max_mib": round(late),
        "rss_growth_mib": round(late - early), "rss_samples": len(rss),
        "distinct_answers_to_one_input": distinct,
        "error_samples": errors[:5], "mismatch_samples": mismatches[:3],
    }
    print(json.dumps(record, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    ok = not errors and not mismatches and rss_eight - rss_one <= 50 and late - early <= 20
    print("PASS" if ok else "FAIL: see errors, mismatches and RSS above")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
