"""evaluate: score the tuned adapter and the hand-written zero-shot prompt on the same
test rows.

- generation tasks (E2E): one row per distinct input (meaning representation) with
  all its references; greedy or beam decoding per params, batched with the KV cache,
  left-padded; corpus BLEU with multiple references (sacrebleu) and ROUGE-L
  (rouge-score, best reference per row).
- classification tasks (SST-2): rank scoring: the label whose verbalizer has the
  highest total log-probability after the prompt wins; accuracy and macro-F1.

The baseline is the untuned base model with ``Task.zero_shot`` in its chat template.
Every metric is in points (0-100), so the registration gate's margins read the same
for every task.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipelines.common import StageError, read_json, read_jsonl, write_json
from pipelines.config import EvaluateConfig
from pipelines.prompts import render_prompt, render_zero_shot, verbalizers
from pipelines.tasks import Task
from pipelines.tune import device_and_dtype
from pipelines.validation import validate

log = logging.getLogger(__name__)


@dataclass
class Row:
    id: str
    fields: dict
    references: list[str]


def test_rows(task: Task, records: list[dict], max_rows: int | None) -> list[Row]:
    """Generation: one row per distinct input with every reference; classification: one per record."""
    if task.kind == "classification":
        rows = [Row(r["id"], r, [r[task.target_field]]) for r in records]
    else:
        by_input: dict[tuple, Row] = {}
        inputs = [f for f in task.fields if f != task.target_field]
        for r in records:
            key = tuple(r[f] for f in inputs)
            if key not in by_input:
                by_input[key] = Row(r["id"], r, [])
            by_input[key].references.append(r[task.target_field])
        rows = list(by_input.values())
    return rows[:max_rows] if max_rows else rows


def load_models(base: Path, adapter: Path, device: str, dtype: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"  # generation continues from the last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    if (adapter / "adapter_config.json").is_file():
        tuned = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).to(device).eval()
    elif (adapter / "model.safetensors").is_file():  # full fine-tuning
        tuned = AutoModelForCausalLM.from_pretrained(adapter, dtype=dtype).to(device).eval()
    else:
        raise StageError(f"{adapter}: neither a PEFT adapter nor a full checkpoint")
    return tok, base_model, tuned


@torch.no_grad()
def generate(model, tok, prompts: list[str], cfg: EvaluateConfig, device: str) -> tuple[list[str], int]:
    """Batched decoding, longest prompts first so each batch pads little. -> (texts, new tokens)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    new_tokens = 0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                             no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        cont = gen[:, enc.input_ids.shape[1]:]
        new_tokens += int((cont != tok.pad_token_id).sum())
        for i, text in zip(idx, tok.batch_decode(cont, skip_special_tokens=True)):
            out[i] = first_line(text)
    return out, new_tokens


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


def generation_metrics(hyps: list[str], refs: list[list[str]]) -> tuple[dict, list[float]]:
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(r, h)["rougeL"].fmeasure * 100 for h, r in zip(hyps, refs)]
    per_row = [sacrebleu.sentence_bleu(h, r).score for h, r in zip(hyps, refs)]
    return {"bleu": round(bleu, 2), "rouge_l": round(sum(rouge) / len(rouge), 2)}, per_row


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


def score_system(task: Task, model, tok, prompts: list[str], rows: list[Row], cfg: EvaluateConfig,
                 device: str, options: dict[str, str]) -> tuple[dict, list[str], list[float], float]:
    """-> (metrics, predictions, per-row scores, tokens/s)."""
    t0 = time.perf_counter()
    if task.kind == "classification":
        labels = list(options)
        scores = rank_scores(model, tok, prompts, [options[k] for k in labels], cfg.batch_size, device)
        preds = [labels[int(i)] for i in scores.argmax(dim=1)]
        tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) * len(labels)
        metrics, per_row = classification_metrics(preds, [r.references[0] for r in rows], labels)
    else:
        preds, tokens = generate(model, tok, prompts, cfg, device)
        metrics, per_row = generation_metrics(preds, [r.references for r in rows])
    return metrics, preds, per_row, tokens / (time.perf_counter() - t0)


def run(cfg: EvaluateConfig, task: Task, clean: Path, base: Path, adapter: Path, out: Path) -> dict:
    device, dtype = device_and_dtype()
    rows = test_rows(task, read_jsonl(clean / "test.jsonl"), cfg.max_rows)
    if not rows:
        raise StageError(f"{clean}/test.jsonl: no test rows to evaluate")
    tok, base_model, tuned = load_models(base, adapter, device, dtype)
    adapter_info = read_json(adapter / "ptune_adapter.json")

    systems = {
        "tuned": (tuned, [render_prompt(task, r.fields) for r in rows], verbalizers(task)),
        "zero_shot": (base_model, [render_zero_shot(task, r.fields, tok) for r in rows],
                      dict(task.labels)),
    }
    metrics = {"task": task.name, "method": adapter_info["stats"]["method"],
               "primary_metric": task.primary_metric, "rows": len(rows),
               "trainable_parameters": adapter_info["stats"]["trainable_parameters"],
               "tokens_per_s": {}}
    predictions = []
    for name, (model, prompts, options) in systems.items():
        m, preds, per_row, tps = score_system(task, model, tok, prompts, rows, cfg, device, options)
        metrics[name] = m
        metrics["tokens_per_s"][name] = round(tps, 1)
        log.info("evaluate: %s: %s (%.0f tokens/s)", name, m, tps)
        predictions += [{"system": name, "id": r.id, "prompt": p, "prediction": pred,
                         "references": r.references, "score": round(s, 2)}
                        for r, p, pred, s in zip(rows, prompts, preds, per_row)]

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    pd.DataFrame([{"system": f"{s} {k}", "value": v} for s in systems for k, v in metrics[s].items()]
                 ).to_csv(out / "scores.csv", index=False)
    # The candidate's predictions are validated; the baseline's are recorded as they are
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
    write_json(out / "metrics.json", metrics)
    return metrics
