import hashlib
import json
import resource

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import collect, validation
from pipelines.common import StageError, read_json, read_jsonl
from pipelines.config import CollectConfig, ConfigError, SourceConfig, parse_params
from pipelines.validation import ValidationFailed
from tests.collect_fixtures import config, make_task, serve, source
from tests.conftest import ROOT

E2E_CSV = '''mr,ref
"name[A], food[Thai]","A serves Thai food."
"name[A], food[Thai]","Thai food is served at A."
"name[A], food[Thai]","A serves Thai food."
"name[B], area[riverside]","B is by the river."
"name[C], area[city centre]",""
"name[D], area[city centre]","D is  in the\tcentre."
"name[E]","E","extra field"
'''

POSTS_XML = '''\ufeff<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="5" PostTypeId="2" ParentId="1" Body="&lt;p&gt;Keep it &lt;b&gt;dry&lt;/b&gt;.&lt;/p&gt;" />
  <row Id="1" PostTypeId="1" AcceptedAnswerId="5" Title="How to store beans?" Body="&lt;p&gt;Storage?&lt;/p&gt;" />
  <row Id="2" PostTypeId="1" Title="Unanswered?" Body="&lt;p&gt;Anyone?&lt;/p&gt;" />
  <row Id="3" PostTypeId="1" AcceptedAnswerId="99" Title="Lost answer" Body="&lt;p&gt;Where?&lt;/p&gt;" />
  <row Id="4" PostTypeId="1" AcceptedAnswerId="6" Title="Math $x^2$" Body="&lt;p&gt;$\\frac{a}{b}$&lt;/p&gt;" />
  <row Id="6" PostTypeId="2" ParentId="4" Body="&lt;pre&gt;&lt;code&gt;x = 1&lt;/code&gt;&lt;/pre&gt;" />
  <row Id="7" PostTypeId="2" ParentId="4" Body="&lt;p&gt;not accepted&lt;/p&gt;" />
  <row Id="8" PostTypeId="5" Body="tag wiki" />
</posts>
'''

QA = ("title", "question", "answer")


def collected(out):
    return (read_jsonl(out / "records.jsonl"), read_jsonl(out / "quarantine.jsonl"),
            read_json(out / "sources.json"))


def test_csv_keeps_provenance_and_quarantines_bad_rows(tmp_path):
    (tmp_path / "src.csv").write_text(E2E_CSV)
    stats = collect.run(config(source("src", "src.csv")), make_task(), tmp_path, tmp_path / "raw")
    records, quarantined, described = collected(tmp_path / "raw")
    assert stats.records == 5 and stats.quarantined == 2
    assert records[0] == {"id": "src:2", "source": "src", "location": "src.csv:2",
                          "mr": "name[A], food[Thai]", "ref": "A serves Thai food."}
    assert {(q["location"], q["reason"]) for q in quarantined} == {("src.csv:6", "empty_field"),
                                                                   ("src.csv:8", "field_count")}
    assert stats.per_source["src"] == {"rows": 7, "records": 5, "quarantined": 2, "skipped": {},
                                       "quarantine_reasons": {"empty_field": 1, "field_count": 1}}
    assert described["src"]["files"] == [{"path": "src.csv",
                                          "sha256": hashlib.sha256(E2E_CSV.encode()).hexdigest()}]
    assert described["src"]["splits"] == {"train": 0.5, "test": 0.5}
    assert read_json(tmp_path / "raw" / "validation.json")["success"] is True


def test_tsv_without_quoting_keeps_raw_quotes_and_maps_columns(tmp_path):
    (tmp_path / "a.tsv").write_text('sentence\tlabel\n"quoted" start , ok\t1\n')
    cfg = config(source("a", "a.tsv", columns={"sentence": "mr", "label": "ref"}, quoting="none"))
    collect.run(cfg, make_task(), tmp_path, tmp_path / "raw")
    assert read_jsonl(tmp_path / "raw" / "records.jsonl") == [
        {"id": "a:2", "source": "a", "location": "a.tsv:2", "mr": '"quoted" start , ok', "ref": "1"}]


def test_jsonl_strings_become_records_and_bad_lines_are_quarantined(tmp_path):
    lines = ['{"mr": "a", "ref": "x"}', "", '{"mr": "b", "ref": "y", "other": [1]}', '{"mr": "c"}',
             "{not json", '["a", "list"]', '{"mr": {"nested": 1}, "ref": "x"}', '{"mr": "d", "ref": 1}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    stats = collect.run(config(source("a", "a.jsonl"), max_quarantined_share=1), make_task(), tmp_path,
                        tmp_path / "raw")
    records, quarantined, _ = collected(tmp_path / "raw")
    assert [(r["id"], r["mr"], r["ref"]) for r in records] == [("a:1", "a", "x"), ("a:3", "b", "y")]
    assert [(q["location"], q["reason"], q["raw"]) for q in quarantined] == [
        ("a.jsonl:4", "missing_field", lines[3]), ("a.jsonl:5", "bad_json", lines[4]),
        ("a.jsonl:6", "bad_json", lines[5]), ("a.jsonl:7", "bad_value", lines[6]),
        ("a.jsonl:8", "bad_value", lines[7])]
    assert stats.per_source["a"]["skipped"] == {"blank_line": 1}


def test_parquet_is_read_in_batches_with_row_index_ids(tmp_path):
    n = 2500  # more than one 1024-row batch
    pq.write_table(pa.table({"mr": [f"m{i}" for i in range(n)], "ref": [str(i) for i in range(n)],
                             "unused": [0.5] * n}),
                   tmp_path / "t.parquet", row_group_size=1000)
    stats = collect.run(config(source("p", "t.parquet")), make_task(), tmp_path, tmp_path / "raw")
    records = read_jsonl(tmp_path / "raw" / "records.jsonl")
    assert stats.records == n
    assert records[0] == {"id": "p:0", "source": "p", "location": "t.parquet:0", "mr": "m0", "ref": "0"}
    assert records[-1]["id"] == f"p:{n - 1}" and records[-1]["ref"] == str(n - 1)


def test_txt_is_one_record_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\r\n")
    stats = collect.run(config(source("a", "a.txt", columns={"text": "mr"}), task="s"),
                        make_task(fields=("mr",), name="s"), tmp_path, tmp_path / "raw")
    assert [(r["id"], r["mr"]) for r in read_jsonl(tmp_path / "raw" / "records.jsonl")] == [
        ("a:1", "first line"), ("a:3", "second line")]
    assert stats.skipped == 1


def test_stackexchange_pairs_questions_with_accepted_answers_in_any_order(tmp_path):
    (tmp_path / "Posts.xml").write_text(POSTS_XML, encoding="utf-8")
    stats = collect.run(config(source("se", "Posts.xml", columns=QA), task="qa"), make_task(QA, name="qa"),
                        tmp_path, tmp_path / "raw")
    records, quarantined, described = collected(tmp_path / "raw")
    assert records == [
        {"id": "se:1", "source": "se", "location": "Posts.xml:4", "title": "How to store beans?",
         "question": "<p>Storage?</p>", "answer": "<p>Keep it <b>dry</b>.</p>"},  # the answer came first
        {"id": "se:4", "source": "se", "location": "Posts.xml:7", "title": "Math $x^2$",
         "question": "<p>$\\frac{a}{b}$</p>", "answer": "<pre><code>x = 1</code></pre>"}]
    assert [(q["id"], q["reason"]) for q in quarantined] == [("se:2", "no_accepted_answer"),
                                                             ("se:3", "accepted_answer_missing")]
    assert "Id 99" in quarantined[1]["detail"]
    assert described["se"]["skipped"] == {"answer_not_accepted": 1, "tag_wiki": 1}
    assert stats.per_source["se"]["rows"] == 4  # questions: 2 records + 2 quarantined


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"mr": ["a", "b"], "ref": ["x", ""]}),
        "test": datasets.Dataset.from_dict({"mr": ["c"], "ref": ["z"]}),
    }).save_to_disk(str(tmp_path / "ds"))
    cfg = config(source("h", "hf:ds", split="train"), source("h2", "hf:ds", split="test"))
    stats = collect.run(cfg, make_task(), tmp_path, tmp_path / "raw")
    records, quarantined, described = collected(tmp_path / "raw")
    assert [(r["id"], r["location"], r["mr"]) for r in records] == [("h:0", "hf:ds[train]:0", "a"),
                                                                    ("h2:0", "hf:ds[test]:0", "c")]
    assert [(q["id"], q["reason"]) for q in quarantined] == [("h:1", "empty_field")]
    assert stats.records == 2 and described["h"]["format"] == "hf"
    assert all(f["sha256"] and f["path"].startswith("hf:ds/") for f in described["h"]["files"])

    with pytest.raises(StageError, match=r"hf:ds: no split 'validation' \(source 'h'\); it has \['test', 'train'\]"):
        collect.run(config(source("h", "hf:ds", split="validation")), make_task(), tmp_path, tmp_path / "r2")


def test_hf_directory_of_data_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("mr,ref\na,b\n")
    collect.run(config(source("h", "hf:d")), make_task(), tmp_path, tmp_path / "raw")
    records, _, described = collected(tmp_path / "raw")
    assert records == [{"id": "h:0", "source": "h", "location": "hf:d[train]:0", "mr": "a", "ref": "b"}]
    assert described["h"]["files"] == [{"path": "hf:d/train.csv",
                                        "sha256": hashlib.sha256(b"mr,ref\na,b\n").hexdigest()}]


def test_fsspec_memory_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/ptune-test/a.jsonl", b'{"mr": "m", "ref": "r"}\n')
    try:
        collect.run(config(source("m", "memory://ptune-test/a.jsonl")), make_task(), tmp_path, tmp_path / "raw")
    finally:
        fs.rm("/ptune-test", recursive=True)
    assert read_jsonl(tmp_path / "raw" / "records.jsonl") == [
        {"id": "m:1", "source": "m", "location": "memory://ptune-test/a.jsonl:1", "mr": "m", "ref": "r"}]


def test_glob_over_two_files_puts_the_file_in_each_id(tmp_path):
    (tmp_path / "parts" / "b").mkdir(parents=True)
    (tmp_path / "parts" / "one.csv").write_text("mr,ref\na,x\n")
    (tmp_path / "parts" / "b" / "two.csv").write_text("mr,ref\nb,y\nc,z\n")
    collect.run(config(source("g", "parts/**/*.csv")), make_task(), tmp_path, tmp_path / "raw")
    records, _, described = collected(tmp_path / "raw")
    assert [(r["id"], r["location"]) for r in records] == [
        ("g:b/two.csv:2", "parts/b/two.csv:2"), ("g:b/two.csv:3", "parts/b/two.csv:3"),
        ("g:one.csv:2", "parts/one.csv:2")]
    assert [f["path"] for f in described["g"]["files"]] == ["parts/b/two.csv", "parts/one.csv"]


def test_id_column_gives_ids_and_quarantines_duplicates(tmp_path):
    (tmp_path / "a.csv").write_text("key,mr,ref\nk1,a,x\nk2,b,y\nk1,c,z\n,d,w\n")
    stats = collect.run(config(source("a", "a.csv", id_column="key")), make_task(), tmp_path, tmp_path / "raw")
    records, quarantined, _ = collected(tmp_path / "raw")
    assert [r["id"] for r in records] == ["a:k1", "a:k2"]
    assert [(q["id"], q["reason"], q["detail"]) for q in quarantined] == [
        ("a:k1", "duplicate_id", "id 'a:k1' already used at a.csv:2"),
        ("a:5", "missing_id", "no value in id column 'key'")]
    assert stats.quarantine_reasons == {"duplicate_id": 1, "missing_id": 1}


def test_validation_runs_per_chunk_and_reports_the_whole(tmp_path, monkeypatch):
    (tmp_path / "src.csv").write_text(E2E_CSV)
    monkeypatch.setattr(validation, "CHUNK_ROWS", 2)
    collect.run(config(source("src", "src.csv")), make_task(), tmp_path, tmp_path / "raw")
    report = read_json(tmp_path / "raw" / "validation.json")
    assert (report["success"], report["rows"], report["chunks"]) == (True, 5, 3)


def test_raw_suite_rejects_records_the_stage_should_never_write(tmp_path):
    checks = collect._RawValidation(config(source("a", "a.csv")), make_task(), ["a"], tmp_path / "v.json")
    checks.add({"id": "a:1", "source": "b", "location": "nowhere", "mr": " ", "ref": "x"}, size=2_000_000)
    with pytest.raises(ValidationFailed) as failed:
        checks.finish()
    unmet = {(f["expectation"], f["column"]) for f in failed.value.summary.failures}
    assert unmet == {("expect_column_values_to_be_in_set", "source"),
                     ("expect_column_pair_values_to_be_equal", "id_source, source"),
                     ("expect_column_values_to_match_regex", "location"),
                     ("expect_column_values_to_be_in_set", "empty_fields"),
                     ("expect_column_values_to_be_between", "record_bytes")}


def test_max_records_per_source_caps_rows_read(tmp_path):
    (tmp_path / "a.csv").write_text("mr,ref\n" + "".join(f"m{i},r{i}\n" for i in range(10)))
    stats = collect.run(config(source("a", "a.csv"), max_records_per_source=4), make_task(),
                        tmp_path, tmp_path / "raw")
    assert stats.records == 4


def test_http_source_is_downloaded_verified_and_cached(tmp_path):
    body = b"mr,ref\na,x\n"
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.csv").write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()
    with serve(tmp_path / "served") as url:
        cfg = config(source("web", f"{url}/a.csv", sha256=sha))
        collect.run(cfg, make_task(), tmp_path, tmp_path / "raw")
    records, _, described = collected(tmp_path / "raw")
    assert records == [{"id": "web:2", "source": "web", "location": f"{url}/a.csv:2", "mr": "a", "ref": "x"}]
    assert described["web"]["files"] == [{"path": f"{url}/a.csv", "sha256": sha}]
    assert (tmp_path / ".ptune" / "downloads" / sha).read_bytes() == body
    collect.run(cfg, make_task(), tmp_path, tmp_path / "raw2")  # the server is gone: served from the cache
    assert read_jsonl(tmp_path / "raw2" / "records.jsonl") == records


def test_source_config_infers_format_and_checks_its_options():
    assert SourceConfig(name="a", uri="x/*.jsonl", columns={"a": "b"}, splits={"train": 1}).format == "jsonl"
    assert SourceConfig(name="a", uri="d/Posts.xml", columns={"a": "b"}, splits={"train": 1}).format == \
        "stackexchange"
    assert SourceConfig(name="a", uri="hf:glue", columns={"a": "b"}, splits={"train": 1}).format == "hf"
    bad = [({"uri": "x.docx"}, "cannot tell the format of 'x.docx'"),
           ({"uri": "https://h/x.csv"}, "needs `sha256`"),
           ({"splits": {"train": 0.5, "test": 0.4}}, "sum to 1"),
           ({"name": "a:b"}, "name"),
           ({"columns": {"a": "f", "b": "f"}}, "same task field"),
           ({"uri": "x/*.csv", "sha256": "0" * 64}, "pins one file"),
           ({"max_quarantined_share": 1.5}, "max_quarantined_share\n  Input should be less than or equal to 1")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            SourceConfig.model_validate({"name": "a", "uri": "x.csv", "columns": {"a": "b"},
                                         "splits": {"train": 1}, **change})
    with pytest.raises(ValueError, match=r"source names must be unique; repeated: \['a'\]"):
        config(source("a", "x.csv"), source("a", "y.csv"))
    with pytest.raises(ValueError, match="max_quarantined_share\n  Input should be greater than or equal to 0"):
        config(source("a", "x.csv"), max_quarantined_share=-0.1)


def test_real_params_declare_sources_for_every_task():
    from pipelines.tasks import get_task, task_names

    cfg = CollectConfig.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())["collect"])
    assert set(cfg.sources) == set(task_names(ROOT / "tasks")) == {"e2e", "sst2", "stackexchange_qa",
                                                                     "stackexchange_chat"}
    assert all(cfg.source_problems(name, (t := get_task(name, ROOT / "tasks")).fields, t.chat) == []
               for name in cfg.sources)
    assert [s.name for s in cfg.sources["stackexchange_qa"]] == ["coffee", "quantumcomputing"]
    assert all((ROOT / s.uri).is_file() for sources in cfg.sources.values() for s in sources)


def test_parse_params_requires_sources_covering_the_task_fields():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["collect"]["sources"]["e2e"][0]["columns"] = {"mr": "mr"}
    raw["task"]["name"] = "e2e"
    with pytest.raises(ConfigError, match=r"collect\.sources\.e2e\.0 \(e2e_devel_fixed\): `columns` maps nothing "
                                          r"to field\(s\) \['ref'\]"):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["task"]["name"] = "e2e"
    del raw["collect"]["sources"]["e2e"]
    with pytest.raises(ConfigError, match="no sources declared for task 'e2e'"):
        parse_params(raw)


@pytest.mark.slow
def test_memory_does_not_grow_with_the_source(tmp_path, monkeypatch):
    """Collect 20k lines, then 200k (45 MiB): the process's peak memory barely moves.

    The small run comes first so that imports and GX's context are already paid for;
    the peak (ru_maxrss) can then only grow if collect holds the source in memory.
    """
    line = json.dumps({"mr": "x" * 150, "ref": "y" * 50})[:-1]
    peak_mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (KiB on Linux)
    peaks = {}
    monkeypatch.setattr(validation, "CHUNK_ROWS", 10_000)  # the 20k run already holds a whole chunk
    for n in (20_000, 200_000):
        path = tmp_path / f"{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(f'{line}, "i": {i}}}\n')
        cfg = config(source("s", path.name))
        assert collect.run(cfg, make_task(), tmp_path, tmp_path / f"raw{n}").records == n
        peaks[n] = peak_mib()
    size_mib = (tmp_path / "200000.jsonl").stat().st_size / 2**20
    print(f"peak RSS {peaks[20_000]:.0f} MiB after 20k lines, {peaks[200_000]:.0f} MiB after 200k "
          f"({size_mib:.0f} MiB of input)")
    assert peaks[200_000] - peaks[20_000] < size_mib / 4
