"""baselines: the untuned base model, prompted by hand, scored on the test rows.

- ``zero_shot``: ``Task.zero_shot`` in the base model's chat template;
- ``few_shot``: the same instruction after ``evaluate.few_shot_k`` demonstrations from
  the train split (the "hard prompt" baseline), seeded, never the row's own group.
- A chat task: the conversation so far in the chat template (zero-shot), after
  ``few_shot_k`` exchanges of train conversations (few-shot); the final answer is scored.

A stage of its own, keyed on what the baselines depend on (the base model, the clean
splits, the task and the evaluate params): a new experiment (``dvc exp run -S
tune.method=prefix``) reruns ``evaluate``, which scores only the adapter and reads these
scores, while this stage stays cached.

Writes ``scores.json`` (per system: its metrics, label and tokens/s; the rows' hash and
the decoding, which evaluate checks against its own), ``predictions.jsonl`` and the
validation summary. An untuned model that answers nothing is a finding, not a broken
stage: the suite checks the rows and the scores' range, not the answers' length.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines import conversations
from pipelines.common import StageError, atomic_dir, read_json, read_jsonl, write_json
from pipelines.conversations import FIELD as CONVERSATION
from pipelines.config import EvaluateConfig
from pipelines.device import device_and_dtype
from pipelines.prompts import Demo, context, draw_demos, render, render_target, render_zero_shot
from pipelines.scoring import TestRow, rows_sha256, score_system, test_rows
from pipelines.tasks import Task
from pipelines.validation import validate
from serving.engine import BASE, Engine

log = logging.getLogger(__name__)

DEMO_POOL = 256  # train records the few-shot baseline draws from: variety at bounded memory
SCORES = "scores.json"
PREDICTIONS = "predictions.jsonl"


class HardPrompts:
    """The base model's prompts: the hand-written instruction, after ``k`` demonstrations
    (user/assistant turns in the chat template) drawn from a seeded sample of train records."""

    def __init__(self, task: Task, tok, train: list[dict], k: int, seed: int):
        self.task, self.tok, self.seed = task, tok, seed
        train = sorted(train, key=lambda r: str(r["id"]))  # the draw depends on the records, not their order
        pool = train if len(train) <= DEMO_POOL else random.Random(seed).sample(train, DEMO_POOL)
        # A chat task's demonstration is a train conversation's last exchange (user turn, answer).
        self.pool = [Demo(str(r["id"]), str(r.get("group", r["id"])), *(
            (r[CONVERSATION][-2]["content"], r[CONVERSATION][-1]["content"]) if task.chat
            else (self.instruction(r), render_target(task, r).strip()))) for r in pool]
        if k and len({d.group for d in self.pool}) <= k:
            raise StageError(f"params.yaml: evaluate.few_shot_k={k}: the train split offers "
                             f"{len({d.group for d in self.pool})} groups; lower few_shot_k")

    def instruction(self, record: dict) -> str:
        return render(self.task.zero_shot, context(self.task, record), record.get("id", "?"))

    def source(self, record: dict, k: int) -> str:
        if self.task.chat:  # the conversation so far, the demonstrations as exchanges before it
            turns = conversations.with_system(record[CONVERSATION][:-1], self.task.system)
            system = turns[:1] if turns[0]["role"] == "system" else []
            shots = [t for d in (draw_demos(self.pool, record, k, self.seed) if k else [])
                     for t in ({"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.target})]
            return conversations.prompt(self.tok, system + shots + turns[len(system):])
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


@dataclass
class Baselines:
    """The baselines' result on one set of test rows (what ``scores.json`` and
    ``predictions.jsonl`` hold)."""
    rows: int
    rows_sha256: str
    decoding: dict
    systems: dict  # name -> {"label", "trainable_parameters", "metrics", "tokens_per_s"}
    not_computed: dict
    predictions: list[dict]  # {"system", "id", "prompt", "prediction", "references", "score"}


def decoding(cfg: EvaluateConfig) -> dict:
    """The decoding settings every scored system shares (and that comparisons check)."""
    return {"num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty,
            "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "max_new_tokens": cfg.max_new_tokens}


def prediction_records(system: str, rows: list[TestRow], prompts: list[str], preds: list[str],
                       per_row: list[float]) -> list[dict]:
    return [{"system": system, "id": r.id, "prompt": p, "prediction": pred, "references": r.references,
             "score": round(s, 2)} for r, p, pred, s in zip(rows, prompts, preds, per_row)]


def score(cfg: EvaluateConfig, task: Task, rows: list[TestRow], engine: Engine, train: list[dict]) -> Baselines:
    """Score the zero-shot prompt and (with ``evaluate.few_shot_k`` and train records) the
    few-shot prompt on the ``engine``'s base model."""
    k = cfg.few_shot_k if train else 0
    hard = HardPrompts(task, engine.tokenizer, train, k, cfg.seed)
    prompted = {"zero_shot": ("zero-shot prompt (base model)", 0)}
    if k:
        prompted["few_shot"] = (f"{k}-shot prompt (base model)", k)
    result = Baselines(len(rows), rows_sha256(rows), decoding(cfg), {}, {}, [])
    for name, (label, shots) in prompted.items():
        prompts = [hard.source(r.fields, shots) for r in rows]
        s = score_system(task, engine, BASE, prompts, rows, cfg, dict(task.labels))
        log.info("baselines: %s: %s (%.0f tokens/s)", name, s.metrics, s.tokens_per_s)
        result.systems[name] = {"label": label, "trainable_parameters": 0, "metrics": s.metrics,
                                "tokens_per_s": round(s.tokens_per_s, 1)}
        result.not_computed.update(s.not_computed)
        result.predictions += prediction_records(name, rows, prompts, s.predictions, s.per_row)
    return result


def read(path: Path) -> Baselines:
    """The stage's output directory -> its ``Baselines``."""
    path = Path(path)
    if not (path / SCORES).is_file() or not (path / PREDICTIONS).is_file():
        raise StageError(f"{path}: no {SCORES} and {PREDICTIONS}; the baselines stage writes them "
                         "(`dvc repro baselines`)")
    s = read_json(path / SCORES)
    return Baselines(s["rows"], s["rows_sha256"], s["decoding"], s["systems"], s.get("not_computed", {}),
                     read_jsonl(path / PREDICTIONS))


def run(cfg: EvaluateConfig, task: Task, clean: Path, base: Path, out: Path) -> dict:
    """The ``baselines`` stage: score the hand-written prompts on ``clean``/test.jsonl."""
    device, dtype = device_and_dtype()
    test_path = Path(clean) / "test.jsonl"
    rows = test_rows(task, read_jsonl(test_path), cfg.max_rows)
    if not rows:
        raise StageError(f"{test_path}: no test rows to score")
    train_path = Path(clean) / "train.jsonl"
    train = read_jsonl(train_path) if cfg.few_shot_k and train_path.is_file() else []
    with atomic_dir(out) as staging:
        # Rank scoring and decoding both in the engine, as evaluate and `ptune serve` run them.
        engine = Engine(base, max_batch=cfg.batch_size, device=device, dtype=dtype, bounded_context=False)
        try:
            result = score(cfg, task, rows, engine, train)
        finally:
            engine.close()
        with open(staging / PREDICTIONS, "w", encoding="utf-8") as f:
            for p in result.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        write_json(staging / SCORES, {"task": task.name, "rows": result.rows, "rows_sha256": result.rows_sha256,
                                      "test_file": str(test_path), "decoding": result.decoding,
                                      "systems": result.systems, "not_computed": result.not_computed})
        df = pd.DataFrame({"system": [p["system"] for p in result.predictions],
                           "id": [p["id"] for p in result.predictions],
                           "score": [p["score"] for p in result.predictions]})
        validate("baselines", df, {"expected_rows": len(rows) * len(result.systems)}, staging / "validation.json")
    return {name: s["metrics"] for name, s in result.systems.items()}
