"""GPU training throughput of the tune stage's recipe (bf16 autocast), with model FLOPs
utilization against the bf16 matmul peak measured in the same run.

It uses the stage's own pieces (PEFT config factory, collator, Trainer arguments) on
the real tokenized shards; the model is the base model's architecture from its
config.json with random weights (the 540 MB checkpoint does not travel to the GPU
machine; throughput does not depend on the weight values).

usage: python benchmarks/gpu_tune.py BASE_DIR SHARDS_DIR [--methods lora,prompt,prefix,full] [--steps 60] [--batch 32]
prints one line per method: tokens/s (non-pad), MFU, final loss.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import pyarrow as pa
import torch


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def read_split(shards: str, split: str) -> list[dict]:
    import json
    from pathlib import Path

    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    rows = []
    for entry in manifest["splits"][split]["shards"]:
        with pa.memory_map(str(Path(shards) / split / entry["file"])) as f:
            rows += pa.ipc.open_stream(f).read_all().select(["input_ids", "labels"]).to_pylist()
    return rows


def main() -> None:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipelines.config import load_params
    from pipelines.tune import PadCollator, build_peft_config, device_and_dtype, make_trainer, training_arguments

    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("shards")
    p.add_argument("--methods", default="lora,prompt,prefix,full")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    device, dtype = device_and_dtype()
    assert device == "cuda", "this benchmark measures the GPU path"
    peak = matmul_peak_tflops()
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} dtype={dtype} "
          f"bf16_matmul_peak={peak:.0f} TFLOP/s")
    tok = AutoTokenizer.from_pretrained(args.base)
    train = read_split(args.shards, "train")
    params = load_params()
    for method in args.methods.split(","):
        cfg = params.tune.model_copy(update={"method": method, "batch_size": args.batch,
                                             "max_steps": args.steps, "eval_examples": 0})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.base), dtype=torch.float32)
        peft_cfg = build_peft_config(cfg, args.base)
        if peft_cfg is not None:
            model = get_peft_model(model, peft_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as scratch:
            targs = training_arguments(cfg, scratch, args.steps, False, device, dtype)
            targs.disable_tqdm = True
            trainer = make_trainer(model, targs, train, None, PadCollator(tok.pad_token_id), None)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = trainer.train()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        seen = args.steps * args.batch
        tokens = sum(len(train[i % len(train)]["input_ids"]) for i in range(seen))
        # Frozen weights need no weight gradients: ~4N FLOPs per token for PEFT, 6N for full.
        flops_per_token = (6 if method == "full" else 4) * n_params
        tps = tokens / seconds
        mfu = tps * flops_per_token / (peak * 1e12)
        print(f"method={method} steps={args.steps} batch={args.batch} tokens_per_s={tps:.0f} "
              f"mfu={100 * mfu:.1f}% final_loss={out.training_loss:.3f} "
              f"bf16_autocast={targs.bf16} seconds={seconds:.1f}")


if __name__ == "__main__":
    main()
