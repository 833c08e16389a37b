"""tune: train a parameter-efficient adapter (or the full model) on the train shards.

The method (``tune.method``'s PEFT config and its initialization) comes from
pipelines/methods.py, the training loop (label-only LM head, length-grouped batches,
resumable checkpoints) from pipelines/training.py; ``run`` wires them to the shards,
the base model and the adapter directory.

DVCLive records loss, learning rate, eval loss and tokens/s for ``dvc plots``; a
progress bar shows tokens/s and the ETA. The adapter directory holds the PEFT weights
(safetensors) and ``ptune_adapter.json``: the resolved config and recipe, trainable and
saved parameter counts, training figures, and the hashes of the base model and shards.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.base_model import load_model, load_tokenizer
from pipelines.common import StageError, atomic_dir, read_json, sha256_file, write_json
from pipelines.config import TuneConfig
from pipelines.device import device_and_dtype, frozen_weights_dtype, training_dtype
from pipelines.methods import (apply_peft, build_peft_config, init_from_labels, init_prefix_from_text,
                               saved_parameters, trainable_in_fp32, trainable_parameters)
from pipelines.shards import load_split, read_manifest
from pipelines.tasks import manifest_task
from pipelines.training import (CountingPackedCollator, PadCollator, make_trainer, rank_and_world, run_key,
                                training_arguments)
from pipelines.validation import validate

log = logging.getLogger(__name__)


@dataclass
class TuneStats:
    method: str
    device: str
    dtype: str
    trainable_parameters: int
    total_parameters: int
    trainable_share: float
    adapter_parameters: int  # saved; less than trainable with prefix projection (the MLP is dropped)
    train_examples: int
    steps: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    train_tokens_per_s: float
    world_size: int = 1
    base_dtype: str = "float32"  # the frozen base weights' (device.frozen_weights_dtype)
    best_step: int | None = None  # load_best: the step whose weights were kept (lowest eval loss)


TRAIN_IDS = "train_ids.txt"


def write_train_ids(column, path: Path) -> int:
    """The source record ids of the training rows, sorted, one per line (a packed row holds several)."""
    ids = sorted({i for row in column for i in ([row] if isinstance(row, str) else row)})
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return len(ids)


def run(cfg: TuneConfig, shards: Path, base: Path, out: Path, live_dir: Path) -> TuneStats:
    """Train ``cfg.method`` on the train shards; write the adapter to ``out`` (rank 0 only).

    Checkpoints (``cfg.save_steps`` > 0) go to ``<cfg.checkpoint_dir>/<run key>``: a
    run restarted with the same config, data and base model resumes from the newest
    one; any change gives a new key and a fresh start. They are deleted once the
    adapter is written.
    """
    from dvclive import Live
    from transformers import set_seed
    from transformers.integrations import DVCLiveCallback
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world = rank_and_world()
    set_seed(cfg.seed)
    device, _ = device_and_dtype()
    dtype = training_dtype(cfg.precision, device)
    manifest = read_manifest(shards)
    if manifest["packed"] and cfg.method in ("prompt", "prefix", "ptuning"):
        raise StageError(f"{shards}: packed shards (tokenize.pack: true) need tune.method lora or full: PEFT's "
                         f"{cfg.method} tuning prepends virtual tokens and takes only a 2-D attention mask")
    # keep_in_memory: `datasets` would otherwise write index caches beside the shards,
    # altering a DVC output of the tokenize stage.
    train = load_split(shards, "train", base=base).shuffle(seed=cfg.seed, keep_in_memory=True)
    if cfg.max_train_examples:
        train = train.select(range(min(cfg.max_train_examples, len(train))), keep_in_memory=True)
    evalset = load_split(shards, "validation", base=base)
    evalset = evalset.select(range(min(cfg.eval_examples, len(evalset))), keep_in_memory=True) \
        if cfg.eval_examples else None
    if len(train) == 0:
        raise StageError(f"{shards}: the train split is empty; nothing to tune on")

    tok = load_tokenizer(base)
    weights = frozen_weights_dtype(cfg.method, dtype)
    model = load_model(base, weights)
    peft_config = build_peft_config(cfg, base)
    if peft_config is not None:
        model = apply_peft(model, peft_config, cfg)
        trainable_in_fp32(model)
    if cfg.method == "prompt" and cfg.prompt.init == "labels":
        init_from_labels(model, tok, list(manifest_task(manifest, str(shards)).labels.values()))
    prefix_init = None
    if cfg.method == "prefix" and cfg.prefix.init == "text":
        prefix_init = init_prefix_from_text(model, tok, cfg.prefix.init_text)
        if rank == 0:
            log.info("tune: prefix initialized from the base model's activations for %s (relative error %.2g)",
                     prefix_init["tokens"], prefix_init["relative_error"])
    trainable, total = trainable_parameters(model)
    if rank == 0:
        log.info("tune: %s on %s (%s, base weights %s, %d process%s): %s trainable of %s parameters (%.4f%%); "
                 "recipe %s", cfg.method, device, str(dtype).removeprefix("torch."),
                 str(weights).removeprefix("torch."), world, "es" if world > 1 else "", f"{trainable:,}",
                 f"{total:,}", 100 * trainable / total, cfg.recipe.model_dump())

    lengths = [len(x) for x in train["input_ids"]]
    est_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        len(train) / (cfg.recipe.batch_size * cfg.grad_accum * world) * cfg.recipe.epochs)
    manifest_sha = sha256_file(shards / "manifest.json")
    base_sha = sha256_file(base / "model.safetensors")
    ckpt_dir = Path(cfg.checkpoint_dir) / run_key(cfg, manifest_sha, base_sha)
    resume = get_last_checkpoint(str(ckpt_dir)) if cfg.save_steps and ckpt_dir.is_dir() else None
    if resume and rank == 0:
        log.info("tune: resuming from %s", resume)
    args = training_arguments(cfg, str(ckpt_dir), est_steps, evalset is not None, device, dtype)
    live = Live(str(live_dir), report=None, save_dvc_exp=False, dvcyaml=False, resume=bool(resume)) \
        if rank == 0 else None
    collator = (CountingPackedCollator if manifest["packed"] else PadCollator)(tok.pad_token_id)
    callbacks = [DVCLiveCallback(live=live)] if live is not None else []
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = make_trainer(model, args, train.remove_columns(["id"]),
                           evalset.remove_columns(["id"]) if evalset is not None else None, collator,
                           lengths if cfg.group_by_length else None, callbacks=callbacks)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    tokens = trainer.tokens_seen * world
    eval_loss = trainer.evaluate()["eval_loss"] if evalset is not None else None
    history = [h for h in trainer.state.log_history if "loss" in h]
    if live is not None:
        live.end()

    if not math.isfinite(result.training_loss):
        raise StageError(f"tune: training loss is {result.training_loss}; lower tune.learning_rate")
    stats = TuneStats(
        method=cfg.method, device=device, dtype=str(dtype).removeprefix("torch."),
        base_dtype=str(weights).removeprefix("torch."),
        trainable_parameters=trainable, total_parameters=total,
        trainable_share=trainable / total, adapter_parameters=saved_parameters(model),
        train_examples=len(train), steps=result.global_step,
        train_loss=round(result.training_loss, 4),
        eval_loss=round(eval_loss, 4) if eval_loss is not None else None,
        train_seconds=round(seconds, 1),
        train_tokens_per_s=round(tokens / seconds, 1),  # this session's tokens (after a resume: since it)
        world_size=world,
        best_step=trainer.state.best_global_step if cfg.load_best else None,
    )
    if rank != 0:
        return stats
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if peft_config is None:
            tok.save_pretrained(staging)
        # Which source records this adapter trained on (after tokenize's drops and the
        # max_train_examples subset): `ptune lineage --record-id` answers from this file.
        train_ids = write_train_ids(train["id"], staging / TRAIN_IDS)
        samples = result.global_step * cfg.recipe.batch_size * cfg.grad_accum * world
        write_json(staging / "ptune_adapter.json", {
            "config": cfg.model_dump(mode="json"),
            "recipe": cfg.recipe.model_dump(mode="json"),
            "stats": asdict(stats),
            "prefix_init": prefix_init,  # tune.prefix.init: text: the tokens used and the fit's error
            "base_model": read_json(base / "ptune_base.json"),
            "base_model_sha256": base_sha,
            "data": {"manifest_sha256": manifest_sha,
                     "tokenizer_sha256": manifest["tokenizer"]["sha256"],
                     "template_sha256": manifest["template_sha256"],
                     "train_shards": manifest["splits"]["train"]["shards"],
                     "train_ids": {"file": TRAIN_IDS, "count": train_ids, "sha256": sha256_file(staging / TRAIN_IDS),
                                   # < 1: training stopped (max_steps) before every row was drawn once
                                   "epochs_drawn": round(samples / len(train), 4)}},
        })
        validate("tune", pd.DataFrame({"step": [h["step"] for h in history],
                                       "loss": [h["loss"] for h in history]}),
                 {}, staging / "validation.json")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info("tune: %d steps in %.0fs (%.0f tokens/s), train loss %.3f, eval loss %s -> %s",
             stats.steps, stats.train_seconds, stats.train_tokens_per_s, stats.train_loss,
             stats.eval_loss, out)
    return stats
