"""The promotion gate, and registration (git commit, GTO tags, dvc push) in a throw-away
git + DVC repository whose stages are stand-ins that write what the real ones write."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipelines.common import StageError
from pipelines.config import RegisterConfig, parse_params
from pipelines.register import gate
from pipelines.registry import artifacts, list_versions, next_version, prod_version, register
from pipelines.stages import CATALOG
from tests.conftest import ROOT, git, write_params

CFG = RegisterConfig(min_margin_over_zero_shot=5.0, prod_tolerance=1.0)
GATE, METRICS, DETAILS = Path("data/eval/gate.json"), Path("data/eval/metrics.json"), Path("data/eval/details.json")


def metrics(tuned, zero, task="e2e"):
    return {"task": task, "method": "lora", "primary_metric": "bleu",
            "tuned": {"bleu": tuned, "rouge_l": 55.0}, "zero_shot": {"bleu": zero, "rouge_l": 30.2}}


def test_gate_passes_a_clear_winner_with_no_prod():
    d = gate(CFG, metrics(36.0, 7.0), None)
    assert d["passed"] is True
    assert d["reasons"] == ["pass: bleu 36.00 is +29.00 over the zero-shot prompt (7.00); at least +5.00 required",
                            "pass: no version in prod yet, nothing to compare against"]
    assert (d["primary_metric"], d["candidate"], d["zero_shot"], d["prod"]) == ("bleu", 36.0, 7.0, None)


def test_gate_refuses_a_small_margin():
    d = gate(CFG, metrics(10.0, 7.0), None)
    assert d["passed"] is False
    assert d["reasons"][0] == ("FAIL: bleu 10.00 is +3.00 over the zero-shot prompt (7.00); "
                               "at least +5.00 required")


@pytest.mark.parametrize("prod_score, passed", [(36.5, True), (37.0, True), (37.5, False)])
def test_gate_compares_against_prod_within_tolerance(prod_score, passed):
    d = gate(CFG, metrics(36.0, 7.0), {"version": "v0.2.0", "metrics": metrics(prod_score, 7.0)})
    assert d["passed"] is passed
    assert d["prod"] == {"version": "v0.2.0", "value": prod_score}
    assert d["reasons"][1] == (f"{'pass' if passed else 'FAIL'}: bleu 36.00 vs prod v0.2.0 {prod_score:.2f} "
                               f"({36.0 - prod_score:+.2f}); at most 1.00 worse allowed")


def test_gate_refuses_when_prod_has_no_metrics_to_compare():
    d = gate(CFG, metrics(36.0, 7.0), {"version": "v0.0.1", "metrics": None})
    assert d["passed"] is False
    assert d["reasons"][1].startswith("FAIL: prod v0.0.1 has no committed bleu")


def test_gate_names_a_malformed_metrics_file():
    with pytest.raises(StageError, match="primary_metric"):
        gate(CFG, {"tuned": {"bleu": 1.0}}, None)


def test_next_version_starts_where_gto_does_and_bumps_minor():
    assert next_version([]) == "v0.0.1"
    assert next_version(["v0.0.1"]) == "v0.1.0"
    assert next_version(["v0.1.0", "v0.0.1", "v1.0.0-rc1"]) == "v1.1.0"


# --- a throw-away repository --------------------------------------------------------

PARAMS = {  # a valid params.yaml; only `register` matters to these stand-in stages
    "task": {"name": "e2e"},
    "base_model": {"source": "none"},
    "collect": {"sources": {"e2e": [{"name": "e2e", "uri": "e2e.csv", "columns": {"mr": "mr", "ref": "ref"},
                                     "splits": {"train": 1.0}}]}},
    "clean": {},
    "tokenize": {"max_length": 16, "shard_rows": 10},
    "tune": {"method": "lora", "epochs": 1, "batch_size": 1, "learning_rate": 0.1,
             "prompt": {"num_virtual_tokens": 1}, "prefix": {"num_virtual_tokens": 1},
             "ptuning": {"num_virtual_tokens": 1}},
    "evaluate": {"batch_size": 1, "max_new_tokens": 1},
    "register": {"min_margin_over_zero_shot": 5.0, "prod_tolerance": 1.0, "remote": None},
}

# Writes a stage's output and its validation summary as the real stages do; `control.json`
# says what the candidate scores, which stage's validation fails (and how), which crashes.
STAGE_PY = '''\
import json, sys
from pathlib import Path

stage, out = sys.argv[1], Path(sys.argv[2])
control = json.loads(Path("control.json").read_text())
if control.get("crash") == stage:
    sys.exit(f"{stage}: out of disk space")
ok = control.get("fail") != stage
summary = {"suite": stage, "success": ok, "evaluated": 2, "successful": 2 if ok else 1, "rows": 3,
           "failures": [] if ok else [{"expectation": "expect_column_values_to_not_be_null",
                                       "column": "text", "kwargs": {}, "observed": "1 unexpected"}]}
if not ok and control.get("exit_on_failure"):  # as pipelines.common.atomic_dir leaves it
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / (out.name + ".validation-failed.json")).write_text(json.dumps(summary))
    sys.exit(f"validation failed: suite {stage!r}")
out.mkdir(parents=True, exist_ok=True)
(out / "validation.json").write_text(json.dumps(summary))
if stage == "evaluate":
    (out / "predictions.jsonl").write_text(json.dumps({"tuned": control["tuned"]}) + "\\n")
    (out / "metrics.json").write_text(json.dumps({
        "rows": 3, "tuned": {"bleu": control["tuned"], "rouge_l": 55.0},
        "zero_shot": {"bleu": control["zero_shot"], "rouge_l": 30.2}, "trainable_parameters": 8}))
    (out / "details.json").write_text(json.dumps({
        "task": "e2e", "method": "lora", "primary_metric": "bleu", "rows_sha256": "0" * 64,
        "systems": ["tuned", "zero_shot"]}))
else:
    (out / "part.txt").write_text(f"{stage} {control['tuned']}\\n")
'''

OUTS = {name: s.out for name, s in CATALOG.items() if s.out_is_dir and name != "evaluate"}  # evaluate: files
UPSTREAM = {"clean": ["data/raw"], "tokenize": ["data/clean", "data/models/base"],
            "tune": ["data/shards"], "evaluate": ["data/models/tuned"], "package": ["data/models/tuned"]}


ALL_STAGES = tuple(CATALOG)
SHORT = ("tune", "evaluate", "package", "register")  # enough for the registry: an adapter, metrics, the gate


def dvc_yaml(stages: tuple[str, ...]) -> dict:
    graph = {}
    for stage in stages:
        if stage == "register":
            graph[stage] = {
                "cmd": f"python -m pipelines.cli stage register --metrics {METRICS} --details {DETAILS} --out {GATE}",
                "deps": [str(METRICS), str(DETAILS)], "params": ["register"], "metrics": [{str(GATE): {"cache": False}}]}
            continue
        out = OUTS.get(stage, "data/eval")
        upstream = [d for d in UPSTREAM.get(stage, []) if any(OUTS.get(s) == d for s in stages)]
        graph[stage] = {"cmd": f"python stage.py {stage} {out}", "deps": ["stage.py", "control.json", *upstream],
                        "outs": [out]}
    if "evaluate" in graph:
        graph["evaluate"]["outs"] = ["data/eval/predictions.jsonl", {"data/eval/validation.json": {"cache": False}},
                                     {str(DETAILS): {"cache": False}}]
        graph["evaluate"]["metrics"] = [{str(METRICS): {"cache": False}}]
    return {"stages": graph,
            "artifacts": {"${task.name}-adapter": {"path": "data/models/adapter", "type": "model"}}}


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def set_control(repo: Path, commit: bool = True, **control) -> None:
    (repo / "control.json").write_text(json.dumps({"tuned": 41.2, "zero_shot": 9.1, **control}))
    if commit:
        git(repo, "commit", "-q", "-m", f"control {control}", "--", "control.json")


def _build(repo: Path, stages: tuple[str, ...]) -> None:
    parse_params(PARAMS, tasks_dir=ROOT / "tasks")  # the stand-in stays a valid project
    write_params(repo, PARAMS, header="# stand-in project\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(stages), sort_keys=False))
    (repo / "stage.py").write_text(STAGE_PY)
    (repo / ".gitignore").write_text("__pycache__/\n/dvc-remote/\n")
    set_control(repo, commit=False)
    git(repo, "init", "-q", "-b", "main")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "local", "dvc-remote")  # stored as ../dvc-remote, as in the real project
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "stand-in project")


_TEMPLATES: dict[tuple[str, ...], Path] = {}


def make_repo(tmp: Path, stages: tuple[str, ...] = SHORT, **control) -> Path:
    """A git repo + DVC project (first commit made) with a local remote in ``dvc-remote/``.

    Built once per graph and copied: git and DVC start-ups are most of a test's time.
    """
    if stages not in _TEMPLATES:
        scratch = tempfile.mkdtemp(prefix="ptune-template-")
        atexit.register(shutil.rmtree, scratch, True)
        template = Path(scratch) / "project"
        _build(template, stages)
        _TEMPLATES[stages] = template
    repo = tmp / "project"
    shutil.copytree(_TEMPLATES[stages], repo, symlinks=True)
    if control:
        set_control(repo, **control)
    return repo


@pytest.fixture(autouse=True)
def no_git_identity(tmp_path, monkeypatch):
    """No user.name/email anywhere: registration must bring its own (and GTO needs one)."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)


def tags(repo: Path) -> list[str]:
    return git(repo, "tag", "-l").split()


def remote_files(repo: Path) -> set[str]:
    return {p.relative_to(repo / "dvc-remote").as_posix() for p in (repo / "dvc-remote").rglob("*") if p.is_file()}


def lock_hash(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_no_git_repository_or_no_tags_means_no_prod(tmp_path):
    assert prod_version(tmp_path, "e2e-adapter") is None
    repo = make_repo(tmp_path)
    assert prod_version(repo, "e2e-adapter") is None
    assert list_versions(repo, "e2e-adapter") == []


def test_a_repository_without_a_first_commit_is_refused(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / GATE).parent.mkdir(parents=True)
    (tmp_path / GATE).write_text(json.dumps({"passed": True, "reasons": []}))
    with pytest.raises(StageError, match="not a git repository with a first commit"):
        register(tmp_path, CFG, GATE, METRICS)
    assert artifacts(tmp_path) == [] and list_versions(tmp_path, "e2e-adapter") == []


def test_a_passing_run_is_committed_versioned_in_prod_and_pushed(tmp_path):
    repo = make_repo(tmp_path)
    sh(repo, "dvc", "repro")
    decision = json.loads((repo / GATE).read_text())
    assert decision["passed"] and decision["prod"] is None

    result = register(repo, CFG, GATE, METRICS)
    assert (result.registered, result.artifact, result.version) == (True, "e2e-adapter", "v0.0.1")
    assert result.stages == ["staging", "prod"] and result.pushed
    assert result.message.startswith("registered e2e-adapter v0.0.1 ")
    assert result.commit == git(repo, "rev-parse", "HEAD").strip()
    assert sorted(tags(repo)) == ["e2e-adapter#prod#2", "e2e-adapter#staging#1", "e2e-adapter@v0.0.1"]
    log = git(repo, "log", "-1", "--format=%an <%ae>%n%s")
    assert log.splitlines() == ["ptune <ptune@localhost>",
                                "ptune: register e2e-adapter v0.0.1 — e2e/lora bleu 41.20 (zero-shot 9.10)"]
    committed = git(repo, "show", "--name-only", "--format=", "HEAD").split()
    # The lock and what DVC leaves to git; the cached outputs stay out of git.
    assert sorted(committed) == ["data/eval/.gitignore", "data/eval/details.json", "data/eval/gate.json",
                                 "data/eval/metrics.json", "data/eval/validation.json", "data/models/.gitignore",
                                 "dvc.lock"]
    assert git(repo, "status", "--porcelain") == ""
    # dvc push put the registered directory (its .dir listing and its files) into the remote.
    adapter = lock_hash(repo, "package", "data/models/adapter")
    pushed = remote_files(repo)
    assert f"files/md5/{adapter[:2]}/{adapter[2:]}" in pushed
    assert len(pushed) == 2 * 3 + 1  # tune's and package's outputs (a .dir listing, two files each), the predictions

    (version,) = list_versions(repo, "e2e-adapter")
    assert version["version"] == "v0.0.1" and version["stages"] == ["prod", "staging"]
    assert (version["tuned"]["bleu"], version["zero_shot"]["bleu"]) == (41.2, 9.1)

    again = register(repo, CFG, GATE, METRICS)  # nothing changed: nothing new
    assert again.version == "v0.0.1" and "already registered" in again.message
    assert len(tags(repo)) == 3


def test_a_better_candidate_is_compared_with_prod_and_bumps_the_version(tmp_path):
    repo = make_repo(tmp_path)
    sh(repo, "dvc", "repro")
    first = register(repo, CFG, GATE, METRICS)
    set_control(repo, tuned=41.0)  # within prod_tolerance of v0.0.1's 41.2
    sh(repo, "dvc", "repro")
    decision = json.loads((repo / GATE).read_text())
    assert decision["prod"] == {"version": "v0.0.1", "value": 41.2}
    assert decision["reasons"][1] == "pass: bleu 41.00 vs prod v0.0.1 41.20 (-0.20); at most 1.00 worse allowed"

    second = register(repo, CFG, GATE, METRICS)
    assert second.version == "v0.1.0" and second.commit != first.commit
    versions = list_versions(repo, "e2e-adapter")
    assert [(v["version"], v["stages"], v["tuned"]["bleu"]) for v in versions] == [
        ("v0.1.0", ["prod", "staging"], 41.0), ("v0.0.1", [], 41.2)]
    assert prod_version(repo, "e2e-adapter") == {"version": "v0.1.0", "commit": second.commit}
    assert artifacts(repo) == ["e2e-adapter"]


def test_a_refused_candidate_is_kept_in_staging_only_with_the_reasons(tmp_path):
    repo = make_repo(tmp_path, tuned=12.0)
    sh(repo, "dvc", "repro")  # the stage records a refusal; it does not fail the graph
    decision = json.loads((repo / GATE).read_text())
    assert decision["passed"] is False

    result = register(repo, CFG, GATE, METRICS)
    assert result.registered and result.version == "v0.0.1" and result.stages == ["staging"]
    assert "not promoted to prod: the promotion gate refused this candidate" in result.message
    assert "FAIL: bleu 12.00 is +2.90 over the zero-shot prompt (9.10)" in result.message
    assert sorted(tags(repo)) == ["e2e-adapter#staging#1", "e2e-adapter@v0.0.1"]
    assert "FAIL: bleu 12.00" in git(repo, "tag", "-l", "-n9", "e2e-adapter#staging#1")
    assert "gate refused: staging only" in git(repo, "log", "-1", "--format=%s")
    assert prod_version(repo, "e2e-adapter") is None
    assert remote_files(repo)  # pushed: a staging version's data is fetchable too


def test_a_run_whose_validation_failed_is_refused(tmp_path):
    repo = make_repo(tmp_path)
    sh(repo, "dvc", "repro")
    set_control(repo, tuned=50.0, fail="tune", exit_on_failure=True)
    assert sh(repo, "dvc", "repro", check=False).returncode != 0  # gate.json is the previous run's

    with pytest.raises(StageError, match="does not match dvc.lock, so nothing is registered") as err:
        register(repo, CFG, GATE, METRICS)
    assert "tune" in str(err.value)
    assert tags(repo) == [] and not (repo / "dvc-remote").exists()


def test_uncommitted_pipeline_inputs_are_refused(tmp_path):
    repo = make_repo(tmp_path)
    set_control(repo, commit=False, tuned=45.0)
    sh(repo, "dvc", "repro")  # up to date with dvc.lock, but not with git

    with pytest.raises(StageError, match="pipeline inputs differ from the last commit") as err:
        register(repo, CFG, GATE, METRICS)
    assert "\n M control.json\n" in str(err.value)
    assert tags(repo) == [] and not (repo / "dvc-remote").exists()


def test_a_prod_assigned_after_the_gate_decided_is_refused(tmp_path):
    repo = make_repo(tmp_path)
    sh(repo, "dvc", "repro")  # the gate decides against no prod
    git(repo, "tag", "-a", "e2e-adapter@v0.3.0", "-m", "by hand")
    git(repo, "tag", "-a", "e2e-adapter#prod#1", "-m", "by hand")

    with pytest.raises(StageError, match=r"prod is now v0\.3\.0, but the gate compared the candidate with None"):
        register(repo, CFG, GATE, METRICS)


def test_a_params_key_no_stage_reads_does_not_invalidate_the_registration(tmp_path):
    repo = make_repo(tmp_path)
    sh(repo, "dvc", "repro")
    first = register(repo, CFG, GATE, METRICS)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "prefect": {"port": 4300}}, sort_keys=False))
    assert "up to date" in sh(repo, "dvc", "status").stdout  # no stage declares `prefect`

    again = register(repo, CFG, GATE, METRICS)  # was: "run `dvc repro --force --single-item register`"
    assert (again.version, again.commit) == ("v0.0.1", first.commit) and "already registered" in again.message
    assert len(tags(repo)) == 3 and git(repo, "status", "--porcelain").split() == ["M", "params.yaml"]

    # A key a stage declares is part of the version: rerun, and it is registered anew with it.
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "register": {**params["register"],
                                                                               "prod_tolerance": 2.0}}))
    with pytest.raises(StageError, match="does not match dvc.lock"):
        register(repo, CFG, GATE, METRICS)
    sh(repo, "dvc", "repro")
    third = register(repo, CFG, GATE, METRICS)
    assert third.version == "v0.1.0" and "params.yaml" in git(repo, "show", "--name-only", "--format=", "HEAD")
