"""Beam search: transformers' ``generate``, per adapter, with the virtual tokens placed as
the continuous batch places them.

Beams re-rank whole hypotheses, so a beam request cannot stream or share the running
batch; the engine runs a few of them (same adapter, same settings) through ``generate``
between two steps of the batch.

PEFT's ``PeftModel.generate`` cannot be used for prompt learning under PEFT 0.21 +
transformers 5.2x:

- prefix tuning: it drops the prefix (transformers prefers its own fresh cache to the
  ``past_key_values`` PEFT passes; a FutureWarning says so). Here the prefix goes in as a
  pre-filled cache, as a cached prompt would: placeholder ids stand for its positions
  (generate feeds only what the cache does not cover), the mask is 1 over them, and there
  is one cache row per beam (generate does not expand a cache it is given).
- prompt tuning and P-tuning: PEFT puts the virtual tokens before the left padding and
  ignores position ids, so a padded row sees shifted positions. Here each row is
  ``[pad][virtual][tokens]`` as embeddings, so positions count from the virtual tokens as
  in training; the ids go along (placeholders at the virtual positions) so that
  ``no_repeat_ngram_size`` sees the prompt for every method.
"""
from __future__ import annotations

import torch

from serving.adapters import Adapter
from serving.types import Decoding


def left_padded(prompts: list[tuple[int, ...]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def placement(adapter: Adapter, ids: torch.Tensor, mask: torch.Tensor, num_beams: int, pad_id: int) -> dict:
    """``generate``'s inputs for left-padded ``ids`` with ``adapter``'s virtual tokens placed."""
    from transformers import DynamicCache

    n, b = adapter.virtual_tokens, ids.shape[0]
    if n == 0:
        return {"input_ids": ids, "attention_mask": mask}
    lead = torch.full((b, n), pad_id, dtype=ids.dtype, device=ids.device)
    ones = torch.ones((b, n), dtype=mask.dtype, device=mask.device)
    if adapter.prefix is not None:
        rows = b * num_beams
        cache = DynamicCache(ddp_cache_data=[(k.unsqueeze(0).expand(rows, -1, -1, -1),
                                              v.unsqueeze(0).expand(rows, -1, -1, -1)) for k, v in adapter.prefix])
        return {"input_ids": torch.cat([lead, ids], 1), "attention_mask": torch.cat([ones, mask], 1), "cache": cache}
    embeds = adapter.group.model.get_input_embeddings()(ids)
    pads = (mask == 0).sum(1).tolist()  # left padding: a leading block per row

    def place(t, virtual):
        return torch.stack([torch.cat([t[i, :k], virtual[i], t[i, k:]]) for i, k in enumerate(pads)])

    return {"input_ids": place(ids, lead), "attention_mask": place(mask, ones),
            "inputs_embeds": place(embeds, adapter.soft_prompt.expand(b, -1, -1))}


@torch.inference_mode()
def search(adapter: Adapter, prompts: list[tuple[int, ...]], d: Decoding, pad_id: int,
           eos_ids: list[int]) -> list[list[list[int]]]:
    """-> for each prompt, its ``d.n`` best beams' new tokens (an ended beam is padded after its EOS)."""
    group = adapter.group
    ids, mask = left_padded(prompts, pad_id, group.model.device)
    inputs = placement(adapter, ids, mask, d.num_beams, pad_id)
    out = group.generate(adapter.lora, len(prompts), **inputs, max_new_tokens=d.max_tokens, do_sample=False,
                         num_beams=d.num_beams, num_return_sequences=d.n, length_penalty=d.length_penalty,
                         no_repeat_ngram_size=d.no_repeat_ngram_size, pad_token_id=pad_id, eos_token_id=eos_ids)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [new[i * d.n:(i + 1) * d.n] for i in range(len(prompts))]
