"""Build a throw-away copy of the project (its own git repo, DVC remote and params) so
tests can run the real `dvc repro` / `ptune register` without touching the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, git

COPIED = ["pipelines", "serving", "flows", "plots", "tasks", "gx/great_expectations.yml", "gx/expectations", "gx/plugins",
          "dvc.yaml", "params.yaml", "data/sources", ".dvc/config", ".dvcignore", ".gitignore"]


def env_for(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(project)  # the copy's modules, not the editable install's
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TOKENIZERS_PARALLELISM="false",
               PREFECT_HOME=str(project / ".prefect"))
    return env


def set_params(params: dict, overrides: dict) -> None:
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value


def update_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_params(params, overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def add_deps(project: Path, stage: str, *paths: str) -> None:
    """List ``paths`` in ``stage``'s deps in the project's dvc.yaml (its comments are lost)."""
    graph = yaml.safe_load((project / "dvc.yaml").read_text())
    graph["stages"][stage]["deps"].extend(paths)
    (project / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))


def make_project(tmp: Path, overrides: dict) -> Path:
    project = tmp / "project"
    for rel in COPIED:
        src, dst = ROOT / rel, project / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    update_params(project, overrides)
    base = overrides.get("base_model.source")
    if base and Path(base).is_absolute():  # a local checkpoint: the base_model stage must hash it
        add_deps(project, "base_model", base)
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "test project")
    return project


def run(project: Path, *cmd: str, check: bool = True, timeout: int = 900,
        input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=project, env=env_for(project), capture_output=True, text=True,
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
