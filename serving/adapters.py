"""Adapters as the engine holds them: what each method adds to one shared base model.

- prompt tuning, P-tuning: the virtual tokens' input embeddings, [n, hidden] (for
  P-tuning the prompt encoder's output, computed once here where PEFT recomputes it at
  every ``get_prompt``);
- prefix tuning: per-layer keys and values, [kv_heads, n, head_dim] each (``get_prompt``);
- LoRA: a named adapter in the base group's one ``PeftModel``; each row of a batch picks
  its own (``"__base__"``: none), see ``Group``;
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
    fine-tuned model. Its running rows decode together, one forward per step.

    LoRA rows: PEFT loads and injects the adapters (``PeftModel.from_pretrained`` /
    ``load_adapter``) and can mix them per row (``adapter_names``), but on the decode path
    that costs about a fifth of a step on the embedded model on CPU: it registers a hook on
    every LoRA layer at every forward and re-derives each layer's sub-batches from the list
    of names. So where every injected layer is a plain ``lora.Linear`` (what ``tune`` builds)
    the injected layers are switched off (they return their base layer's output) and one
    forward hook per layer, installed once, adds each adapter's ``B(A(x)) * scaling`` to its
    rows, the row indexes computed once per forward. The arithmetic is PEFT's (the same
    modules, casts and addition), so the outputs are the same to the bit. Any other LoRA
    layer (an embedding, a DoRA or other variant) keeps PEFT's own ``adapter_names`` path."""

    def __init__(self, model):
        self.model = model
        self.lora = None  # a PeftModel over ``model`` while any LoRA adapter is loaded
        self._loras = 0  # names handed out, so a reloaded version never reuses an old name
        self.lock = threading.Lock()  # held by every forward and every change of weights
        self._rows: tuple = ()  # during a forward: (adapter name, its rows or None for all)
        self._own_rows = False  # whether the hooks (True) or PEFT (False) apply LoRA per row

    def forward(self, lora_names: list[str], **inputs):
        with self.lock:
            if self.lora is None:
                return self.model(**inputs)
            if not self._own_rows:  # PEFT applies the active adapter to every row unless told per row
                return self.lora(adapter_names=lora_names, **inputs)
            self._rows = _rows_by_adapter(lora_names, self.model.device)
            try:
                return self.model(**inputs)
            finally:
                self._rows = ()

    def generate(self, lora_name: str, batch: int, **kwargs):
        with self.lock:
            if self.lora is None:
                return self.model.generate(**kwargs)
            if not self._own_rows:
                return self.lora.generate(adapter_names=[lora_name] * batch, **kwargs)  # PEFT repeats it per beam
            self._rows = () if lora_name == BASE_ROW else ((lora_name, None),)
            try:
                return self.model.generate(**kwargs)
            finally:
                self._rows = ()

    def add_lora(self, path: Path) -> str:
        from peft import PeftModel

        with self.lock:
            self._loras += 1
            name = f"lora{self._loras}"
            if self.lora is None:
                self.lora = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.lora.load_adapter(path, adapter_name=name)
            self._route()
        return name

    def drop_lora(self, name: str) -> None:
        with self.lock:
            if list(self.lora.peft_config) == [name]:
                self.lora.unload()  # PEFT cannot run a PeftModel with no adapter left
                self.lora = None
            else:
                self.lora.delete_adapter(name)
                self._route()

    def _route(self) -> None:
        """Decide who applies LoRA per row after the set of adapters changed (see the class)."""
        from peft.tuners.lora import Linear, LoraLayer

        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self._own_rows = all(type(m) is Linear and not m.lora_variant for m in layers)
        for m in layers:
            m.enable_adapters(not self._own_rows)
            if self._own_rows and not getattr(m, "_ptune_rows_hook", False):
                m.register_forward_hook(self._add_lora)
                m._ptune_rows_hook = True

    def _add_lora(self, layer, args, output):
        x = args[0]
        for name, rows in self._rows:
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name]
            part = (x if rows is None else x.index_select(0, rows)).to(a.weight.dtype)
            delta = (layer.lora_B[name](a(layer.lora_dropout[name](part))) * layer.scaling[name]).to(output.dtype)
            if rows is None:
                output = output + delta
            else:
                output.index_add_(0, rows, delta)
        return output


def _rows_by_adapter(names: list[str], device) -> tuple:
    """(adapter, row indexes) for each LoRA adapter among a batch's rows; None: every row."""
    found: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name != BASE_ROW:
            found.setdefault(name, []).append(i)
    return tuple((name, None if len(rows) == len(names) else torch.tensor(rows, device=device))
                 for name, rows in found.items())


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
