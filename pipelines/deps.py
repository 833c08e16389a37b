"""Every file a stage reads is one of its DVC dependencies, or pinned by a param it declares.

DVC reruns a stage when one of its ``deps`` or declared ``params`` changes. A file the
stage reads that is neither is invisible to it: after the file changes, ``dvc status``
says nothing, ``dvc repro`` skips the stage, and its outputs and everything downstream
stay stale while looking up to date. Params can point a stage anywhere (a source in
``collect.sources.<task>``, a local ``base_model.source``), and DVC's templating cannot
turn them into deps: DVC 3 interpolates only strings, numbers and booleans into
``deps`` (a list is refused), while a task's sources are a list. So a stage that DVC
runs (DVC sets ``DVC_STAGE``) checks, before it reads anything, that what its params
name is either

- under one of the stage's ``deps`` in dvc.yaml: a file or directory is hashed by DVC,
  and a glob needs its whole directory there (a file added to it is read next time); or
- pinned by a param the stage declares, which DVC records in dvc.lock: a file's
  ``sha256`` (every http(s) source has one), a hub dataset's or hub model's commit
  ``revision``, a wheel's exact version.
  A changed pin is a changed param: the stage reruns.

Anything else is refused with one line that says what to add. Such a source is never
rerun blindly instead (``always_changed``): every ``dvc repro`` would then rerun the
stage, and ``ptune register`` would never see a workspace that matches dvc.lock.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from packaging.requirements import InvalidRequirement, Requirement

from pipelines.common import StageError
from pipelines.config import BaseModelConfig, Params, SourceConfig

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class StageDeps:
    stage: str  # the stage's name in dvc.yaml
    root: Path  # the directory the stage runs in (its paths are relative to it)
    paths: tuple[str, ...]  # absolute local paths, and the URLs of remote dependencies

    def covers(self, target: str) -> bool:
        """``target`` (an absolute path or a URL) is one of the deps or lies inside one."""
        return any(target == dep or target.startswith(dep.rstrip("/") + "/") for dep in self.paths)

    def shown(self, target: str) -> str:
        """``target`` as dvc.yaml would list it: relative to the stage's directory where inside it."""
        if not os.path.isabs(target):
            return target  # a URL
        rel = os.path.relpath(target, self.root)
        return target if rel.startswith("..") else Path(rel).as_posix()

    def refusal(self, what: str, target: str) -> str:
        dirs = [self.shown(d) for d in self.paths if os.path.isdir(d)]
        move = f"move it under {' or '.join(f'{d}/' for d in dirs)}, or " if dirs else ""
        return (f"{what}: {self.shown(target)} is not a dependency of the {self.stage} stage, so `dvc repro` "
                f"would not rerun it when that changes; {move}add `- {self.shown(target)}` to the "
                f"{self.stage} stage's deps in dvc.yaml")


def of_running_stage(root: Path) -> StageDeps | None:
    """The deps of the stage DVC is running here (``DVC_STAGE``); None outside DVC."""
    address = os.environ.get("DVC_STAGE")
    if not address:
        return None
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (stage,) = repo.stage.collect(address)
        paths = tuple(d.fs_path if d.fs.protocol == "local" else d.def_path
                      for d in stage.deps if not isinstance(d, ParamsDependency))
    return StageDeps(stage.name, Path(os.path.abspath(root)), paths)


def _local_target(uri: str, root: Path) -> str:
    """The absolute path a local path or glob reads: the glob's fixed directory for a glob."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    path = os.path.abspath(root / path)
    glob = _GLOB.search(path)
    return path[:glob.start()].rpartition("/")[0] if glob else path


def check_sources(sources: Sequence[SourceConfig], task: str, deps: StageDeps) -> None:
    """Refuse a source of ``collect.sources.<task>`` that neither a dep nor a pin covers."""
    for i, src in enumerate(sources):
        what = f"collect.sources.{task}[{i}] (source {src.name!r})"
        if src.sha256:
            continue  # one file, its hash a declared param
        if src.format == "hf":
            name = src.uri[len("hf:"):]
            local = os.path.abspath(deps.root / name)
            if not os.path.isdir(local):
                if src.revision:
                    continue
                raise StageError(f"{what}: the hub dataset {name!r} has no `revision`, so a new upload would "
                                 "not rerun collect; pin it with `revision: <the dataset's commit sha>`")
            target = local
        elif "://" in src.uri and not src.uri.startswith("file://"):
            target = src.uri[:m.start()].rpartition("/")[0] if (m := _GLOB.search(src.uri)) else src.uri
            if not deps.covers(target):
                raise StageError(deps.refusal(what, target) + " (DVC hashes s3://, gs://, azure://, ssh://, "
                                 "hdfs:// and http(s):// dependencies), or pin one file with `sha256`")
            continue
        else:
            target = _local_target(src.uri, deps.root)
        if not deps.covers(target):
            raise StageError(deps.refusal(what, target))


def check_base_model(cfg: BaseModelConfig, deps: StageDeps) -> None:
    """Refuse a base model that could change without DVC seeing it: a local checkpoint directory
    that is not a dep, a hub id without ``revision``, a wheel requirement without an exact version.

    A changed ``revision`` or requirement is a changed param, so base_model reruns; a hub id or
    a ``>=`` requirement alone names whatever the hub or the index holds today.
    """
    if cfg.source.startswith("wheel:"):
        requirement = cfg.source.removeprefix("wheel:")
        try:
            specifiers = list(Requirement(requirement).specifier)
        except InvalidRequirement as exc:
            raise StageError(f"base_model.source: {requirement!r} is not a pip requirement: {exc}") from None
        if not any(s.operator in ("==", "===") and "*" not in s.version for s in specifiers):
            raise StageError(f"base_model.source: the wheel requirement {requirement!r} names no exact version, "
                             "so a new release would not rerun base_model; pin it, e.g. "
                             f"`wheel:{Requirement(requirement).name}==<version>`")
        return
    local = os.path.abspath(deps.root / cfg.source)
    if os.path.exists(local):
        if not deps.covers(local):
            raise StageError(deps.refusal("base_model.source", local))
    elif not cfg.revision:
        raise StageError(f"base_model.source: the hub model {cfg.source!r} has no `revision`, so an update "
                         "on the hub would not rerun base_model; pin it with `base_model.revision: <the "
                         "model's commit sha>`")


def check(stage: str, params: Params, root: Path) -> None:
    """Before ``stage`` reads anything: refuse what its params name that DVC would not see change."""
    if stage not in ("collect", "base_model") or (deps := of_running_stage(root)) is None:
        return
    if stage == "collect":
        check_sources(params.collect.sources[params.task.name], params.task.name, deps)
    else:
        check_base_model(params.base_model, deps)
