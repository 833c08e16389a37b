"""Lineage, scoring outside the pipeline, and reproducibility of a registered version, on
a tiny project copy (the tiny random model): `dvc repro`, `ptune register`, then
`ptune lineage`, `ptune evaluate --adapter <artifact@version> --file ...`, and `dvc repro`
again from the version's commit in a fresh clone."""
import json
import shutil

import pytest
import yaml

from pipelines.common import StageError, sha256_file
from pipelines.lineage import parse_spec
from tests.conftest import build_tiny_model
from tests.pipeline_project import git, make_project, run
from tests.test_pipeline import TINY

SPEC = "e2e-adapter@v0.0.1"
# Tuning on CPU with the same threads, seed and data is bitwise deterministic here (the
# reproduction below finds the same adapter weights); this bounds metrics where it is not.
METRIC_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lineage")
    base = build_tiny_model(tmp / "tiny_base")
    project = make_project(tmp, {**TINY, "base_model.source": str(base), "evaluate.few_shot_k": 1,
                                 "evaluate.min_nonempty_fraction": 0.01,
                                 "register.min_margin_over_zero_shot": 0.0, "register.prod_tolerance": 100.0})
    run(project, "dvc", "repro")
    assert "registered e2e-adapter v0.0.1" in run(project, "ptune", "register").stdout
    return project


def lock_outs(project, text=None) -> dict:
    lock = yaml.safe_load(text if text is not None else (project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])
            if not o["path"].endswith((".json", ".md", ".csv")) or "predictions" in o["path"]}


def ids(project, split):
    return [json.loads(x)["id"] for x in (project / f"data/clean/{split}.jsonl").read_text().splitlines()]


def test_spec_must_name_artifact_and_version():
    with pytest.raises(StageError, match="expected <artifact>@<version>"):
        parse_spec("e2e-adapter")


def test_lineage_names_commit_params_hashes_validation_metrics_and_membership(registered):
    project = registered
    head = git(project, "rev-parse", "HEAD").strip()
    train_id, test_id = ids(project, "train")[0], ids(project, "test")[0]
    info = json.loads(run(project, "ptune", "lineage", SPEC, "--json", "--record-id", train_id).stdout)
    assert info["commit"] == head and info["stages"] == ["prod", "staging"]
    assert info["params"]["tune"]["max_train_examples"] == 16
    lock = lock_outs(project)
    assert info["data"]["adapter"]["data/models/adapter"] == lock["data/models/adapter"]
    assert info["data"]["clean"]["data/clean"] == lock["data/clean"]
    assert info["data"]["base model"]["data/models/base"] == lock["data/models/base"]
    assert all(v["success"] for v in info["validation"].values()), info["validation"]
    assert info["metrics"]["tuned"] == json.loads((project / "data/eval/metrics.json").read_text())["tuned"]
    # tune trained on a 16-row subset of the train split and recorded which rows: exact answers
    trained = (project / "data/models/adapter/train_ids.txt").read_text().split()
    assert len(trained) == 16 and trained == sorted(trained)
    assert json.loads((project / "data/models/adapter/ptune_adapter.json").read_text())["data"]["train_ids"]["count"] == 16
    untrained = next(i for i in ids(project, "train") if i not in set(trained))
    record = info["record"] if train_id in trained else \
        json.loads(run(project, "ptune", "lineage", SPEC, "--json", "--record-id", trained[0]).stdout)["record"]
    assert record["split"] == "train" and record["in_training_data"] is True, record
    out = json.loads(run(project, "ptune", "lineage", SPEC, "--json", "--record-id", untrained).stdout)["record"]
    assert out["split"] == "train" and out["in_training_data"] is False and "not in the adapter's training rows" \
        in out["detail"], out

    held_out = json.loads(run(project, "ptune", "lineage", SPEC, "--json", "--record-id", test_id).stdout)
    assert held_out["record"]["split"] == "test" and held_out["record"]["in_training_data"] is False
    text = run(project, "ptune", "lineage", SPEC, "--record-id", "e2e_devel_fixed:999999").stdout
    assert f"commit {head}" in text and "in training data: no" in text

    missing = run(project, "ptune", "lineage", "e2e-adapter@v9.9.9", check=False)
    assert missing.returncode == 1 and "has no version v9.9.9" in missing.stderr


def test_a_registered_version_scores_any_file(registered, tmp_path):
    project = registered
    rows = (project / "data/sources/e2e/devel-fixed.no-ol.csv").read_text().splitlines()
    outside = tmp_path / "independent.csv"
    outside.write_text("\n".join([rows[0], *rows[-5:]]) + "\n")  # MRs the tiny project never collected
    shutil.rmtree(project / "data/models/adapter")  # fetched from the DVC cache at the version's commit
    try:
        proc = run(project, "ptune", "evaluate", "--adapter", SPEC, "--file", str(outside),
                   "--out", str(tmp_path / "eval"))
    finally:
        run(project, "dvc", "checkout", "data/models/adapter")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["test_file"].endswith("test.jsonl") and 1 <= metrics["rows"] <= 5
    assert metrics["systems"] == ["tuned", "zero_shot", "few_shot"]
    assert "| lora (tuned) |" in proc.stdout
    assert run(project, "dvc", "status").stdout.strip().endswith("up to date.")  # the pipeline is untouched


@pytest.mark.slow
def test_repro_from_the_versions_commit_gives_the_same_hashes_and_metrics(registered, tmp_path):
    project = registered
    commit = json.loads(run(project, "ptune", "lineage", SPEC, "--json").stdout)["commit"]
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    git(clone, "checkout", "-q", commit)
    run(clone, "dvc", "repro")
    original = lock_outs(project, git(project, "show", f"{commit}:dvc.lock"))
    reproduced = lock_outs(clone)
    # The adapter directory and the training curves also hold timings (tokens/s); the weights
    # must be the same bytes.
    timed = ("data/models/adapter", "data/tune_live/plots/metrics")
    assert {k: v for k, v in reproduced.items() if k not in timed} == \
        {k: v for k, v in original.items() if k not in timed}  # raw, clean, shards, base model, predictions
    weights = "data/models/adapter/adapter_model.safetensors"
    assert sha256_file(clone / weights) == sha256_file(project / weights)
    before = json.loads(git(project, "show", f"{commit}:data/eval/metrics.json"))
    after = json.loads((clone / "data/eval/metrics.json").read_text())
    for system in before["systems"]:
        for key, value in before[system].items():
            assert after[system][key] == pytest.approx(value, abs=METRIC_TOLERANCE), (system, key)
