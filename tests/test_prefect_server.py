"""Operating ptune from Prefect, for real: `ptune server` on a free loopback port (its
SQLite database in a throw-away project), `ptune deploy`, `ptune worker`, runs triggered
through the UI's API call on the tiny model, the queue that keeps two runs apart, and
the failure notification (a local HTTP server stands in for the team's channel).

The server, worker and first run are shared with tests/test_ui_browser.py (one pipeline
run for both modules)."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.config import ConfigError, parse_params
from pipelines.stages import CATALOG
from tests.conftest import build_tiny_model, free_port, git
from tests.pipeline_project import env_for, make_project
from tests.test_pipeline import TINY

slow = pytest.mark.slow  # a real server (and, once, the tiny pipeline): seconds to minutes

STAGES = list(CATALOG)
TASK_RUNS = STAGES + ["publish-metrics", "publish-gate", "register-version", "publish-comparison"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT_S = 600  # the tiny pipeline takes ~1 min on 2 idle cores


def http(method: str, url: str, body: dict | None = None, attempts: int = 5):
    """One API call; a 429/502/503 (the server briefly busy, e.g. its SQLite locked on a
    loaded 2-core machine) is retried with backoff, as Prefect's own client does."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


class Inbox(ThreadingHTTPServer):
    """A webhook that keeps what is POSTed to it."""

    def __init__(self):
        self.received: list[dict] = []

        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                inbox.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """Ctrl-C, as a user stops `ptune server` / `ptune worker`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=timeout)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class Stack:
    project: Path
    port: int
    env: dict
    inbox: Inbox
    logs: Path
    procs: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.ui}/api"

    def ptune(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ptune", *args], cwd=self.project, env=self.env, capture_output=True, text=True,
                              timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"ptune {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def deployment(self) -> dict:
        return http("GET", f"{self.api}/deployments/name/retrain/retrain")

    def trigger(self, **parameters) -> str:
        """What the UI's "Run" button does."""
        run = http("POST", f"{self.api}/deployments/{self.deployment()['id']}/create_flow_run",
                   {"parameters": parameters})
        return run["id"]

    def wait(self, run_id: str) -> dict:
        return wait_for(lambda: (r := http("GET", f"{self.api}/flow_runs/{run_id}"))["state"]["type"] in TERMINAL
                        and r, RUN_TIMEOUT_S, f"flow run {run_id}", self.procs["worker"], self.logs / "worker.log")

    def task_runs(self, run_id: str) -> list[dict]:
        runs = http("POST", f"{self.api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        return sorted(runs, key=lambda t: t["start_time"] or t["expected_start_time"])

    def artifacts(self, run_id: str) -> dict[str, dict]:
        found = http("POST", f"{self.api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {a["key"]: a for a in found}

    def logs_of(self, run_id: str) -> list[str]:
        messages: list[str] = []
        while True:  # the API pages by 200
            page = http("POST", f"{self.api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                                            "sort": "TIMESTAMP_ASC", "offset": len(messages)})
            messages += [entry["message"] for entry in page]
            if not page:
                return messages


_SHARED: dict = {}


def _start_stack(tmp: Path, resources: ExitStack) -> Stack:
    base = build_tiny_model(tmp / "tiny_base")
    project = make_project(tmp, {
        **TINY, "base_model.source": str(base),
        "register.min_margin_over_zero_shot": 0.0, "register.prod_tolerance": 100.0,  # any candidate passes
        "prefect.schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}})
    port = free_port()
    inbox = Inbox()
    resources.callback(inbox.shutdown)
    logs = tmp / "logs"
    logs.mkdir()
    env = {**env_for(project), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PTUNE_NOTIFY_URL": inbox.url,
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # the worker polls every 2 s instead of 10: quicker tests
    stack = Stack(project, port, env, inbox, logs)

    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    stack.procs["server"] = start(["ptune", "server", "--port", str(port)], project, server_env, logs / "server.log")
    resources.callback(stop, stack.procs["server"])
    wait_for(lambda: "export PREFECT_API_URL=" in (logs / "server.log").read_text(), 120, "ptune server",
             stack.procs["server"], logs / "server.log")
    stack.ptune("deploy")
    stack.procs["worker"] = start(["ptune", "worker"], project, env, logs / "worker.log")
    resources.callback(stop, stack.procs["worker"])
    return stack


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    """A server, the deployment and a worker over a tiny-model copy of the project."""
    if "stack" not in _SHARED:
        resources = ExitStack()
        _SHARED["resources"] = resources
        try:
            _SHARED["stack"] = _start_stack(tmp_path_factory.mktemp("prefect"), resources)
        except BaseException:
            resources.close()
            raise
    yield _SHARED["stack"]
    _SHARED.pop("resources", ExitStack()).close()


@pytest.fixture(scope="session")
def retrain_run(prefect_stack) -> dict:
    """The first run, triggered as the UI does, with parameters as `dvc exp run -S` sets them."""
    if "first" not in prefect_stack.runs:
        run_id = prefect_stack.trigger(learning_rate=0.002, params_overrides={"tune.seed": 3})
        prefect_stack.runs["first"] = prefect_stack.wait(run_id)
    return prefect_stack.runs["first"]


# --- params ----------------------------------------------------------------------------

def _params(prefect: dict) -> dict:
    from tests.test_registry import PARAMS

    return {**PARAMS, "prefect": prefect}


def test_the_prefect_section_is_validated_and_optional():
    from tests.test_registry import PARAMS

    assert parse_params(PARAMS).prefect.schedule is None  # a project without the section: no schedule
    cfg = parse_params(_params({"schedule": {"cron": "0 3 * * 1", "timezone": "Europe/Berlin"}})).prefect
    assert (cfg.port, cfg.deployment, cfg.work_pool, cfg.schedule.timezone) == (4200, "retrain", "ptune", "Europe/Berlin")
    with pytest.raises(ConfigError, match=r"prefect\.schedule: Value error, cron '0 3 \* \* x': Bad day-of-week"):
        parse_params(_params({"schedule": {"cron": "0 3 * * x"}}))
    with pytest.raises(ConfigError, match=r"prefect\.schedule: Value error, timezone 'Mars/Olympus'"):
        parse_params(_params({"schedule": {"cron": "0 3 * * 1", "timezone": "Mars/Olympus"}}))
    with pytest.raises(ConfigError, match=r"prefect\.notify_url"):
        parse_params(_params({"notify_url": "slack.example"}))


def test_named_parameters_map_onto_params_and_do_not_contradict_overrides():
    import yaml

    from flows.retrain import NAMED_PARAMS, named_overrides
    from tests.conftest import ROOT

    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted in NAMED_PARAMS.values():  # apply_overrides accepts only keys that exist
        section, key = dotted.split(".")
        assert key in real[section], dotted
    assert named_overrides({"method": "prompt", "learning_rate": 0.03, "task_name": None},
                           {"tune.seed": "2"}) == {"tune.method": "prompt", "tune.learning_rate": 0.03,
                                                   "tune.seed": "2"}
    assert named_overrides({"method": "lora"}, {"tune.method": "lora"}) == {"tune.method": "lora"}
    with pytest.raises(ConfigError, match=r"tune\.method is set twice: method='prompt' and params_overrides 'lora'"):
        named_overrides({"method": "prompt"}, {"tune.method": "lora"})


# --- the server, the deployment, a run ---------------------------------------------------

@slow
def test_server_answers_on_loopback_with_its_database_in_the_project(prefect_stack):
    log = (prefect_stack.logs / "server.log").read_text()
    assert f"UI:   {prefect_stack.ui}\n" in log and f"export PREFECT_API_URL={prefect_stack.api}\n" in log
    assert (prefect_stack.project / ".prefect/prefect.db").is_file()
    # The UI is told where its API is (by default it would say port 4200).
    assert http("GET", f"{prefect_stack.ui}/ui-settings")["api_url"] == prefect_stack.api
    assert git(prefect_stack.project, "status", "--porcelain", "--ignored", ".prefect").startswith("!! .prefect/")


@slow
def test_deploy_creates_the_scheduled_deployment_on_a_process_pool(prefect_stack):
    d = prefect_stack.deployment()
    [schedule] = d["schedules"]
    assert schedule["schedule"]["cron"] == "30 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert d["work_pool_name"] == "ptune" and http("GET", f"{prefect_stack.api}/work_pools/ptune")["type"] == "process"
    assert d["global_concurrency_limit"]["limit"] == 1 and d["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert d["job_variables"]["working_dir"] == str(prefect_stack.project)
    assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                {"directory": str(prefect_stack.project)}}]
    properties = d["parameter_openapi_schema"]["properties"]
    assert {"task_name", "method", "learning_rate", "params_overrides", "repo"} <= set(properties)
    assert properties["method"]["description"] == "tune.method (prompt, prefix, ptuning, lora, full)"


@slow
def test_a_run_triggered_through_the_api_runs_every_stage_registers_and_publishes(prefect_stack, retrain_run):
    run = retrain_run
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"] == {"learning_rate": 0.002, "params_overrides": {"tune.seed": 3}}
    tasks = prefect_stack.task_runs(run["id"])
    assert [t["name"] for t in tasks] == TASK_RUNS[:7] + ["publish-metrics", "package", "register", "publish-gate",
                                                     "register-version", "publish-comparison"]
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    artifacts = prefect_stack.artifacts(run["id"])
    for stage in STAGES[:-1]:
        assert artifacts[f"validation-{stage.replace('_', '-')}"]["data"].startswith(f"### Validation of `{stage}`: passed")
    table = json.loads(artifacts["evaluation"]["data"])
    assert table[0]["metric"] == "bleu (primary)" and {"tuned", "zero_shot", "delta"} <= set(table[0])
    assert "Promotion gate: passed" in artifacts["promotion-gate"]["data"]
    assert "registered e2e-adapter v0.0.1" in artifacts["registration"]["data"]
    assert artifacts["method-comparison"]["data"].startswith("### Methods compared: e2e, the same ")
    logs = prefect_stack.logs_of(run["id"])
    assert "Running stage 'tune':" in logs and any(m.startswith("> ptune stage tune") for m in logs)

    # Registered, with the run's parameters committed in params.yaml, as `dvc exp run -S` leaves them.
    listing = prefect_stack.ptune("registry").stdout
    assert "e2e-adapter: " in listing and "v0.0.1" in listing and "prod" in listing
    committed = git(prefect_stack.project, "show", "HEAD:params.yaml")
    assert "learning_rate: 0.002" in committed and "seed: 3" in committed
    assert git(prefect_stack.project, "status", "--porcelain", "params.yaml", "dvc.lock") == ""


@slow
def test_two_triggers_at_once_run_one_after_the_other(prefect_stack, retrain_run):
    """The deployment's limit of one queues the second run; neither meets a DVC lock."""
    first = prefect_stack.trigger(params_overrides={"register.prod_tolerance": 50})
    second = prefect_stack.trigger(params_overrides={"register.prod_tolerance": 60})
    runs = sorted((prefect_stack.wait(first), prefect_stack.wait(second)), key=lambda r: r["start_time"])
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    assert runs[0]["end_time"] <= runs[1]["start_time"]  # ISO timestamps in UTC: ordered as strings
    waited = http("GET", f"{prefect_stack.api}/flow_run_states/?flow_run_id={runs[1]['id']}")
    assert "AwaitingConcurrencySlot" in [s["name"] for s in waited]
    for run in runs:
        assert not any("Unable to acquire lock" in m or "another retrain" in m for m in prefect_stack.logs_of(run["id"]))
        assert len(prefect_stack.task_runs(run["id"])) == len(TASK_RUNS)


@slow
def test_a_failed_run_is_notified_and_registers_nothing(prefect_stack, retrain_run):
    tags = git(prefect_stack.project, "tag", "-l")
    before = len(prefect_stack.inbox.received)
    run = prefect_stack.wait(prefect_stack.trigger(method="adapterdrop"))
    assert run["state"]["type"] == "FAILED"
    assert "tune.method: Input should be 'prompt', 'prefix', 'ptuning', 'lora' or 'full'" in run["state"]["message"]
    assert git(prefect_stack.project, "tag", "-l") == tags
    assert "registration" not in prefect_stack.artifacts(run["id"])
    [note] = wait_for(lambda: prefect_stack.inbox.received[before:], 30, "the failure notification")
    assert note["text"].startswith(f"ptune: retrain run `{run['name']}` failed: ")
    assert "tune.method: Input should be" in note["text"]
    assert note["text"].endswith(f"\n{prefect_stack.ui}/runs/flow-run/{run['id']}")


# --- the failure hook in-process, on the stand-in project (fast) --------------------------

@pytest.fixture
def standin(tmp_path, monkeypatch, prefect_stack):
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.conftest import ROOT
    from tests.test_registry import ALL_STAGES, make_repo

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the stand-in's register stage runs this checkout's cli
    repo = make_repo(tmp_path, stages=ALL_STAGES)
    (repo / "control.json").write_text(json.dumps({"tuned": 41.2, "zero_shot": 9.1, "fail": "tokenize"}))
    with temporary_settings(updates={PREFECT_API_URL: prefect_stack.api}):
        yield repo
        APILogWorker.drain_all(timeout=10)  # this run's logs reach the server before it stops


@slow
def test_a_failed_stage_is_named_in_the_notification(standin, prefect_stack, monkeypatch):
    from flows.retrain import run_retrain

    inbox = Inbox()
    monkeypatch.setenv("PTUNE_NOTIFY_URL", inbox.url)
    try:
        state = run_retrain(standin)
        assert state.is_failed()
        [note] = wait_for(lambda: inbox.received, 30, "the failure notification")
    finally:
        inbox.shutdown()
    run_id = state.state_details.flow_run_id
    text = note["text"]
    assert text.startswith("ptune: retrain run `") and " failed at stage tokenize: " in text
    assert "validation failed: suite 'tokenize'" in text
    assert text.endswith(f"\n{prefect_stack.ui}/runs/flow-run/{run_id}")
    assert not (standin / "data/eval").exists()


@slow
def test_a_notification_that_cannot_be_sent_does_not_hide_the_failure(standin, monkeypatch):
    from flows.retrain import ValidationStopped, run_retrain

    monkeypatch.setenv("PTUNE_NOTIFY_URL", f"http://127.0.0.1:{free_port()}/nobody-listens")
    state = run_retrain(standin)
    with pytest.raises(ValidationStopped, match="validation failed: suite 'tokenize'"):
        state.result()


def test_the_url_comes_from_the_environment_or_params_and_without_one_nothing_is_sent(tmp_path, monkeypatch):
    import yaml

    from pipelines.prefect_ops import notify_failure, notify_url

    monkeypatch.delenv("PTUNE_NOTIFY_URL", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params({"notify_url": "https://hooks.example/T0"})))
    assert notify_url(tmp_path) == "https://hooks.example/T0"  # no tasks/ here: only the prefect section is read
    monkeypatch.setenv("PTUNE_NOTIFY_URL", "http://127.0.0.1:9/env-wins")
    assert notify_url(tmp_path) == "http://127.0.0.1:9/env-wins"

    monkeypatch.delenv("PTUNE_NOTIFY_URL")
    params.write_text("task: {name: e2e}\n")  # a run can fail on a broken params.yaml: no URL in it then
    assert notify_url(tmp_path) is None
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("notified without a URL"))
    run = SimpleNamespace(parameters={"repo": str(tmp_path)}, id="x", name="y")
    assert notify_failure(SimpleNamespace(name="retrain"), run, SimpleNamespace(message="boom", name="Failed")) is None


# --- start, refuse, stop ------------------------------------------------------------------

@slow
def test_server_and_worker_stop_cleanly_on_ctrl_c(tmp_path):
    project = make_project(tmp_path, {})
    port = free_port()
    env = {**env_for(project), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    server = start(["ptune", "server", "--port", str(port)], project, env, tmp_path / "server.log")
    try:
        wait_for(lambda: "Ctrl-C stops it" in (tmp_path / "server.log").read_text(), 120, "ptune server",
                 server, tmp_path / "server.log")
        taken = subprocess.run(["ptune", "server", "--port", str(port)], cwd=project, env=env,
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1
        assert (f"ptune server: error: port {port} on 127.0.0.1 is taken (a Prefect server is already running "
                "there)") in taken.stderr
        worker = start(["ptune", "worker", "--pool", "stop-test"], project, env, tmp_path / "worker.log")
        wait_for(lambda: "started!" in (tmp_path / "worker.log").read_text(), 60, "ptune worker",
                 worker, tmp_path / "worker.log")
        prefect_children = children(server.pid) + children(worker.pid)
        assert len(prefect_children) == 2
        assert stop(worker) == 0
    finally:
        assert stop(server) == 0
    assert not any(alive(pid) for pid in prefect_children)  # nothing orphaned
    with pytest.raises(urllib.error.URLError):
        http("GET", f"http://127.0.0.1:{port}/api/health")


def test_deploy_and_worker_say_how_to_reach_a_server(tmp_path):
    project = make_project(tmp_path, {})
    dead = f"http://127.0.0.1:{free_port()}/api"
    for command in ("deploy", "worker"):
        proc = subprocess.run(["ptune", command], cwd=project, env={**env_for(project), "PREFECT_API_URL": dead},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            f"ptune {command}: error: no Prefect server answers at PREFECT_API_URL={dead}: start one with "
            "`ptune server` (or `make server`) in another terminal, or point PREFECT_API_URL at a running one")
