"""The stage catalog: one declaration per DVC stage, and every fact about it that code needs.

``ptune stage <name>`` takes its options from here, the retrain flow its order, retries and
validation reports, lineage its validated outputs, and tests/test_graph.py holds dvc.yaml
to it (each stage's ``cmd`` and ``outs`` as declared here; its ``deps`` the modules the
stage's module really imports, its suite and its inputs). Adding a stage touches its
module, its GX suite, this catalog and dvc.yaml.

The paths are dvc.yaml's (relative to the project root); a stage gets them on its command
line, so it never hard-codes where it reads or writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TASK_DECLARATION = "tasks/${task.name}.yaml"  # dvc.yaml's spelling: the params' task's file


@dataclass(frozen=True)
class Option:
    name: str  # the command-line option, without "--"
    path: str  # what dvc.yaml passes (a path, or a value like the artifact's name)
    help: str | None = None
    dep: bool = True  # a path the stage reads: one of its dvc.yaml deps


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # pipelines/<module>.py holds its ``run``
    call: Callable[..., Any]  # (params, task, options as {name: str}) -> the stage's stats
    out: str  # what it writes (a directory; for register the gate's file)
    inputs: tuple[Option, ...] = ()
    params: tuple[str, ...] = ()  # params.yaml sections dvc.yaml gives it
    suite: str | None = None  # GX suite validating ``out``; its report lands in ``out``/validation.json
    stats: str | None = None  # --stats: its metrics file (cache: false)
    extra: tuple[Option, ...] = ()  # options after --out (tune's DVCLive directory)
    extra_deps: tuple[str, ...] = ()  # deps no option names (collect: the task's own source files)
    retried: bool = False  # the flow retries it: it may reach a hub or a source
    about: str | None = None  # the CLI's help line
    writes: tuple[str, ...] = ()  # what dvc.yaml tracks under outs, metrics and plots; default: out, stats
    options: tuple[Option, ...] = field(init=False)

    def __post_init__(self):
        out = Option("out", self.out, dep=False)
        stats = (Option("stats", self.stats, dep=False),) if self.stats else ()
        object.__setattr__(self, "options", (*self.inputs, out, *self.extra, *stats))
        if not self.writes:
            object.__setattr__(self, "writes", (self.out, *((self.stats,) if self.stats else ())))

    @property
    def out_is_dir(self) -> bool:
        return Path(self.out).suffix == ""

    @property
    def cmd(self) -> str:
        """The command dvc.yaml runs."""
        return " ".join([f"ptune stage {self.name}", *(f"--{o.name} {o.path}" for o in self.options)])

    @property
    def deps(self) -> tuple[str, ...]:
        """What it reads besides its modules and suite: its inputs, the extra deps, and the
        task's declaration where it takes the task's params."""
        task = (TASK_DECLARATION,) if "task" in self.params else ()
        return (*(o.path for o in self.inputs if o.dep), *self.extra_deps, *task)

    @property
    def validated(self) -> str | None:
        """Where its validation report is (``<dir>/validation.json``), if it validates."""
        return self.out if self.suite else None


def _p(options: dict, name: str) -> Path:
    return Path(options[name])


def _base_model(params, task, o):
    from pipelines import base_model
    return base_model.run(params.base_model, _p(o, "out"))


def _collect(params, task, o):
    from pipelines import collect
    return collect.run(params.collect, task, Path("."), _p(o, "out"))


def _clean(params, task, o):
    from pipelines import clean
    return clean.run(params.clean, task, _p(o, "raw"), _p(o, "out"))


def _tokenize(params, task, o):
    from pipelines import tokenize
    return tokenize.run(params.tokenize, task, _p(o, "clean"), _p(o, "base"), _p(o, "out"))


def _tune(params, task, o):
    from pipelines import tune
    return tune.run(params.tune, _p(o, "shards"), _p(o, "base"), _p(o, "out"), _p(o, "live"))


def _baselines(params, task, o):
    from pipelines import baselines
    return baselines.run(params.evaluate, task, _p(o, "clean"), _p(o, "base"), _p(o, "out"))


def _evaluate(params, task, o):
    from pipelines import evaluate
    return evaluate.run(params.evaluate, task, _p(o, "clean"), _p(o, "base"), _p(o, "adapter"), _p(o, "out"),
                        shards=_p(o, "shards"), scored_baselines=_p(o, "baselines"))


def _package(params, task, o):
    from pipelines import package
    inputs = package.Inputs(tuned=_p(o, "tuned"), base=_p(o, "base"), manifest=_p(o, "manifest"),
                            metrics=_p(o, "metrics"), details=_p(o, "details"), predictions=_p(o, "predictions"),
                            test=_p(o, "test"))
    return package.run(params.package, params.base_model, task, o["artifact"], inputs, _p(o, "out"))


def _register(params, task, o):
    from pipelines import register
    return register.run(params.register, _p(o, "metrics"), _p(o, "details"), _p(o, "out"), Path("."))


BASE = Option("base", "data/models/base")
CATALOG: dict[str, Stage] = {s.name: s for s in (  # dvc.yaml's order
    Stage("base_model", "base_model", _base_model, "data/models/base", params=("base_model",),
          suite="base_model", retried=True, about="the base model and its tokenizer, fetched and checked"),
    Stage("collect", "collect", _collect, "data/raw", params=("task", "collect"), suite="raw",
          stats="data/metrics/collect.json", extra_deps=("data/sources/${task.name}",), retried=True,
          about="the task's sources as records; unreadable ones quarantined with the reason"),
    Stage("clean", "clean", _clean, "data/clean", inputs=(Option("raw", "data/raw"),), params=("task", "clean"),
          suite="clean", stats="data/metrics/clean.json",
          about="normalized, filtered, deduplicated, split by group; every removal kept with its reason"),
    Stage("tokenize", "tokenize", _tokenize, "data/shards", inputs=(Option("clean", "data/clean"), BASE),
          params=("task", "tokenize"), suite="shards", stats="data/metrics/tokenize.json",
          about="templates rendered, tokenized, label-masked into checksummed Arrow shards"),
    Stage("tune", "tune", _tune, "data/models/tuned", inputs=(Option("shards", "data/shards"), BASE),
          params=("tune",), suite="tune", stats="data/metrics/tune.json",
          about="the adapter (prompt, prefix, P-tuning, LoRA) or a full fine-tune",
          extra=(Option("live", "data/tune_live", "DVCLive directory (metrics and plots)", dep=False),),
          writes=("data/models/tuned", "data/metrics/tune.json", "data/tune_live/metrics.json",
                  "data/tune_live/plots/metrics")),
    Stage("baselines", "baselines", _baselines, "data/baselines", inputs=(Option("clean", "data/clean"), BASE),
          params=("task", "evaluate"), suite="baselines",
          about="the task's metrics for the base model's zero- and few-shot prompts (no adapter: "
                "a new experiment does not rerun it)"),
    Stage("evaluate", "evaluate", _evaluate, "data/eval",
          inputs=(Option("clean", "data/clean"),
                  Option("shards", "data/shards", "the shards the adapter was trained on (its prompt format)"),
                  BASE, Option("adapter", "data/models/tuned"),
                  Option("baselines", "data/baselines", "the baselines stage's scores of the same rows")),
          params=("task", "evaluate"), suite="predictions",
          about="the task's metrics for the adapter, beside the baselines'",
          writes=("data/eval/predictions.jsonl", "data/eval/validation.json", "data/eval/report.md",
                  "data/eval/details.json", "data/eval/metrics.json", "data/eval/scores.csv")),
    Stage("package", "package", _package, "data/models/adapter",
          inputs=(Option("tuned", "data/models/tuned", "tune's output"), BASE,
                  Option("manifest", "data/shards/manifest.json", "the shards' manifest.json (the prompt format)"),
                  Option("metrics", "data/eval/metrics.json", "evaluate's metrics.json"),
                  Option("details", "data/eval/details.json", "evaluate's details.json (what the metrics are of)"),
                  Option("predictions", "data/eval/predictions.jsonl", "evaluate's predictions.jsonl"),
                  Option("test", "data/clean/test.jsonl", "the clean test split (the card's example row)"),
                  Option("artifact", "${task.name}-adapter", "the registry's name for it (dvc.yaml `artifacts:`)",
                         dep=False)),
          params=("task", "base_model", "package"), suite="package", stats="data/metrics/package.json",
          about="the registered artifact: adapter, tokenizer, model card"),
    Stage("register", "register", _register, "data/eval/gate.json",
          inputs=(Option("metrics", "data/eval/metrics.json"), Option("details", "data/eval/details.json")),
          params=("register",),
          about="the promotion gate's decision (the DVC stage; `ptune register` acts on it)"),
)}
