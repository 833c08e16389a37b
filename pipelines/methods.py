"""The tuning methods: one factory (``build_peft_config``) maps ``tune.method`` to a PEFT config.

``prompt`` (Lester et al. 2021), ``prefix`` (Li & Liang 2021, MLP reparameterization
in training, only the prefix saved), ``ptuning`` (Liu et al. 2021), ``lora`` (Hu et al.
2021); ``full`` fine-tunes every weight as the upper baseline. Each method's recipe
(learning rate, epochs, batch, optimizer) is its own section of ``tune`` in params.yaml.
Prompt tuning can start from the task's label words, prefix tuning from a text's
activations; the parameter counts say what each method trains and what it saves.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipelines.common import StageError
from pipelines.config import TuneConfig


def build_peft_config(cfg: TuneConfig, base_dir: Path):
    """The PEFT config for ``cfg.method`` (None for full fine-tuning)."""
    from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                      PromptTuningInit, TaskType)

    causal = TaskType.CAUSAL_LM
    if cfg.method == "full":
        return None
    if cfg.method == "lora":
        targets = None if cfg.lora.targets == "auto" else list(cfg.lora.targets)  # None: PEFT's per-architecture
        return LoraConfig(task_type=causal, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=targets)
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


def apply_peft(model, peft_config, cfg: TuneConfig):
    """``model`` wrapped for ``peft_config``; LoRA targets the model lacks are a StageError naming
    the param, the architecture and the modules it has."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # PEFT's NoMatchingPeftModuleError, or no default for the architecture
        if cfg.method != "lora":
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ in ("Linear", "Conv1D") and "." in n})
        raise StageError(f"params.yaml: tune.lora.targets: {cfg.lora.targets!r} on a "
                         f"{model.config.model_type} base model: {exc}; its linear layers are {linear} "
                         "(name some, or `auto` for PEFT's choice)") from None


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


def trainable_in_fp32(model) -> int:
    """Cast any trainable parameter that is not fp32 to fp32 (the optimizer's master weights
    over a bf16 base, ``device.frozen_weights_dtype``) -> how many were cast. PEFT makes its
    adapters fp32 over a bf16 base already (``autocast_adapter_dtype``); this holds the
    invariant whatever a method or a PEFT version does."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters. With prefix projection the MLP trains but is not
    saved: PEFT stores its output (the prefix itself), so that is what the adapter holds."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
