"""Adapters as the engine holds them: what each method adds to one shared base model.

- prompt tuning, P-tuning: the virtual tokens' input embeddings, [n, hidden] (for
  P-tuning the prompt encoder's output, computed once here where PEFT recomputes it at
  every ``get_prompt``);
- prefix tuning: per-layer keys and values, [kv_heads, n, head_dim] each (``get_prompt``);
- LoRA: a named adapter in the base group's one ``PeftModel``; a batch's rows pick theirs
  with PEFT's ``adapter_names`` forward argument (``"__base__"``: none);
- full fine-tuning: other weights, hence a ``Group`` of its own;
- ``base``: nothing.

Prompt-learning tensors are taken with PEFT's own ``PeftModel.from_pretrained`` +
``get_prompt`` over the shared model (that wrapper changes no base weight and is dropped
at once), so any reshaping PEFT does per architecture is PEFT's, not copied here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.base_model import load_model
from pipelines.common import StageError

BASE_ROW = "__base__"  # PEFT's adapter name for a row of a mixed LoRA batch that uses none
PROMPT_LEARNING = {"PROMPT_TUNING": "prompt", "P_TUNING": "ptuning", "PREFIX_TUNING": "prefix"}


class Group:
    """One set of weights: the base model (which may carry LoRA adapters) or a fully
    fine-tuned model. Its running rows decode together, one forward per step."""

    def __init__(self, model):
        self.model = model
        self.lora = None  # a PeftModel over ``model`` while any LoRA adapter is loaded
        self._loras = 0  # names handed out, so a reloaded version never reuses an old name
        self.lock = threading.Lock()  # held by every forward and every change of weights

    def forward(self, lora_names: list[str], **inputs):
        """Once LoRA layers are injected the bare model would apply the active adapter to
        every row, so every forward then goes through the PeftModel with per-row names."""
        with self.lock:
            if self.lora is None:
                return self.model(**inputs)
            return self.lora(adapter_names=lora_names, **inputs)

    def generate(self, lora_name: str, batch: int, **kwargs):
        with self.lock:
            if self.lora is None:
                return self.model.generate(**kwargs)
            return self.lora.generate(adapter_names=[lora_name] * batch, **kwargs)  # PEFT repeats it per beam

    def add_lora(self, path: Path) -> str:
        from peft import PeftModel

        with self.lock:
            self._loras += 1
            name = f"lora{self._loras}"
            if self.lora is None:
                self.lora = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.lora.load_adapter(path, adapter_name=name)
        return name

    def drop_lora(self, name: str) -> None:
        with self.lock:
            if list(self.lora.peft_config) == [name]:
                self.lora.unload()  # PEFT cannot run a PeftModel with no adapter left
                self.lora = None
            else:
                self.lora.delete_adapter(name)


@dataclass(eq=False)
class Adapter:
    """A served name's weights. ``users`` counts requests holding it (waiting or running):
    a removed or replaced adapter is freed only when the last one finishes."""

    name: str
    method: str  # base | prompt | ptuning | prefix | lora | full
    group: Group
    path: Path | None = None
    soft_prompt: torch.Tensor | None = None  # [n, hidden]
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None  # per layer: keys, values
    lora: str = BASE_ROW
    users: int = 0

    @property
    def virtual_tokens(self) -> int:
        """Positions the adapter occupies before the prompt (they count in its positions)."""
        if self.soft_prompt is not None:
            return self.soft_prompt.shape[0]
        return self.prefix[0][0].shape[1] if self.prefix else 0


def load(name: str, path: Path, base: Group) -> Adapter:
    """The adapter directory ``path`` (written by ``tune``) as the engine serves it."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(path)
        kind = config.peft_type.value
        if kind in PROMPT_LEARNING:
            return _prompt_learning(name, path, base, PROMPT_LEARNING[kind])
        if kind == "LORA":
            return Adapter(name, "lora", base, path, lora=base.add_lora(path))
        raise StageError(f"{path}: a {kind} adapter; ptune serves prompt tuning, P-tuning, prefix tuning, "
                         "LoRA and fully fine-tuned checkpoints")
    if (path / "model.safetensors").is_file():
        model = load_model(path, base.model.dtype, remedy="rerun `dvc repro tune`")
        return Adapter(name, "full", Group(model.to(base.model.device).eval().requires_grad_(False)), path)
    raise StageError(f"{path}: neither a PEFT adapter (adapter_config.json) nor a full checkpoint "
                     "(model.safetensors); point at a directory written by the tune stage")


@torch.no_grad()
def _prompt_learning(name: str, path: Path, base: Group, method: str) -> Adapter:
    from peft import PeftModel

    with base.lock:  # the wrapper walks the shared model's modules
        prompt = PeftModel.from_pretrained(base.model, path).get_prompt(1)
    if method == "prefix":
        prefix = tuple((layer.keys[0], layer.values[0]) for layer in prompt.layers)
        return Adapter(name, method, base, path, prefix=prefix)
    embeddings = base.model.get_input_embeddings().weight
    return Adapter(name, method, base, path, soft_prompt=prompt[0].to(embeddings.dtype))
