"""The promotion gate (the DVC ``register`` stage) and registration after the graph.

A GTO version names a git commit, so it cannot be made inside ``dvc repro``: the
``register`` stage only decides (``gate.json``: passed or not, with one sentence per
check), and ``ptune register`` then acts on that decision: it refuses a workspace that
does not match ``dvc.lock`` (a failed or unfinished run), commits ``dvc.lock``,
``params.yaml`` and the metrics, tags a new semantic version of the artifact with GTO,
assigns ``staging`` and ``prod``, and pushes the data to the DVC remote.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipelines.common import StageError, read_json, write_json
from pipelines.config import RegisterConfig

log = logging.getLogger(__name__)

METRICS = "data/eval/metrics.json"
ADAPTER = "data/models/adapter"
# What the commit of a version holds besides code: the lock (every output's hash) and
# the small outputs DVC leaves to git (cache: false): metrics, plots, validation results.
COMMITTED = ["dvc.lock", "params.yaml", "data/eval/metrics.json", "data/eval/gate.json",
             "data/eval/scores.csv", "data/eval/validation.json", "data/metrics", "data/tune_live"]


@dataclass
class RegistrationResult:
    registered: bool
    message: str
    version: str | None = None
    commit: str | None = None
    stages: list[str] = field(default_factory=list)
    pushed: bool = False


def tool(name: str) -> str:
    """The CLI installed beside this interpreter (gto, dvc), so the venv need not be on PATH."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _run(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise StageError(f"`{' '.join(cmd)}` failed in {repo} (exit {proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Commits and tags need an identity; use the user's, or a neutral one if none is set.
    has_user = _run(repo, "git", "config", "user.email", check=False).stdout.strip()
    ident = [] if has_user else ["-c", "user.name=ptune", "-c", "user.email=ptune@localhost"]
    return _run(repo, "git", *ident, *args, check=check)


def _gto_json(repo: Path, *args: str):
    proc = _run(repo, tool("gto"), "show", *args, "--json", check=False)
    if proc.returncode != 0:
        return None  # no such artifact or stage yet
    return json.loads(proc.stdout or "null")


def artifact_name(repo: Path) -> str:
    """The dvc.yaml ``artifacts:`` entry of the adapter, resolved for the current params."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        found = [name for artifacts in dvc_repo.artifacts.read().values()
                 for name, a in artifacts.items() if a.path.rstrip("/") == ADAPTER]
    if len(found) != 1:
        raise StageError(f"dvc.yaml: expected one entry under `artifacts:` with path {ADAPTER}, "
                         f"found {found or 'none'}")
    return found[0]


def prod_version(repo: Path, artifact: str) -> dict | None:
    """{version, commit} of the version in ``prod``, or None (no repo, no tags, no prod)."""
    if _run(repo, "git", "rev-parse", "--verify", "HEAD", check=False).returncode != 0:
        return None
    found = _gto_json(repo, f"{artifact}#prod")
    if not found:
        return None
    return {"version": found[0]["version"], "commit": found[0]["commit_hexsha"]}


def metrics_at(repo: Path, commit: str) -> dict | None:
    proc = _run(repo, "git", "show", f"{commit}:{METRICS}", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def gate(cfg: RegisterConfig, metrics: dict, prod: dict | None) -> dict:
    """Decide promotion. ``prod`` is {version, metrics} of the current prod version or None."""
    key = metrics["primary_metric"]
    cand, zero = metrics["tuned"][key], metrics["zero_shot"][key]
    margin = cand - zero
    reasons, passed = [], True
    ok = margin >= cfg.min_margin_over_zero_shot
    passed &= ok
    reasons.append(f"{'pass' if ok else 'FAIL'}: {key} {cand:.2f} is {margin:+.2f} over the zero-shot "
                   f"prompt ({zero:.2f}); at least {cfg.min_margin_over_zero_shot:+.2f} required")
    prod_info = None
    if prod and prod.get("metrics") and key in prod["metrics"].get("tuned", {}):
        ref = prod["metrics"]["tuned"][key]
        prod_info = {"version": prod["version"], "value": ref}
        ok = cand >= ref - cfg.prod_tolerance
        passed &= ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: {key} {cand:.2f} vs prod {prod['version']} "
                       f"{ref:.2f} ({cand - ref:+.2f}); at most {cfg.prod_tolerance:.2f} worse allowed")
    else:
        reasons.append("pass: no version of this task in prod yet, nothing to compare against")
    return {"passed": bool(passed), "reasons": reasons, "primary_metric": key, "candidate": cand,
            "zero_shot": zero, "prod": prod_info,
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run(cfg: RegisterConfig, metrics_path: Path, out: Path, repo: Path) -> dict:
    """The DVC ``register`` stage: record the gate's decision (a refusal is not an error)."""
    metrics = read_json(metrics_path)
    prod = prod_version(repo, artifact_name(repo))
    if prod:
        prod["metrics"] = metrics_at(repo, prod["commit"])
    decision = gate(cfg, metrics, prod)
    write_json(out, decision)
    for reason in decision["reasons"]:
        log.info("gate: %s", reason)
    return decision


def register(repo: Path, cfg: RegisterConfig, gate_path: Path, metrics_path: Path) -> RegistrationResult:
    """After ``dvc repro``: commit, version, assign stages and push, if the gate passed."""
    if not (repo / gate_path).is_file():
        raise StageError(f"{gate_path}: missing; run `dvc repro` first")
    decision = read_json(repo / gate_path)
    if not decision["passed"]:
        return RegistrationResult(False, "not registered: the gate refused this candidate:\n  "
                                  + "\n  ".join(decision["reasons"]))
    status = _run(repo, tool("dvc"), "status", "--json")
    if json.loads(status.stdout or "{}"):
        raise StageError("the workspace does not match dvc.lock (a stage failed, or inputs changed "
                         f"since the last run): {status.stdout.strip()[:1500]}\n"
                         "Run `dvc repro` to completion before registering.")
    metrics = read_json(repo / metrics_path)
    key = metrics["primary_metric"]
    artifact = artifact_name(repo)
    paths = [p for p in COMMITTED if (repo / p).exists()]
    _git(repo, "add", "--", *paths)
    if _git(repo, "diff", "--cached", "--quiet", check=False).returncode != 0:
        _git(repo, "commit", "-q", "-m",
             f"ptune: {artifact} candidate — {metrics['task']}/{metrics['method']} "
             f"{key} {metrics['tuned'][key]:.2f} (zero-shot {metrics['zero_shot'][key]:.2f})")
    commit = _git(repo, "rev-parse", "HEAD").stdout.strip()

    existing = _gto_json(repo, artifact) or []
    same = [v for v in existing if v["commit_hexsha"] == commit]
    if same:
        version = same[0]["version"]  # this commit is already a version: only (re)assign stages
    else:
        bump = ["--bump-minor"] if existing else []  # GTO refuses to bump the very first version
        _run(repo, tool("gto"), "register", artifact, commit, *bump, "-m",
             f"{metrics['task']}/{metrics['method']}: {key} {metrics['tuned'][key]:.2f}")
        version = _gto_json(repo, artifact)[0]["version"]
    for stage in ("staging", "prod"):
        _run(repo, tool("gto"), "assign", artifact, "--version", version, "--stage", stage,
             "-m", f"gate passed: {'; '.join(decision['reasons'])}")
    push = [tool("dvc"), "push", "-q"] + (["-r", cfg.remote] if cfg.remote else [])
    _run(repo, *push)
    return RegistrationResult(
        True, f"registered {artifact} {version} (commit {commit[:10]}) in staging and prod; "
              f"{key} {metrics['tuned'][key]:.2f} vs zero-shot {metrics['zero_shot'][key]:.2f}; "
              "data pushed to the DVC remote", version, commit, ["staging", "prod"], True)


def artifacts(repo: Path) -> list[str]:
    """Every artifact with at least one registered version (one per task)."""
    return sorted((_gto_json(repo) or {}).keys())


def list_versions(repo: Path, artifact: str) -> list[dict]:
    versions = []
    for v in _gto_json(repo, artifact) or []:
        m = metrics_at(repo, v["commit_hexsha"]) or {}
        versions.append({"version": v["version"], "commit": v["commit_hexsha"],
                         "stages": sorted(s["stage"] for s in v.get("stages", [])),
                         "created_at": v.get("created_at"), "task": m.get("task"),
                         "method": m.get("method"), "primary_metric": m.get("primary_metric"),
                         "tuned": m.get("tuned", {}), "zero_shot": m.get("zero_shot", {})})
    return versions


def format_version(v: dict) -> str:
    key = v.get("primary_metric")
    score = (f"{key} {v['tuned'].get(key, float('nan')):.2f} (zero-shot {v['zero_shot'].get(key, float('nan')):.2f})"
             if key else "no metrics at that commit")
    return (f"{v['version']:<8} {','.join(v['stages']) or '-':<14} {v['commit'][:10]}  "
            f"{v.get('task') or '?'}/{v.get('method') or '?'}  {score}")
