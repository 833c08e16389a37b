"""The tune stage's training loop on a GPU, side by side with the plain and the tuned
PEFT + Trainer peers, with model FLOPs utilization against the bf16 matmul peak measured
in the same run. Writes one JSON record per model and method (``--out``).

The rows are the peers' own: the first N SST-2 train rows as `Review: ...\\nSentiment:`
+ verbalizer + EOS, loss on the target only (``tune_speed.encode_rows``), batch 8,
learning rate 3e-3, the peers' PEFT configs. Every run trains the same rows:

- ``ptune``: ``pipelines.training.make_trainer`` (label-only LM head, length-grouped
  batches) with the stage's GPU precision: fp32 master weights, bf16 autocast, and
  (since 2026-12-06) the frozen base's weights in bf16 for every method but full fine-tuning.
- ``ptune, same batches``: the same loop on the peer's sampler (135M only): its
  per-step losses against the plain peer's, which runs in fp32 (so the difference is
  bf16 rounding plus whatever the math changes; the CPU suite checks the math exactly).
- ``peer plain`` / ``peer tuned``: ``peft_trainer_recipe.py`` and
  ``peft_trainer_tuned_recipe.py`` as subprocesses on the same saved weights.

Models have random weights from a config (throughput does not depend on the values):
``135m`` is the base model's own config.json; ``1.7b`` the same family at
SmolLM2-1.7B's published sizes; ``7b`` Llama-2-7B's sizes with this tokenizer's
vocabulary; ``tiny`` a 2-layer model for a CPU smoke test of this script.

MFU counts the model FLOPs of the useful work, the same for every contender:
(4 for frozen weights: forward + activation gradients; 6 with weight gradients, full
fine-tuning) x (decoder matmul weights x real tokens + LM head x label positions).
Virtual tokens, padding and attention scores (sequences of ~30-60 tokens) are not
counted: they are cost, not work.

Offline, set USE_HUB_KERNELS=NO: transformers 5.25 on CUDA otherwise fetches a rotary kernel
from the hub at the first forward pass, and fails.

usage: python benchmarks/gpu_tune.py BASE_DIR SST2_TSV --peers DIR --out gpu.json
           [--models 135m,1.7b,7b] [--methods prompt,prefix,ptuning,lora,full]
           [--peer-models 135m] [--steps 200]
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tune_speed import BATCH, LR, ShapeRecorder, encode_rows, peer_peft_config  # noqa: E402

FULL_LR = 5e-5  # full fine-tuning diverges at the peers' 3e-3; speed does not depend on it
SIZES = {  # config overrides on the base model's config.json
    "135m": {},
    # SmolLM2-1.7B's config.json
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, head_dim=64),
    # Llama-2-7B's sizes (untied head), this tokenizer's 49,152-token vocabulary
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
PEER_PLAIN, PEER_TUNED = "peft_trainer_recipe.py", "peft_trainer_tuned_recipe.py"


def matmul_peak_tflops(device: str, n: int = 8192, reps: int = 10) -> float | None:
    if device != "cuda":
        return None
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


def model_config(size: str, base: Path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base)
    for k, v in SIZES[size].items():
        setattr(cfg, k, v)
    return cfg


def matmul_weights(model) -> tuple[int, int]:
    """(decoder Linear weights, LM-head weights) of the base model, adapters excluded."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in name and "lora_" not in name)
    return body, head


def save_random(cfg, out: Path, tok, device: str) -> None:
    """Random weights in fp32 safetensors, as the peers and the stage load a base model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model


def load_model(source, device: str, dtype: torch.dtype = torch.float32):
    """Weights in ``dtype``, as the stage loads a base model (``device.frozen_weights_dtype``):
    from a saved directory, or random from a config (built on the device: a 7B model is
    initialized there in seconds instead of written to disk)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if isinstance(source, Path):
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(source, dtype=dtype)


def run_ptune(source, rows: list[dict], tok, method: str, steps: int, grouped: bool, device: str) -> dict:
    from peft import get_peft_model
    from transformers import TrainingArguments

    from pipelines.training import PadCollator, make_trainer

    if device == "cuda":  # the previous run's model must be gone, or it counts in this run's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from pipelines.device import frozen_weights_dtype
    from pipelines.methods import trainable_in_fp32

    compute = torch.bfloat16 if device == "cuda" else torch.float32  # the Trainer's bf16 switch below
    model = load_model(source, device, frozen_weights_dtype(method, compute))
    body, head = matmul_weights(model)
    if method != "full":
        model = get_peft_model(model, peer_peft_config(method))
        trainable_in_fp32(model)
    with tempfile.TemporaryDirectory(prefix="ptune-gpu-") as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=BATCH, max_steps=steps,
                                 learning_rate=FULL_LR if method == "full" else LR, logging_steps=10,
                                 save_strategy="no", report_to=[], use_cpu=device == "cpu",
                                 bf16=compute == torch.bfloat16, dataloader_num_workers=0, disable_tqdm=True,
                                 remove_unused_columns=False, prediction_loss_only=True)
        collator = ShapeRecorder(PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id))
        lengths = [len(r["input_ids"]) for r in rows] if grouped else None
        trainer = make_trainer(model, args, rows, None, collator, lengths)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = trainer.train()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    labels = sum(n for *_, n in collator.shapes)
    tokens = trainer.tokens_seen
    per = 6 if method == "full" else 4
    flops = per * (body * tokens + head * labels)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "label_positions": labels,
            "model_flops": flops, "flops_per_token": flops / tokens, "mean_loss": out.training_loss,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "peak_mem_gib": peak,
            "matmul_weights": body + head}


def run_peer(script: Path, model_dir: Path, tsv: Path, method: str, n: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="peer-") as cwd:
        proc = subprocess.run([sys.executable, str(script.resolve()), str(model_dir.resolve()), str(tsv.resolve()), method,
                               str(n), str(steps)],
                              cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{script.name} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    losses = [float(line.split("'loss': ")[1].split(",")[0].strip("'"))
              for line in proc.stdout.splitlines() if line.startswith("{") and "'loss'" in line]
    final = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    return {"tokens_per_s": float(final["peer_tokens_per_s"]), "mean_loss": float(final["final_loss"]),
            "seconds": float(final["seconds"]), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="a directory with config.json and the tokenizer")
    ap.add_argument("tsv", type=Path, help="SST-2 train.tsv")
    ap.add_argument("--peers", type=Path, required=True, help="the folder holding the two peer recipes")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="135m,1.7b,7b")
    ap.add_argument("--methods", default="prompt,prefix,ptuning,lora,full")
    ap.add_argument("--peer-models", default="135m", help="models the peers run on (they load saved weights)")
    ap.add_argument("--peer-methods", default="prompt,prefix,lora")
    ap.add_argument("--big-methods", default="prompt,prefix,lora", help="methods for models other than 135m/tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--big-steps", type=int, default=20)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak_tflops(device)
    env = {"date": dt.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "bf16_matmul_peak_tflops": round(peak, 1) if peak else None, "batch": BATCH}
    print(json.dumps(env), flush=True)
    tok = AutoTokenizer.from_pretrained(args.base)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append({**env, **rec})
        print(json.dumps(records[-1]), flush=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")  # after each: a timeout keeps what was measured

    with tempfile.TemporaryDirectory(prefix="gpu-tune-") as tmp:
        for size in args.models.split(","):
            steps = args.steps if size in ("135m", "tiny") else args.big_steps
            methods = args.methods.split(",") if size in ("135m", "tiny") else args.big_methods.split(",")
            n = steps * BATCH  # one epoch: every contender sees every row once
            rows = encode_rows(tok, args.tsv, n)
            with_peers = size in args.peer_models.split(",")
            source = model_config(size, args.base)
            if with_peers:  # the peers load saved weights; ptune then loads the same ones
                source = Path(tmp) / size
                save_random(model_config(size, args.base), source, tok, device)
            if size == args.models.split(",")[0]:
                run_ptune(source, rows[: 5 * BATCH], tok, methods[0], 5, True, device)  # CUDA/cuBLAS warm-up
            for method in methods:
                rec: dict = {"model": size, "method": method, "steps": steps}
                try:
                    r = run_ptune(source, rows, tok, method, steps, True, device)
                    mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12) if peak else None
                    rec.update(tokens_per_s=round(r["tokens_per_s"], 1), mfu=round(mfu, 5) if mfu else None,
                               peak_mem_gib=round(r["peak_mem_gib"], 2) if r["peak_mem_gib"] else None,
                               seconds=round(r["seconds"], 2), tokens=r["tokens"], matmul_weights=r["matmul_weights"],
                               mean_loss=round(r["mean_loss"], 4))
                    if with_peers and method in args.peer_methods.split(","):
                        for key, script in (("peer_plain", PEER_PLAIN), ("peer_tuned", PEER_TUNED)):
                            try:
                                p = run_peer(args.peers / script, source, args.tsv, method, n, steps)
                                rec[f"{key}_tokens_per_s"] = round(p["tokens_per_s"], 1)
                                rec[f"ratio_vs_{key}"] = round(r["tokens_per_s"] / p["tokens_per_s"], 3)
                                rec[f"{key}_mfu"] = round(p["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12),
                                                          5) if peak else None
                                if key == "peer_plain":
                                    plain_losses = p["losses"]
                            except Exception as e:  # noqa: BLE001
                                rec[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                        if size in ("135m", "tiny") and "peer_plain_tokens_per_s" in rec:
                            same = run_ptune(source, rows, tok, method, steps, False, device)["losses"]
                            diffs = [abs(a - b) for a, b in zip(plain_losses, same)]
                            rec["same_batches_max_loss_diff_vs_plain"] = round(max(diffs), 5) if diffs else None
                except Exception as e:  # noqa: BLE001 - recorded: an OOM ends this method only
                    rec["error"] = f"{type(e).__name__}: {e}"[:500]
                if device == "cuda":
                    torch.cuda.empty_cache()
                emit(rec)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
