"""Small helpers every stage shares: hashing, atomic outputs, JSON."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("ptune")


class StageError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback."""


class ConfigError(ValueError):
    """A user-fixable problem in params.yaml (or an override of it) or a task's declaration."""


SPLITS = ("train", "validation", "test")  # clean writes them, tokenize shards them, lineage searches them


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` whole or not at all: through a scratch file beside it (hidden,
    with the PID, so two writers never share one and a killed writer's is swept next time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    remove_stale_scratch(path)
    tmp = path.with_name(f"{scratch_prefix(path)}tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_output(path: Path, directory: bool = True) -> None:
    """Refuse, before any work, an output path the stage could not write at the end: a
    file where a directory goes (or the reverse), or a file where a parent directory goes."""
    path = Path(path)
    if directory and path.is_dir():
        _check_replaceable(path)
    if path.exists() and path.is_dir() != directory:
        raise StageError(f"{path}: exists and is {'not ' if directory else ''}a directory; the stage writes "
                         f"a {'directory' if directory else 'file'} there: move it away or choose another path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise StageError(f"{parent}: is a file, so {path} cannot be created; move it away or choose another path")


def _check_replaceable(path: Path) -> None:
    """A directory output is replaced whole: never the directory a user works in, one above
    it, their home, or a git repository (a mistyped ``--out .`` would take the project)."""
    target, here = path.resolve(), Path.cwd().resolve()
    what = ("the current directory" if target == here else "a parent of the current directory" if target in here.parents
            else "the home directory" if target == Path.home().resolve()
            else "a git repository" if (target / ".git").exists() else None)
    if what:
        raise StageError(f"{path}: is {what}, and the output directory is replaced whole; choose another path")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``out`` only if the block succeeds.

    A failed or killed stage leaves the previous output (or none), never a
    half-written directory that looks valid. A failed validation report written
    into the scratch directory is kept beside it as ``<out>.validation-failed.json``.
    """
    out = Path(out)
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(out)
    tmp = Path(tempfile.mkdtemp(prefix=scratch_prefix(out), dir=out.parent))
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


def scratch_prefix(out: Path) -> str:
    """The name prefix of this process's scratch directories beside ``out``: hidden (and
    ignored by git), with the PID, so a later run can tell a killed run's from a live one's."""
    return f".{Path(out).name}.{os.getpid()}."


def remove_stale_scratch(out: Path) -> None:
    """Remove the scratch directories and files beside ``out`` of runs that are gone (SIGKILL
    skips every cleanup), and directories named before they carried a PID; a running run's stay."""
    out = Path(out)
    # `.<name>.<pid>.*`; before the PID, `.<name>.<random>` (mkdtemp) and clean's `.<name>.index-<random>`
    name = re.compile(rf"\.{re.escape(out.name)}\.(?:(\d+)\..+|[^.]+)", re.S)
    for path in out.parent.iterdir() if out.parent.is_dir() else ():
        m = name.fullmatch(path.name)
        if not m or (m[1] and _running(int(m[1]))):
            continue
        if path.is_dir():
            log.info("removing %s, left behind by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)
        elif m[1] and path.is_file():  # write_json's `.<name>.<pid>.tmp`
            log.info("removing %s, left behind by a killed run", path)
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def setup_logging(level: int = logging.INFO) -> None:
    """The project's loggers at ``level``, every library's at WARNING (INFO under DEBUG):
    a stage's log is its own summary, not 200 lines of GX's (or httpx's) bookkeeping."""
    logging.basicConfig(level=logging.INFO if level <= logging.DEBUG else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for own in ("pipelines", "ptune"):
        logging.getLogger(own).setLevel(level)
    for noisy in ("great_expectations", "httpx", "httpcore", "absl"):  # chatter even at INFO: WARNING with -v too
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PEFT calls a transformers method deprecated in 5.x at every adapter load (tune, evaluate,
    # package, export, serve): not the user's to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
