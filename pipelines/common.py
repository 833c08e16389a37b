"""Small helpers every stage shares: hashing, atomic outputs, JSON."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("ptune")


class StageError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out`` only if the block succeeds.

    A failed or killed stage leaves the previous output (or none), never a
    half-written directory that looks valid. A failed validation report written
    into the scratch directory is kept beside it as ``<out>.validation-failed.json``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A run killed with SIGKILL leaves its scratch directory behind; only this function
    # makes `.<name>.*` directories, and DVC's lock rules out a concurrent run writing one.
    for stale in out.parent.glob(f".{out.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    failed_report = out.parent / f"{out.name}.validation-failed.json"
    try:
        yield tmp
    except BaseException:
        if (tmp / "validation.json").is_file():
            os.replace(tmp / "validation.json", failed_report)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed_report.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "absl"):  # one line per HTTP request / tokenizer choice
        logging.getLogger(noisy).setLevel(logging.WARNING)
