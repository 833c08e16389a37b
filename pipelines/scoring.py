"""Scoring a system on the test rows: the rows, decoding, and the task's metrics.

Shared by the ``baselines`` stage (the base model prompted by hand) and the ``evaluate``
stage (the tuned adapter), so the two score alike and an edit to one stage's prompts
reruns only that stage.

Generation tasks (E2E, Stack Exchange QA): one row per distinct input with all its
references; greedy or beam decoding (length penalty, no-repeat n-grams) per params,
through the serving engine (serving/engine.py), the one decoding path ``ptune serve``
answers with. The E2E challenge's metrics as in the Prefix-Tuning paper's Table 1: BLEU
(sacrebleu, multi-reference), NIST (nltk), METEOR (METEOR 1.5 through pycocoevalcap;
needs a Java runtime), ROUGE-L and CIDEr-D (pycocoevalcap, as the challenge's scoring
script computes them: ROUGE-L is the LCS F-measure with beta 1.2 from the best precision
and the best recall over a row's references, averaged over rows). BLEU, METEOR and
ROUGE-L are in points (0-100); NIST and CIDEr on their own scales, as the paper reports
them. Beside them chrF (sacrebleu) and exact match, in points. A task reports the metrics
its declaration lists (``metrics:``; all of them by default). What cannot be computed on
this machine is named, with the reason, under ``not_computed``.

Classification tasks (SST-2): rank scoring: the label whose verbalizer has the highest
total log-probability after the prompt wins (``Engine.score``: the log-probabilities a
served completion's ``echo`` gives); accuracy and macro-F1 in points.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from pipelines.common import StageError
from pipelines.config import EvaluateConfig
from pipelines.conversations import FIELD as CONVERSATION
from pipelines.tasks import METRICS, Task
from serving.engine import Engine
from serving.types import Decoding, Request


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


def references_per_row(rows: list[TestRow]) -> float:
    """The mean count of references a scored row is judged against (E2E: per MR)."""
    return sum(len(r.references) for r in rows) / len(rows) if rows else 0.0


def test_rows(task: Task, records: list[dict], max_rows: int | None) -> list[TestRow]:
    """Generation: one row per distinct input with every reference; classification: one per record."""
    if task.kind == "classification":
        rows = [TestRow(r["id"], r, [r[task.target_field]]) for r in records]
    elif task.chat:  # one row per distinct conversation so far; its final answers are the references
        by_history: dict[str, TestRow] = {}
        for r in records:
            turns = r[CONVERSATION]
            key = json.dumps(turns[:-1], sort_keys=True, ensure_ascii=False)
            by_history.setdefault(key, TestRow(r["id"], r, [])).references.append(turns[-1]["content"])
        rows = list(by_history.values())
    else:
        by_input: dict[tuple, TestRow] = {}
        inputs = task.input_fields
        for r in records:
            key = tuple(r[f] for f in inputs)
            if key not in by_input:
                by_input[key] = TestRow(r["id"], r, [])
            by_input[key].references.append(r[task.target_field])
        rows = list(by_input.values())
    return rows[:max_rows] if max_rows else rows


def generate(engine: Engine, model: str, prompts: list[str], cfg: EvaluateConfig, whole: bool = False
             ) -> tuple[list[str], int]:
    """Decode ``prompts`` with the engine's served ``model`` -> (first lines, new tokens);
    ``whole``: the whole answers, stripped (a chat turn is scored as the assistant says it).

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
        out[i] = choice.text.strip() if whole else first_line(choice.text)
    return out, sum(choice.completion_tokens for (choice,) in done)


def first_line(text: str) -> str:
    """Both systems are asked for one sentence; anything after the first line is not the answer."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def rank_scores(engine: Engine, model: str, prompts: list[str], options: list[str]) -> torch.Tensor:
    """Total log-probability of each option after each prompt under the engine's ``model``:
    [len(prompts), len(options)]. The engine's scoring (``Engine.score``): a served
    completion's ``echo`` log-probabilities are these, by construction."""
    p_ids = [engine.encode(p) for p in prompts]
    o_ids = [engine.encode(o) for o in options]
    if not all(p_ids) or not all(o_ids):
        raise StageError("rank scoring: a prompt or an option is empty (no token to condition on or to score)")
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    scored = engine.score(model, [p_ids[i] + o_ids[j] for i, j in pairs])
    scores = torch.empty(len(prompts), len(options))
    for (i, j), logprobs in zip(pairs, scored):
        scores[i, j] = sum(lp.logprob for lp in logprobs[len(p_ids[i]):])
    return scores



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
    # mteval-v13a divides each order's information by max(hypothesis n-grams, 1), so an order no
    # hypothesis is long enough for adds 0; NLTK divides by the count itself, and raised
    # ZeroDivisionError on a corpus whose answers were all under 5 tokens. Orders up to the
    # longest answer's length give mteval's sum (an order's weights and the length penalty do
    # not depend on the highest order counted).
    return corpus_nist([_tokens(r) for r in refs], hyp_tokens, n=min(5, max(map(len, hyp_tokens))))


def _coco(hyps: list[str], refs: list[list[str]], wanted: tuple[str, ...], not_computed: dict
          ) -> tuple[list[float], float | None, float | None]:
    """(per-row ROUGE-L in points, CIDEr-D, METEOR 1.5) through pycocoevalcap, the COCO
    caption scorers the E2E challenge's script uses, each fed the same tokens; CIDEr and
    METEOR only where ``wanted``; METEOR runs its jar and so needs ``java`` on PATH."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [" ".join(t)] for i, t in enumerate(_tokens(hyps))}
    gts = {i: [" ".join(t) for t in _tokens(r)] for i, r in enumerate(refs)}
    rouge = [100 * float(s) for s in Rouge().compute_score(gts, res)[1]]
    cider = float(Cider().compute_score(gts, res)[0]) if "cider" in wanted else None
    return rouge, cider, _meteor(gts, res, not_computed) if "meteor" in wanted else None


def _meteor(gts: dict, res: dict, not_computed: dict) -> float | None:
    if shutil.which("java") is None:
        not_computed["meteor"] = "needs a Java runtime for the METEOR 1.5 jar (none on PATH here)"
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()  # a java subprocess, ended when the scorer is collected
    try:
        return 100 * float(scorer.compute_score(gts, res)[0])
    finally:
        del scorer


def _normalized(text: str) -> str:
    return " ".join(text.split())


class GenerationMetrics(NamedTuple):
    """A generation system's corpus metrics, its per-row scores (ROUGE-L and exact match, in
    points: what the paired bootstrap resamples) and, per metric that could not be computed
    here, why."""
    metrics: dict[str, float]
    per_row: dict[str, list[float]]
    not_computed: dict[str, str]


def generation_metrics(hyps: list[str], refs: list[list[str]], wanted: tuple[str, ...] = METRICS["generation"]
                       ) -> GenerationMetrics:
    """The ``wanted`` metrics: BLEU, NIST, METEOR, ROUGE-L and CIDEr-D as the E2E challenge's
    script computes them; chrF (sacrebleu, multi-reference); exact match (a row scores 100
    when its answer equals one of its references, whitespace runs folded). Per-row ROUGE-L
    and exact match are always computed: one of them is each prediction's score."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    not_computed: dict[str, str] = {}
    rouge, cider, meteor = _coco(hyps, refs, wanted, not_computed)
    exact = [100.0 * (_normalized(h) in {_normalized(r) for r in rs}) for h, rs in zip(hyps, refs)]
    compute = {
        "bleu": lambda: sacrebleu.corpus_bleu(hyps, streams).score,
        "nist": lambda: _nist(hyps, refs),
        "meteor": lambda: meteor,
        "rouge_l": lambda: sum(rouge) / len(rouge),
        "cider": lambda: cider,
        "chrf": lambda: sacrebleu.corpus_chrf(hyps, streams).score,
        "exact_match": lambda: sum(exact) / len(exact),
    }
    metrics = {k: compute[k]() for k in METRICS["generation"] if k in wanted}
    metrics = {k: (round(v, 4) if k in ("cider", "nist") else round(v, 2)) for k, v in metrics.items()
               if v is not None}
    return GenerationMetrics(metrics, {"rouge_l": rouge, "exact_match": exact}, not_computed)


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
          "chrf": (0, 100), "exact_match": (0, 100),
          "macro_f1": (0, 100), "nist": (0, 20), "cider": (0, 10)}


@dataclass
class Scored:
    """One system's result on the test rows."""
    metrics: dict  # metric -> value (points, or the metric's own scale)
    predictions: list[str]  # per row, in row order
    per_row: list[float]  # the per-row score, of the task's row_metric (ROUGE-L, exact match or accuracy)
    tokens_per_s: float  # generated (generation) or scored (classification) tokens per second of model time
    not_computed: dict = field(default_factory=dict)  # metric -> why it could not be computed here


def score_system(task: Task, engine: Engine, model: str, prompts: list[str], rows: list[TestRow],
                 cfg: EvaluateConfig, options: dict[str, str]) -> Scored:
    """Score the ``engine``'s served ``model`` on ``prompts``: rank scoring (classification)
    or decoding (generation)."""
    t0 = time.perf_counter()
    not_computed: dict[str, str] = {}
    if task.kind == "classification":
        labels = list(options)
        scores = rank_scores(engine, model, prompts, [options[k] for k in labels])
        preds = [labels[int(i)] for i in scores.argmax(dim=1)]
        tokens = sum(len(engine.encode(p)) for p in prompts) * len(labels)
        seconds = time.perf_counter() - t0
        metrics, per_row = classification_metrics(preds, [r.references[0] for r in rows], labels)
        metrics = {k: v for k, v in metrics.items() if k in task.scored_metrics}
    else:
        preds, tokens = generate(engine, model, prompts, cfg, whole=task.chat)
        seconds = time.perf_counter() - t0  # decoding only: the metrics' own time is not the model's
        metrics, per_rows, not_computed = generation_metrics(preds, [r.references for r in rows],
                                                             task.scored_metrics)
        per_row = per_rows[task.row_metric]
    for key, value in metrics.items():
        low, high = RANGES.get(key, (float("-inf"), float("inf")))
        if not low <= value <= high:
            raise StageError(f"metric {key} = {value} outside [{low}, {high}]: a scorer is broken")
    return Scored(metrics, preds, per_row, tokens / seconds, not_computed)
