import json

import pytest

from pipelines import tokenize
from pipelines.common import StageError
from pipelines.config import TokenizeConfig
from pipelines.shards import load_split
from pipelines.tasks import get_task

E2E = get_task("e2e")


def write_clean(path, rows_by_split):
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        with open(path / f"{split}.jsonl", "w") as f:
            for i, r in enumerate(rows_by_split.get(split, [])):
                f.write(json.dumps({"id": f"{split}:{i}", "source": "s", "location": "s:1",
                                    "group": r["mr"], "split": split, **r}) + "\n")
    return path


ROWS = {
    "train": [{"mr": "name[Aromi], food[Chinese]", "ref": "Aromi is a Chinese coffee shop."},
              {"mr": "name[Alimentum], area[city centre]", "ref": "Alimentum is in the city centre."},
              {"mr": "name[Aromi]", "ref": "Aromi."}],
    "validation": [{"mr": "name[Aromi]", "ref": "Aromi is a coffee shop."}],
    "test": [{"mr": "name[Alimentum]", "ref": "There is a place, Alimentum."}],
}


def test_labels_cover_exactly_the_target(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    clean = write_clean(tmp_path / "clean", ROWS)
    stats = tokenize.run(TokenizeConfig(max_length=128, shard_rows=2), E2E, clean, tiny_base, tmp_path / "shards")
    assert stats.examples == {"train": 3, "validation": 1, "test": 1}
    tok = AutoTokenizer.from_pretrained(tiny_base)
    train = load_split(tmp_path / "shards", "train")
    assert len(train) == 3
    row = train[0]
    target = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tok.decode(target) == " Aromi is a Chinese coffee shop.<|im_end|>"
    prompt = [t for t, l in zip(row["input_ids"], row["labels"]) if l == -100]
    assert tok.decode(prompt) == "Attributes: name[Aromi], food[Chinese]\nDescription:"
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [2, 1]
    assert manifest["tokenizer"]["vocab_size"] == len(tok)
    assert len(manifest["template_sha256"]) == 64


def test_truncation_keeps_target_and_counts(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    long = {"mr": "name[Aromi], " * 40, "ref": "Aromi."}
    clean = write_clean(tmp_path / "clean", {"train": [long, ROWS["train"][0]]})
    full = tokenize.run(TokenizeConfig(max_length=1000, shard_rows=10), E2E, clean, tiny_base, tmp_path / "s0")
    fits = len(load_split(tmp_path / "s0", "train")[1]["input_ids"])  # the ordinary example
    assert full.truncated == 0 and full.length["max"] > fits
    stats = tokenize.run(TokenizeConfig(max_length=fits, shard_rows=10), E2E, clean, tiny_base, tmp_path / "s1")
    assert stats.truncated == 1 and stats.dropped == 0
    row = load_split(tmp_path / "s1", "train")[0]
    assert len(row["input_ids"]) == fits
    tok = AutoTokenizer.from_pretrained(tiny_base)
    target = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    prompt = [t for t, l in zip(row["input_ids"], row["labels"]) if l == -100]
    assert tok.decode(target) == " Aromi.<|im_end|>"  # the target survived whole
    assert tok.decode(prompt).endswith("name[Aromi], \nDescription:")  # the cue before it too
    stats = tokenize.run(TokenizeConfig(max_length=fits, shard_rows=10, truncation="drop"), E2E, clean,
                         tiny_base, tmp_path / "s2")
    assert stats.dropped == 1 and stats.examples["train"] == 1
    dropped = [json.loads(x) for x in (tmp_path / "s2" / "dropped.jsonl").read_text().splitlines()]
    assert dropped[0]["reason"] == "too_long_for_max_length"


def test_reader_refuses_corrupted_or_missing_shard(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", ROWS)
    out = tmp_path / "shards"
    tokenize.run(TokenizeConfig(max_length=128, shard_rows=2), E2E, clean, tiny_base, out)
    shard = out / "train" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError, match="sha256 differs"):
        load_split(out, "train")
    shard.unlink()
    with pytest.raises(StageError, match="missing"):
        load_split(out, "train")
    with pytest.raises(StageError, match="no split 'dev'"):
        load_split(out, "dev")


def test_token_ids_beyond_the_model_embedding_fail_validation(tmp_path):
    from pipelines.validation import ValidationFailed
    from tests.conftest import build_tiny_model

    mismatched = build_tiny_model(tmp_path / "bad_base", vocab_slack=-200)
    clean = write_clean(tmp_path / "clean", ROWS)
    with pytest.raises(ValidationFailed, match="max_id"):
        tokenize.run(TokenizeConfig(max_length=128, shard_rows=10), E2E, clean, mismatched, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    report = json.loads((tmp_path / "shards.validation-failed.json").read_text())
    assert report["success"] is False
