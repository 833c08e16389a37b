"""The Prefect `retrain` flow over a stand-in project (tests/test_registry.py builds it):
every DVC stage as a task in order, the artifacts, registration, a failed validation
that stops the run, the workspace lock and parameter overrides."""
from __future__ import annotations

import asyncio
import json

import pytest
from filelock import FileLock
from prefect.testing.utilities import prefect_test_harness

from prefect import flow, task

from flows.retrain import (LOCK, ValidationStopped, WorkspaceBusy, _transient, apply_overrides,
                           retrain, run_retrain)
from pipelines.common import StageError
from pipelines.config import ConfigError
from tests.conftest import ROOT, git
from tests.test_registry import ALL_STAGES, make_repo, sh, tags

STAGES = ALL_STAGES  # the stand-in project has the catalog's stages


@pytest.fixture(scope="session")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def flow_run(test):
    """A test that runs a flow: on the test server (~10 s to start), and slow (seconds a run)."""
    return pytest.mark.slow(pytest.mark.usefixtures("prefect_api")(test))


@pytest.fixture
def project(tmp_path, monkeypatch):
    # The stand-in's register stage runs `python -m pipelines.cli` from this checkout.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return make_repo(tmp_path, stages=ALL_STAGES)


async def _read_run(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)

    async with get_client() as client:
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    task_runs = sorted(task_runs, key=lambda t: t.start_time or t.expected_start_time)
    names = {t.id: t.name for t in task_runs}
    by_task = {}
    for log in logs:
        by_task.setdefault(names.get(log.task_run_id), []).append(log.message)
    return task_runs, {a.key: a for a in artifacts}, by_task


def read_run(state):
    """(task runs in start order, artifacts by key, log messages by task run name) of a flow run."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)  # logs reach the API in batches
    return asyncio.run(_read_run(state.state_details.flow_run_id))


@flow_run
def test_retrain_runs_every_stage_in_order_publishes_and_registers(project):
    state = run_retrain(project, {"register.prod_tolerance": "2.5"})
    assert state.is_completed(), state.message
    result = state.result()
    assert result["registration"]["version"] == "v0.0.1" and result["gate"]["passed"]
    assert "e2e-adapter#prod#2" in tags(project)
    assert (project / "dvc.lock").is_file()
    assert json.loads(sh(project, "dvc", "status", "--json").stdout) == {}  # as `dvc repro` leaves it
    # The override went to its dotted place; the file's comment survived; it was committed.
    params = (project / "params.yaml").read_text()
    assert params.startswith("# stand-in project\n") and "prod_tolerance: 2.5" in params
    assert git(project, "status", "--porcelain", "params.yaml") == ""

    task_runs, artifacts, logs = read_run(state)
    names = [t.name for t in task_runs]
    assert [n for n in names if n in STAGES] == list(STAGES)
    assert names.index("publish-metrics") == names.index("evaluate") + 1
    assert names[-2:] == ["register-version", "publish-comparison"]
    assert all(t.state.is_completed() and t.run_count == 1 for t in task_runs)
    assert "Running stage 'tune':" in logs["tune"] and "> python stage.py tune data/models/tuned" in logs["tune"]

    for stage in STAGES[:-1]:
        md = artifacts[f"validation-{stage.replace('_', '-')}"].data
        assert md.startswith(f"### Validation of `{stage}`: passed") and f"| {stage} | passed | 2/2 | 3 |" in md
    table = json.loads(artifacts["evaluation"].data)
    assert table[0] == {"metric": "bleu (primary)", "tuned": 41.2, "zero_shot": 9.1, "delta": 32.1}
    assert "E2E BLEU here is not comparable with the Prefix-Tuning paper's Table 1" in artifacts["evaluation"].description
    assert "E2E BLEU here is not comparable" in artifacts["registration"].data
    assert "pass: bleu 41.20 is +32.10 over the zero-shot prompt" in artifacts["promotion-gate"].data
    assert "registered e2e-adapter v0.0.1" in artifacts["registration"].data
    comparison = artifacts["method-comparison"].data
    assert comparison.startswith("### Methods compared: e2e, the same 3 test rows")
    assert "| lora (tuned) | workspace | 8 |" in comparison and "| zero-shot | workspace |" in comparison
    # This fake evaluate writes no per-row predictions: no intervals, and the table says why.
    assert "- no interval for lora (tuned) (workspace): its predictions are not the 3 test rows" in comparison


@flow_run
@pytest.mark.parametrize("failing, exits", [("tokenize", False), ("collect", True)],
                         ids=["json-says-failed", "stage-exits-nonzero"])
def test_a_failed_validation_fails_the_run_and_stops_everything_after_it(project, failing, exits):
    (project / "control.json").write_text(json.dumps(
        {"tuned": 41.2, "zero_shot": 9.1, "fail": failing, "exit_on_failure": exits}))

    state = run_retrain(project)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"validation failed: suite '{failing}'"):
        state.result()
    task_runs, artifacts, _ = read_run(state)
    done = STAGES[:STAGES.index(failing) + 1]
    assert [t.name for t in task_runs] == list(done)
    # A failed validation is not transient: the stages that retry did not retry it.
    assert task_runs[-1].state.is_failed() and task_runs[-1].run_count == 1
    assert "FAILED" in artifacts[f"validation-{failing}"].data
    assert "| expect_column_values_to_not_be_null | text | 1 unexpected |" in artifacts[f"validation-{failing}"].data
    assert not (project / "data/models/adapter").exists() and not (project / "data/eval").exists()
    assert tags(project) == [] and "registration" not in artifacts


@flow_run
def test_a_crashing_stage_fails_the_run_with_the_tail_of_its_output(project):
    (project / "control.json").write_text(json.dumps({"tuned": 41.2, "zero_shot": 9.1, "crash": "clean"}))
    git(project, "commit", "-qam", "break a stage")
    state = run_retrain(project)
    with pytest.raises(StageError, match=r"dvc repro --single-item clean exited \d+:\n(.*\n)*clean: out of disk space"):
        state.result()
    task_runs, _, _ = read_run(state)
    assert [t.name for t in task_runs] == ["base_model", "collect", "clean"]
    assert task_runs[-1].run_count == 1  # clean does not fetch: no retries


@flow_run
def test_only_failures_that_may_pass_on_a_second_try_are_retried():
    attempts = []

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=_transient)
    def flaky(error: Exception) -> None:
        attempts.append(type(error).__name__)
        if len(attempts) == 1:
            raise error

    @flow
    def both() -> None:
        flaky(StageError("connection reset"))
        attempts.clear()
        flaky(ValidationStopped("validation failed"))

    with pytest.raises(ValidationStopped):
        both()
    assert attempts == ["ValidationStopped"]


@flow_run
def test_a_second_run_in_the_same_workspace_is_refused(project):
    with FileLock(str(project / LOCK)):
        with pytest.raises(WorkspaceBusy, match=f"another retrain is running in {project}; try again later"):
            retrain(repo=str(project))
    assert not (project / "dvc.lock").exists()


def test_bad_overrides_are_rejected_before_anything_is_written(project):
    before = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"tune\.learning_rate: Input should be greater than 0"):
        apply_overrides(project, {"tune.learning_rate": "-1"})
    with pytest.raises(ConfigError, match="no key 'tune.lr'"):
        apply_overrides(project, {"tune.lr": "1"})
    with pytest.raises(ConfigError, match="no section 'tuning'"):
        apply_overrides(project, {"tuning.lr": "1"})
    assert (project / "params.yaml").read_text() == before
    apply_overrides(project, {"tune.learning_rate": "2e-3", "tune.method": "prompt"})
    changed = [(a, b) for a, b in zip(before.splitlines(), (project / "params.yaml").read_text().splitlines())
               if a != b]
    assert changed == [("  method: lora", "  method: prompt"), ("  learning_rate: 0.1", "  learning_rate: 0.002")]


@pytest.mark.parametrize("argv, said", [(["-S", "tune.lr=1"], "override tune.lr: params.yaml has no key 'tune.lr'"),
                                        (["-S", "tune.learning_rate=-1"], "tune.learning_rate: Input should be greater than 0"),
                                        (["-S", "tune.method=lora", "-S", "tune.method=prompt"],
                                         "-S tune.method: given twice; pass each parameter once")])
def test_ptune_retrain_refuses_bad_overrides_before_a_flow_run_starts(project, monkeypatch, capsys, argv, said):
    """A typo in -S is one line, not a failed run in Prefect's history (nor a temporary server started)."""
    import flows.retrain
    from pipelines import cli

    monkeypatch.chdir(project)
    monkeypatch.setattr(flows.retrain, "retrain", lambda **kw: pytest.fail("a flow run started"))
    before = (project / "params.yaml").read_text()
    assert cli.main(["retrain", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ptune retrain: error: ") and said in err
    assert (project / "params.yaml").read_text() == before
