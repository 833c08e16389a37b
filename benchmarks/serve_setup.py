"""What the serving benchmarks share: adapters of every method on the real base model, a
throwaway registry that holds them as `prod` versions, `ptune serve` on a free loopback
port, and the E2E inputs.

The adapters are the project's own: the LoRA adapter `make run` trained, and untrained
adapters of the other methods built by the tune stage's factory (`build_peft_config` and
its real-word initializations, different init texts or seeds per adapter), so each
answers differently and no answer is the base model's. Their answers are not meant to
be good: the benchmarks measure throughput and check that every client got its own
adapter's answer.

The registry is a git + DVC repository in a temporary directory, one commit and one GTO
version per adapter, so `ptune serve` resolves names exactly as it does in a project.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
E2E_CSV = "data/sources/e2e/devel-fixed.no-ol.csv"
PROMPT_TEXTS = ["Describe the restaurant from its attributes in one fluent sentence:",
                "Write one sentence about this place for a guide:"]
PREFIX_TEXTS = ["table-to-text", "restaurant description"]


def mrs(project: Path, n: int, skip: int = 0) -> list[str]:
    """``n`` distinct meaning representations from the E2E dev file, after the first ``skip``."""
    seen: list[str] = []
    with open(project / E2E_CSV, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["mr"] not in seen:
                seen.append(row["mr"])
            if len(seen) == skip + n:
                break
    return seen[skip:]


def _untrained(project: Path, method: str, out: Path, seed: int, variant: int) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.config import load_params
    from pipelines.methods import build_peft_config, init_prefix_from_text

    base = project / "data/models/base"
    tune = load_params(project / "params.yaml").tune
    updates = {"method": method}
    if method == "prompt":
        updates["prompt"] = tune.prompt.model_copy(update={"init": "text", "init_text": PROMPT_TEXTS[variant % 2]})
    cfg = tune.model_copy(update=updates)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), build_peft_config(cfg, base))
    if method == "prefix":
        init_prefix_from_text(model, tok, PREFIX_TEXTS[variant % 2])
    if method == "lora":  # LoRA starts as the identity (B = 0): a small B makes it another model
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


def build_adapters(project: Path, out: Path, methods: list[str]) -> dict[str, Path]:
    """name -> adapter directory: ``lora`` first is the trained adapter of ``project``; the
    rest untrained, of the methods listed (a method listed twice gets a second variant)."""
    trained = project / "data/models/adapter"
    info = json.loads((trained / "ptune_adapter.json").read_text())
    if info["config"]["method"] != "lora":
        raise SystemExit(f"{trained}: a {info['config']['method']} adapter; these benchmarks expect the make run "
                         "default (tune.method: lora)")
    found: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for i, method in enumerate(methods):
        variant = counts.get(method, 0)
        counts[method] = variant + 1
        name = f"{method}-{variant}"
        where = out / name
        if method == "lora" and variant == 0:
            shutil.copytree(trained, where)
        else:
            _untrained(project, method, where, seed=100 + i, variant=variant)
            # The trained one's record (its base model's sha256 is what the server checks), this method's name.
            mine = {**info, "config": {**info["config"], "method": method},
                    "stats": {**info.get("stats", {}), "method": method, "steps": 0}}
            (where / "ptune_adapter.json").write_text(json.dumps(mine, indent=2))
        found[name] = where
    return found


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_registry(project: Path, adapters: dict[str, Path], repo: Path) -> None:
    """A git + DVC repository where each adapter is the ``prod`` version v0.0.1 of an artifact
    of its name, with the project's shards manifest (its prompt format)."""
    from gto import api

    bin_dir = Path(sys.executable).parent
    repo.mkdir(parents=True)
    _run(repo, "git", "init", "-q")
    _run(repo, str(bin_dir / "dvc"), "init", "-q")
    _run(repo, "git", "commit", "-qm", "dvc init")
    shards = repo / "data/shards"
    shards.mkdir(parents=True)
    for name in ("manifest.json", "demonstrations.jsonl"):
        if (project / "data/shards" / name).is_file():
            shutil.copy(project / "data/shards" / name, shards / name)
    for name, path in adapters.items():
        target = repo / "data/models/adapter"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(path, target)
        _run(repo, str(bin_dir / "dvc"), "add", "-q", "data/models/adapter", "data/shards")
        _run(repo, "git", "add", "-A")
        _run(repo, "git", "commit", "-qm", f"adapter {name}")
        head = _run(repo, "git", "rev-parse", "HEAD").strip()
        api.register(str(repo), name, head, version="v0.0.1", author="bench", author_email="bench@localhost")
        api.assign(str(repo), name, "prod", version="v0.0.1", author="bench", author_email="bench@localhost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(repo: Path, base: Path, log: Path, *extra: str):
    """``ptune serve`` on a free loopback port -> (base URL, its process); stopped on exit."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "ptune"), "serve", "--repo", str(repo), "--base", str(base),
           "--port", str(port), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ptune serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet: still loading the base model and the prod versions
            if time.monotonic() > deadline:
                raise SystemExit(f"ptune serve did not answer within 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
