"""The Prefect `retrain` flow over a tiny project: the DVC stages as tasks, artifacts,
registration, a validation failure that stops the run, and the workspace lock."""
import asyncio
import json

import pytest
from filelock import FileLock
from prefect.testing.utilities import prefect_test_harness

from flows.retrain import WorkspaceBusy, retrain
from tests.conftest import build_tiny_model
from tests.pipeline_project import make_project, run
from tests.test_pipeline import TINY


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _artifacts():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {a.key: a for a in await client.read_artifacts()}


def test_retrain_runs_every_stage_publishes_and_registers(tmp_path, monkeypatch):
    base = build_tiny_model(tmp_path / "tiny_base")
    project = make_project(tmp_path, {**TINY, "base_model.source": str(base),
                                      "register.min_margin_over_zero_shot": 0.0})
    monkeypatch.setenv("PYTHONPATH", str(project))
    result = retrain(repo=str(project), params_overrides={"tune.learning_rate": "2e-3"})
    assert result["registration"].startswith("registered e2e-adapter v0.0.1")
    assert "tune.learning_rate" not in (project / "params.yaml").read_text()  # nested, not flat
    assert "learning_rate: 0.002" in (project / "params.yaml").read_text()
    status = run(project, "dvc", "status", "--json")
    assert json.loads(status.stdout) == {}  # the same dvc.lock that `dvc repro` leaves
    artifacts = asyncio.run(_artifacts())
    for key in ("validation-base-model", "validation-collect", "validation-clean", "validation-tokenize",
                "validation-tune", "validation-evaluate", "evaluation", "promotion-gate", "registration"):
        assert key in artifacts, key
    assert "passed" in artifacts["validation-tokenize"].data
    table = json.loads(artifacts["evaluation"].data)
    assert [row["system"] for row in table] == ["tuned", "zero_shot"]


def test_validation_failure_fails_the_run_and_registers_nothing(tmp_path, monkeypatch):
    bad = build_tiny_model(tmp_path / "mismatched", vocab_slack=-200)
    project = make_project(tmp_path, {**TINY, "base_model.source": str(bad)})
    monkeypatch.setenv("PYTHONPATH", str(project))
    with pytest.raises(Exception, match="validation failed: suite 'base_model'"):
        retrain(repo=str(project))
    assert not (project / "data/eval").exists()
    assert run(project, "git", "tag", "-l").stdout == ""


def test_a_second_run_in_the_same_workspace_is_refused(tmp_path):
    project = make_project(tmp_path, {})
    (project / ".dvc" / "tmp").mkdir(exist_ok=True)
    with FileLock(str(project / ".dvc" / "tmp" / "ptune-retrain.lock")):
        with pytest.raises(WorkspaceBusy, match="another retrain is running"):
            retrain(repo=str(project))


def test_bad_override_is_rejected_before_anything_runs(tmp_path):
    project = make_project(tmp_path, {})
    before = (project / "params.yaml").read_text()
    with pytest.raises(Exception, match=r"tune\.learning_rate"):
        retrain(repo=str(project), params_overrides={"tune.learning_rate": "-1"})
    with pytest.raises(Exception, match="no key 'tune.lr'"):
        retrain(repo=str(project), params_overrides={"tune.lr": "1"})
    assert (project / "params.yaml").read_text() == before
    assert not (project / "dvc.lock").exists()
