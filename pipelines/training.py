"""The tune stage's training loop: transformers' Trainer (bf16 autocast on a GPU and on a
CPU with hardware bf16, else fp32: ``tune.precision``; gradient accumulation; DDP under
``torchrun``; resumable safetensors checkpoints), with two changes that keep the math and
cut the work:

- the LM head and the loss only at label positions (``LabelHeadTrainer``), not over the
  whole vocabulary at every position;
- length-grouped batches (``LengthGroupedSampler``): less padding, the same examples per epoch.

Checkpoints of prefix tuning (with projection) and P-tuning keep their prompt encoder
(``EncoderCheckpoints``), so they resume; ``run_key`` names what a checkpoint belongs to.
A progress bar shows tokens/s and the ETA.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from pipelines.common import StageError
from pipelines.config import TuneConfig
from pipelines.shards import IGNORE, PackedCollator


def training_arguments(cfg: TuneConfig, output_dir: str, est_steps: int, has_eval: bool,
                       device: str, dtype: torch.dtype):
    """The Trainer's arguments for ``cfg``: autocast to ``dtype`` (bf16 or fp16; fp32 master
    weights) or none (fp32), on ``device`` (``pipelines.device.training_dtype`` chooses).

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
        bf16=dtype == torch.bfloat16,  # on CPU too: the Trainer autocasts there as well
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        ddp_backend="gloo" if device == "cpu" and rank_and_world()[1] > 1 else None,
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
            if shared is None:
                outputs = model(**inputs, use_cache=False)
            else:  # the base model's own forward, which the Trainer's autocast wrapper does not cover
                with self.accelerator.autocast():
                    outputs = _forward_shared_prompt(model, shared, inputs)
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


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
