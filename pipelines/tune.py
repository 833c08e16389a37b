"""tune: train a parameter-efficient adapter (or the full model) on the train shards.

One factory (``build_peft_config``) maps ``tune.method`` to a PEFT config:
``prompt`` (Lester et al. 2021), ``prefix`` (Li & Liang 2021, MLP reparameterization
in training, only the prefix saved), ``ptuning`` (Liu et al. 2021), ``lora`` (Hu et al.
2021); ``full`` fine-tunes every weight as the upper baseline. Each method's recipe
(learning rate, epochs, batch, optimizer) is its own section of ``tune`` in params.yaml.

transformers' Trainer runs the loop (CUDA with bf16 autocast when present, CPU
otherwise; gradient accumulation; DDP under ``torchrun``; resumable safetensors
checkpoints), with two changes that keep the math and cut the work:

- the LM head and the loss only at label positions (``LabelHeadTrainer``), not over the
  whole vocabulary at every position;
- length-grouped batches (``LengthGroupedSampler``): less padding, the same examples per epoch.

DVCLive records loss, learning rate, eval loss and tokens/s for ``dvc plots``; a
progress bar shows tokens/s and the ETA. The adapter directory holds the PEFT weights
(safetensors) and ``ptune_adapter.json``: the resolved config and recipe, trainable and
saved parameter counts, training figures, and the hashes of the base model and shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.base_model import load_model, load_tokenizer
from pipelines.common import StageError, atomic_dir, read_json, sha256_file, write_json
from pipelines.config import TuneConfig
from pipelines.device import device_and_dtype
from pipelines.shards import IGNORE, PackedCollator, load_split, read_manifest
from pipelines.tasks import get_task
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
    best_step: int | None = None  # load_best: the step whose weights were kept (lowest eval loss)


def build_peft_config(cfg: TuneConfig, base_dir: Path):
    """The PEFT config for ``cfg.method`` (None for full fine-tuning)."""
    from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                      PromptTuningInit, TaskType)

    causal = TaskType.CAUSAL_LM
    if cfg.method == "full":
        return None
    if cfg.method == "lora":
        return LoraConfig(task_type=causal, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.targets))
    if cfg.method == "prefix":
        return PrefixTuningConfig(task_type=causal, num_virtual_tokens=cfg.prefix.num_virtual_tokens,
                                  prefix_projection=cfg.prefix.projection,
                                  encoder_hidden_size=cfg.prefix.encoder_hidden_size)
    if cfg.method == "ptuning":
        return PromptEncoderConfig(task_type=causal, num_virtual_tokens=cfg.ptuning.num_virtual_tokens,
                                   encoder_hidden_size=cfg.ptuning.encoder_hidden_size)
    m = cfg.prompt
    if m.init == "text":
        if not m.init_text:
            raise StageError("params.yaml: tune.prompt.init_text: required when tune.prompt.init is 'text'")
        return PromptTuningConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=m.init_text,
                                  tokenizer_name_or_path=str(base_dir))
    # labels: sampled vocabulary first, then the label words over the first rows (init_from_labels)
    init = PromptTuningInit.RANDOM if m.init == "random" else PromptTuningInit.SAMPLE_VOCAB
    return PromptTuningConfig(task_type=causal, num_virtual_tokens=m.num_virtual_tokens, prompt_tuning_init=init)


def init_from_labels(model, tok, words: list[str]) -> None:
    """Lester et al. (2021) class-label init: prompt row i is the embedding of label word i
    (averaged over its tokens); the rows after the labels keep their sampled-vocabulary init."""
    table = model.prompt_encoder[model.active_adapter].embedding.weight
    emb = model.get_input_embeddings().weight
    if len(words) > table.shape[0]:
        raise StageError(f"params.yaml: tune.prompt.num_virtual_tokens: {table.shape[0]} is fewer than the "
                         f"task's {len(words)} labels; raise it or use init: text")
    with torch.no_grad():
        for i, w in enumerate(words):
            table[i] = emb[tok(" " + w, add_special_tokens=False).input_ids].mean(0)


def init_prefix_from_text(model, tok, text: str) -> dict:
    """Li & Liang (2021, sec. 7.2) real-word initialization: the prefix starts as the
    keys and values the frozen base model computes for ``text``'s tokens at every layer,
    so before any training the adapter acts as if ``text`` were written before the input
    (the text's tokens are repeated or cut to the prefix length, as PEFT's prompt-tuning
    text init does). Their remedy for low-data settings, where a random prefix trains worse.

    Without projection the prefix *is* those activations. With the MLP
    reparameterization, Li & Liang fit the MLP to them by gradient steps on the squared
    error; here the fit is solved exactly: the MLP's last layer gets the least-squares
    correction from its random initialization (what gradient descent on that layer
    converges to), which reproduces the activations whenever the prefix has no more
    tokens than the MLP's width + 1. Returns what was used and the relative error left.
    """
    pcfg = model.active_peft_config
    n = pcfg.num_virtual_tokens
    ids = tok(text, add_special_tokens=False).input_ids
    if not ids:
        raise StageError(f"params.yaml: tune.prefix.init_text: {text!r} has no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    base = model.get_base_model()
    device = next(base.parameters()).device
    training = base.training
    base.eval()  # no dropout in the activations copied
    try:
        with torch.no_grad():
            cache = base(input_ids=torch.tensor([ids], device=device), use_cache=True).past_key_values
    finally:
        base.train(training)
    # [layers, key/value, KV heads, tokens, head dim] -> PEFT's layout: per token, (layer, key/value, head, dim)
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    target = kv.permute(3, 0, 1, 2, 4).reshape(n, -1).double()
    encoder = model.prompt_encoder[model.active_adapter]
    width = pcfg.num_layers * 2 * pcfg.token_dim
    if target.shape[1] != width:
        raise StageError(f"tune.prefix.init: text: the base model's key/value cache has {target.shape[1]} values "
                         f"per token, PEFT's prefix {width}; use tune.prefix.init: random for this model")
    with torch.no_grad():
        if not pcfg.prefix_projection:
            encoder.embedding.weight.copy_(target)
        else:
            last = encoder.transform[-1]
            hidden = encoder.transform[:-1](encoder.embedding.weight).double()
            hidden = torch.cat([hidden, hidden.new_ones(n, 1)], 1)  # the bias as a column
            weights = torch.cat([last.weight.T.double(), last.bias.double()[None]])  # [width_in + 1, width]
            weights += torch.linalg.pinv(hidden) @ (target - hidden @ weights)  # minimum-norm correction
            last.weight.copy_(weights[:-1].T)
            last.bias.copy_(weights[-1])
        prefix = encoder(torch.arange(n, device=encoder.embedding.weight.device)).double()
    error = float((prefix - target).norm() / target.norm())
    return {"text": text, "token_ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
            "relative_error": float(f"{error:.3g}")}


def saved_parameters(model) -> int:
    """Parameters in what ``save_pretrained`` writes: the adapter (for prefix projection, the
    prefix the MLP computes, not the MLP), or every weight for full fine-tuning."""
    if not hasattr(model, "peft_config"):
        return sum(p.numel() for p in model.parameters())
    from peft import get_peft_model_state_dict

    return sum(t.numel() for t in get_peft_model_state_dict(model).values())


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters. With prefix projection the MLP trains but is not
    saved: PEFT stores its output (the prefix itself), so that is what the adapter holds."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def training_arguments(cfg: TuneConfig, output_dir: str, est_steps: int, has_eval: bool,
                       device: str, dtype: torch.dtype):
    """The Trainer's arguments for ``cfg``: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU.

    With ``cfg.save_steps`` the Trainer writes a resumable checkpoint (adapter in
    safetensors, optimizer, scheduler and RNG state, all read back with
    ``weights_only=True``) every that many steps, keeping the last two: a kill during
    a save leaves the previous one whole. With ``cfg.load_best`` it evaluates and saves
    at the same points (each epoch without ``save_steps``) and ends on the lowest eval loss.
    """
    from transformers import TrainingArguments

    r = cfg.recipe
    every = "steps" if cfg.save_steps else "epoch"  # load_best: evaluate and save at the same points
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=r.batch_size,
        per_device_eval_batch_size=r.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=r.learning_rate,
        weight_decay=r.weight_decay,
        # Trainer's adafactor: fixed learning rate (no relative step), as in Lester et al.
        optim="adafactor" if r.optimizer == "adafactor" else "adamw_torch",
        warmup_steps=round(est_steps * cfg.warmup_ratio),
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=r.epochs,
        max_steps=cfg.max_steps,
        logging_steps=max(1, min(10, est_steps // 4)),  # a loss curve even for tiny runs
        eval_strategy=every if cfg.load_best else ("epoch" if has_eval else "no"),
        eval_steps=cfg.save_steps or None,
        save_strategy=every if cfg.load_best else ("steps" if cfg.save_steps else "no"),
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,  # with load_best the best checkpoint is kept as well
        load_best_model_at_end=cfg.load_best,
        metric_for_best_model="eval_loss" if cfg.load_best else None,
        greater_is_better=False if cfg.load_best else None,
        report_to=[],
        seed=cfg.seed,
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and _world()[1] > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable tensor gets a gradient each step
        dataloader_num_workers=0,
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=True,  # TokenProgress draws the bar (with tokens/s)
    )


class PadCollator:
    """Right-pads a batch to its longest example; padded positions carry no loss.

    ``n_tokens`` (the batch's real tokens) feeds the tokens/s figures; the trainer
    removes it before the forward pass.
    """

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
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "n_tokens": torch.tensor(int(mask.sum()))}


class CountingPackedCollator(PackedCollator):
    """``PackedCollator`` plus ``n_tokens``, like ``PadCollator``."""

    def __call__(self, features: list[dict]):
        batch = super().__call__(features)
        batch["n_tokens"] = torch.tensor(sum(len(f["input_ids"]) for f in features))
        return batch


def _prepended_tokens(model) -> int:
    """Virtual tokens PEFT puts before the input sequence (prompt and P-tuning; not prefix)."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or cfg.peft_type.value == "PREFIX_TUNING":
        return 0
    return cfg.num_virtual_tokens


def _output_head(model) -> torch.nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_output_embeddings()


def _shared_prompt_base(model):
    """The base model, if ``model`` is a (not DDP-wrapped) prompt- or P-tuning model without
    dropout: then its virtual tokens can be computed once per batch (see below); else None."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or cfg.peft_type.value not in ("PROMPT_TUNING", "P_TUNING"):
        return None
    base = model.get_base_model()
    dropout = getattr(base.config, "attention_dropout", 0.0) or any(  # the prompt encoder's too
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    return None if dropout and model.training else base


def _forward_shared_prompt(model, base, inputs: dict):
    """Prompt tuning's forward pass with the virtual tokens computed once, not per row.

    The virtual tokens come first and attention is causal, so at every layer their keys
    and values are the same for every example of the batch: they depend on the prompt
    alone. PEFT recomputes them for each row (batch x 20 extra positions through the
    whole decoder). Here the decoder runs once over the prompt (batch 1), its key/value
    cache is broadcast to the batch, and the examples run after it at positions that
    continue the prompt's — the same network, positions and mask as PEFT's forward, so
    the loss and the gradients are equal (the broadcast sums the per-row gradients);
    tests/test_tune.py checks them. Without dropout only: dropout would differ per row.
    """
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b = ids.shape[0]
    prompt = model.get_prompt(1).to(base.dtype)  # [1, virtual tokens, hidden]
    n = prompt.shape[1]
    once = base.get_decoder()(inputs_embeds=prompt, use_cache=True).past_key_values
    cache = DynamicCache(config=base.config)
    for i, layer in enumerate(once.layers):
        cache.update(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1), i)
    full_mask = torch.cat([torch.ones((b, n), dtype=mask.dtype, device=mask.device), mask], 1)
    return base(input_ids=ids, attention_mask=full_mask, cache=cache, use_cache=False)


class LabelHeadTrainer:
    """Mixin for ``Trainer``: the LM head and the loss only where labels are.

    The plain recipe computes logits over the whole vocabulary (49k for SmolLM2) at
    every position, padding included, then ignores all but the target positions. Here a
    forward pre-hook on the output layer hands it only the hidden states that predict a
    label; the loss is the same sum of token cross-entropies divided by the same count
    (``num_items_in_batch`` over the accumulated batch, as the Trainer's own loss does),
    so the gradients are equal up to float rounding.
    """

    tokens_seen = 0  # real (non-pad) tokens trained on by this process

    def _install_head_hook(self, model) -> None:
        self._keep = None
        self._prepend = _prepended_tokens(model)
        _output_head(model).register_forward_pre_hook(
            lambda _module, args: (args[0][self._keep],) if self._keep is not None else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch.nn.functional as F

        inputs = dict(inputs)
        n_tokens = inputs.pop("n_tokens", None)
        if model.training and n_tokens is not None:
            self.tokens_seen += int(n_tokens)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        shared = _shared_prompt_base(model)
        keep = F.pad(targets != IGNORE, (0 if shared is not None else self._prepend, 1), value=False)
        self._keep = keep  # position t predicts label t+1
        try:
            outputs = _forward_shared_prompt(model, shared, inputs) if shared is not None else \
                model(**inputs, use_cache=False)
        finally:
            self._keep = None
        loss = F.cross_entropy(outputs.logits.float(), targets[targets != IGNORE], reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(1, int(keep.sum())))
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and self.model_accepts_loss_kwargs):
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and getattr(self, "_t_start", None):
            logs["tokens_per_s"] = round(self.tokens_seen * self.args.world_size
                                         / max(1e-9, time.perf_counter() - self._t_start), 1)
        super().log(logs, start_time)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length (sorted within seeded mega-batches of 50 batches), so
    padding, not data, is what shrinks. The order depends only on the seed and the
    epoch, so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


def _progress_callback(trainer):
    """A progress bar (main process only) with steps, ETA, tokens/s and the last loss."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TokenProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step",
                                desc="tune", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                rate = trainer.tokens_seen * args.world_size / max(1e-9, time.perf_counter() - trainer._t_start)
                self.bar.set_postfix({"tok/s": f"{rate:.0f}"}, refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix({"tok/s": f"{logs.get('tokens_per_s', 0):.0f}", "loss": f"{logs['loss']:.3f}"})

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TokenProgress()


PROMPT_ENCODER = "prompt_encoder.safetensors"


def _prompt_encoder(model):
    """The prompt encoder of a prefix-tuning model with MLP reparameterization or of a
    P-tuning model, whose saved adapter is the encoder's output; else None."""
    cfg = getattr(model, "active_peft_config", None)
    kind = cfg.peft_type.value if cfg is not None else None
    if kind == "P_TUNING" or (kind == "PREFIX_TUNING" and cfg.prefix_projection):
        return model.prompt_encoder[model.active_adapter]
    return None


class EncoderCheckpoints:
    """Mixin for ``Trainer``: checkpoints of prefix tuning (with projection) and P-tuning
    keep their encoder.

    PEFT saves such an adapter as the virtual tokens the encoder computes (all inference
    needs), which cannot be loaded back into the encoder: resuming from it fails (prefix)
    or silently feeds the output through a fresh encoder (P-tuning). Each checkpoint
    therefore also holds the encoder's weights (safetensors), and resuming loads them."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        super()._save(output_dir, state_dict)
        encoder = _prompt_encoder(self.model)
        if encoder is not None and self.args.should_save:
            save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      str(Path(output_dir or self.args.output_dir) / PROMPT_ENCODER))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        encoder = _prompt_encoder(model if model is not None else self.model)
        if encoder is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROMPT_ENCODER
        if not path.is_file():
            raise StageError(f"{resume_from_checkpoint}: no {PROMPT_ENCODER}, so this checkpoint cannot resume "
                             f"the prompt encoder; delete {Path(resume_from_checkpoint).parent} to start over")
        device = next(encoder.parameters()).device
        encoder.load_state_dict(load_file(str(path), device=str(device)), strict=True)

    def _load_best_model(self) -> None:
        if _prompt_encoder(self.model) is None:
            return super()._load_best_model()
        return self._load_from_checkpoint(self.state.best_model_checkpoint)


def make_trainer(model, args, train, evalset, collator, lengths: list[int] | None, callbacks=()):
    """A Trainer with the label-only LM head, and length-grouped batches when ``lengths``."""
    from transformers import PrinterCallback, Trainer

    class _Trainer(EncoderCheckpoints, LabelHeadTrainer, Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return LengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        self.args.seed)

        def train(self, *a, **kw):
            self._t_start = time.perf_counter()
            return super().train(*a, **kw)

    trainer = _Trainer(model=model, args=args, train_dataset=train, eval_dataset=evalset,
                       data_collator=collator, callbacks=list(callbacks))
    trainer._install_head_hook(model)
    trainer.remove_callback(PrinterCallback)  # the bar and DVCLive report; no dict per log line
    trainer.add_callback(_progress_callback(trainer))
    return trainer


def run_key(cfg: TuneConfig, manifest_sha256: str, base_sha256: str) -> str:
    """What a checkpoint belongs to: the config (minus where checkpoints go), the data and the base model."""
    conf = cfg.model_dump(mode="json", exclude={"checkpoint_dir"})
    blob = json.dumps({"config": conf, "manifest": manifest_sha256, "base": base_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
    from peft import get_peft_model
    from transformers import set_seed
    from transformers.integrations import DVCLiveCallback
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world = _world()
    set_seed(cfg.seed)
    device, dtype = device_and_dtype()
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
    model = load_model(base, torch.float32)
    peft_config = build_peft_config(cfg, base)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if cfg.method == "prompt" and cfg.prompt.init == "labels":
        init_from_labels(model, tok, list(get_task(manifest["task"]).labels.values()))
    prefix_init = None
    if cfg.method == "prefix" and cfg.prefix.init == "text":
        prefix_init = init_prefix_from_text(model, tok, cfg.prefix.init_text)
        if rank == 0:
            log.info("tune: prefix initialized from the base model's activations for %s (relative error %.2g)",
                     prefix_init["tokens"], prefix_init["relative_error"])
    trainable, total = trainable_parameters(model)
    if rank == 0:
        log.info("tune: %s on %s (%s, %d process%s): %s trainable of %s parameters (%.4f%%); recipe %s",
                 cfg.method, device,
                 str(dtype).removeprefix("torch."), world, "es" if world > 1 else "", f"{trainable:,}",
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
