"""Generated tokens/s of `ptune serve` under concurrent clients over adapters of four methods
and the base, against two ways of answering the same requests without it, in one run:

(a) one request at a time, one ``PeftModel`` per adapter, decoded as ``evaluate`` decoded
    before the serving engine existed (``generate`` with its prefix / soft-prompt
    placement: the obvious implementation that gives right answers);
(b) the requests grouped per adapter and each group batched (up to the server's batch,
    longest prompts first) through the same decoding: what a careful offline job does.

The server runs as `ptune serve` over a throwaway registry (benchmarks/serve_setup.py) and
is driven by the official `openai` client, every request streamed (time to first token);
(a) and (b) run afterwards in this process, the server stopped, with the same torch
threads. All three decode greedily with the same ``max_tokens`` and end-of-sequence ids,
and their texts are compared request by request. Tokens count every generated token, an
end-of-sequence token included, the same way on every side.

usage: python benchmarks/serve_throughput.py [--project .] [--clients 16] [--per-client 4]
           [--max-tokens 40] [--out benchmarks/results/serve.json]
The project must have run `make run` (the trained LoRA adapter, the shards manifest, the base).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

from serve_setup import build_adapters, build_registry, load_average, mrs, serving

METHODS = ["lora", "prompt", "ptuning", "prefix"]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def figures(served: list[dict], wall: float, alone: tuple[int, float, int], grouped: tuple[int, float, int],
            alone_compared: int | None = None) -> dict:
    """The record's throughput, latency and equality figures: the served side (one dict per
    request: tokens, start, end, ttft in seconds) against (a) and (b), each given as
    (tokens, wall seconds, answers identical to the served ones); ``alone_compared``: the
    requests (a) answered, where it ran on a subset (default: all)."""
    tokens = sum(r["tokens"] for r in served)
    latency = [1000 * (r["end"] - r["start"]) for r in served]
    ttft = [1000 * r["ttft"] for r in served]
    rate, a_rate, b_rate = tokens / wall, alone[0] / alone[1], grouped[0] / grouped[1]
    return {
        "tokens": tokens, "tokens_per_s": round(rate, 1),
        "one_at_a_time_tokens_per_s": round(a_rate, 1), "per_adapter_batching_tokens_per_s": round(b_rate, 1),
        "ratio_vs_one_at_a_time": round(rate / a_rate, 2), "ratio_vs_per_adapter_batching": round(rate / b_rate, 2),
        "p50_ms": round(percentile(latency, 50)), "p99_ms": round(percentile(latency, 99)),
        "ttft_p50_ms": round(percentile(ttft, 50)), "ttft_p99_ms": round(percentile(ttft, 99)),
        "mean_latency_ms": round(statistics.mean(latency)),
        "identical_to_one_at_a_time": f"{alone[2]}/{alone_compared or len(served)}",
        "identical_to_per_adapter_batching": f"{grouped[2]}/{len(served)}",
    }


def drive(url: str, jobs: list[list[tuple[str, str, str]]], max_tokens: int) -> tuple[list[dict], float]:
    """Each client (a thread) sends its (model, prompt, MR) jobs one after another, streamed.
    -> one record per job, and the wall time from the first request to the last answer."""
    import openai

    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(mine: list[tuple[str, str, str]]) -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        for model, prompt, mr in mine:
            start = time.perf_counter()
            first, text, usage = None, "", None
            try:
                for chunk in api.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].text
                    if chunk.usage:
                        usage = chunk.usage
            except Exception as exc:  # reported, and the run fails
                with lock:
                    errors.append(f"{model}: {exc!r}")
                continue
            end = time.perf_counter()
            with lock:
                results.append({"model": model, "mr": mr, "text": text, "start": start, "end": end,
                                "ttft": (first or end) - start, "tokens": usage.completion_tokens})

    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[:5]}")
    return results, wall


def old_generation_inputs(model, ids, mask, pad_id):
    """evaluate's decoding before the engine (pipelines/evaluate.py at b6f3f38^,
    ``generation_inputs``): PEFT's generate drops a prefix and mis-places a padded soft
    prompt, so the prefix goes in as generate's cache and the soft prompt after the padding.
    -> (model to call generate on, inputs, leading output columns that are input)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel) or not model.active_peft_config.is_prompt_learning:
        return model, {"input_ids": ids, "attention_mask": mask}, ids.shape[1]
    n, b = model.active_peft_config.num_virtual_tokens, ids.shape[0]
    ones = torch.ones((b, n), dtype=mask.dtype, device=mask.device)
    if model.active_peft_config.peft_type.value == "PREFIX_TUNING":
        lead = torch.full((b, n), pad_id, dtype=ids.dtype, device=ids.device)
        return model.get_base_model(), {"input_ids": torch.cat([lead, ids], 1),
                                        "attention_mask": torch.cat([ones, mask], 1),
                                        "cache": model.get_prompt(b)}, n + ids.shape[1]
    base = model.get_base_model()
    embeds = base.get_input_embeddings()(ids)
    virtual = model.get_prompt(b).to(embeds.dtype)
    pads = (mask == 0).sum(1).tolist()
    rows = [torch.cat([embeds[i, :k], virtual[i], embeds[i, k:]]) for i, k in enumerate(pads)]
    masks = [torch.cat([mask[i, :k], ones[i], mask[i, k:]]) for i, k in enumerate(pads)]
    return base, {"inputs_embeds": torch.stack(rows), "attention_mask": torch.stack(masks)}, 0


@torch.inference_mode()
def old_decode(model, tok, prompts: list[str], max_tokens: int, eos: list[int]) -> list[tuple[str, int]]:
    """One left-padded ``generate`` over ``prompts`` -> (text, generated tokens) each."""
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    runner, inputs, n_input = old_generation_inputs(model, enc["input_ids"], enc["attention_mask"], tok.pad_token_id)
    out = runner.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                          pad_token_id=tok.pad_token_id, eos_token_id=eos)
    answers = []
    for row in out[:, n_input:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row[:end] if end is not None else row
        answers.append((tok.decode(kept, skip_special_tokens=True), len(kept) + (end is not None)))
    return answers


def load_models(base: Path, adapters: dict[str, Path], dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> tuple[dict, object, list[int]]:
    """One model per served name (each adapter over its own copy of the base, as a user
    loading them one by one with PEFT would have)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def fresh():
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()

    models = {"base": fresh()}
    for name, path in adapters.items():
        models[name] = PeftModel.from_pretrained(fresh(), path).eval()
    gen = models["base"].generation_config.eos_token_id
    eos = sorted({tok.eos_token_id, *(gen if isinstance(gen, list) else [gen])} - {None})
    return models, tok, eos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=4, help="requests each client sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch, and (b)'s batch")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    project = Path(args.project).resolve()
    base = project / "data/models/base"

    from serving.models import Served
    from pipelines.evaluate import TunedPrompts
    from pipelines.shards import read_manifest
    from pipelines.tasks import manifest_task
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="ptune-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        adapters = build_adapters(project, tmp / "adapters", METHODS)
        build_registry(project, adapters, tmp / "registry")
        print(f"adapters {', '.join(adapters)} registered in {time.perf_counter() - t0:.0f} s", flush=True)

        # What a client of the base model sends: the adapters' own E2E prompt, as text.
        manifest = read_manifest(project / "data/shards")
        task = manifest_task(manifest, "data/shards")
        prompts = TunedPrompts.from_dir(task, AutoTokenizer.from_pretrained(base), project / "data/shards", base,
                                        check=False)
        formatter = Served("x", "lora", task=task, prompts=prompts)
        names = [*adapters, "base"]
        inputs = mrs(project, args.clients * args.per_client)
        jobs = [[(names[(c * args.per_client + j) % len(names)], inputs[c * args.per_client + j])
                 for j in range(args.per_client)] for c in range(args.clients)]
        as_sent = {mr: formatter.format_text(mr) for mr in inputs}  # the text each model decodes from

        def sent(name: str, mr: str) -> tuple[str, str, str]:  # an adapter formats the MR itself
            return name, as_sent[mr] if name == "base" else mr, mr

        with serving(tmp / "registry", base, tmp / "serve.log", "--max-batch", str(args.max_batch)) as (url, _):
            # Off the clock: each version's first use and the first-call allocations.
            drive(url, [[sent(n, inputs[0])] for n in names], args.max_tokens)
            load = load_average()
            served, wall = drive(url, [[sent(n, mr) for n, mr in client] for client in jobs], args.max_tokens)
        s_tokens = sum(r["tokens"] for r in served)
        print(f"ptune serve: {s_tokens} tokens in {wall:.1f} s = {s_tokens / wall:.1f} tok/s "
              f"({len(served)} requests, {args.clients} clients; load before: {load})", flush=True)

        models, tok, eos = load_models(base, adapters)
        work = [(n, mr) for client in jobs for n, mr in client]
        for n in names:  # warm-up, off the clock: first-call allocations of each model
            old_decode(models[n], tok, [as_sent[inputs[0]]], 2, eos)

        t0 = time.perf_counter()
        alone = {(n, mr): old_decode(models[n], tok, [as_sent[mr]], args.max_tokens, eos)[0] for n, mr in work}
        a_wall = time.perf_counter() - t0
        a_tokens = sum(t for _, t in alone.values())
        print(f"(a) one at a time: {a_tokens} tokens in {a_wall:.1f} s = {a_tokens / a_wall:.1f} tok/s", flush=True)

        t0 = time.perf_counter()
        grouped = {}
        for n in names:
            mine = sorted((mr for m, mr in work if m == n), key=lambda mr: -len(as_sent[mr]))
            for i in range(0, len(mine), args.max_batch):
                chunk = mine[i:i + args.max_batch]
                grouped.update({(n, mr): a for mr, a in zip(chunk, old_decode(models[n], tok, [as_sent[mr] for mr in chunk],
                                                                             args.max_tokens, eos))})
        b_wall = time.perf_counter() - t0
        b_tokens = sum(t for _, t in grouped.values())
        print(f"(b) per-adapter batches: {b_tokens} tokens in {b_wall:.1f} s = {b_tokens / b_wall:.1f} tok/s", flush=True)

    same_a = sum(r["text"] == alone[(r["model"], r["mr"])][0] for r in served)
    same_b = sum(r["text"] == grouped[(r["model"], r["mr"])][0] for r in served)
    record = {
        "date": date.today().isoformat(), "device": "cpu", "torch_threads": torch.get_num_threads(),
        "load_average_before": load, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "clients": args.clients, "requests": len(served), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "adapters": {n: m for n, m in zip(adapters, METHODS)} | {"base": "base"},
        **figures(served, wall, (a_tokens, a_wall, same_a), (b_tokens, b_wall, same_b)),
        "tokens_equal": s_tokens == a_tokens == b_tokens,
    }
    print(json.dumps(record, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
