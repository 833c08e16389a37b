"""evaluate: score the tuned adapter against hand-written prompts on the same test rows.

Systems, all on the same rows:
- ``tuned``: the adapter, prompted exactly as ``tokenize`` built its training sources
  (the shards' manifest says whether the chat template and few-shot demonstrations were
  on; the demonstrations come from the same pool, drawn with the same seed);
- ``zero_shot``: the untuned base model with ``Task.zero_shot`` in its chat template;
- ``few_shot``: the same instruction after ``evaluate.few_shot_k`` demonstrations from
  the train split (the "hard prompt" baseline), seeded, never the row's own group.

Generation tasks (E2E, Stack Exchange QA): one row per distinct input with all its
references; greedy or beam decoding (length penalty, no-repeat n-grams) per params,
through the serving engine (serving/engine.py), the one decoding path ``ptune serve``
answers with. The E2E challenge's metrics as in the Prefix-Tuning paper's Table 1: BLEU
(sacrebleu, multi-reference), NIST (nltk), METEOR (METEOR 1.5 through pycocoevalcap;
needs a Java runtime), ROUGE-L and CIDEr-D (pycocoevalcap, as the challenge's scoring
script computes them: ROUGE-L is the LCS F-measure with beta 1.2 from the best precision
and the best recall over a row's references, averaged over rows). BLEU, METEOR and
ROUGE-L are in points (0-100); NIST and CIDEr on their own scales, as the paper reports
them. What cannot be computed on this machine is named, with the reason, under
``not_computed``.

Classification tasks (SST-2): rank scoring: the label whose verbalizer has the highest
total log-probability after the prompt wins; accuracy and macro-F1 in points.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.base_model import load_model, load_tokenizer
from pipelines.common import StageError, read_json, read_jsonl, sha256_file, write_json
from pipelines.config import EvaluateConfig
from pipelines.device import device_and_dtype
from pipelines.prompts import Demo, PromptFormat, context, draw_demos, render, render_target, render_zero_shot
from pipelines.shards import read_manifest, tokenizer_fingerprint, verify
from pipelines.tasks import Task
from pipelines.validation import validate
from serving.engine import BASE, Engine
from serving.types import Decoding, Request

log = logging.getLogger(__name__)

DEMO_POOL = 256  # train records the few-shot baseline draws from: variety at bounded memory


@dataclass
class TestRow:
    id: str
    fields: dict
    references: list[str]


def rows_sha256(rows: list[TestRow]) -> str:
    """Identity of a test set: scores with equal hashes were computed on the same rows."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.id, r.fields, r.references], sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def test_rows(task: Task, records: list[dict], max_rows: int | None) -> list[TestRow]:
    """Generation: one row per distinct input with every reference; classification: one per record."""
    if task.kind == "classification":
        rows = [TestRow(r["id"], r, [r[task.target_field]]) for r in records]
    else:
        by_input: dict[tuple, TestRow] = {}
        inputs = [f for f in task.fields if f != task.target_field]
        for r in records:
            key = tuple(r[f] for f in inputs)
            if key not in by_input:
                by_input[key] = TestRow(r["id"], r, [])
            by_input[key].references.append(r[task.target_field])
        rows = list(by_input.values())
    return rows[:max_rows] if max_rows else rows


def load_models(base: Path, adapter: Path, device: str, dtype: torch.dtype):
    """(tokenizer, base model, tuned model) for rank scoring, which runs forward passes
    only; generation decodes through the engine instead."""
    from peft import PeftModel

    tok = load_tokenizer(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base_model = load_model(base, dtype).to(device).eval()
    if (adapter / "adapter_config.json").is_file():
        tuned = PeftModel.from_pretrained(load_model(base, dtype), adapter).to(device).eval()
    elif (adapter / "model.safetensors").is_file():  # full fine-tuning
        tuned = load_model(adapter, dtype, remedy="rerun `dvc repro tune`").to(device).eval()
    else:
        raise StageError(f"{adapter}: neither a PEFT adapter nor a full checkpoint")
    return tok, base_model, tuned


def generate(engine: Engine, model: str, prompts: list[str], cfg: EvaluateConfig) -> tuple[list[str], int]:
    """Decode ``prompts`` with the engine's served ``model`` -> (first lines, new tokens).

    This is the path ``ptune serve`` and ``ptune generate`` answer with (serving/engine.py:
    continuous batching for greedy, transformers' beam search per adapter), so a served
    greedy answer is the one scored here. Longest prompts go in first, so that the rows
    decoding together pad little.
    """
    ids = [engine.encode(p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    decoding = Decoding(max_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                        no_repeat_ngram_size=cfg.no_repeat_ngram_size)
    done = engine.generate([Request(model, ids[i], decoding) for i in order])
    out = [""] * len(prompts)
    for i, (choice,) in zip(order, done):
        out[i] = first_line(choice.text)
    return out, sum(choice.completion_tokens for (choice,) in done)


def first_line(text: str) -> str:
    """Both systems are asked for one sentence; anything after the first line is not the answer."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


@torch.no_grad()
def rank_scores(model, tok, prompts: list[str], options: list[str], batch_size: int,
                device: str) -> torch.Tensor:
    """Total log-probability of each option after each prompt: [len(prompts), len(options)]."""
    scores = torch.empty(len(prompts), len(options))
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        p_ids = [tok(prompts[i], add_special_tokens=False).input_ids for i, _ in chunk]
        o_ids = [tok(options[j], add_special_tokens=False).input_ids for _, j in chunk]
        n = max(len(p) + len(o) for p, o in zip(p_ids, o_ids))
        ids = torch.full((len(chunk), n), tok.pad_token_id)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for k, (p, o) in enumerate(zip(p_ids, o_ids)):  # right padding: positions line up
            ids[k, :len(p) + len(o)] = torch.tensor(p + o)
            mask[k, :len(p) + len(o)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, -n:, :].float()  # prompt tuning prepends virtual-token positions
        logp = torch.log_softmax(logits, dim=-1).cpu()
        for k, ((i, j), p, o) in enumerate(zip(chunk, p_ids, o_ids)):
            pos = torch.arange(len(p) - 1, len(p) + len(o) - 1)
            scores[i, j] = logp[k, pos, torch.tensor(o)].sum()
    return scores


class TunedPrompts:
    """The tuned model's prompts, rebuilt from what ``tokenize`` recorded in the shards.

    ``manifest.json`` holds the tokenize params that shape the text (``chat_template``,
    ``few_shot``, ``seed``) and ``demonstrations.jsonl`` the pool the demonstrations were
    drawn from, so a test record gets the very source ``tokenize`` wrote for it.
    """

    def __init__(self, task: Task, tok, manifest: dict, demos: list[Demo]):
        params = manifest.get("params", {})
        self.few_shot, self.seed = int(params.get("few_shot") or 0), int(params.get("seed") or 0)
        self.fmt = PromptFormat(task, tok, bool(params.get("chat_template")))
        if self.fmt.hash != manifest.get("template_sha256"):
            raise StageError("the task's templates (or the tokenizer's chat template) changed since the shards "
                             "were written; the adapter was trained on other prompts. Re-run tokenize and tune")
        if self.few_shot and not demos:
            raise StageError(f"the shards were cut with few_shot={self.few_shot} but hold no "
                             "demonstrations.jsonl; re-run tokenize")
        self.task, self.demos = task, demos

    @classmethod
    def from_dir(cls, task: Task, tok, shards: Path, base: Path | None, check: bool = True) -> "TunedPrompts":
        """From a shards directory; ``check`` verifies it against its manifest (and ``base``'s tokenizer)."""
        shards = Path(shards)
        if check:
            manifest = verify(shards, base, splits=("test",))
        else:  # only the manifest and demonstrations were fetched (a registered version)
            manifest = read_manifest(shards)
            if base is not None and tokenizer_fingerprint(base) != manifest["tokenizer"]["sha256"]:
                raise StageError(f"{base}: not the tokenizer the adapter's shards were cut with; "
                                 "pass --base with that version's base model")
        path = shards / "demonstrations.jsonl"
        demos = [Demo(**d) for d in read_jsonl(path)] if path.is_file() else []
        return cls(task, tok, manifest, demos)

    def source(self, record: dict) -> str:
        demos = draw_demos(self.demos, record, self.few_shot, self.seed) if self.few_shot else ()
        return self.fmt.source(self.fmt.prompt(record), demos)

    def options(self) -> dict[str, str]:
        """label -> the target text the tuned model is scored on (as tokenize renders it)."""
        texts = {label: render(self.task.target, {"verbalizer": word}) for label, word in self.task.labels.items()}
        return {k: v.lstrip() for k, v in texts.items()} if self.fmt.chat else texts


class HardPrompts:
    """The base model's prompts: the hand-written instruction, after ``k`` demonstrations
    (user/assistant turns in the chat template) drawn from a seeded sample of train records."""

    def __init__(self, task: Task, tok, train: list[dict], k: int, seed: int):
        self.task, self.tok, self.seed = task, tok, seed
        train = sorted(train, key=lambda r: str(r["id"]))  # the draw depends on the records, not their order
        pool = train if len(train) <= DEMO_POOL else random.Random(seed).sample(train, DEMO_POOL)
        self.pool = [Demo(str(r["id"]), str(r.get("group", r["id"])), self.instruction(r),
                          render_target(task, r).strip()) for r in pool]
        if k and len({d.group for d in self.pool}) <= k:
            raise StageError(f"params.yaml: evaluate.few_shot_k={k}: the train split offers "
                             f"{len({d.group for d in self.pool})} groups; lower few_shot_k")

    def instruction(self, record: dict) -> str:
        return render(self.task.zero_shot, context(self.task, record), record.get("id", "?"))

    def source(self, record: dict, k: int) -> str:
        if not k:
            return render_zero_shot(self.task, record, self.tok)
        demos = draw_demos(self.pool, record, k, self.seed)
        if not getattr(self.tok, "chat_template", None):
            shots = "".join(f"{d.prompt}\n{d.target}\n\n" for d in demos)
            return f"{shots}{self.instruction(record)}\n"
        turns = [t for d in demos for t in ({"role": "user", "content": d.prompt},
                                            {"role": "assistant", "content": d.target})]
        turns.append({"role": "user", "content": self.instruction(record)})
        return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def _tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased 13a tokens (sacrebleu's, as mteval's NIST uses) for NIST and the COCO scorers."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    return [tokenize(t.lower()).split() for t in texts]


def _nist(hyps: list[str], refs: list[list[str]]) -> float:
    from nltk.translate.nist_score import corpus_nist

    hyp_tokens = _tokens(hyps)
    if not any(hyp_tokens):
        return 0.0
    return corpus_nist([_tokens(r) for r in refs], hyp_tokens, n=5)


def _coco(hyps: list[str], refs: list[list[str]], not_computed: dict) -> tuple[list[float], float, float | None]:
    """(per-row ROUGE-L in points, CIDEr-D, METEOR 1.5) through pycocoevalcap, the COCO
    caption scorers the E2E challenge's script uses, each fed the same tokens; METEOR runs
    its jar and so needs ``java`` on PATH."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [" ".join(t)] for i, t in enumerate(_tokens(hyps))}
    gts = {i: [" ".join(t) for t in _tokens(r)] for i, r in enumerate(refs)}
    rouge = [100 * float(s) for s in Rouge().compute_score(gts, res)[1]]
    cider = float(Cider().compute_score(gts, res)[0])
    meteor = None
    if shutil.which("java") is None:
        not_computed["meteor"] = "needs a Java runtime for the METEOR 1.5 jar (none on PATH here)"
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a java subprocess, ended when the scorer is collected
        meteor = 100 * float(scorer.compute_score(gts, res)[0])
        del scorer
    return rouge, cider, meteor


def generation_metrics(hyps: list[str], refs: list[list[str]]) -> tuple[dict, list[float], dict]:
    """-> (corpus metrics, per-row ROUGE-L, {metric: why it was not computed})."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    not_computed: dict[str, str] = {}
    rouge, cider, meteor = _coco(hyps, refs, not_computed)
    metrics = {"bleu": round(bleu, 2), "nist": round(_nist(hyps, refs), 4), "meteor": meteor,
               "rouge_l": round(sum(rouge) / len(rouge), 2), "cider": cider}
    metrics = {k: (round(v, 4) if k in ("cider", "nist") else round(v, 2)) for k, v in metrics.items()
               if v is not None}
    return metrics, rouge, not_computed


def classification_metrics(pred: list[str], gold: list[str], labels: list[str]) -> tuple[dict, list[float]]:
    correct = [100.0 * (p == g) for p, g in zip(pred, gold)]
    f1s = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold))
        fp = sum(p == label and g != label for p, g in zip(pred, gold))
        fn = sum(p != label and g == label for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": round(sum(correct) / len(correct), 2),
            "macro_f1": round(100 * sum(f1s) / len(f1s), 2)}, correct


# Each metric's range, checked on every run (the GX suite checks the per-row scores).
RANGES = {"bleu": (0, 100), "meteor": (0, 100), "rouge_l": (0, 100), "accuracy": (0, 100),
          "macro_f1": (0, 100), "nist": (0, 20), "cider": (0, 10)}


def score_system(task: Task, model, tok, prompts: list[str], rows: list[TestRow], cfg: EvaluateConfig,
                 device: str, options: dict[str, str], engine: Engine | None = None
                 ) -> tuple[dict, list[str], list[float], float, dict]:
    """-> (metrics, predictions, per-row scores, tokens/s, not computed). ``model``: the model
    (classification) or the ``engine``'s served name (generation)."""
    t0 = time.perf_counter()
    not_computed: dict[str, str] = {}
    if task.kind == "classification":
        labels = list(options)
        scores = rank_scores(model, tok, prompts, [options[k] for k in labels], cfg.batch_size, device)
        preds = [labels[int(i)] for i in scores.argmax(dim=1)]
        tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) * len(labels)
        seconds = time.perf_counter() - t0
        metrics, per_row = classification_metrics(preds, [r.references[0] for r in rows], labels)
    else:
        preds, tokens = generate(engine, model, prompts, cfg)
        seconds = time.perf_counter() - t0  # decoding only: the metrics' own time is not the model's
        metrics, per_row, not_computed = generation_metrics(preds, [r.references for r in rows])
    for key, value in metrics.items():
        low, high = RANGES.get(key, (float("-inf"), float("inf")))
        if not low <= value <= high:
            raise StageError(f"metric {key} = {value} outside [{low}, {high}]: a scorer is broken")
    return metrics, preds, per_row, tokens / seconds, not_computed


def adapter_info(adapter: Path) -> dict:
    path = Path(adapter) / "ptune_adapter.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; {adapter} is not an adapter written by the tune stage")
    return read_json(path)


def report(metrics: dict) -> str:
    """The evaluation table in markdown: one line per system."""
    keys = list(dict.fromkeys(k for s in metrics["systems"] for k in metrics[s]))
    head = ["method", "trainable params", *keys, "tokens/s"]
    lines = [f"### Evaluation: {metrics['task']}, {metrics['rows']} test rows", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in metrics["systems"]:
        info = metrics["system_info"][s]
        cells = [info["label"], f"{info['trainable_parameters']:,}",
                 *(f"{metrics[s][k]}" if k in metrics[s] else "—" for k in keys),
                 f"{metrics['tokens_per_s'][s]}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Primary metric: {metrics['primary_metric']}. BLEU, METEOR, ROUGE-L, accuracy and "
              "macro-F1 in points (0-100); NIST and CIDEr on their own scales. tokens/s: generated "
              "(generation) or scored (classification) tokens per second of model time."]
    for key, why in metrics.get("not_computed", {}).items():
        lines.append(f"- {key}: not computed ({why})")
    return "\n".join(lines) + "\n"


def run(cfg: EvaluateConfig, task: Task, clean: Path, base: Path, adapter: Path, out: Path,
        shards: Path | None = None, test_file: Path | None = None, check_shards: bool = True) -> dict:
    """Score ``adapter`` and the baselines on ``clean``/test.jsonl (or ``test_file``).

    ``shards``: the directory the adapter was trained from (its prompt format); None:
    plain prompts (the format of shards cut with default params).
    """
    device, dtype = device_and_dtype()
    test_path = Path(test_file) if test_file else Path(clean) / "test.jsonl"
    rows = test_rows(task, read_jsonl(test_path), cfg.max_rows)
    if not rows:
        raise StageError(f"{test_path}: no test rows to evaluate")
    info = adapter_info(adapter)
    engine = None
    if task.kind == "classification":  # rank scoring: forward passes, nothing to decode
        tok, base_model, tuned = load_models(base, adapter, device, dtype)
    else:
        # Unbounded: a few-shot prompt past the model's context is scored as generate would
        # score it; serving refuses such a prompt instead.
        engine = Engine(base, max_batch=cfg.batch_size, device=device, dtype=dtype, bounded_context=False)
        engine.add("tuned", adapter)
        tok, base_model, tuned = engine.tokenizer, BASE, "tuned"
    if shards is not None:
        tuned_prompts = TunedPrompts.from_dir(task, tok, shards, base, check=check_shards)  # reads the manifest
        trained_on = info.get("data", {}).get("manifest_sha256")
        if trained_on and trained_on != sha256_file(Path(shards) / "manifest.json"):
            raise StageError(f"{adapter} was trained on other shards than {shards} (manifest sha256 "
                             f"{trained_on[:12]}); evaluate it with the shards it was trained on")
    else:
        tuned_prompts = TunedPrompts(task, tok, {"params": {}, "template_sha256": PromptFormat(task, tok).hash}, [])
    train_path = Path(clean) / "train.jsonl" if clean else None
    k = cfg.few_shot_k if train_path and train_path.is_file() else 0
    hard = HardPrompts(task, tok, read_jsonl(train_path) if k else [], k, cfg.seed)

    method = info["stats"]["method"]
    systems = {
        "tuned": (tuned, [tuned_prompts.source(r.fields) for r in rows], tuned_prompts.options(),
                  {"label": f"{method} (tuned)", "trainable_parameters": info["stats"]["trainable_parameters"],
                   "train_seconds": info["stats"].get("train_seconds"),
                   "train_examples": info["stats"].get("train_examples"), "train_steps": info["stats"].get("steps"),
                   "train_best_step": info["stats"].get("best_step")}),
        "zero_shot": (base_model, [hard.source(r.fields, 0) for r in rows], dict(task.labels),
                      {"label": "zero-shot prompt (base model)", "trainable_parameters": 0}),
    }
    if k:
        systems["few_shot"] = (base_model, [hard.source(r.fields, k) for r in rows], dict(task.labels),
                               {"label": f"{k}-shot prompt (base model)", "trainable_parameters": 0})
    metrics = {"task": task.name, "method": method, "primary_metric": task.primary_metric, "rows": len(rows),
               "rows_sha256": rows_sha256(rows), "test_file": str(test_path), "trainable_parameters": info["stats"]["trainable_parameters"],
               "decoding": {"num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty,
                            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_new_tokens": cfg.max_new_tokens},
               "systems": list(systems), "system_info": {s: v[3] for s, v in systems.items()},
               "tokens_per_s": {}, "not_computed": {}}
    predictions = []
    for name, (model, prompts, options, _) in systems.items():
        m, preds, per_row, tps, missing = score_system(task, model, tok, prompts, rows, cfg, device, options, engine)
        metrics[name] = m
        metrics["tokens_per_s"][name] = round(tps, 1)
        metrics["not_computed"].update(missing)
        log.info("evaluate: %s: %s (%.0f tokens/s)", name, m, tps)
        predictions += [{"system": name, "id": r.id, "prompt": p, "prediction": pred,
                         "references": r.references, "score": round(s, 2)}
                        for r, p, pred, s in zip(rows, prompts, preds, per_row)]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    pd.DataFrame([{"system": f"{s} {k}", "value": v} for s in systems for k, v in metrics[s].items()]
                 ).to_csv(out / "scores.csv", index=False)
    # The candidate's predictions are validated; the baselines' are recorded as they are
    # (an untuned model answering nothing is a finding, not a broken stage).
    tuned_rows = [p for p in predictions if p["system"] == "tuned"]
    df = pd.DataFrame({"id": [p["id"] for p in tuned_rows],
                       "prediction_chars": [len(p["prediction"]) for p in tuned_rows],
                       "score": [p["score"] for p in tuned_rows]})
    try:
        validate("predictions", df, {"expected_rows": len(rows), "min_nonempty_fraction": cfg.min_nonempty_fraction},
                 out / "validation.json")
    except StageError:
        (out / "predictions.jsonl").unlink()  # nothing downstream may read a failed evaluation
        raise
    (out / "report.md").write_text(report(metrics), encoding="utf-8")
    write_json(out / "metrics.json", metrics)
    return metrics


def collect_and_clean_file(params, task: Task, file: Path, work: Path, fmt: str | None = None) -> Path:
    """Records of ``file`` (in the format of the task's first declared source) through the
    collect and clean stages, all in the test split -> the clean test.jsonl."""
    from pipelines import clean, collect
    from pipelines.config import SourceConfig

    file = Path(file).resolve()
    if not file.is_file():
        raise StageError(f"{file}: no such file")
    declared = params.collect.sources.get(task.name)
    if not declared:
        raise StageError(f"params.yaml: collect.sources.{task.name} declares no source to take the format from")
    like = declared[0].model_dump(exclude={"name", "uri", "splits", "sha256", "format"})
    src = SourceConfig(**like, name="file", uri=str(file), splits={"test": 1.0},
                       **({"format": fmt} if fmt else {}))
    collect_cfg = params.collect.model_copy(update={"sources": {**params.collect.sources, task.name: (src,)}})
    collect.run(collect_cfg, task, Path("."), work / "raw")
    clean.run(params.clean, task, work / "raw", work / "clean")
    return work / "clean" / "test.jsonl"


def evaluate_file(params, task: Task, adapter: str, file: Path, base: Path, shards: Path, out: Path,
                  repo: Path = Path("."), fmt: str | None = None) -> dict:
    """``ptune evaluate``: score an adapter directory, or a registered ``artifact@version``
    (fetched from the DVC cache or remote at its commit), on any file in the task's source
    format, without touching the pipeline's outputs. The few-shot baseline draws from the
    project's ``data/clean/train.jsonl`` where there is one."""
    import tempfile

    from pipelines import lineage

    with tempfile.TemporaryDirectory(prefix="ptune-evaluate-") as tmp:
        work = Path(tmp)
        check = True
        if not Path(adapter).exists() and "@" in adapter:
            version = lineage.resolve(repo, adapter)
            commit = version["commit"]
            adapter_dir = lineage.materialize(repo, commit, "data/models/adapter", work / "adapter")
            shards = work / "shards"
            shards.mkdir()
            lineage.materialize(repo, commit, "data/shards/manifest.json", shards / "manifest.json")
            try:
                lineage.materialize(repo, commit, "data/shards/demonstrations.jsonl",
                                    shards / "demonstrations.jsonl")
            except StageError:
                pass  # shards cut without few-shot demonstrations have none
            check = False
            log.info("evaluate: %s is commit %s", adapter, commit[:10])
        elif Path(adapter).is_dir():
            adapter_dir = Path(adapter)
        else:
            raise StageError(f"{adapter}: neither an adapter directory nor <artifact>@<version>")
        test_file = collect_and_clean_file(params, task, file, work, fmt)
        return run(params.evaluate, task, Path("data/clean"), base, adapter_dir, out, shards=shards,
                   test_file=test_file, check_shards=check)
