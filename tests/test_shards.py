import json
import os
import re
import shutil

import pyarrow as pa
import pytest
import torch

from pipelines import shards, tokenize
from pipelines.common import StageError
from pipelines.shards import PackedCollator, ShardWriter, load_split, read_manifest, verify
from tests.test_tokenize import E2E, MANY, ROWS, cfg, write_clean


@pytest.fixture
def out(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", ROWS)
    tokenize.run(cfg(shard_rows=2), E2E, clean, tiny_base, tmp_path / "shards")
    return tmp_path / "shards"


def test_reader_memory_maps_the_listed_shards(out, tiny_base):
    train = load_split(out, "train", base=tiny_base)
    assert len(train) == 3 and train.cache_files  # backed by the files, not copied into memory
    assert {f["filename"] for f in train.cache_files} == {str(out / "train" / f"shard-0000{i}.arrow") for i in (0, 1)}


def test_a_corrupted_shard_is_named(out):
    shard = out / "train" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"train/shard-00001.arrow: sha256 differs"):
        load_split(out, "train")
    load_split(out, "validation")  # the other splits are still readable
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(StageError, match=r"shard-00001.arrow: \d+ bytes, manifest.json says"):
        load_split(out, "validation", checksums=False)  # sizes are checked even without checksums


def test_a_missing_shard_an_extra_file_or_a_split_not_there(out):
    (out / "train" / "shard-00001.arrow").rename(out / "shard-00001.arrow")
    with pytest.raises(StageError, match=r"shard-00001.arrow: not listed in manifest.json"):
        load_split(out, "train")
    (out / "shard-00001.arrow").unlink()
    with pytest.raises(StageError, match=r"train/shard-00001.arrow: listed in manifest.json but missing"):
        load_split(out, "train")
    with pytest.raises(StageError, match="no split 'dev'"):
        load_split(out, "dev")
    (out / "manifest.json").unlink()
    with pytest.raises(StageError, match="manifest.json: missing"):
        load_split(out, "validation")


@pytest.mark.parametrize("damage, says", [
    (lambda text: text[:len(text) // 2], r"not valid JSON \(.*\): truncated or edited"),
    (lambda text: "[]", r"format None, this code reads 'ptune-shards/2'"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "splits"}), "no splits: edited"),
])
def test_a_damaged_manifest_is_one_line_naming_it(out, damage, says):
    path = out / "manifest.json"
    path.write_text(damage(path.read_text()))
    for read in (read_manifest, verify, lambda d: load_split(d, "train")):
        with pytest.raises(StageError, match=f"^{re.escape(str(path))}: {says}.*; rerun `dvc repro tokenize`$") as err:
            read(out)
        assert "\n" not in str(err.value)


def test_shards_cut_by_another_tokenizer_are_refused(out, tiny_base, tmp_path):
    other = tmp_path / "other_base"
    shutil.copytree(tiny_base, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    verify(out, base=tiny_base)
    with pytest.raises(StageError, match=r"tokenized with tokenizer \w{12} .* but .*other_base has \w{12}"):
        load_split(out, "train", base=other)


def test_a_failed_run_leaves_the_previous_output_and_no_valid_looking_shard(out, tiny_base, tmp_path, monkeypatch):
    before = (out / "manifest.json").read_bytes()
    real = os.replace
    staging = []

    def crash_on_second_shard(src, dst):
        if str(dst).endswith("shard-00001.arrow"):
            staging.append(os.path.dirname(os.path.dirname(src)))
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(shards.os, "replace", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        tokenize.run(cfg(shard_rows=2), E2E, tmp_path / "clean", tiny_base, out)
    monkeypatch.undo()
    assert (out / "manifest.json").read_bytes() == before
    verify(out)
    assert staging and not os.path.exists(staging[0])  # the scratch directory is gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["clean", "shards"]


def test_the_writer_exposes_a_shard_name_only_once_complete(tmp_path, monkeypatch):
    def killed(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(shards.os, "replace", killed)
    writer = ShardWriter(tmp_path / "train", shards.SCHEMA, rows=2)
    batch = pa.RecordBatch.from_pylist([{"id": "a", "input_ids": [1, 2], "labels": [-100, 2]}] * 2, shards.SCHEMA)
    with pytest.raises(OSError, match="killed"):
        writer.write(batch)
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["shard-00000.arrow.partial"]


def tiny_model(base, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_has_the_loss_of_the_same_examples_unpacked(tmp_path, tiny_base, attn):
    clean = write_clean(tmp_path / "clean", {**MANY, "train": MANY["train"] * 2})
    tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "plain")
    stats = tokenize.run(cfg(pack=True), E2E, clean, tiny_base, tmp_path / "packed")
    plain, packed = load_split(tmp_path / "plain", "train"), load_split(tmp_path / "packed", "train")
    assert len(packed) < len(plain) == stats.examples["train"] == sum(len(r["seq_lens"]) for r in packed)
    for row in packed:
        assert sum(row["seq_lens"]) == len(row["input_ids"]) <= 128
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
    by_id = {r["id"]: r for r in plain}
    for row in packed:  # each row is its examples end to end
        assert row["input_ids"] == [t for i in row["id"] for t in by_id[i]["input_ids"]]

    model = tiny_model(tiny_base, attn)
    collate = PackedCollator(pad_id=2)
    with torch.no_grad():
        unpacked_loss = model(**collate(list(plain))).loss
        packed_loss = model(**collate(list(packed))).loss
        # the same examples in other packed rows (a batch of one row at a time, token-weighted)
        per_row = [(model(**collate([r])).loss, sum(1 for v in r["labels"][1:] if v != -100)) for r in packed]
    assert torch.allclose(packed_loss, unpacked_loss, atol=1e-5)
    weighted = sum(loss * n for loss, n in per_row) / sum(n for _, n in per_row)
    assert torch.allclose(weighted, unpacked_loss, atol=1e-5)


def test_the_collator_on_unpacked_rows_matches_plain_padding(tiny_base, tmp_path):
    from pipelines.training import PadCollator

    clean = write_clean(tmp_path / "clean", ROWS)
    tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in load_split(tmp_path / "shards", "train")]
    model = tiny_model(tiny_base, "sdpa")
    with torch.no_grad():
        assert torch.allclose(model(**PackedCollator(2)(rows)).loss, model(**PadCollator(2)(rows)).loss, atol=1e-5)


def test_tune_trains_on_packed_shards_with_lora_and_refuses_prompt_tuning(tmp_path, tiny_base):
    from pipelines import tune
    from tests.test_tune import tune_cfg

    clean = write_clean(tmp_path / "clean", MANY)
    packed = tokenize.run(cfg(pack=True), E2E, clean, tiny_base, tmp_path / "shards")
    assert read_manifest(tmp_path / "shards")["packed"] and packed.rows["train"] < packed.examples["train"]
    stats = tune.run(tune_cfg("lora", epochs=1, batch_size=1), tmp_path / "shards", tiny_base, tmp_path / "adapter",
                     tmp_path / "live")
    assert stats.steps == packed.rows["train"] and stats.train_loss == stats.train_loss  # one row a step; finite
    with pytest.raises(StageError, match="packed shards .* need tune.method lora or full"):
        tune.run(tune_cfg("prompt"), tmp_path / "shards", tiny_base, tmp_path / "adapter2", tmp_path / "live2")
