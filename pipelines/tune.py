"""tune: train a parameter-efficient adapter (or the full model) on the train shards.

One factory (``build_peft_config``) maps ``tune.method`` to a PEFT config:
``prompt`` (Lester et al. 2021), ``prefix`` (Li & Liang 2021), ``ptuning``
(Liu et al. 2021), ``lora`` (Hu et al. 2021); ``full`` fine-tunes every weight as the
upper baseline. transformers' Trainer runs the loop: CUDA with bf16 when present,
CPU otherwise; DVCLive records loss, learning rate and eval loss for ``dvc plots``.

The adapter directory holds the PEFT weights (safetensors) and ``ptune_adapter.json``:
the resolved config, trainable-parameter count and share, training figures, and the
hashes of the base model and shards it was trained on.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.common import StageError, atomic_dir, read_json, sha256_file, write_json
from pipelines.config import TuneConfig
from pipelines.shards import load_split, read_manifest
from pipelines.validation import validate

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TuneStats:
    method: str
    device: str
    dtype: str
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    train_examples: int
    steps: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    train_tokens_per_s: float


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def build_peft_config(cfg: TuneConfig, base_dir: Path):
    """The PEFT config for ``cfg.method`` (None for full fine-tuning)."""
    from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                      PromptTuningInit, TaskType)

    causal = TaskType.CAUSAL_LM
    if cfg.method == "full":
        return None
    if cfg.method == "lora":
        return LoraConfig(task_type=causal, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
    m = getattr(cfg, cfg.method)
    if cfg.method == "prompt":
        if m.init == "text":
            if not m.init_text:
                raise StageError("params.yaml: tune.prompt.init_text: required when tune.prompt.init is 'text'")
            return PromptTuningConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=m.init_text,
                                      tokenizer_name_or_path=str(base_dir))
        return PromptTuningConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if m.init != "random":
        raise StageError(f"params.yaml: tune.{cfg.method}.init: only 'random' is available for "
                         f"{cfg.method} in PEFT")
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens,
                                  prefix_projection=cfg.prefix_projection,
                                  encoder_hidden_size=cfg.encoder_hidden_size)
    return PromptEncoderConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens,
                               encoder_hidden_size=cfg.encoder_hidden_size)


def training_arguments(cfg: TuneConfig, output_dir: str, est_steps: int, has_eval: bool,
                       device: str, dtype: torch.dtype):
    """The Trainer's arguments for ``cfg``: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(est_steps * cfg.warmup_ratio),
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=max(1, min(10, est_steps // 4)),  # a loss curve even for tiny runs
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )


class PadCollator:
    """Right-pads a batch to its longest example; padded positions carry no loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(cfg: TuneConfig, shards: Path, base: Path, out: Path, live_dir: Path) -> TuneStats:
    from dvclive import Live
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
    from transformers.integrations import DVCLiveCallback

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    device, dtype = device_and_dtype()
    manifest = read_manifest(shards)
    # keep_in_memory: `datasets` would otherwise write index caches beside the shards,
    # altering a DVC output of the tokenize stage.
    train = load_split(shards, "train").shuffle(seed=cfg.seed, keep_in_memory=True)
    if cfg.max_train_examples:
        train = train.select(range(min(cfg.max_train_examples, len(train))), keep_in_memory=True)
    evalset = load_split(shards, "validation")
    evalset = evalset.select(range(min(cfg.eval_examples, len(evalset))), keep_in_memory=True) \
        if cfg.eval_examples else None
    if len(train) == 0:
        raise StageError(f"{shards}: the train split is empty; nothing to tune on")

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_config = build_peft_config(cfg, base)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("tune: %s on %s (%s): %s trainable of %s parameters (%.4f%%)", cfg.method, device,
             str(dtype).removeprefix("torch."), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    train_tokens = sum(len(x) for x in train["input_ids"])
    est_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        len(train) / (cfg.batch_size * cfg.grad_accum) * cfg.epochs)
    with tempfile.TemporaryDirectory(prefix="ptune-trainer-") as scratch:
        args = training_arguments(cfg, scratch, est_steps, evalset is not None, device, dtype)
        live = Live(str(live_dir), report=None, save_dvc_exp=False, dvcyaml=False)
        trainer = Trainer(model=model, args=args, train_dataset=train.remove_columns(["id"]),
                          eval_dataset=evalset.remove_columns(["id"]) if evalset is not None else None,
                          data_collator=PadCollator(tok.pad_token_id),
                          callbacks=[DVCLiveCallback(live=live)])
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        eval_loss = trainer.evaluate()["eval_loss"] if evalset is not None else None
        history = [h for h in trainer.state.log_history if "loss" in h]
        live.end()

    if not math.isfinite(result.training_loss):
        raise StageError(f"tune: training loss is {result.training_loss}; lower tune.learning_rate")
    epochs_done = result.global_step * cfg.batch_size * cfg.grad_accum / len(train)
    stats = TuneStats(
        method=cfg.method, device=device, dtype=str(dtype).removeprefix("torch."),
        trainable_parameters=trainable, total_parameters=total,
        trainable_share=trainable / total, train_examples=len(train), steps=result.global_step,
        train_loss=round(result.training_loss, 4),
        eval_loss=round(eval_loss, 4) if eval_loss is not None else None,
        train_seconds=round(seconds, 1),
        train_tokens_per_s=round(train_tokens * min(epochs_done, cfg.epochs) / seconds, 1),
    )
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if peft_config is None:
            tok.save_pretrained(staging)
        write_json(staging / "ptune_adapter.json", {
            "config": cfg.model_dump(mode="json"),
            "stats": asdict(stats),
            "base_model": read_json(base / "ptune_base.json"),
            "base_model_sha256": sha256_file(base / "model.safetensors"),
            "data": {"manifest_sha256": sha256_file(shards / "manifest.json"),
                     "tokenizer_sha256": manifest["tokenizer"]["sha256"],
                     "template_sha256": manifest["template_sha256"],
                     "train_shards": manifest["splits"]["train"]["shards"]},
        })
        validate("tune", pd.DataFrame({"step": [h["step"] for h in history],
                                       "loss": [h["loss"] for h in history]}),
                 {}, staging / "validation.json")
    log.info("tune: %d steps in %.0fs (%.0f tokens/s), train loss %.3f, eval loss %s -> %s",
             stats.steps, stats.train_seconds, stats.train_tokens_per_s, stats.train_loss,
             stats.eval_loss, out)
    return stats
