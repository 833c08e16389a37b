import json

import pytest

from pipelines import clean, collect
from pipelines.common import StageError, read_jsonl
from pipelines.config import CleanConfig, CollectConfig
from pipelines.tasks import Source, Task

E2E_CSV = '''mr,ref
"name[A], food[Thai]","A serves Thai food."
"name[A], food[Thai]","Thai food is served at A."
"name[A], food[Thai]","A serves Thai food."
"name[B], area[riverside]","B is by the river."
"name[C], area[city centre]",""
"name[D], area[city centre]","D is  in the\tcentre."
"name[E]","E","extra field"
'''


def make_task(tmp_path, files: dict[str, str], splits=None, labels=None, fmt="csv"):
    sources = []
    for name, text in files.items():
        (tmp_path / f"{name}.{fmt}").write_text(text, encoding="utf-8")
        sources.append(Source(name=name, path=f"{name}.{fmt}", format=fmt,
                              columns={"mr": "mr", "ref": "ref"},
                              splits=(splits or {}).get(name, {"train": 0.5, "test": 0.5})))
    return Task(name="t", kind="classification" if labels else "generation", fields=("mr", "ref"),
                group_key="mr", sources=tuple(sources), prompt="{{ mr }}", target=" {{ ref }}",
                zero_shot="{{ mr }}", target_field="ref", labels=labels or {}, text_fields=("mr", "ref"))


def test_collect_keeps_provenance_and_quarantines_bad_rows(tmp_path):
    task = make_task(tmp_path, {"src": E2E_CSV})
    stats = collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")
    records = read_jsonl(tmp_path / "raw" / "records.jsonl")
    quarantined = read_jsonl(tmp_path / "raw" / "quarantine.jsonl")
    assert stats.records == 5 and stats.quarantined == 2
    assert records[0] == {"id": "src:2", "source": "src", "location": "src.csv:2",
                          "mr": "name[A], food[Thai]", "ref": "A serves Thai food."}
    assert {q["reason"] for q in quarantined} == {"empty_field", "field_count"}
    assert {q["location"] for q in quarantined} == {"src.csv:6", "src.csv:8"}
    assert (tmp_path / "raw" / "validation.json").is_file()


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("mr,text\n\"a\",\"b\"\n", r"lacks column\(s\) \['ref'\]"),
])
def test_collect_rejects_unusable_sources(tmp_path, content, message):
    task = make_task(tmp_path, {"src": content})
    with pytest.raises(StageError, match=message):
        collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # no partial output left behind


def test_collect_names_file_and_byte_of_invalid_utf8(tmp_path):
    task = make_task(tmp_path, {"src": "mr,ref\n"})
    (tmp_path / "src.csv").write_bytes(b'mr,ref\n"a","caf\xe9 b"\n')
    with pytest.raises(StageError, match=r"src\.csv: not valid UTF-8 at byte"):
        collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")


def test_clean_accounts_for_every_record(tmp_path):
    task = make_task(tmp_path, {"src": E2E_CSV})
    collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")
    stats = clean.run(CleanConfig(min_chars=12, max_chars=100), task, tmp_path / "raw", tmp_path / "clean")
    assert stats.records_in == 5
    assert stats.removed == {"duplicate": 1}
    assert stats.records_in == stats.records_out + sum(stats.removed.values())
    dup = read_jsonl(tmp_path / "clean" / "removed" / "duplicate.jsonl")
    assert dup[0]["id"] == "src:4" and dup[0]["detail"] == "same as src:2"
    rows = [r for s in ("train", "validation", "test") for r in read_jsonl(tmp_path / "clean" / f"{s}.jsonl")]
    assert len(rows) == stats.records_out
    d = next(r for r in rows if r["mr"].startswith("name[D]"))
    assert d["ref"] == "D is in the centre."  # whitespace runs normalized


def test_clean_filters_length_and_labels_with_reasons(tmp_path):
    text = "mr,ref\nok text,1\nok text two,7\nx,0\n"
    task = make_task(tmp_path, {"src": text}, labels={"0": "no", "1": "yes"})
    collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")
    stats = clean.run(CleanConfig(min_chars=3, max_chars=100), task, tmp_path / "raw", tmp_path / "clean")
    assert stats.removed == {"bad_label": 1, "too_short": 1}
    bad = read_jsonl(tmp_path / "clean" / "removed" / "bad_label.jsonl")[0]
    assert bad["ref"] == "7" and "not in ['0', '1']" in bad["detail"]


def test_groups_never_straddle_splits_and_held_out_wins(tmp_path):
    many = "mr,ref\n" + "".join(f'"name[G{i % 20}]","text number {i}"\n' for i in range(200))
    held = 'mr,ref\n"name[G3]","a held-out text"\n'
    task = make_task(tmp_path, {"a": many, "b": held},
                     splits={"a": {"train": 0.7, "validation": 0.1, "test": 0.2}, "b": {"test": 1.0}})
    collect.run(CollectConfig(), task, tmp_path, tmp_path / "raw")
    clean.run(CleanConfig(min_chars=3, max_chars=100), task, tmp_path / "raw", tmp_path / "clean")
    split_of_group = {}
    for split in ("train", "validation", "test"):
        for r in read_jsonl(tmp_path / "clean" / f"{split}.jsonl"):
            assert split_of_group.setdefault(r["group"], split) == split
    assert split_of_group["name[g3]"] == "test"
    assert len(set(split_of_group.values())) >= 2


def test_split_is_deterministic_and_seeded():
    fr = {"train": 0.8, "test": 0.2}
    groups = [f"g{i}" for i in range(500)]
    a = [clean.split_of(g, fr, 0) for g in groups]
    assert a == [clean.split_of(g, fr, 0) for g in groups]
    assert a != [clean.split_of(g, fr, 1) for g in groups]
    assert 0.7 < a.count("train") / len(a) < 0.9
