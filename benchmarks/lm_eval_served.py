"""A served version scored by lm-evaluation-harness, checked against lm-eval's own `hf`
model running the same adapter through PEFT.

1. A multiple-choice task written from the project's test split: for each of --questions
   meaning representations (seeded), its first reference among the first references of
   three other MRs, in the adapter's prompt format (``Attributes: <mr>\nDescription:``).
2. `ptune serve` on a free loopback port; lm-eval's `local-completions` model scores the
   task over the served version (token ids, ``echo``, ``logprobs``: what its log-likelihood
   requests send) and over `base`.
3. lm-eval's `hf` model with ``peft=<adapter>`` scores the same task in this process's
   environment; the two runs' per-choice log-likelihoods are compared.

lm-eval is not a ptune dependency. Install it beside the project's environment, e.g.
``python -m venv /tmp/lmenv && echo $PWD/.venv/lib/python3.11/site-packages >
/tmp/lmenv/lib/python3.11/site-packages/ptune.pth && /tmp/lmenv/bin/pip install "lm-eval[api]"``
(the ``.pth`` line lends it torch, transformers and PEFT for the `hf` reference), and pass
its ``lm_eval`` with --lm-eval. --adapter must be the directory of the version --model
serves (after `make run`: data/models/adapter is the prod version).

usage: python benchmarks/lm_eval_served.py --lm-eval /tmp/lmenv/bin/lm_eval [--project .]
           [--model e2e-adapter] [--adapter data/models/adapter] [--questions 60]
           [--out benchmarks/results/lm_eval_served.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from datetime import date
from pathlib import Path

from serve_setup import load_average, serving

TASK = "ptune_e2e_choice"


def write_task(test: Path, questions: int, out: Path) -> None:
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    by_mr: dict[str, str] = {}
    for r in rows:
        by_mr.setdefault(r["mr"], r["ref"])
    rng = random.Random(0)
    mrs = sorted(by_mr)
    rng.shuffle(mrs)
    docs = []
    for mr in mrs[:questions]:
        choices = [by_mr[m] for m in rng.sample([m for m in mrs if m != mr], 3)]
        label = rng.randrange(4)
        choices.insert(label, by_mr[mr])
        docs.append({"mr": mr, "choices": choices, "label": label})
    (out / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Attributes: {{mr}}\\nDescription:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def lm_eval(exe: str, task_dir: Path, out: Path, model: str, model_args: str, *extra: str) -> tuple[dict, list]:
    """One lm-eval run -> (its metrics, each document's choice log-likelihoods in doc order)."""
    cmd = [exe, "--model", model, "--model_args", model_args, "--tasks", TASK, "--include_path", str(task_dir),
           "--batch_size", "8", "--output_path", str(out), "--log_samples", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"lm_eval failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    samples = sorted((json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    scores = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return {k.split(",")[0]: v for k, v in results.items() if k.startswith("acc")}, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", required=True, help="the lm_eval executable of an environment that has it")
    ap.add_argument("--project", default=".")
    ap.add_argument("--model", default="e2e-adapter")
    ap.add_argument("--adapter", default="data/models/adapter")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results/lm_eval_served.json")
    args = ap.parse_args()
    project = Path(args.project).resolve()
    base = project / "data/models/base"
    with tempfile.TemporaryDirectory(prefix="lm_eval_served.") as tmp:
        tmp = Path(tmp)
        (tmp / "task").mkdir()
        write_task(project / "data/clean/test.jsonl", args.questions, tmp / "task")
        with serving(project, base, tmp / "serve.log") as (url, _):
            served = {}
            for name in (args.model, "base"):
                served[name] = lm_eval(args.lm_eval, tmp / "task", tmp / f"served-{name}", "local-completions",
                                       f"model={name},base_url={url}/v1/completions,tokenizer={base},"
                                       "tokenizer_backend=huggingface,tokenized_requests=True")
        reference = lm_eval(args.lm_eval, tmp / "task", tmp / "hf", "hf",
                            f"pretrained={base},peft={(project / args.adapter).resolve()},dtype=float32",
                            "--device", "cpu")
    mine, theirs = served[args.model][1], reference[1]
    diffs = [abs(a - b) for x, y in zip(mine, theirs) for a, b in zip(x, y)]
    result = {"date": date.today().isoformat(), "model": args.model, "questions": args.questions,
              "served": served[args.model][0], "hf_peft": reference[0], "base_served": served["base"][0],
              "loglikelihoods": len(diffs), "max_abs_diff": max(diffs),
              "same_choices": sum(x.index(max(x)) == y.index(max(y)) for x, y in zip(mine, theirs)),
              "load": load_average()}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
