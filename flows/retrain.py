"""The ``retrain`` flow: the DVC graph, stage by stage, then registration.

Each Prefect task runs one DVC stage (``dvc repro --single-item <stage>``), so a run from the
Prefect UI leaves exactly the ``dvc.lock`` that ``dvc repro`` would. Prefect adds what
DVC has not: per-stage logs, the validation summaries, metrics and the gate's decision
as artifacts, retries where a failure may be transient (the stages that fetch), and a
workspace lock so two runs never drive DVC in one repository at once.

Names: in ptune a "task" is the NLP task (``task.name`` in params.yaml, ``pipelines/
tasks.py``); Prefect's decorator is imported here as ``prefect_task`` and its runs are
"task runs".
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger
from prefect import task as prefect_task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipelines import evaluation
from pipelines.common import StageError, read_json
from pipelines.config import ConfigError, load_params, parse_params
from pipelines.prefect_ops import STAGE_NOTE, notify_failure
from pipelines.registry import register, tool
from pipelines.stages import CATALOG
from pipelines.validation import SITE_DIR, ValidationSummary, latest_page

METRICS = Path(evaluation.METRICS)
REPORT = Path("data/eval/report.md")
GATE = Path("data/eval/gate.json")
LOCK = Path(".dvc/tmp/ptune-retrain.lock")
LOCK_TIMEOUT_S = 2.0  # long enough to ride out a run that is just releasing it
# The flow's named parameters (what the UI's "Run" form shows) and the params they set.
NAMED_PARAMS = {"task_name": "task.name", "method": "tune.method", "learning_rate": "tune.learning_rate"}


class ValidationStopped(StageError):
    """A stage's output failed validation: not transient, never retried."""


class WorkspaceBusy(StageError):
    """Another retrain holds this workspace."""


def _transient(_prefect_task, _task_run, state) -> bool:
    """Retry only failures that may pass on a second try (network, a busy DVC lock)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (ValidationStopped, ConfigError))


def _summary(root: Path, stage: str, succeeded: bool, started: float) -> ValidationSummary | None:
    """This run's validation summary of ``stage``, if it wrote one.

    A failed stage leaves its report beside the output (``<out>.validation-failed.json``,
    see ``pipelines.common.atomic_dir``) or in place; a report older than the run is not
    this run's. A stage DVC skipped as up to date keeps the summary of the run it records.
    """
    out = root / CATALOG[stage].validated
    failed = out.parent / f"{out.name}.validation-failed.json"
    candidates = [out / "validation.json"] if succeeded else [failed, out / "validation.json"]
    for path in candidates:
        if path.is_file() and (succeeded or path.stat().st_mtime >= started - 1):
            data = read_json(path)
            try:
                return ValidationSummary(**{k: data[k] for k in ValidationSummary.__dataclass_fields__})
            except (KeyError, TypeError) as exc:
                raise StageError(f"{path}: not a validation summary (missing {exc})") from None
    return None


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")  # observed values may hold either


def _docs_line(root: Path, suite: str) -> str:
    """Where the suite's newest Great Expectations Data Docs page is, as a file:// URL."""
    page = latest_page(root, suite)
    if page is None:
        return (f"Data Docs: no page of suite `{suite}` in {(root / SITE_DIR).as_uri()} yet; "
                "`make docs` builds the site.")
    # A browser does not follow a file:// link from the Prefect UI's http:// page: the URL is
    # shown to copy as well.
    return (f"Data Docs (GX's page of the newest `{suite}` validation; a file:// URL on the machine that "
            f"ran the stage, it needs no network): [{page.name}]({page.as_uri()}) `{page.as_uri()}`")


def _validation_markdown(stage: str, s: ValidationSummary, root: Path) -> str:
    result = "passed" if s.success else "FAILED"
    lines = [f"### Validation of `{stage}`: {result}", "",
             "| suite | result | expectations met | rows |", "|---|---|---|---|",
             f"| {_cell(s.suite)} | {result} | {s.successful}/{s.evaluated} | {s.rows} |"]
    if s.failures:
        lines += ["", "| failed expectation | column | observed / unexpected |", "|---|---|---|"]
        lines += [f"| {_cell(f.get('expectation', '?'))} | {_cell(f.get('column') or '')} | "
                  f"{_cell(f.get('observed', ''))} |" for f in s.failures]
    lines += ["", _docs_line(root, s.suite)]
    return "\n".join(lines) + "\n"


@prefect_task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(repo: str, stage: str) -> dict | None:
    """``dvc repro --single-item <stage>``, its output streamed to the run log.

    Publishes the stage's validation summary and fails on a failed validation even if
    the command itself exited 0.
    """
    logger = get_run_logger()
    root = Path(repo)
    # The stage commands (`ptune stage ...`) live beside this interpreter; a worker's
    # PATH need not include the project's environment.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.time()
    proc = subprocess.Popen([tool("dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=30)
    for raw in proc.stdout:
        line = raw.rstrip().rsplit("\r", 1)[-1]  # a progress bar's redraws: keep its last state
        if line:
            logger.info(line)
            tail.append(line)
    code = proc.wait()
    if code != 0 and any("Unable to acquire lock" in line for line in tail):
        # DVC's own lock is not a queue: say who holds it instead of its traceback.
        raise StageError(f"DVC's lock on {root} is held by another `dvc` process (not a retrain: "
                         "one started from a shell?); try again when it has finished")

    summary = _summary(root, stage, code == 0, started) if CATALOG[stage].validated else None
    if summary is not None:
        create_markdown_artifact(key=f"validation-{stage.replace('_', '-')}",
                                 markdown=_validation_markdown(stage, summary, root),
                                 description=f"Great Expectations summary of the {stage} stage")
        if not summary.success:
            raise ValidationStopped(f"{stage}: {summary}")
    if code != 0:
        raise StageError(f"dvc repro --single-item {stage} exited {code}:\n" + "\n".join(tail))
    if CATALOG[stage].validated and summary is None:
        raise StageError(f"{stage}: no validation summary at {CATALOG[stage].validated}/validation.json; "
                         "every stage validates its outputs (pipelines/validation.py)")
    return None if summary is None else {"suite": summary.suite, "success": summary.success}


@prefect_task(name="publish-metrics", task_run_name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(repo: str) -> dict:
    """The evaluation table (every system on the same rows) and the evaluate stage's report."""
    metrics = evaluation.read(Path(repo) / METRICS)
    systems = metrics.get("systems") or ["tuned", "zero_shot"]
    keys = list(dict.fromkeys(k for s in systems for k in metrics[s]))
    rows = [{"metric": key + (" (primary)" if key == metrics.get("primary_metric") else ""),
             **{s: metrics[s].get(key) for s in systems},
             "delta": (None if None in (metrics["tuned"].get(key), metrics["zero_shot"].get(key))
                       else round(metrics["tuned"][key] - metrics["zero_shot"][key], 2))} for key in keys]
    note = evaluation.bleu_caveat(metrics.get("task"), keys, metrics.get("references_per_row"), metrics.get("rows"),
                                  short=True)
    create_table_artifact(key="evaluation", table=rows, description=(
        f"{metrics.get('task')}: {metrics.get('method')} adapter vs {', '.join(s for s in systems if s != 'tuned')} "
        f"on the same {metrics.get('rows')} test rows" + (f". {note}" if note else "")))
    report = Path(repo) / REPORT
    if report.is_file():
        create_markdown_artifact(key="evaluation-report", markdown=report.read_text(encoding="utf-8"),
                                 description="data/eval/report.md: method, trainable parameters, metrics, tokens/s")
    return metrics


@prefect_task(name="publish-gate", task_run_name="publish-gate", cache_policy=NO_CACHE)
def publish_gate(repo: str) -> dict:
    decision = read_json(Path(repo) / GATE)
    create_markdown_artifact(key="promotion-gate", description="the register stage's decision", markdown=(
        f"### Promotion gate: {'passed' if decision['passed'] else 'refused'}\n\n"
        + "\n".join(f"- {r}" for r in decision["reasons"]) + "\n"))
    return decision


@prefect_task(name="register-version", task_run_name="register-version", cache_policy=NO_CACHE)
def register_version(repo: str) -> dict:
    """``ptune register``: commit, GTO version and stages, ``dvc push`` (if the gate passed)."""
    root = Path(repo)
    params = load_params(root / "params.yaml")
    result = register(root, params.register, GATE, METRICS)
    create_markdown_artifact(key="registration", markdown=f"### Registration\n\n{result.message}\n",
                             description="ptune register after the graph")
    get_run_logger().info(result.message)
    return asdict(result)


@prefect_task(name="publish-comparison", task_run_name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison(repo: str) -> dict:
    """Every trained method of the params' NLP task (registered versions, DVC experiments) scored on
    this run's test rows, with the prompt baselines: ``ptune compare`` as an artifact."""
    from pipelines import compare

    description = "ptune compare: registered versions and DVC experiments on the same test rows"
    try:
        c = compare.compare(Path(repo))
        compare.significance(Path(repo), c)
    except StageError as exc:  # the run itself succeeded: say why there is no table, do not fail it
        create_markdown_artifact(key="method-comparison", markdown=f"### Methods compared\n\nNo table: {exc}\n",
                                 description=description)
        return {"rows": 0, "excluded": 0}
    create_markdown_artifact(key="method-comparison", markdown=compare.markdown(c), description=description)
    return {"rows": len(c.rows), "excluded": len(c.excluded)}


def apply_overrides(repo: Path, overrides: dict[str, object], write: bool = True) -> None:
    """Set dotted params in params.yaml like ``dvc exp run -S`` (its comments are kept).

    Values given as strings are read as YAML (``"2e-3"`` is a float, ``"null"`` None).
    Every key must exist already, and the result must validate, or nothing is written.
    ``write=False``: only check (``ptune retrain`` does, before any flow run starts).
    """
    from ruamel.yaml import YAML, YAMLError

    path = repo / "params.yaml"
    rt = YAML()
    rt.preserve_quotes = True
    # ruamel writes None as an empty value; keep the file's (and DVC's) spelling, `null`.
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    for dotted, raw in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                raise ConfigError(f"override {dotted}: params.yaml has no section {key!r}")
        if not hasattr(node, "get") or leaf not in node:
            raise ConfigError(f"override {dotted}: params.yaml has no key {dotted!r}")
        try:
            node[leaf] = YAML(typ="safe").load(raw) if isinstance(raw, str) else raw
        except YAMLError as exc:
            raise ConfigError(f"override {dotted}: {raw!r} is not a YAML value: {exc}") from None
    parse_params(dict(doc), where=f"params.yaml with overrides {overrides}", tasks_dir=repo / "tasks")
    if not write:
        return
    with open(path, "w") as f:
        rt.dump(doc, f)


def _check_graph(root: Path) -> None:
    """The flow runs the stage catalog's stages; one it does not know would leave the workspace unfinished."""
    from dvc.repo import Repo

    with Repo(str(root)) as dvc_repo:
        names = {stage.name for stage in dvc_repo.index.stages}
    if names != set(CATALOG):
        raise StageError(f"{root}/dvc.yaml has stages {sorted(names)}, but the retrain flow runs "
                         f"{list(CATALOG)}: declare it in pipelines/stages.py")


@contextmanager
def workspace_lock(root: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """One retrain per workspace: DVC's repo lock fails a second run, it does not queue it."""
    if not (root / ".dvc").is_dir():
        raise StageError(f"{root}: not a DVC project (no .dvc/); pass the project root as repo")
    (root / LOCK).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise WorkspaceBusy(f"another retrain is running in {root}; try again later") from None
    try:
        yield
    finally:
        lock.release()


def named_overrides(named: dict[str, object], overrides: dict[str, object] | None) -> dict[str, object]:
    """The flow's named parameters as dotted params, merged with ``overrides`` (None: unset)."""
    merged = {NAMED_PARAMS[k]: v for k, v in named.items() if v is not None}
    for key, value in (overrides or {}).items():
        if key in merged and merged[key] != value:
            name = next(k for k, v in NAMED_PARAMS.items() if v == key)
            raise ConfigError(f"{key} is set twice: {name}={merged[key]!r} and params_overrides {value!r}")
        merged[key] = value
    return merged


@flow(name="retrain", log_prints=True, on_failure=[notify_failure], on_crashed=[notify_failure])
def retrain(repo: str = ".", params_overrides: dict[str, str | int | float | bool | None] | None = None,
            task_name: str | None = None, method: str | None = None, learning_rate: float | None = None) -> dict:
    """Every DVC stage in order, the evaluation and the gate as artifacts, then registration.

    Parameters are written to params.yaml first, as ``dvc exp run -S`` does, and stay
    there (the registered commit records them); unset ones keep the file's values.

    Args:
        repo: the project directory (a deployment runs in it: ".")
        params_overrides: any dotted params, e.g. {"tune.lora.r": 16, "evaluate.max_rows": 50}
        task_name: task.name (e2e, sst2, stackexchange_qa)
        method: tune.method (prompt, prefix, ptuning, lora, full)
        learning_rate: tune.learning_rate, for every method
    """
    root = Path(repo).resolve()
    overrides = named_overrides({"task_name": task_name, "method": method, "learning_rate": learning_rate},
                                params_overrides)
    with workspace_lock(root):
        if overrides:
            apply_overrides(root, overrides)
        _check_graph(root)
        metrics = None
        for stage in CATALOG:
            options = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _transient} \
                if CATALOG[stage].retried else {}
            try:
                run_stage.with_options(name=stage, **options)(str(root), stage)
            except Exception as exc:
                exc.add_note(f"{STAGE_NOTE}{stage}")  # for the failure hook: the API may not have the task run yet
                raise
            if stage == "evaluate":
                metrics = publish_metrics(str(root))
        decision = publish_gate(str(root))
        registration = register_version(str(root))
        publish_comparison(str(root))
    return {"metrics": metrics, "gate": decision, "registration": registration}


def run_retrain(repo: str | Path = ".", overrides: dict[str, object] | None = None):
    """Run the flow and return its final Prefect state (``.is_completed()``, ``.result()``)."""
    return retrain(repo=str(repo), params_overrides=overrides or None, return_state=True)
