"""The ``retrain`` flow: the DVC graph, stage by stage, then registration.

Each task runs one DVC stage (``dvc repro --single-item <stage>``), so a run from the
Prefect UI leaves exactly the ``dvc.lock`` that ``dvc repro`` would. Prefect adds what
DVC has not: per-stage logs, the validation summaries, metrics and the gate's decision
as artifacts, retries where a failure may be transient (the stages that fetch), and a
workspace lock so two runs never drive DVC in one repository at once.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines.common import StageError, read_json
from pipelines.config import load_params
from pipelines.registry import register, tool
from pipelines.validation import ValidationSummary

STAGES = ("base_model", "collect", "clean", "tokenize", "tune", "evaluate", "register")
# Where each stage leaves its Great Expectations summary (see dvc.yaml's outs).
VALIDATION = {
    "base_model": "data/models/base",
    "collect": "data/raw",
    "clean": "data/clean",
    "tokenize": "data/shards",
    "tune": "data/models/adapter",
    "evaluate": "data/eval",
}
FETCHING = {"base_model", "collect"}  # may hit the network: worth a retry


class ValidationStopped(StageError):
    """A stage's output failed validation: not transient, never retried."""


class WorkspaceBusy(StageError):
    pass


def _summary(repo: Path, stage: str) -> ValidationSummary | None:
    out = repo / VALIDATION[stage]
    for path in (out / "validation.json", out.parent / f"{out.name}.validation-failed.json"):
        if path.is_file():
            data = read_json(path)
            return ValidationSummary(**{k: data[k] for k in ValidationSummary.__dataclass_fields__})
    return None


def _transient(task, task_run, state) -> bool:
    try:
        state.result()
    except ValidationStopped:
        return False
    except Exception:
        return True
    return False


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(repo: str, stage: str) -> dict | None:
    """``dvc repro --single-item <stage>``; its output streamed to the run log."""
    logger = get_run_logger()
    root = Path(repo)
    failed_report = None
    if stage in VALIDATION:
        out = root / VALIDATION[stage]
        failed_report = out.parent / f"{out.name}.validation-failed.json"
        failed_report.unlink(missing_ok=True)
    # The stage commands (`ptune stage ...`) live beside this interpreter; a worker's
    # PATH need not include the project's environment.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([tool("dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=30)
    for line in proc.stdout:
        line = line.rstrip()
        if line and not line.endswith("it/s]"):  # progress bars are noise in a run log
            logger.info(line)
            tail.append(line)
    code = proc.wait()
    summary = _summary(root, stage) if stage in VALIDATION else None
    if summary is not None:
        create_markdown_artifact(key=f"validation-{stage.replace('_', '-')}", markdown=summary.to_markdown(),
                                 description=f"Great Expectations: {stage}")
    if code != 0:
        message = f"dvc repro --single-item {stage} exited {code}:\n" + "\n".join(tail)
        if failed_report is not None and failed_report.is_file():
            raise ValidationStopped(message)
        raise StageError(message)
    return None if summary is None else {"suite": summary.suite, "success": summary.success}


@task(name="publish-metrics")
def publish_metrics(repo: str) -> dict:
    metrics = read_json(Path(repo) / "data/eval/metrics.json")
    rows = [{"system": system, **metrics[system], "tokens_per_s": metrics["tokens_per_s"].get(system)}
            for system in ("tuned", "zero_shot")]
    create_table_artifact(key="evaluation", table=rows,
                          description=f"{metrics['task']}: {metrics['method']} adapter vs the zero-shot "
                                      f"prompt on {metrics['rows']} test rows")
    gate = read_json(Path(repo) / "data/eval/gate.json")
    create_markdown_artifact(key="promotion-gate", markdown=(
        f"### Promotion gate: {'passed' if gate['passed'] else 'refused'}\n\n"
        + "\n".join(f"- {r}" for r in gate["reasons"]) + "\n"))
    return metrics


@task(name="register")
def register_version(repo: str) -> str:
    root = Path(repo)
    params = load_params(root / "params.yaml")
    result = register(root, params.register, Path("data/eval/gate.json"), Path("data/eval/metrics.json"))
    create_markdown_artifact(key="registration", markdown=f"### Registration\n\n{result.message}\n")
    get_run_logger().info(result.message)
    return result.message


def apply_overrides(repo: Path, overrides: dict[str, object]) -> None:
    """Set dotted params like ``dvc exp run -S`` (comments in params.yaml are kept)."""
    from ruamel.yaml import YAML

    from pipelines.config import parse_params

    yaml = YAML()
    path = repo / "params.yaml"
    doc = yaml.load(path.read_text())
    for dotted, raw in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise StageError(f"-S {dotted}: params.yaml has no section {key!r}")
            node = node[key]
        if leaf not in node:
            raise StageError(f"-S {dotted}: params.yaml has no key {dotted!r}")
        node[leaf] = YAML(typ="safe").load(str(raw)) if isinstance(raw, str) else raw
    parse_params(dict(doc), where=f"params.yaml with {overrides}")  # reject before writing
    with open(path, "w") as f:
        yaml.dump(doc, f)


@flow(name="retrain", log_prints=True)
def retrain(repo: str = ".", params_overrides: dict[str, object] | None = None) -> dict:
    """Run the pipeline (every DVC stage in order), publish its results, and register."""
    root = Path(repo).resolve()
    lock = FileLock(str(root / ".dvc" / "tmp" / "ptune-retrain.lock"))
    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        raise WorkspaceBusy(f"another retrain is running in {root}; try again when it has finished") from None
    try:
        if params_overrides:
            apply_overrides(root, params_overrides)
        for stage in STAGES:
            options = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _transient} \
                if stage in FETCHING else {}
            run_stage.with_options(**options)(str(root), stage)
        metrics = publish_metrics(str(root))
        message = register_version(str(root))
        return {"metrics": metrics, "registration": message}
    finally:
        lock.release()
