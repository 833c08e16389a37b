import warnings

import pytest

from pipelines.common import atomic_dir, setup_logging


def test_atomic_dir_replaces_only_on_success_and_sweeps_killed_scratch(tmp_path):
    out = tmp_path / "shards"
    killed = tmp_path / ".shards.abc123"  # what a SIGKILLed run leaves
    (killed / "part").mkdir(parents=True)
    with atomic_dir(out) as scratch:
        (scratch / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    assert not killed.exists()

    with pytest.raises(RuntimeError):
        with atomic_dir(out) as scratch:
            (scratch / "a.txt").write_text("half")
            raise RuntimeError("stage failed")
    assert (out / "a.txt").read_text() == "first"  # the previous output, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the system reuses it)


def test_write_json_is_whole_or_absent_and_sweeps_a_killed_writers_scratch(tmp_path):
    import json
    import os

    from pipelines.common import write_json

    out = tmp_path / "metrics" / "tune.json"
    out.parent.mkdir()
    killed = out.parent / f".tune.json.{_dead_pid()}.tmp"  # what a writer SIGKILLed mid-write leaves
    killed.write_text('{"half": ')
    live = out.parent / f".tune.json.{os.getppid()}.tmp"  # a running writer's: not ours to remove
    live.write_text("{}")
    write_json(out, {"steps": 3})
    assert json.loads(out.read_text()) == {"steps": 3}
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([live.name, "tune.json"])

    class Unwritable:
        def __str__(self):
            raise RuntimeError("cannot render")

    with pytest.raises(RuntimeError, match="cannot render"):
        write_json(out, {"steps": Unwritable()})
    assert json.loads(out.read_text()) == {"steps": 3}  # the previous file, untouched
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([live.name, "tune.json"])

    blocked = tmp_path / "metrics" / "dir.json"
    blocked.mkdir()  # a directory where the file goes: the rename fails after the scratch is written
    with pytest.raises(OSError):
        write_json(blocked, {"steps": 3})
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".dir.json.")]  # no scratch left


def test_the_cli_logging_setup_silences_a_library_deprecation_no_user_can_act_on():
    """PEFT's call of a deprecated transformers method printed a FutureWarning in every
    `make run` (tune, evaluate, package) and `ptune export`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
