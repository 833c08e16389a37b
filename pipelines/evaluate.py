"""evaluate: score the tuned adapter on the test rows, beside the prompt baselines.

- ``tuned``: the adapter, prompted exactly as ``tokenize`` built its training sources
  (the shards' manifest says whether the chat template and few-shot demonstrations were
  on; the demonstrations come from the same pool, drawn with the same seed);
- ``zero_shot`` and ``few_shot``: the base model prompted by hand, as the ``baselines``
  stage scored it on the same rows with the same decoding (checked by the rows' hash);
  ``ptune evaluate`` on a file of one's own scores them here instead.

Scoring (decoding through the serving engine, the task's metrics) is pipelines/scoring.py.
The record is written in two files (pipelines/evaluation.py): ``metrics.json``, numbers
only, as ``dvc metrics`` and ``dvc exp show`` tabulate them, and ``details.json``
(task, method, primary metric, the rows' hash, decoding, labels) beside it.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from pipelines import baselines, evaluation
from pipelines.common import StageError, read_json, read_jsonl, sha256_file
from pipelines.config import EvaluateConfig
from pipelines.device import device_and_dtype
from pipelines.prompts import Demo, PromptFormat, draw_demos, render
from pipelines.scoring import TestRow, references_per_row, rows_sha256, score_system, test_rows
from pipelines.shards import read_manifest, tokenizer_fingerprint, verify
from pipelines.tasks import Task
from pipelines.validation import validate
from serving.engine import Engine

log = logging.getLogger(__name__)


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


NOT_SCORED = "not_scored.jsonl"  # ptune evaluate --file: the file's records collect or clean left out


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
    lines += ["", f"Primary metric: {metrics['primary_metric']}. BLEU, METEOR, ROUGE-L, chrF, exact match, "
              "accuracy and macro-F1 in points (0-100); NIST and CIDEr on their own scales. tokens/s: generated "
              "(generation) or scored (classification) tokens per second of model time."]
    if note := evaluation.bleu_caveat(metrics["task"], keys, metrics.get("references_per_row"), metrics["rows"]):
        lines += ["", note, ""]
    for key, why in metrics.get("not_computed", {}).items():
        lines.append(f"- {key}: not computed ({why})")
    if left := metrics.get("not_scored"):  # ptune evaluate --file: what of the file was not scored, and why
        if left["records"]:
            reasons = ", ".join(f"{reason} {n}" for reason, n in left["reasons"].items())
            lines.append(f"- {left['records']} of {left['records'] + left['kept']} records of {left['file']} not "
                         f"scored ({reasons}): each with its reason in {NOT_SCORED}")
        if left["test_rows"] > metrics["rows"]:
            lines.append(f"- the first {metrics['rows']} of {left['test_rows']} test rows scored "
                         "(evaluate.max_rows; `--max-rows` to change)")
    return "\n".join(lines) + "\n"



def run(cfg: EvaluateConfig, task: Task, clean: Path, base: Path, adapter: Path, out: Path,
        shards: Path | None = None, test_file: Path | None = None, check_shards: bool = True,
        scored_baselines: Path | None = None) -> dict:
    """Score ``adapter`` on ``clean``/test.jsonl (or ``test_file``) -> the evaluation record.

    ``shards``: the directory the adapter was trained from (its prompt format); None:
    plain prompts (the format of shards cut with default params). ``scored_baselines``:
    the baselines stage's output for these rows; None: score the baselines here (with
    ``clean``/train.jsonl, where there is one, for the few-shot demonstrations).
    """
    device, dtype = device_and_dtype()
    test_path = Path(test_file) if test_file else Path(clean) / "test.jsonl"
    rows = test_rows(task, read_jsonl(test_path), cfg.max_rows)
    if not rows:
        raise StageError(f"{test_path}: no test rows to evaluate")
    info = adapter_info(adapter)
    prior = _checked(baselines.read(scored_baselines), rows, cfg, scored_baselines) if scored_baselines else None
    # Decoding and rank scoring both run in the engine, as `ptune serve` does. Unbounded: a
    # few-shot prompt past the model's context is scored as generate would score it; serving
    # refuses such a prompt instead.
    engine = Engine(base, max_batch=cfg.batch_size, device=device, dtype=dtype, bounded_context=False)
    try:
        engine.add("tuned", adapter)
        prompts = _tuned_prompts(task, engine.tokenizer, adapter, info, base, shards, check_shards)
        sources = [prompts.source(r.fields) for r in rows]
        s = score_system(task, engine, "tuned", sources, rows, cfg, prompts.options())
        log.info("evaluate: tuned: %s (%.0f tokens/s)", s.metrics, s.tokens_per_s)
        if prior is None:
            train_path = Path(clean) / "train.jsonl" if clean else None
            train = read_jsonl(train_path) if cfg.few_shot_k and train_path and train_path.is_file() else []
            prior = baselines.score(cfg, task, rows, engine, train)
    finally:
        engine.close()
    stats = info["stats"]
    tuned_info = {"label": f"{stats['method']} (tuned)", "trainable_parameters": stats["trainable_parameters"],
                  "train_seconds": stats.get("train_seconds"), "train_examples": stats.get("train_examples"),
                  "train_steps": stats.get("steps"), "train_best_step": stats.get("best_step")}
    systems = ["tuned", *prior.systems]
    record = {"task": task.name, "method": stats["method"], "primary_metric": task.primary_metric,
              "rows": len(rows), "rows_sha256": rows_sha256(rows), "test_file": str(test_path),
              "references_per_row": round(references_per_row(rows), 2),
              "trainable_parameters": stats["trainable_parameters"], "decoding": baselines.decoding(cfg),
              "systems": systems,
              "system_info": {"tuned": tuned_info, **{n: {k: v[k] for k in ("label", "trainable_parameters")}
                                                     for n, v in prior.systems.items()}},
              "tokens_per_s": {"tuned": round(s.tokens_per_s, 1),
                               **{n: v["tokens_per_s"] for n, v in prior.systems.items()}},
              "not_computed": {**s.not_computed, **prior.not_computed},
              "tuned": s.metrics, **{n: v["metrics"] for n, v in prior.systems.items()}}
    predictions = baselines.prediction_records("tuned", rows, sources, s.predictions, s.per_row) + prior.predictions
    _write(Path(out), record, predictions, cfg)
    return record


def _checked(prior: baselines.Baselines, rows: list[TestRow], cfg: EvaluateConfig, where: Path) -> baselines.Baselines:
    """The baselines stage's scores, if they are of these rows with this decoding."""
    if prior.rows_sha256 != rows_sha256(rows):
        raise StageError(f"{where}: the baselines were scored on other test rows ({prior.rows} rows, hash "
                         f"{prior.rows_sha256[:12]}) than these {len(rows)}; rerun `dvc repro baselines`")
    if prior.decoding != baselines.decoding(cfg):
        raise StageError(f"{where}: the baselines were decoded with {prior.decoding}, this evaluation with "
                         f"{baselines.decoding(cfg)}; rerun `dvc repro baselines`")
    return prior


def _tuned_prompts(task: Task, tok, adapter: Path, info: dict, base: Path, shards: Path | None,
                   check_shards: bool) -> TunedPrompts:
    if shards is None:
        return TunedPrompts(task, tok, {"params": {}, "template_sha256": PromptFormat(task, tok).hash}, [])
    prompts = TunedPrompts.from_dir(task, tok, shards, base, check=check_shards)  # reads the manifest
    trained_on = info.get("data", {}).get("manifest_sha256")
    if trained_on and trained_on != sha256_file(Path(shards) / "manifest.json"):
        raise StageError(f"{adapter} was trained on other shards than {shards} (manifest sha256 "
                         f"{trained_on[:12]}); evaluate it with the shards it was trained on")
    return prompts


def _write(out: Path, record: dict, predictions: list[dict], cfg: EvaluateConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    pd.DataFrame([{"system": f"{s} {k}", "value": v} for s in record["systems"] for k, v in record[s].items()]
                 ).to_csv(out / "scores.csv", index=False)
    # The candidate's predictions are validated; the baselines' are recorded as they are
    # (an untuned model answering nothing is a finding, not a broken stage).
    tuned_rows = [p for p in predictions if p["system"] == "tuned"]
    df = pd.DataFrame({"id": [p["id"] for p in tuned_rows],
                       "prediction_chars": [len(p["prediction"]) for p in tuned_rows],
                       "score": [p["score"] for p in tuned_rows]})
    try:
        validate("predictions", df, {"expected_rows": record["rows"],
                                     "min_nonempty_fraction": cfg.min_nonempty_fraction}, out / "validation.json")
    except StageError:
        (out / "predictions.jsonl").unlink()  # nothing downstream may read a failed evaluation
        raise
    (out / "report.md").write_text(report(record), encoding="utf-8")
    evaluation.write(out, record)


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
        if not Path(adapter).exists():
            version = lineage.resolve_path_or_version(repo, adapter)
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
            raise StageError(f"{adapter}: not a directory (an adapter directory or <artifact>[@<version>] is expected)")
        try:
            test_file = collect_and_clean_file(params, task, file, work, fmt)
        except StageError as exc:
            raise StageError(_keep_failure_reports(str(exc), work, Path(out))) from None
        left, kept = not_scored(work), read_jsonl(test_file)
        if not kept:
            Path(out).mkdir(parents=True, exist_ok=True)
            _write_not_scored(Path(out), left)
            reasons = dict(Counter(r["reason"] for r in left).most_common())
            raise StageError(f"{file}: no record left to score: collect and clean left out all {len(left)} "
                             f"({reasons}); each with its reason in {Path(out) / NOT_SCORED}")
        record = run(params.evaluate, task, Path("data/clean"), base, adapter_dir, out, shards=shards,
                     test_file=test_file, check_shards=check)
    _write_not_scored(Path(out), left)  # written even if empty: nothing was left out
    record["not_scored"] = {"file": str(file), "records": len(left), "kept": len(kept),
                            "test_rows": len(test_rows(task, kept, None)),
                            "reasons": dict(Counter(r["reason"] for r in left).most_common())}
    (Path(out) / "report.md").write_text(report(record), encoding="utf-8")
    return record


def _keep_failure_reports(message: str, work: Path, out: Path) -> str:
    """``message`` with the failure reports collect or clean left in the scratch directory
    (``raw.quarantine-failed.jsonl``, ``clean.validation-failed.json``) moved to ``out``: the
    scratch directory goes when ``ptune evaluate`` ends, and the error points at them."""
    import shutil

    for report_file in sorted(work.glob("*-failed.json*")):
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(report_file, out / report_file.name)
        message = message.replace(str(report_file), str(out / report_file.name))
    return message


def _write_not_scored(out: Path, left: list[dict]) -> None:
    # A quarantined row's undecodable bytes come back as surrogates: written escaped, as collect writes them.
    with open(out / NOT_SCORED, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in left)


def not_scored(work: Path) -> list[dict]:
    """The records of a file ``ptune evaluate`` scores that collect quarantined or clean removed,
    each with the stage and its reason (the test split holds the rest): a user's row is never
    dropped without a word."""
    left = [{"stage": "collect", **r} for r in read_jsonl(work / "raw" / "quarantine.jsonl")]
    for path in sorted((work / "clean" / "removed").glob("*.jsonl")):
        left += [{"stage": "clean", **r} for r in read_jsonl(path)]
    return left
