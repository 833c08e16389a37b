"""Training speed of the tune stage's loop against the plain PEFT + Trainer recipe.

The peer (``../shared/peers/peft_trainer_recipe.py``, beside the repository) runs as a subprocess on the
same model directory, the same first N SST-2 rows, method, batch (8), steps, learning
rate (3e-3) and seeds; ptune's loop (``pipelines.training.make_trainer``) then trains the
same way twice, in this process:

- ``same batches``: the peer's sampler, so every batch is the peer's batch. Only the LM
  head / loss change (logits at label positions only), so each logged loss must equal
  the peer's within float tolerance: this checks that the math is equal.
- ``ptune``: the stage's defaults, i.e. also length-grouped batches and the stage's
  precision (``--precision``, as ``tune.precision``: auto = bf16 autocast on a CPU with
  hardware bf16). Each step sees other examples than the peer's, so per-step losses
  differ; with N = steps x batch both see every example exactly once, and the mean loss
  over that epoch is compared. The same-batches run stays fp32, as the peer does on CPU.

Tokens/s counts real (non-pad, non-virtual) tokens over the wall time of
``trainer.train()``, as the peer does. On a shared CPU wall time measures the neighbours
as much as the code, so the table's ratio is per CPU-second (user + sys over all
threads): ptune's from ``time.process_time()`` around ``trainer.train()``, the peer's
from its process's CPU time less that of a one-step run of it, over the tokens of
steps 2..N (the batches are the same-batches run's). The first step, which carries
warm-up costs, is thus charged to ptune only.

usage: python benchmarks/tune_speed.py MODEL_DIR SST2_TSV [--methods prompt,prefix,lora] [--steps 30]
           [--repeats 2] [--peer ../shared/peers/peft_trainer_recipe.py] [--precision auto]
"""
from __future__ import annotations

import argparse
import ast
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER = ROOT.parent / "shared" / "peers" / "peft_trainer_recipe.py"  # the shared peers sit beside the repository
BATCH, LR, LOG_EVERY = 8, 3e-3, 10  # the peer's fixed settings
VERBAL = {"0": " negative", "1": " positive"}


def _peer_once(peer: Path, model_dir: Path, tsv: Path, method: str, n: int, steps: int) -> tuple[str, float]:
    """The peer's stdout and the CPU seconds (user + sys, all threads) its process used."""
    before = os.times()
    with tempfile.TemporaryDirectory(prefix="peer-") as cwd:
        cmd = [sys.executable, str(peer.resolve()), str(model_dir.resolve()), str(tsv.resolve()), method,
               str(n), str(steps)]
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
    after = os.times()
    return out, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def run_peer(peer: Path, model_dir: Path, tsv: Path, method: str, n: int, steps: int) -> dict:
    """The peer's figures. Its CPU seconds of training are those of the full run less those
    of a one-step run (imports, model loading, data preparation, the first step)."""
    out, cpu = _peer_once(peer, model_dir, tsv, method, n, steps)
    _, cpu_one = _peer_once(peer, model_dir, tsv, method, n, 1)
    losses = [ast.literal_eval(line)["loss"] for line in out.splitlines()
              if line.startswith("{") and "'loss'" in line]
    final = dict(kv.split("=") for kv in re.search(r"peer_tokens_per_s=.*", out).group(0).split())
    return {"tokens_per_s": float(final["peer_tokens_per_s"]), "mean_loss": float(final["final_loss"]),
            "losses": [float(x) for x in losses], "seconds": float(final["seconds"]),
            "cpu_seconds_after_step_1": cpu - cpu_one}


def encode_rows(tok, tsv: Path, n: int) -> list[dict]:
    """The peer's examples: `Review: ...\\nSentiment:` + verbalizer + EOS, loss on the target only."""
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    out = []
    for r in rows:
        p = tok(f"Review: {r['sentence']}\nSentiment:", add_special_tokens=False).input_ids
        t = tok(VERBAL[r["label"]], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = (p + t)[:128]
        out.append({"input_ids": ids, "labels": ([-100] * len(p) + t)[:128]})
    return out


def peer_peft_config(method: str):
    """The peer's PEFT configs (PEFT defaults otherwise)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    causal = TaskType.CAUSAL_LM
    return {"prompt": lambda: PromptTuningConfig(task_type=causal, num_virtual_tokens=20),
            "prefix": lambda: PrefixTuningConfig(task_type=causal, num_virtual_tokens=10),
            "ptuning": lambda: PromptEncoderConfig(task_type=causal, num_virtual_tokens=20),
            "lora": lambda: LoraConfig(task_type=causal, r=8)}[method]()


def run_ptune(model_dir: Path, rows: list[dict], method: str, steps: int, grouped: bool,
              dtype: torch.dtype = torch.float32) -> dict:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from pipelines.training import PadCollator, _prepended_tokens, make_trainer

    from pipelines.device import frozen_weights_dtype
    from pipelines.methods import trainable_in_fp32

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # as the peer, before the PEFT weights are initialized
    weights = frozen_weights_dtype(method, dtype)  # as the tune stage loads the base: bf16 when frozen under bf16
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights), peer_peft_config(method))
    trainable_in_fp32(model)
    with tempfile.TemporaryDirectory(prefix="ptune-bench-") as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=BATCH, max_steps=steps,
                                 learning_rate=LR, logging_steps=LOG_EVERY, save_strategy="no", report_to=[],
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                 bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                 disable_tqdm=True, remove_unused_columns=False, prediction_loss_only=True)
        lengths = [len(r["input_ids"]) for r in rows] if grouped else None
        collator = ShapeRecorder(PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id))
        trainer = make_trainer(model, args, Dataset.from_list(rows), None, collator, lengths)
        t, c = time.time(), time.process_time()
        out = trainer.train()
        dt, cpu = time.time() - t, time.process_time() - c
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    virtual = _prepended_tokens(model)
    return {"tokens_per_s": trainer.tokens_seen / dt, "mean_loss": out.training_loss, "losses": losses,
            "seconds": dt, "cpu_seconds": cpu, "batch_tokens": list(collator.tokens),
            "positions": sum(b * (t + virtual) for b, t, _ in collator.shapes),
            "head_positions": sum(n for _, _, n in collator.shapes)}


class ShapeRecorder:
    """Records each batch's (rows, padded length, label positions): the work, free of timing noise."""

    def __init__(self, inner):
        self.inner, self.shapes, self.tokens = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens.append(int(batch["n_tokens"]))
        self.shapes.append((*batch["input_ids"].shape, int((batch["labels"][:, 1:] != -100).sum())))
        return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("tsv", type=Path)
    ap.add_argument("--methods", default="prompt,prefix,lora")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the fastest of each is kept")
    ap.add_argument("--peer", type=Path, default=PEER)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="ptune's (length-grouped) run, as tune.precision")
    args = ap.parse_args()
    from pipelines.device import training_dtype

    dtype = training_dtype(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    if not args.peer.is_file():
        ap.error(f"--peer {args.peer}: no such file; the peer recipe is peft_trainer_recipe.py in the shared "
                 f"peers folder (by default ../shared/peers beside the repository): pass its path with --peer")
    from transformers import AutoTokenizer

    n = args.steps * BATCH  # one epoch: every example seen once by each run
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = encode_rows(tok, args.tsv, n)
    tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"{n} SST-2 rows, {tokens} real tokens, batch {BATCH}, {args.steps} steps, lr {LR}, "
          f"{torch.get_num_threads()} threads; ptune computes in {str(dtype).removeprefix('torch.')}", flush=True)
    table = []
    for method in args.methods.split(","):
        # Interleaved repeats; each side keeps its fastest run (the least disturbed by neighbours).
        peers, sames, fasts = [], [], []
        for _ in range(args.repeats):
            peers.append(run_peer(args.peer, args.model_dir, args.tsv, method, n, args.steps))
            sames.append(run_ptune(args.model_dir, rows, method, args.steps, grouped=False))
            fasts.append(run_ptune(args.model_dir, rows, method, args.steps, grouped=True, dtype=dtype))
        peer = min(peers, key=lambda r: r["cpu_seconds_after_step_1"])
        same = min(sames, key=lambda r: r["cpu_seconds"])
        fast = min(fasts, key=lambda r: r["cpu_seconds"])
        for name, runs in (("peer", peers), ("same batches", sames), ("ptune", fasts)):
            print(f"  {method} {name}: wall s per repeat {[round(r['seconds'], 1) for r in runs]}", flush=True)
        diff = max((abs(a - b) for a, b in zip(peer["losses"], same["losses"])), default=float("nan"))
        print(f"\n== {method}")
        print(f"  loss every {LOG_EVERY} steps  peer: {peer['losses']}")
        print(f"                       same batches: {[round(x, 4) for x in same['losses']]}  "
              f"(max |diff| {diff:.2e})")
        print(f"                       ptune (grouped): {[round(x, 4) for x in fast['losses']]}")
        print(f"  positions through the decoder: peer {same['positions']}, ptune {fast['positions']}; "
              f"through the LM head: peer {same['positions']}, ptune {fast['head_positions']}")
        # Per CPU-second, steps 2.. only (the peer's first step is inside its one-step run): fair
        # under a shared, busy CPU, where wall time depends on what else runs.
        peer["tokens_per_cpu_s"] = sum(same["batch_tokens"][1:]) / peer["cpu_seconds_after_step_1"]
        for r in (same, fast):
            r["tokens_per_cpu_s"] = sum(r["batch_tokens"]) / r["cpu_seconds"]
        for name, r in (("peer", peer), ("same batches", same), ("ptune", fast)):
            print(f"  {name:>14}: {r['tokens_per_s']:7.1f} tok/s (wall)  {r['tokens_per_cpu_s']:6.2f} tok/CPU-s  "
                  f"{r['seconds']:6.1f} s  epoch mean loss {r['mean_loss']:.4f}", flush=True)
        table.append((method, peer, same, fast, diff))
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\n| method | tok/CPU-s peer | ptune, same batches | ptune (length-grouped) | speed-up per CPU-s | "
          "speed-up, wall | decoder / LM-head positions, ptune vs peer | max per-step loss diff (same batches) | "
          "epoch mean loss peer / ptune |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, peer, same, fast, diff in table:
        print(f"| {method} | {peer['tokens_per_cpu_s']:.2f} | {same['tokens_per_cpu_s']:.2f} "
              f"({same['tokens_per_cpu_s'] / peer['tokens_per_cpu_s']:.2f}x) | {fast['tokens_per_cpu_s']:.2f} | "
              f"**{fast['tokens_per_cpu_s'] / peer['tokens_per_cpu_s']:.2f}x** | "
              f"{fast['tokens_per_s'] / peer['tokens_per_s']:.2f}x | "
              f"{fast['positions'] / same['positions']:.2f} / {fast['head_positions'] / same['positions']:.3f} | "
              f"{diff:.1e} | "
              f"{peer['mean_loss']:.4f} / {fast['mean_loss']:.4f} |")


if __name__ == "__main__":
    main()
