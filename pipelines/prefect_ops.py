"""Running ptune from Prefect: a local server, the ``retrain`` deployment, a worker, and
the failure notification.

    ptune server   a Prefect server on 127.0.0.1 (SQLite under .prefect/, or the
                   PREFECT_SERVER_DATABASE_CONNECTION_URL you set, e.g. Postgres)
    ptune deploy   the `retrain` deployment: schedule from params.yaml's `prefect`
                   section, friendly parameters, one run at a time, a process work pool
    ptune worker   a process worker on that pool, running flows with this environment's
                   interpreter in this project

Prefect is imported only inside the functions: ``ptune stage ...`` never pays for it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError

from pipelines.common import StageError
from pipelines.config import PrefectConfig

ENTRYPOINT = "flows/retrain.py:retrain"
HOST = "127.0.0.1"  # loopback only: the server has no authentication
# Prefect's first flow waits on telemetry without these, and DVC spawns an analytics daemon.
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "HF_HUB_DISABLE_TELEMETRY": "1"}
SERVER_START_TIMEOUT_S = 120.0  # ~5 s idle; the first start migrates the database, slower on busy cores
STOP_TIMEOUT_S = 30.0  # after SIGINT; then SIGTERM, then SIGKILL
NOTIFY_URL_ENV = "PTUNE_NOTIFY_URL"
STAGE_NOTE = "failed stage: "  # the retrain flow notes the stage on the exception it re-raises


def _prefect_cli() -> list[str]:
    # This interpreter's Prefect: the worker then starts flow runs with this interpreter too.
    return [sys.executable, "-m", "prefect"]


def _child_env(root: Path) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV}
    env.setdefault("PREFECT_HOME", str(root / ".prefect"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc, ptune of this venv
    return env


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers at ``api_url`` (``http://host:port/api``)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"null") is True
    except (OSError, ValueError):
        return False


def api_url(cfg: PrefectConfig) -> str:
    """PREFECT_API_URL if set and answering, else the local server `ptune server` starts."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not healthy(url):
            raise StageError(f"no Prefect server answers at PREFECT_API_URL={url}: start one with `ptune server` "
                             "(or `make server`) in another terminal, or point PREFECT_API_URL at a running one")
        return url
    url = f"http://{HOST}:{cfg.port}/api"
    if not healthy(url):
        raise StageError(f"no Prefect server: PREFECT_API_URL is not set and nothing answers at {url}; start one "
                         "with `ptune server` (or `make server`) in another terminal, or set PREFECT_API_URL")
    return url


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((HOST, port)) == 0


class _Stop(Exception):
    """SIGINT or SIGTERM to ptune itself: stop the child."""


def _supervise(cmd: list[str], env: dict[str, str], cwd: Path,
               ready: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run ``cmd`` in its own process group until it exits or we are told to stop.

    Prefect's server and workers ignore SIGTERM; they stop cleanly on SIGINT. Ctrl-C
    (or SIGTERM to ptune) is passed on to the whole group as SIGINT, so nothing is
    orphaned; what has not exited after STOP_TIMEOUT_S is terminated, then killed.
    """
    def _raise_stop(signum, frame):
        raise _Stop

    # Set before the child starts: a shell's background job inherits SIGINT ignored, and
    # an ignored SIGINT would pass on to the child (a handler does not survive exec).
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    try:
        if ready is not None:
            ready(proc)
        return proc.wait()
    except _Stop:
        print(f"stopping `{' '.join(cmd[2:4])}` ...", file=sys.stderr, flush=True)
        return _stop(proc)
    finally:
        if proc.poll() is None:  # `ready` failed: leave nothing behind
            _stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(proc: subprocess.Popen) -> int:
    for sig, wait in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    code = proc.wait()
    # A clean stop on SIGINT is Prefect's 0 or the conventional 130.
    return 0 if code in (0, 130, -signal.SIGINT) else code


def server(root: Path, cfg: PrefectConfig, port: int | None = None) -> int:
    """``prefect server start`` on loopback until Ctrl-C; its database under ``root/.prefect``."""
    port = port or cfg.port
    url = f"http://{HOST}:{port}"
    if _port_taken(port):
        what = "a Prefect server is already running there" if healthy(f"{url}/api") else "something else uses it"
        raise StageError(f"port {port} on {HOST} is taken ({what}); stop it, or pass --port "
                         "(or set prefect.port in params.yaml)")
    env = _child_env(root)
    env.pop("PREFECT_API_URL", None)  # the server serves its own API; a client setting is not for it
    # The UI asks the server where its API is: without these it says port 4200 whatever --port was.
    env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=f"{url}/api")
    if not env.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        (root / ".prefect").mkdir(exist_ok=True)
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{root / '.prefect' / 'prefect.db'}"
    database = env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    if "@" in database:  # postgresql+asyncpg://user:password@host/db: do not print the password
        database = database.split("://", 1)[0] + "://…@" + database.rsplit("@", 1)[1]

    def ready(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not healthy(f"{url}/api", timeout=1.0):
            if proc.poll() is not None:
                raise StageError(f"`prefect server start` exited {proc.returncode} before answering at {url}/api "
                                 "(its output is above)")
            if time.monotonic() > deadline:
                raise StageError(f"the Prefect server did not answer at {url}/api within {SERVER_START_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
        print(f"\nPrefect server ready (database: {database})\n"
              f"  UI:   {url}\n"
              f"  for `ptune deploy`, `ptune worker`, `ptune retrain` in another shell:\n"
              f"  export PREFECT_API_URL={url}/api\n"
              f"Ctrl-C stops it.", flush=True)

    return _supervise([*_prefect_cli(), "server", "start", "--host", HOST, "--port", str(port)],
                      env, root, ready)


def ensure_work_pool(name: str) -> None:
    """A process work pool named ``name`` (created with Prefect's default job template)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created process work pool {name!r}")
            return
    if pool.type != ProcessWorker.type:
        raise StageError(f"work pool {name!r} is of type {pool.type!r}, not {ProcessWorker.type!r}; "
                         "set prefect.work_pool in params.yaml to another name")


def deploy(root: Path, cfg: PrefectConfig, schedule: bool = True) -> str:
    """Create or update the ``retrain`` deployment of this project; returns its id.

    The flow is loaded from this directory (``flows/retrain.py``) and runs in it; at
    most one run at a time, later ones wait in the queue (AwaitingConcurrencySlot).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.flows import Flow
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = api_url(cfg)
    if not (root / ENTRYPOINT.split(":")[0]).is_file():
        raise StageError(f"{root}: no {ENTRYPOINT.split(':')[0]}; run `ptune deploy` from the project root")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        ensure_work_pool(cfg.work_pool)
        flow = Flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
        schedules = [Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)] if schedule and cfg.schedule else []
        deployment_id = flow.deploy(
            name=cfg.deployment, work_pool_name=cfg.work_pool, build=False, push=False,
            schedules=schedules,
            # A second trigger waits for the first instead of failing on the workspace lock.
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            job_variables={"working_dir": str(root), "env": QUIET_ENV},
            description=f"ptune retrain of {root}: every DVC stage, then registration (README, 'Prefect')",
            tags=["ptune"], print_next_steps=False, ignore_warnings=True)
    ui = url.removesuffix("/").removesuffix("/api")
    when = (f"schedule: cron {cfg.schedule.cron!r} in {cfg.schedule.timezone}" if schedules
            else "no schedule: runs when triggered")
    print(f"deployment retrain/{cfg.deployment} ({deployment_id}), work pool {cfg.work_pool!r}, {when}\n"
          f"  UI:      {ui}/deployments/deployment/{deployment_id}\n"
          f"  trigger: prefect deployment run retrain/{cfg.deployment} [-p method=prompt ...]\n"
          f"  runs need a worker: ptune worker")
    return str(deployment_id)


def worker(root: Path, cfg: PrefectConfig, pool: str | None = None) -> int:
    """``prefect worker start`` on the project's pool until Ctrl-C."""
    url = api_url(cfg)
    env = {**_child_env(root), "PREFECT_API_URL": url}
    print(f"worker on pool {pool or cfg.work_pool!r} against {url}; Ctrl-C stops it", flush=True)
    return _supervise([*_prefect_cli(), "worker", "start", "--pool", pool or cfg.work_pool, "--type", "process"],
                      env, root)


# --- failure notification ----------------------------------------------------------

def notify_url(repo: str | Path) -> str | None:
    """PTUNE_NOTIFY_URL, else ``prefect.notify_url`` in the run's params.yaml (None: no one to tell)."""
    url = os.environ.get(NOTIFY_URL_ENV)
    if url:
        return url
    # Only the prefect section is read: a run that failed on another section of params.yaml, or on
    # its task's declaration, still tells someone.
    try:
        raw = yaml.safe_load((Path(repo) / "params.yaml").read_text())
        return PrefectConfig.model_validate((raw or {}).get("prefect") or {}).notify_url
    except (OSError, yaml.YAMLError, ValidationError, AttributeError):  # the file itself is what broke
        return None


def _failed_stages(flow_run_id, state) -> list[str]:
    """The stage the flow noted on its exception, else the failed task runs the API knows of.

    Task run states reach the API as events, a moment after the flow has seen them: a
    hook that runs at once may not find the failed task run there yet.
    """
    exc = state.result(raise_on_failure=False) if state.is_failed() else None
    noted = [n[len(STAGE_NOTE):] for n in getattr(exc, "__notes__", []) if n.startswith(STAGE_NOTE)]
    if noted:
        return noted
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED]))))
    return [r.name for r in runs]


def failure_text(flow_name: str, flow_run, state, stages: list[str]) -> str:
    from prefect.settings import PREFECT_UI_URL

    where = f" at stage {', '.join(stages)}" if stages else ""
    reason = (state.message or state.name or "").strip()
    if len(reason) > 1500:  # a chat message, not a log: the run page has the rest
        reason = reason[:1500] + " …"
    text = f"ptune: {flow_name} run `{flow_run.name}` {state.name.lower()}{where}: {reason}"
    ui = PREFECT_UI_URL.value()
    if ui:
        text += f"\n{ui.rstrip('/')}/runs/flow-run/{flow_run.id}"
    return text


def notify_failure(flow, flow_run, state) -> None:
    """Flow ``on_failure`` / ``on_crashed`` hook: POST ``{"text": ...}`` (Slack-compatible).

    Does nothing without a URL; a notification that fails is logged and never replaces
    the run's own failure.
    """
    from prefect.logging.loggers import flow_run_logger

    url = notify_url(flow_run.parameters.get("repo", "."))
    if not url:
        return
    logger = flow_run_logger(flow_run, flow)
    where = "/".join(url.split("/")[:3])  # a webhook's path is its secret: keep it out of the logs
    try:
        try:
            stages = _failed_stages(flow_run.id, state)
        except Exception as exc:  # the API may be what failed; still say that the run did
            logger.warning("could not read the failed stage of %s: %s", flow_run.name, exc)
            stages = []
        body = json.dumps({"text": failure_text(flow.name, flow_run, state, stages)}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
        logger.info("failure notified to %s", where)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        logger.warning("failure notification to %s did not go through: %s", where, exc)
