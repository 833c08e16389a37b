"""Registration after the graph, and the registry's reads (versions, prod, metrics at a commit).

A GTO version names a git commit, so it cannot be made inside ``dvc repro``: the
``register`` stage (pipelines/register.py) only decides (``gate.json``: passed or not,
with one sentence per check), and ``ptune register`` then acts on that decision. It registers nothing from a
workspace that does not match ``dvc.lock`` (a failed or unfinished run) or whose
pipeline inputs are not committed; it pushes the data to the DVC remote, commits what
DVC leaves to git (``dvc.lock``, ``params.yaml``, the ``cache: false`` metrics and the
``.gitignore`` files beside cached outputs), tags a new semantic version of the
artifact with GTO and assigns ``staging``; ``prod`` only if the gate passed (a refused
candidate is kept, in ``staging``, with the gate's reasons in its tag message).

git runs as a subprocess; DVC and GTO through their Python APIs, which give typed
errors instead of console text and cost a tenth of a CLI start each.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple
from pathlib import Path

from pipelines import evaluation
from pipelines.common import StageError, read_json
from pipelines.config import RegisterConfig

GTO_STAGES = ("staging", "prod")  # staging: validated; prod: the gate passed (it compared with prod)
FALLBACK_AUTHOR = ("ptune", "ptune@localhost")  # only where git has no user configured


@dataclass
class RegistrationResult:
    registered: bool
    message: str
    artifact: str | None = None
    version: str | None = None
    commit: str | None = None
    stages: list[str] = field(default_factory=list)
    pushed: bool = False


def tool(name: str) -> str:
    """The CLI installed beside this interpreter (dvc, gto), so the venv need not be on PATH."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise StageError(f"`git {' '.join(args)}` failed in {repo} (exit {proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _has_commit(repo: Path) -> bool:
    return _git(repo, "rev-parse", "--verify", "-q", "HEAD", check=False).returncode == 0


def _author(repo: Path) -> tuple[str, str] | None:
    """None where git has an identity; else ours. GTO will not tag without one."""
    configured = all(_git(repo, "config", key, check=False).stdout.strip() for key in ("user.name", "user.email"))
    return None if configured else FALLBACK_AUTHOR


def _versions(repo: Path, artifact: str) -> list[dict]:
    """GTO's versions of ``artifact`` (newest first; ``artifact#stage`` for a stage); [] if none."""
    from gto import api
    from gto.exceptions import ArtifactNotFound

    if not _has_commit(repo):
        return []
    try:
        return api.show(str(repo), artifact)
    except ArtifactNotFound:
        return []


def next_version(versions: list[str]) -> str:
    """GTO's first version (v0.0.1), then GTO's minor bump of the highest: each adapter is a release."""
    from gto.versions import SemVer

    valid = [SemVer(v) for v in versions if SemVer.is_valid(v)]
    return (max(valid).bump_minor() if valid else SemVer.get_minimal()).version


def repo_path(repo: Path, path: Path) -> str:
    """``path`` (absolute, or relative to the working directory) as a git path in ``repo``."""
    path = Path(path)
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        return path.resolve().relative_to(Path(repo).resolve()).as_posix()
    except ValueError:
        raise StageError(f"{path}: not inside the repository {repo}") from None


def _artifact_name(dvc_repo, where: Path) -> str:
    found = sorted(name for artifacts in dvc_repo.artifacts.read().values()
                   for name, a in artifacts.items() if a.type == "model")
    if len(found) != 1:
        raise StageError(f"{where}/dvc.yaml: expected exactly one `artifacts:` entry with "
                         f"`type: model` (the adapter), found {found or 'none'}")
    return found[0]


def artifact_name(repo: Path) -> str:
    """The one ``type: model`` entry under ``artifacts:`` in dvc.yaml (interpolated by DVC)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return _artifact_name(dvc_repo, repo)


def prod_version(repo: Path, artifact: str) -> dict | None:
    """{version, commit} of the version in ``prod``; None without a commit, a version or prod."""
    found = _versions(repo, f"{artifact}#prod")
    return {"version": found[0]["version"], "commit": found[0]["commit_hexsha"]} if found else None


def json_at(repo: Path, commit: str, path: str) -> dict | None:
    """The JSON file ``path`` as committed at ``commit``, or None if that commit has none."""
    proc = _git(repo, "show", f"{commit}:{path}", check=False)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None


def evaluation_at(repo: Path, commit: str, metrics_path: str = evaluation.METRICS) -> dict | None:
    """The evaluation record (metrics.json and the details.json beside it) committed at
    ``commit``, or None if that commit has no metrics.json."""
    numbers = json_at(repo, commit, metrics_path)
    if numbers is None:
        return None
    return evaluation.join(numbers, json_at(repo, commit, str(evaluation.details_path(Path(metrics_path)))))


class PrimaryScores(NamedTuple):
    """The primary metric's name and its value for the adapter and for the zero-shot prompt."""
    metric: str
    tuned: float
    zero_shot: float


def primary_scores(metrics: dict, where: str) -> PrimaryScores:
    """The primary scores in evaluate's record; ``where`` names the record in the error."""
    try:
        key = metrics["primary_metric"]
        return PrimaryScores(key, float(metrics["tuned"][key]), float(metrics["zero_shot"][key]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{where}: expected primary_metric and its value under `tuned` and "
                         f"`zero_shot` (as the evaluate stage writes them); missing {exc}") from None


def _git_paths(dvc_repo, root: Path) -> tuple[list[str], list[str]]:
    """(the stages' inputs that git holds, the paths DVC leaves to git).

    The second list: the ``cache: false`` outputs (metrics, plots, small results) and the
    ``.gitignore`` files DVC writes beside its cached outputs.
    """
    from dvc.dependency.param import ParamsDependency

    root = root.resolve()

    def inside(fs_path: str) -> str | None:
        try:
            return Path(fs_path).resolve().relative_to(root).as_posix()
        except ValueError:
            return None

    deps, outs, to_git = set(), set(), set()
    for stage in dvc_repo.index.stages:
        deps.update(p for d in stage.deps if not isinstance(d, ParamsDependency) if (p := inside(d.fs_path)))
    for out in dvc_repo.index.outs:
        if (rel := inside(out.fs_path)) is None:
            continue
        outs.add(rel)
        to_git.add((Path(rel).parent / ".gitignore").as_posix() if out.use_cache else rel)
    # An input another stage produces is DVC's to check (`dvc status`), not git's.
    sources = {d for d in deps if not any(d == o or d.startswith(o + "/") for o in outs)}
    return sorted(sources), sorted(to_git)


def _check_workspace(dvc_repo, repo: Path, sources: list[str]) -> None:
    stale = dvc_repo.status()
    if stale:
        raise StageError(
            "the workspace does not match dvc.lock, so nothing is registered (a stage failed its "
            "validation or did not run, or its inputs changed since): "
            + "; ".join(f"{stage}: {json.dumps(change, default=str)}" for stage, change in stale.items())[:1500]
            + "\nRun `dvc repro` to completion, then register.")
    # The version's commit must hold the code and data that produced it: `dvc repro` at
    # that commit has to give the same dvc.lock. Outputs are git-ignored and never show here.
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=all", "--", "dvc.yaml",
                 *sources).stdout.rstrip()
    if dirty:
        raise StageError("these pipeline inputs differ from the last commit, so a version made "
                         "now would not name the code that produced it:\n" + dirty
                         + "\nCommit them (or restore them and run `dvc repro`), then register.")


def _declared_params(repo: Path) -> dict[str, dict]:
    """params file -> {declared key: value} as dvc.lock records them, over every stage."""
    from dvc.utils.serialize import parse_yaml

    lock_file = repo / "dvc.lock"
    lock = parse_yaml(lock_file.read_text(), str(lock_file)) if lock_file.is_file() else {}
    declared: dict[str, dict] = {"params.yaml": {}}  # DVC's default params file, committed even if unread
    for entry in (lock.get("stages") or {}).values():
        for file, values in (entry.get("params") or {}).items():
            declared.setdefault(file, {}).update(values)
    return declared


def _params_changed(repo: Path, declared: dict[str, dict]) -> list[str]:
    """The declared params (``file:key``) whose values differ from the last commit's."""
    from dvc.utils.serialize import parse_yaml

    missing = object()
    changed = []
    for file, values in declared.items():
        text = _git(repo, "show", f"HEAD:{file}", check=False)
        committed = parse_yaml(text.stdout, file) if text.returncode == 0 else None
        for key, value in values.items():
            node = committed
            for part in key.split("."):
                node = node.get(part, missing) if isinstance(node, dict) else missing
            if node != value:
                changed.append(f"{file}:{key}")
    return changed


def register(repo: Path, cfg: RegisterConfig, gate_path: Path, metrics_path: Path,
             details_path: Path | None = None) -> RegistrationResult:
    """After ``dvc repro``: push, commit, version with GTO, assign ``staging`` and, if the gate
    passed, ``prod``. Only a workspace that matches ``dvc.lock`` (every stage ran and
    passed its validation) is registered.

    Paths are relative to ``repo`` (or absolute). Running it again on the same commit
    registers nothing new.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from gto import api

    repo = Path(repo)
    gate_file, metrics_file = repo / gate_path, repo / metrics_path
    details_file = repo / details_path if details_path else evaluation.details_path(metrics_file)
    if not gate_file.is_file():
        raise StageError(f"{gate_file}: missing; run `dvc repro` (its register stage writes it) first")
    decision = read_json(gate_file)
    passed = bool(decision.get("passed"))
    stages = GTO_STAGES if passed else GTO_STAGES[:1]
    reasons = "; ".join(decision.get("reasons", []))
    if not _has_commit(repo):
        raise StageError(f"{repo}: not a git repository with a first commit; GTO versions are git "
                         "tags on commits (`git init` and commit the project first)")
    with Repo(str(repo)) as dvc_repo:
        sources, to_git = _git_paths(dvc_repo, repo)
        _check_workspace(dvc_repo, repo, sources)
        artifact = _artifact_name(dvc_repo, repo)
        metrics = evaluation.read(metrics_file, details_file)
        key, cand, zero = primary_scores(metrics, str(metrics_file))
        summary = f"{metrics.get('task', '?')}/{metrics.get('method', '?')} {key} {cand:.2f} (zero-shot {zero:.2f})"

        declared = _declared_params(repo)
        paths = sorted({"dvc.lock", *declared, repo_path(repo, metrics_file), repo_path(repo, details_file),
                        repo_path(repo, gate_file), *to_git})
        paths = [p for p in paths if (repo / p).exists()]
        # A params file counts as changed only where a stage reads it: dvc.lock records those
        # values, and a key no stage declares (`prefect.port`) changes no output.
        changed = bool(_git(repo, "status", "--porcelain", "--untracked-files=all", "--",
                            *(p for p in paths if p not in declared)).stdout.strip()) \
            or bool(_params_changed(repo, declared))
        versions = _versions(repo, artifact)
        head = _git(repo, "rev-parse", "HEAD").stdout.strip()
        existing = None if changed else next((v for v in versions if v["commit_hexsha"] == head), None)
        if existing is None and passed:
            # The gate compared the candidate with the prod of its time; a version assigned
            # to prod since then has not been compared with it.
            prod = prod_version(repo, artifact)
            decided = (decision.get("prod") or {}).get("version")
            if (prod or {}).get("version") != decided:
                raise StageError(f"{artifact}'s prod is now {prod and prod['version']}, but the gate compared "
                                 f"the candidate with {decided}: run `dvc repro --force --single-item "
                                 "register` to decide again, then register")

        # Data first: a version is never announced whose data the remote lacks.
        try:
            dvc_repo.push(remote=cfg.remote)
        except DvcException as exc:
            raise StageError(f"dvc push failed, so nothing is registered: {exc}\nSet a default DVC "
                             "remote (`dvc remote add -d <name> <url>`) or register.remote.") from None

    author = _author(repo)
    who = {"author": author[0], "author_email": author[1]} if author else {}
    if existing is not None:
        version = existing["version"]
        held = {s["stage"] for s in existing.get("stages", [])}
    else:
        version, held = next_version([v["version"] for v in versions]), set()
        if changed:
            _git(repo, "add", "--", *paths)
            # Only these paths: whatever else the user has staged stays staged, uncommitted.
            ident = ["-c", f"user.name={author[0]}", "-c", f"user.email={author[1]}"] if author else []
            _git(repo, *ident, "commit", "-q", "-m", f"ptune: register {artifact} {version} — {summary}"
                 + ("" if passed else " (gate refused: staging only)"), "--", *paths)
            head = _git(repo, "rev-parse", "HEAD").stdout.strip()
        api.register(str(repo), artifact, head, version=version, message=f"ptune: {summary}", **who)
    for stage in stages:
        if stage not in held:
            api.assign(str(repo), artifact, stage, version=version,
                       message=f"validation passed; gate {'passed' if passed else 'refused'}: {reasons}", **who)
    again = "" if existing is None else " (already registered at this commit)"
    refused = "" if passed else ("\nnot promoted to prod: the promotion gate refused this candidate:\n  "
                                 + "\n  ".join(decision.get("reasons", [])))
    note = evaluation.bleu_caveat(metrics.get("task"), [key], metrics.get("references_per_row"), metrics.get("rows"),
                                  short=True)
    return RegistrationResult(
        True, f"registered {artifact} {version} (commit {head[:10]}) in {' and '.join(stages)}{again}; "
              f"{summary}; data pushed to the DVC remote{refused}" + (f"\n{note}" if note else ""),
        artifact, version, head, list(stages), True)


def artifacts(repo: Path) -> list[str]:
    """Every artifact with at least one registered version (one per task)."""
    from gto import api

    return sorted(api.show(str(repo)).keys()) if _has_commit(repo) else []


def list_versions(repo: Path, artifact: str, metrics_path: str = evaluation.METRICS) -> list[dict]:
    """Versions of ``artifact``, newest first, with their stages and the metrics at their commit."""
    versions = []
    for v in _versions(repo, artifact):
        m = evaluation_at(repo, v["commit_hexsha"], metrics_path) or {}
        created = v.get("created_at")
        versions.append({"version": v["version"], "commit": v["commit_hexsha"],
                         "stages": sorted(s["stage"] for s in v.get("stages", [])),
                         "created_at": created.isoformat() if isinstance(created, datetime) else created,
                         "task": m.get("task"), "method": m.get("method"),
                         "primary_metric": m.get("primary_metric"),
                         "tuned": m.get("tuned", {}), "zero_shot": m.get("zero_shot", {}),
                         "few_shot": m.get("few_shot", {}), "rows": m.get("rows"),
                         "references_per_row": m.get("references_per_row")})
    return versions


def versions_note(versions: list[dict]) -> str | None:
    """The caveat of the newest listed version whose figures need one (E2E BLEU)."""
    return next((note for v in versions if (note := evaluation.bleu_caveat(
        v.get("task"), [v.get("primary_metric")], v.get("references_per_row"), v.get("rows"), short=True))), None)


def format_version(v: dict) -> str:
    key = v.get("primary_metric")
    nan = float("nan")
    few = f", few-shot {v['few_shot'][key]:.2f}" if key in v.get("few_shot", {}) else ""
    score = (f"{key} {v['tuned'].get(key, nan):.2f} (zero-shot {v['zero_shot'].get(key, nan):.2f}{few})"
             if key else "no metrics at that commit")
    return (f"{v['version']:<8} {','.join(v['stages']) or '-':<14} {v['commit'][:10]}  "
            f"{v.get('task') or '?'}/{v.get('method') or '?'}  {score}")
