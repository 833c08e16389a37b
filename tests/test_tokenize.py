import dataclasses
import json
import re

import pytest

from pipelines import prompts, tokenize
from pipelines.common import StageError
from pipelines.config import TokenizeConfig
from pipelines.prompts import PromptFormat
from pipelines.shards import load_split, read_manifest
from pipelines.tasks import get_task
from tests.conftest import ROOT

E2E = get_task("e2e", ROOT / "tasks")
SST2 = get_task("sst2", ROOT / "tasks")
EOS = "<|im_end|>"


def write_clean(path, rows_by_split):
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        with open(path / f"{split}.jsonl", "w") as f:
            for i, r in enumerate(rows_by_split.get(split, [])):
                f.write(json.dumps({"id": f"{split}:{i}", "source": "s", "location": "s:1",
                                    "group": r.get("mr", r.get("sentence")), "split": split, **r}) + "\n")
    return path


ROWS = {
    "train": [{"mr": "name[Aromi], food[Chinese]", "ref": "Aromi is a Chinese coffee shop."},
              {"mr": "name[Alimentum], area[city centre]", "ref": "Alimentum is in the city centre."},
              {"mr": "name[Aromi]", "ref": "Aromi."}],
    "validation": [{"mr": "name[Aromi]", "ref": "Aromi is a coffee shop."}],
    "test": [{"mr": "name[Alimentum]", "ref": "There is a place, Alimentum."}],
}
# Six train groups, so that few-shot draws have a choice.
MANY = {
    "train": [{"mr": f"name[{n}], area[city centre]", "ref": f"{n} is in the city centre."}
              for n in ("Aromi", "Alimentum", "Cotto", "Zizzi", "Fitzbillies", "Wildwood")],
    "validation": [{"mr": "name[Loch Fyne]", "ref": "Loch Fyne is a restaurant."}],
    "test": [{"mr": "name[Strada]", "ref": "Strada is a pub."}],
}


def cfg(**kw):
    return TokenizeConfig(**{"max_length": 128, "shard_rows": 10, "num_proc": 1, **kw})


def parts(row):
    """(source ids, label ids) of an unpacked row."""
    return ([t for t, l in zip(row["input_ids"], row["labels"]) if l == -100],
            [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])


def test_labels_cover_exactly_the_target_and_its_eos(tmp_path, tiny_base, tok):
    clean = write_clean(tmp_path / "clean", ROWS)
    stats = tokenize.run(cfg(shard_rows=2), E2E, clean, tiny_base, tmp_path / "shards")
    assert stats.examples == {"train": 3, "validation": 1, "test": 1} == stats.rows
    train = load_split(tmp_path / "shards", "train", base=tiny_base)
    for row, rec in zip(train, ROWS["train"]):
        source, target = parts(row)
        assert tok.decode(target) == " " + rec["ref"] + EOS
        assert tok.decode(source) == f"Attributes: {rec['mr']}\nDescription:"
        assert row["input_ids"] == source + target  # the source first, then the target: no gap
    manifest = read_manifest(tmp_path / "shards")
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [2, 1]
    assert manifest["tokenizer"]["vocab_size"] == len(tok)
    assert len(manifest["template_sha256"]) == 64 and "num_proc" not in manifest["params"]
    assert stats.tokens["train"] == sum(len(r["input_ids"]) for r in train)
    lengths = sorted(len(r["input_ids"]) for r in train)
    assert stats.length["train"] == {"p50": lengths[1], "p90": lengths[2], "p99": lengths[2], "max": lengths[2]}
    assert json.loads((tmp_path / "shards" / "validation.json").read_text())["rows"] == 5


def test_the_rust_tokenizer_gives_the_ids_of_the_tokenizer_call(tiny_base, tok):
    encoder = tokenize.Encoder(PromptFormat(E2E, tok), tok, cfg(), [])
    texts = ["Attributes: name[Aromi]\nDescription:", " Aromi is a café.", "<|im_start|>user\nhi<|im_end|>\n", ""]
    assert encoder.encode(texts) == tok(texts, add_special_tokens=False).input_ids


def test_percentiles_are_nearest_rank():
    import numpy as np

    lengths = np.random.default_rng(0).integers(2, 100, size=1001)
    got = tokenize.percentiles(np.bincount(lengths, minlength=128))
    for q in (50, 90, 99):
        assert got[f"p{q}"] == int(np.percentile(lengths, q, method="inverted_cdf"))
    assert got["max"] == lengths.max()


def test_truncation_cuts_the_prompt_start_keeps_the_target_and_counts(tmp_path, tiny_base, tok):
    long = {"mr": "name[Aromi], " * 40, "ref": "Aromi."}
    clean = write_clean(tmp_path / "clean", {"train": [long, ROWS["train"][0]]})
    full = tokenize.run(cfg(max_length=1000), E2E, clean, tiny_base, tmp_path / "s0")
    fits = len(load_split(tmp_path / "s0", "train")[1]["input_ids"])  # the ordinary example
    assert full.truncated == {} and full.length["train"]["max"] > fits
    stats = tokenize.run(cfg(max_length=fits), E2E, clean, tiny_base, tmp_path / "s1")
    assert stats.truncated == {"source": 1} and stats.dropped == {}
    row = load_split(tmp_path / "s1", "train")[0]
    assert len(row["input_ids"]) == fits
    source, target = parts(row)
    assert tok.decode(target) == " Aromi." + EOS  # the target survived whole
    assert tok.decode(source).endswith("name[Aromi], \nDescription:")  # and the cue before it
    audit = [json.loads(x) for x in (tmp_path / "s1" / "truncated.jsonl").read_text().splitlines()]
    assert audit == [{"id": "train:0", "split": "train", "reason": "source",
                      "tokens_before": full.length["train"]["max"], "tokens_after": fits}]


def test_drop_policy_and_overlong_targets_are_counted_and_kept_for_audit(tmp_path, tiny_base):
    long_prompt = {"mr": "name[Aromi], " * 40, "ref": "Aromi."}
    long_target = {"mr": "name[Aromi]", "ref": "Aromi is a Chinese coffee shop. " * 20}
    clean = write_clean(tmp_path / "clean", {"train": [long_prompt, ROWS["train"][0], long_target]})
    for policy in ("source", "drop"):
        stats = tokenize.run(cfg(max_length=40, truncation=policy), E2E, clean, tiny_base, tmp_path / policy)
        expected = {"target_too_long": 1, **({"too_long": 1} if policy == "drop" else {})}
        assert stats.dropped == expected
        assert stats.examples["train"] == 3 - sum(expected.values())
        dropped = [json.loads(x) for x in (tmp_path / policy / "dropped.jsonl").read_text().splitlines()]
        assert {d["reason"]: d["record"]["ref"] for d in dropped} == {
            "target_too_long": long_target["ref"], **({"too_long": "Aromi."} if policy == "drop" else {})}
        assert read_manifest(tmp_path / policy)["stats"]["dropped"] == expected


def test_few_shot_draws_only_other_train_groups_deterministically(tmp_path, tiny_base, tok):
    clean = write_clean(tmp_path / "clean", MANY)
    stats = tokenize.run(cfg(few_shot=2, max_length=512), E2E, clean, tiny_base, tmp_path / "a")
    tokenize.run(cfg(few_shot=2, max_length=512), E2E, clean, tiny_base, tmp_path / "b")
    assert stats.truncated == {} and stats.dropped == {}
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert ma["splits"] == mb["splits"]  # same seed, same bytes
    train_blocks = {f"Attributes: {r['mr']}\nDescription: {r['ref']}": r["mr"] for r in MANY["train"]}
    seen = set()
    for split in ("train", "validation", "test"):
        for row, rec in zip(load_split(tmp_path / "a", split), MANY[split]):
            source, target = parts(row)
            *demos, prompt = tok.decode(source).split("\n\n")
            assert prompt == f"Attributes: {rec['mr']}\nDescription:" and tok.decode(target) == " " + rec["ref"] + EOS
            assert len(demos) == 2 and len(set(demos)) == 2
            for d in demos:  # a train example, never from validation/test, never the example's own group
                assert train_blocks[d] != rec["mr"]
            seen.update(demos)
    assert len(seen) > 2  # the draw depends on the example
    pool = [json.loads(x) for x in (tmp_path / "a" / "demonstrations.jsonl").read_text().splitlines()]
    assert {p["id"] for p in pool} == {f"train:{i}" for i in range(6)}


def test_few_shot_truncation_drops_demonstrations_before_cutting_the_prompt(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", MANY)
    plain = tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "plain")
    shot = tokenize.run(cfg(few_shot=3, max_length=plain.length["train"]["max"] + 12), E2E, clean, tiny_base,
                        tmp_path / "shot")
    assert shot.truncated.get("demonstrations", 0) == shot.examples["train"] + 2 and "source" not in shot.truncated
    assert shot.dropped == {} and shot.length["train"]["max"] <= plain.length["train"]["max"] + 12


def test_few_shot_needs_enough_train_groups(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", ROWS)
    with pytest.raises(StageError, match="few_shot=3.*3 groups"):
        tokenize.run(cfg(few_shot=3), E2E, clean, tiny_base, tmp_path / "shards")


def test_chat_template_wraps_the_prompt_as_user_turn_and_target_as_answer(tmp_path, tiny_base, tok):
    clean = write_clean(tmp_path / "clean", ROWS)
    chat = dataclasses.replace(E2E, chat_template=True)  # the declaration's switch
    tokenize.run(cfg(), chat, clean, tiny_base, tmp_path / "chat")
    assert read_manifest(tmp_path / "chat")["params"]["chat_template"] is True
    row, rec = load_split(tmp_path / "chat", "train")[0], ROWS["train"][0]
    source, target = parts(row)
    prompt = f"Attributes: {rec['mr']}\nDescription:"
    assert tok.decode(source) == tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                         add_generation_prompt=True)
    assert tok.decode(target) == rec["ref"] + EOS  # no leading space after "assistant\n"
    tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "plain")
    assert read_manifest(tmp_path / "chat")["template_sha256"] != read_manifest(tmp_path / "plain")["template_sha256"]
    # Truncated in chat mode: the markup survives, the prompt loses its start.
    long = write_clean(tmp_path / "long", {"train": [{"mr": "name[Aromi], " * 40, "ref": "Aromi."}]})
    stats = tokenize.run(cfg(max_length=40), chat, long, tiny_base, tmp_path / "cut")
    assert stats.truncated == {"source": 1}
    source, _ = parts(load_split(tmp_path / "cut", "train")[0])
    text = tok.decode(source)
    assert text.startswith("<|im_start|>user\n") and text.endswith("\nDescription:<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_option_needs_a_chat_template():
    class Bare:
        chat_template = None

    with pytest.raises(StageError, match="tasks/e2e.yaml: chat_template is true, but .* no chat template"):
        PromptFormat(E2E, Bare(), chat_template=True)
    with pytest.raises(ValueError, match="chat_template is the task's now: set `chat_template: true` in tasks/"):
        cfg(chat_template=True)  # where it was before: a param


def test_a_missing_field_is_a_clear_error(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", ROWS)
    (clean / "test.jsonl").write_text(json.dumps({"id": "test:9", "mr": "name[Aromi]"}) + "\n")
    with pytest.raises(StageError, match=r"record test:9: no field 'ref'"):
        tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    (clean / "test.jsonl").write_text('{"id": "test:9", "mr": \n')
    with pytest.raises(StageError, match=r"test.jsonl:1: not a JSON record"):
        tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


NOT_TEXT = {  # value of a text field -> how the error shows it
    None: "JSON null", 12345: "a JSON number (12345)", "  ": 'a JSON string ("  "): empty',
    ("name[Aromi]",): 'a JSON array (["name[Aromi]"])', False: "a JSON boolean (false)"}


@pytest.mark.parametrize("field, value", [("mr", None), ("ref", 12345), ("ref", "  "), ("mr", ("name[Aromi]",)),
                                          ("ref", False)])
def test_a_text_field_that_is_not_a_non_empty_string_is_refused(tmp_path, tiny_base, field, value):
    train = [ROWS["train"][0], {**ROWS["train"][1], field: list(value) if isinstance(value, tuple) else value}]
    clean = write_clean(tmp_path / "clean", {**ROWS, "train": train})
    where = re.escape(f"{clean / 'train.jsonl'}:2: record train:1: field {field!r} holds {NOT_TEXT[value]}")
    with pytest.raises(StageError, match=f"^{where}") as err:
        tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]  # no shards, no scratch directory


def test_a_null_is_refused_from_a_worker_process_and_from_the_demonstration_pool(tmp_path, tiny_base):
    train = [*MANY["train"][:5], {**MANY["train"][5], "mr": None}]
    clean = write_clean(tmp_path / "clean", {**MANY, "train": train})
    where = re.escape(f"{clean / 'train.jsonl'}:6: record train:5: field 'mr' holds JSON null, not text")
    with pytest.raises(StageError, match=f"^{where}"):
        tokenize.run(cfg(num_proc=2), E2E, clean, tiny_base, tmp_path / "shards")
    with pytest.raises(StageError, match=f"^{where}"):  # few-shot: the demonstration pool reads it first
        tokenize.run(cfg(few_shot=1), E2E, clean, tiny_base, tmp_path / "shards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean"]


def test_a_label_may_be_a_number_or_boolean_that_names_a_label_and_nothing_else():
    fmt = PromptFormat(SST2)
    record = {"id": "r", "sentence": "a charming journey"}
    for label in (1, 1.0, True):  # as collect reads them: SST-2's 1, a column pandas made float, a boolean
        assert fmt.example({**record, "label": label}) == fmt.example({**record, "label": "1"}) == (
            "Review: a charming journey\nSentiment:", " positive", 0)
    for label, shown in ((None, "JSON null"), (2, "a JSON number (2)"), (0.5, "a JSON number (0.5)"),
                         ("yes", 'a JSON string ("yes")'), ([1], "a JSON array ([1])")):
        with pytest.raises(StageError, match=re.escape(f"record r: label field 'label' holds {shown}, which names "
                                                       "none of task sst2's labels ['0', '1']")):
            fmt.example({**record, "label": label})
    yes_no = dataclasses.replace(SST2, labels={"false": "negative", "true": "positive", "1": "one"})
    assert PromptFormat(yes_no).example({**record, "label": True})[1] == " positive"  # its own name first


def test_the_shards_suite_catches_a_null_that_gets_past_the_field_check(tmp_path, tiny_base, monkeypatch):
    from pipelines.validation import ValidationFailed

    monkeypatch.setattr(prompts, "field_problem", lambda task, record: None)  # the refusal, gone
    clean = write_clean(tmp_path / "clean", {**ROWS, "test": [{"mr": None, "ref": 12345}]})
    with pytest.raises(ValidationFailed) as err:
        tokenize.run(cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    (failure,) = err.value.summary.failures
    assert failure["column"] == "non_text_values" and failure["unexpected_sample"] == [2]  # mr and ref
    assert not (tmp_path / "shards").exists()


def test_output_is_identical_for_one_and_two_processes(tmp_path, tiny_base, monkeypatch):
    monkeypatch.setattr(tokenize, "CHUNK", 2)  # several chunks per split, spread over the workers
    rows = {**MANY, "train": MANY["train"] * 3}
    clean = write_clean(tmp_path / "clean", rows)
    for n in (1, 2):
        for pack in (False, True):
            tokenize.run(cfg(num_proc=n, shard_rows=4, pack=pack, few_shot=1, max_length=48), E2E, clean,
                         tiny_base, tmp_path / f"{n}-{pack}")
    for pack in (False, True):
        one, two = tmp_path / f"1-{pack}", tmp_path / f"2-{pack}"
        assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
        assert len(read_manifest(one)["splits"]["train"]["shards"]) > 1


def test_token_ids_beyond_the_model_embedding_fail_validation(tmp_path):
    from pipelines.validation import ValidationFailed
    from tests.conftest import build_tiny_model

    mismatched = build_tiny_model(tmp_path / "bad_base", vocab_slack=-200)
    clean = write_clean(tmp_path / "clean", ROWS)
    with pytest.raises(ValidationFailed, match="max_id"):
        tokenize.run(cfg(), E2E, clean, mismatched, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
    report = json.loads((tmp_path / "shards.validation-failed.json").read_text())
    assert report["success"] is False


def test_the_shards_suite_fails_examples_without_target_or_source_or_with_a_non_text_value(tmp_path):
    import numpy as np

    from pipelines.validation import ValidationFailed, validate

    ids = np.array([5, 6, 7, 8, 9], np.int32)
    enc = tokenize.Encoded("train", ["a", "b"], ids, np.array([-100, -100, -100, 8, 9], np.int32),
                           np.array([0, 3, 5]), np.array([3, 0], np.int32), np.array([0, 1], np.int32), [], [])
    frame = tokenize.pd.DataFrame({**enc.aggregates(), "split": "train"})
    assert frame.to_dict("list") == {"length": [3, 2], "min_id": [5, 8], "max_id": [7, 9], "label_tokens": [0, 2],
                                     "source_tokens": [3, 0], "non_text_values": [0, 1], "split": ["train", "train"]}
    with pytest.raises(ValidationFailed) as info:
        validate("shards", frame, {"max_length": 128, "vocab_size": 400}, tmp_path / "v.json")
    assert {f["column"] for f in info.value.summary.failures} == {"label_tokens", "source_tokens", "non_text_values"}
