"""ptune export: write what other serving engines load, from an adapter or a registered version.

- LoRA: the adapter merged into the base weights (PEFT ``merge_and_unload``), saved as a
  plain transformers checkpoint (safetensors, config, generation config, tokenizer) that
  vLLM and TGI load as an ordinary model. Full fine-tuning: its checkpoint, likewise.
- Prompt tuning and P-tuning: the soft prompt as one ``[num_virtual_tokens, hidden]``
  tensor (P-tuning's encoder output, computed once, as PEFT saves it), for engines that
  take prompt embeddings, with ``soft_prompt.json`` saying where it goes.
- Prefix tuning is refused: it is per-layer keys and values, which no serving engine
  takes (vLLM declined it, vllm#660; TGI and LoRAX serve LoRA only).

Every export carries ``prompt_format.json`` (the adapter's training prompt: the template
with placeholders and one training example as the model saw it) and ``ptune_export.json``
(source version, method, base model, sha256 of every file, and the check below). Before the
output appears, the written files are loaded back and their logits compared with the
PEFT model's on that training example; nothing is left half-written (``atomic_dir``).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.base_model import load_config, load_model, load_tokenizer, require_files
from pipelines.common import StageError, atomic_dir, check_output, read_json, read_jsonl, sha256_file, write_json
from pipelines.evaluate import TunedPrompts, adapter_info
from pipelines.prompts import Demo
from pipelines.shards import IGNORE, TOKENIZER_FILES, read_manifest, tokenizer_fingerprint
from pipelines.tasks import Task, manifest_task

log = logging.getLogger(__name__)

FORMAT = "ptune-export/1"
SOFT_PROMPT, SOFT_PROMPT_TENSOR = "soft_prompt.safetensors", "prompt_embeds"
MERGED = ("lora", "full")  # written as a transformers checkpoint; the rest as a soft prompt
KIND = {"lora": "merged_checkpoint", "full": "checkpoint", "prompt": "soft_prompt", "ptuning": "soft_prompt"}
REFUSED = {
    "prefix": "prefix tuning cannot be exported: it is per-layer keys and values, which no serving engine "
              "takes (vLLM declined prefix tuning, vllm#660; TGI and LoRAX serve LoRA only); serve it with "
              "`ptune serve`",
}
# Largest logit difference, relative to the largest logit, that the written files may show
# against the PEFT model: float32 merges differ by rounding only (~1e-6); a 16-bit base
# rounds the merged weights (or the soft prompt) to 8-11 significant bits.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
ADAPTER = "data/models/adapter"
SHARDS = "data/shards"


@dataclass
class Source:
    """An adapter directory ready to read, and what it came from."""
    adapter: Path
    shards: Path
    origin: dict  # {"adapter": path} or {"version": artifact@version, "commit": ...}


def export(adapter: str, base: Path, shards: Path, out: Path, force: bool = False, repo: Path = Path(".")) -> dict:
    """Export ``adapter`` (a directory written by tune, or ``artifact@version``) to ``out``;
    returns what ``ptune_export.json`` records."""
    out = Path(out)
    check_output(out)
    if out.exists() and not force:
        raise StageError(f"{out}: exists; pass --force to replace it, or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "ptune_export.json").is_file():
        raise StageError(f"{out}: holds files of something other than a ptune export (no ptune_export.json), and "
                         f"--force would delete them; choose another --out")
    with tempfile.TemporaryDirectory(prefix="ptune-export-") as tmp:
        source = _source(adapter, Path(shards), repo, Path(tmp))
        info = adapter_info(source.adapter)
        method = info["stats"]["method"]
        if method in REFUSED:
            raise StageError(f"{adapter}: {REFUSED[method]}")
        if method not in KIND:
            raise StageError(f"{adapter}: method {method!r} cannot be exported (ptune export writes "
                             f"{', '.join(KIND)}); serve it with `ptune serve`")
        base = Path(base)
        _check_base(adapter, info, base)
        tok = load_tokenizer(base)
        manifest, example = _training_example(source, info, base, tok)
        task = manifest_task(manifest, str(source.shards))
        fmt = prompt_format(task, tok, manifest, _demos(source.shards), example)
        with atomic_dir(out) as staging:
            if method in MERGED:
                check = _write_checkpoint(method, source.adapter, base, example["source_ids"], staging)
            else:
                check = _write_soft_prompt(method, source.adapter, base, example["source_ids"], staging)
            write_json(staging / "prompt_format.json", fmt)
            for path in staging.iterdir():
                path.chmod(0o644)  # safetensors are written private (0600); an export goes to other users' engines
            record = {
                "format": FORMAT,
                "source": source.origin,
                "method": method,
                "kind": KIND[method],
                "base_model": {**_base_info(base), "sha256": info["base_model_sha256"]},
                "trained_on": {k: info["data"].get(k) for k in ("manifest_sha256", "template_sha256", "train_ids")},
                "check": check,
                "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
                "software": _software(),
            }
            write_json(staging / "ptune_export.json", record)
    log.info("export: %s (%s) -> %s", adapter, method, out)
    return record


def _source(adapter: str, shards: Path, repo: Path, work: Path) -> Source:
    """The adapter directory and its shards: as given, or fetched at a registered version's
    commit from the DVC cache or remote (as ``ptune evaluate`` does)."""
    from pipelines import lineage

    path = Path(adapter)
    if path.is_dir():
        return Source(path, shards, {"adapter": str(path.resolve())})
    if not path.exists():
        version = lineage.resolve_path_or_version(repo, adapter)
        commit = version["commit"]
        adapter_dir = lineage.materialize(repo, commit, ADAPTER, work / "adapter")
        fetched = work / "shards"
        fetched.mkdir()
        lineage.materialize(repo, commit, f"{SHARDS}/manifest.json", fetched / "manifest.json")
        manifest = read_manifest(fetched)
        # What export reads, not the whole shards (the train split can be gigabytes).
        wanted = [name for name in ("truncated.jsonl", "demonstrations.jsonl") if name in manifest["files"]]
        wanted.append(f"train/{manifest['splits']['train']['shards'][0]['file']}")
        for name in wanted:
            (fetched / name).parent.mkdir(parents=True, exist_ok=True)
            lineage.materialize(repo, commit, f"{SHARDS}/{name}", fetched / name)
        exact = f"{version['artifact']}@{version['version']}"
        log.info("export: %s is %s, commit %s", adapter, exact, commit[:10])
        return Source(adapter_dir, fetched, {"version": exact, "artifact": version["artifact"],
                                             "commit": commit, "stages": version["stages"]})
    raise StageError(f"{adapter}: not a directory; pass the directory tune wrote (data/models/adapter) or a "
                     "registered version, <artifact>[@<version>] (`ptune registry` lists them)")


def _check_base(adapter: str, info: dict, base: Path) -> None:
    """A merge onto, or a soft prompt for, another base model than the adapter's is wrong
    without any error: refuse it."""
    require_files(base, ("config.json", "model.safetensors"), "pass --base with the base model the adapter "
                  "was trained on (data/models/base at the version's commit)")
    found, trained = sha256_file(base / "model.safetensors"), info.get("base_model_sha256")
    if found != trained:
        raise StageError(f"{base}: not the base model {adapter} was trained on (model.safetensors sha256 "
                         f"{found[:12]}, the adapter records {str(trained)[:12]}); pass --base with that base "
                         "model (data/models/base at the version's commit: `dvc get . data/models/base --rev "
                         "<commit>`)")


def _training_example(source: Source, info: dict, base: Path, tok) -> tuple[dict, dict]:
    """(the shards' manifest, the first untruncated training example as token ids and text).

    The example is read from the train shard, so it is what the model was trained on, token
    for token; the manifest must be the one the adapter records and the tokenizer ``base``'s.
    """
    shards = source.shards
    if not (shards / "manifest.json").is_file():
        raise StageError(f"{shards}/manifest.json: missing; pass --shards with the shards {source.adapter} was "
                         "trained on (they hold its prompt format), or export a registered version (artifact@version)")
    manifest = read_manifest(shards)
    trained_on = info.get("data", {}).get("manifest_sha256")
    if trained_on != sha256_file(shards / "manifest.json"):
        raise StageError(f"{source.adapter} was trained on other shards than {shards} (manifest sha256 "
                         f"{str(trained_on)[:12]}); pass --shards with the shards it was trained on")
    if tokenizer_fingerprint(base) != manifest["tokenizer"]["sha256"]:
        raise StageError(f"{base}: not the tokenizer the adapter's shards were cut with; pass --base with "
                         "the base model the adapter was trained on")
    from datasets import Dataset

    entry = manifest["splits"]["train"]["shards"][0]
    path = shards / "train" / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise StageError(f"{path}: missing or not the file manifest.json lists; pass --shards with the "
                         "shards the adapter was trained on (`dvc checkout data/shards`)")
    truncated = shards / "truncated.jsonl"
    cut = {r["id"] for r in read_jsonl(truncated)} if truncated.is_file() else set()
    for row in Dataset.from_file(str(path)):
        rid = row["id"][0] if isinstance(row["id"], list) else row["id"]  # packed rows list their examples
        if rid in cut:
            continue
        labels = row["labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE)
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
        ids = row["input_ids"]
        return manifest, {"id": rid, "source_ids": ids[:start], "source": tok.decode(ids[:start]),
                          "target": tok.decode(ids[start:end])}
    raise StageError(f"{path}: every example in it was truncated; rerun tokenize with a larger max_length")


def _demos(shards: Path) -> list[Demo]:
    path = shards / "demonstrations.jsonl"
    return [Demo(**d) for d in read_jsonl(path)] if path.is_file() else []


def prompt_format(task: Task, tok, manifest: dict, demos: list[Demo], example: dict) -> dict:
    """How to prompt the exported model as it was trained: the template with ``{field}``
    placeholders where a record's values go, and one training example, rendered."""
    prompts = TunedPrompts(task, tok, manifest, demos)
    inputs = task.input_fields
    placeholder = {f: "{" + f + "}" for f in inputs}
    placeholder[task.target_field] = next(iter(task.labels), "{" + task.target_field + "}")
    if task.chat:  # one user message; a longer conversation is rendered by the chat template the same way
        inputs = ("message",)
        placeholder = {task.target_field: [{"role": "user", "content": "{message}"},
                                           {"role": "assistant", "content": "-"}]}
    fmt = {
        "task": task.name,
        "fields": list(inputs),
        "template": prompts.source({"id": "template", **placeholder}),
        "chat_template": prompts.fmt.chat,
        "few_shot": prompts.few_shot,
        "tokenize": "without special tokens (no BOS): the template's text is the whole input",
        "eos_token": tok.eos_token,
        "labels": prompts.options() if task.labels else None,
        "template_sha256": manifest["template_sha256"],
        "example": {k: example[k] for k in ("id", "source", "target")},
    }
    if prompts.few_shot:
        fmt["note"] = (f"training put {prompts.few_shot} demonstrations, drawn per record (seeded) from the "
                       "train split, before each prompt; the template holds one such draw")
    return fmt


def _base_info(base: Path) -> dict:
    cfg = load_config(base)
    described = read_json(base / "ptune_base.json") if (base / "ptune_base.json").is_file() else {}
    return {"source": described.get("source"), "source_sha256": described.get("source_sha256"),
            "source_revision": described.get("source_revision"),
            "architecture": (cfg.architectures or [None])[0], "hidden_size": cfg.hidden_size,
            "dtype": str(_dtype(cfg)).removeprefix("torch.")}


def _dtype(cfg) -> torch.dtype:
    """The base model's own dtype (what an engine runs it in); float32 if it names none."""
    dtype = getattr(cfg, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0].float()


def _compare(reference: torch.Tensor, found: torch.Tensor, dtype: torch.dtype, what: str) -> dict:
    diff = (reference - found).abs().max().item()
    scale = reference.abs().max().item()
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]) * max(scale, 1.0)
    if diff > tolerance:
        raise StageError(f"{what}: logits differ from the PEFT model's by {diff:.3g} (tolerance {tolerance:.3g}) "
                         "on the training example; nothing was written")
    return {"prompt": "the training example in prompt_format.json", "positions": reference.shape[0],
            "max_abs_logit_difference": diff, "tolerance": tolerance}


def _write_checkpoint(method: str, adapter: Path, base: Path, source_ids: list[int], out: Path) -> dict:
    """A plain transformers checkpoint: LoRA merged into the base weights, or the fully
    fine-tuned one, in the base model's dtype; checked by loading it back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = _dtype(load_config(base))
    ids = torch.tensor([source_ids])
    if method == "lora":
        require_files(adapter, ("adapter_config.json", "adapter_model.safetensors"), "rerun `dvc repro tune`")
        model = PeftModel.from_pretrained(load_model(base, torch.float32), adapter).eval()
        reference = _logits(model, input_ids=ids)
        model = model.merge_and_unload()
    else:
        model = load_model(adapter, torch.float32, remedy="rerun `dvc repro tune`").eval()
        reference = _logits(model, input_ids=ids)
    model.to(dtype).save_pretrained(out)
    for name in TOKENIZER_FILES:  # copied, not re-saved: the very files the adapter's shards were cut with
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    del model
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return _compare(reference, _logits(written, input_ids=ids), dtype, f"the {method} checkpoint")


def _write_soft_prompt(method: str, adapter: Path, base: Path, source_ids: list[int], out: Path) -> dict:
    """The soft prompt as a ``[num_virtual_tokens, hidden]`` tensor in the base model's dtype
    and ``soft_prompt.json``; checked by feeding it back before the example's embeddings."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    require_files(adapter, ("adapter_config.json", "adapter_model.safetensors"), "rerun `dvc repro tune`")
    cfg = load_config(base)
    dtype = _dtype(cfg)
    model = PeftModel.from_pretrained(load_model(base, torch.float32), adapter).eval()
    # Loaded for inference, PEFT holds the encoder's saved output (P-tuning) or the
    # embeddings themselves (prompt tuning): get_prompt returns them as trained.
    prompt = model.get_prompt(1)[0].detach().to(dtype).contiguous()
    n = model.active_peft_config.num_virtual_tokens
    save_file({SOFT_PROMPT_TENSOR: prompt}, str(out / SOFT_PROMPT), metadata={"format": "pt"})
    write_json(out / "soft_prompt.json", {
        "file": SOFT_PROMPT,
        "tensor": SOFT_PROMPT_TENSOR,
        "shape": list(prompt.shape),
        "num_virtual_tokens": n,
        "hidden_size": cfg.hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "method": method,
        "placement": "before the prompt's token embeddings: inputs_embeds = concat(soft prompt, "
                     "embed_tokens(prompt ids)); the attention mask covers the virtual tokens too, and "
                     "positions count from the first virtual token (it is position 0). In a left-padded "
                     "batch the virtual tokens follow the padding, right before each row's own tokens",
        "engines": "transformers: model.generate(inputs_embeds=..., attention_mask=...) (it returns the new "
                   "tokens only); vLLM: that concatenation, [sequence, hidden], as prompt_embeds (`vllm serve "
                   "--enable-prompt-embeds`)",
    })
    ids = torch.tensor([source_ids])
    reference = _logits(model, input_ids=ids)[-len(source_ids):]  # PEFT's training forward: virtual tokens first
    base_model = model.get_base_model()
    written = load_file(str(out / SOFT_PROMPT))[SOFT_PROMPT_TENSOR].float()
    embeds = torch.cat([written, base_model.get_input_embeddings()(ids)[0]])[None]
    found = _logits(base_model, inputs_embeds=embeds)[n:]
    return _compare(reference, found, dtype, f"the {method} soft prompt")


def _software() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
