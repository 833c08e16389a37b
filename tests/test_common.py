import pytest

from pipelines.common import atomic_dir


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
