"""A corpus of malformed input: every kind ends as a clear error naming the source and
the place, or as a quarantined row with its reason; never a traceback, never a silent drop."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import clean, cli, collect, tokenize
from pipelines.common import StageError, atomic_dir, read_json, read_jsonl
from pipelines.config import CleanConfig
from pipelines.stages import CATALOG
from tests.collect_fixtures import config, make_task, serve, source
from tests.conftest import ROOT, write_params
from tests.test_tokenize import E2E, ROWS, write_clean
from tests.test_tokenize import cfg as tokenize_cfg

SST = ("sentence", "label")
QA = ("title", "question", "answer")
LABELS = {"0": "negative", "1": "positive"}
TEN_MB = 10 * 2**20

# name -> (file, bytes, extra source options): each file holds one or more bad rows among good ones
QUARANTINE_CORPUS = {
    "utf8": ("utf8.csv", b"sentence,label\ngood one,1\ncaf\xe9 au lait,0\n", {}),
    "nul": ("nul.csv", b"sentence,label\nnul\x00 inside,1\nfine,0\n", {}),
    "truncated": ("truncated.csv", b'sentence,label\nfine,1\nno label column\n"cut off in the mid', {}),
    "unclosed": ("unclosed.csv", b'sentence,label\n"no closing quote,1\nthe next good row,0\n', {}),
    "missing": ("missing.jsonl", b'{"sentence": "no label"}\n{"sentence": "ok", "label": 1}\n{"sentence": "br\n',
                {}),
    "big": ("big.jsonl", None, {}),  # written at run time: one 10 MB record, then a normal one
    "dupes": ("dupes.csv", b"key,sentence,label\nr1,first,1\nr1,second,0\nr2,third,0\n", {"id_column": "key"}),
    "labels": ("labels.csv", b"sentence,label\nwrong label,2\nalso wrong,positive\nright,0\n", {}),
}

EXPECTED_QUARANTINE = [  # (id, location, reason, words of the detail)
    ("utf8:3", "utf8.csv:3", "invalid_utf8", "column 'sentence': byte 0xe9 at character 4 is not valid UTF-8"),
    ("nul:2", "nul.csv:2", "nul_byte", "field 'sentence' holds a NUL byte at character 4"),
    ("truncated:3", "truncated.csv:3", "field_count", "expected 2 fields, found 1"),
    ("truncated:4", "truncated.csv:4", "truncated_row", "ends inside a quoted field that starts at line 4"),
    ("unclosed:2", "unclosed.csv:2", "truncated_row", "ends inside a quoted field that starts at line 2; an "
     "unclosed quote? line 2 is quarantined alone and reading resumes at line 3"),
    ("missing:1", "missing.jsonl:1", "missing_field", "no value for column 'label'"),
    ("missing:3", "missing.jsonl:3", "bad_json", "Unterminated string starting at"),
    ("big:1", "big.jsonl:1", "too_large", "line 1 is 10,485,"),
    ("dupes:r1", "dupes.csv:3", "duplicate_id", "id 'dupes:r1' already used at dupes.csv:2"),
]


@pytest.fixture
def bad_corpus(tmp_path):
    declared = []
    for name, (file, data, options) in QUARANTINE_CORPUS.items():
        if data is None:
            data = (b'{"sentence": "' + b"x" * TEN_MB + b'", "label": "1"}\n'
                    + b'{"sentence": "after the big one", "label": "0"}\n')
        (tmp_path / file).write_bytes(data)
        declared.append(source(name, file, columns=SST, **options))
    # Bad rows among a few good ones, on purpose: over collect's usual quarantined share.
    return tmp_path, config(*declared, max_quarantined_share=1.0)


def test_bad_rows_are_quarantined_with_their_reason_and_place(bad_corpus):
    root, cfg = bad_corpus
    stats = collect.run(cfg, make_task(SST, LABELS), root, root / "raw")
    quarantined = read_jsonl(root / "raw" / "quarantine.jsonl")
    got = [(q["id"], q["location"], q["reason"]) for q in quarantined]
    assert got == [e[:3] for e in EXPECTED_QUARANTINE]
    for q, (*_, words) in zip(quarantined, EXPECTED_QUARANTINE):
        assert words in q["detail"], (q["reason"], q["detail"])
    records = read_jsonl(root / "raw" / "records.jsonl")
    assert [r["id"] for r in records] == ["utf8:2", "nul:3", "truncated:2", "unclosed:3", "missing:2", "big:2",
                                          "dupes:r1", "dupes:r2", "labels:2", "labels:3", "labels:4"]
    # every data line is one row, a record or quarantined, per source (the unclosed quote took no other line)
    assert stats.records == 11 and stats.quarantined == 9 and stats.skipped == 0
    assert all(s["rows"] == s["records"] + s["quarantined"] for s in stats.per_source.values())
    assert {name: s["rows"] for name, s in stats.per_source.items()} == {
        name: len((root / file).read_bytes().splitlines()) - file.endswith(".csv")
        for name, (file, *_) in QUARANTINE_CORPUS.items()}
    assert stats.per_source["truncated"]["quarantine_reasons"] == {"field_count": 1, "truncated_row": 1}
    # each quarantined line keeps its text as read, to fix by hand; an undecodable byte as
    # its surrogate (0xe9: \udce9, as Python's surrogateescape decodes it)
    raw = {q["id"]: q["raw"] for q in quarantined}
    assert {i: raw[i] for i in ("utf8:3", "truncated:3", "truncated:4", "unclosed:2", "missing:3", "dupes:r1")} == {
        "utf8:3": "caf\udce9 au lait,0", "truncated:3": "no label column", "truncated:4": '"cut off in the mid',
        "unclosed:2": '"no closing quote,1', "missing:3": '{"sentence": "br', "dupes:r1": "r1,second,0"}
    assert raw["big:1"] == '{"sentence": "' + "x" * 66 + f"... [{TEN_MB + 31 - 80:,} more bytes]"
    # the 10 MB row is audited by its size and first bytes, not copied whole
    assert (root / "raw" / "quarantine.jsonl").stat().st_size < 20_000


def test_task_fields_hold_text_and_labels_hold_labels(tmp_path):
    rows = [{"sentence": "a string", "label": "1"}, {"sentence": "a number label", "label": 1},
            {"sentence": "a boolean label", "label": False}, {"sentence": "a float label", "label": 0.0},
            {"sentence": True, "label": "1"}, {"sentence": 12345, "label": "0"}, {"sentence": None, "label": "0"},
            {"sentence": ["a", "list"], "label": "0"}, {"sentence": {"an": "object"}, "label": "0"},
            {"sentence": " \t", "label": "0"}, {"sentence": "no such label", "label": 2},
            {"sentence": "a list label", "label": [1]}, {"sentence": "a null label", "label": None},
            {"sentence": "a label in words", "label": "positive"}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "v.csv").write_text('sentence,label\n"",1\n   ,0\nfine,1\n')
    pq.write_table(pa.table({"sentence": ["ok", None, "seven"], "label": [1, 0, 7]}), tmp_path / "v.parquet")
    cfg = config(source("j", "v.jsonl", columns=SST), source("c", "v.csv", columns=SST),
                 source("p", "v.parquet", columns=SST), max_quarantined_share=1.0)
    collect.run(cfg, make_task(SST, LABELS), tmp_path, tmp_path / "raw")
    assert [(r["id"], r["sentence"], r["label"]) for r in read_jsonl(tmp_path / "raw" / "records.jsonl")] == [
        ("j:1", "a string", "1"), ("j:2", "a number label", "1"), ("j:3", "a boolean label", "0"),
        ("j:4", "a float label", "0"),
        ("j:14", "a label in words", "positive"),  # a string: clean's label step judges it (bad_label)
        ("c:4", "fine", "1"), ("p:0", "ok", "1")]
    not_label = "not a string, or a number or boolean standing for one of the labels ['0', '1']"
    assert [(q["id"], q["reason"], q["detail"]) for q in read_jsonl(tmp_path / "raw" / "quarantine.jsonl")] == [
        ("j:5", "bad_value", "field 'sentence' is a boolean (true), not a string"),
        ("j:6", "bad_value", "field 'sentence' is a number (12345), not a string"),
        ("j:7", "bad_value", "field 'sentence' is null, not a string"),
        ("j:8", "bad_value", "field 'sentence' is an array, not a string"),
        ("j:9", "bad_value", "field 'sentence' is an object, not a string"),
        ("j:10", "empty_field", "field(s) 'sentence' empty or only whitespace"),
        ("j:11", "bad_value", f"field 'label' is a number (2), {not_label}"),
        ("j:12", "bad_value", f"field 'label' is an array, {not_label}"),
        ("j:13", "bad_value", f"field 'label' is null, {not_label}"),
        ("c:2", "empty_field", "field(s) 'sentence' empty or only whitespace"),
        ("c:3", "empty_field", "field(s) 'sentence' empty or only whitespace"),
        ("p:1", "bad_value", "field 'sentence' is null, not a string"),
        ("p:2", "bad_value", f"field 'label' is a number (7), {not_label}")]


def test_bad_conversations_are_quarantined_with_their_reason_and_place(tmp_path):
    """A chat task's rows: each kind of bad conversation, in JSONL and in Parquet (a list of
    structs), quarantined with its reason; good ones in either layout kept as OpenAI turns."""
    from tests.test_chat import TASK as CHAT

    def u(text):
        return {"role": "user", "content": text}

    def a(text):
        return {"role": "assistant", "content": text}

    rows = [{"messages": [u("hi"), a("hello")]},
            {"messages": [{"role": "moderator", "content": "x"}, a("y")]},
            {"messages": [u({"text": "an object"}), a("y")]},
            {"messages": [u("hi"), a(" \n ")]},
            {"messages": [u("one"), u("two"), a("y")]},
            {"messages": [{"role": "system", "content": "s"}, u("q")]},
            {"messages": [u("q\u0000"), a("y")]},
            {"messages": None},
            {"conversation": [u("q"), a("y")]},
            {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "sharegpt"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"messages": [[u("q"), a("parquet")], [a("first")]]}), tmp_path / "c.parquet")
    cfg = config(source("j", "c.jsonl", columns={"messages": "messages"}),
                 source("p", "c.parquet", columns={"messages": "messages"}), task="support",
                 max_quarantined_share=1.0)
    collect.run(cfg, CHAT, tmp_path, tmp_path / "raw")
    assert [(r["id"], r["messages"][-1]) for r in read_jsonl(tmp_path / "raw" / "records.jsonl")] == [
        ("j:1", a("hello")), ("j:10", a("sharegpt")), ("p:0", a("parquet"))]
    where = "field 'messages': "
    assert [(q["id"], q["reason"], q["detail"]) for q in read_jsonl(tmp_path / "raw" / "quarantine.jsonl")] == [
        ("j:2", "unknown_role", where + "turn 0: role 'moderator' is none of ['assistant', 'developer', "
                                        "'gpt', 'human', 'system', 'user']"),
        ("j:3", "bad_content", where + "turn 0 (user): content is an object, not a string or an array of text "
                                           "parts ({type: text, text})"),
        ("j:4", "empty_content", where + "turn 1 (assistant): content is empty or only whitespace"),
        ("j:5", "turn_order", where + "turn 1 is user's where assistant's was due (a system turn only first, then "
                                      "user and assistant alternating from the user)"),
        ("j:6", "no_assistant_turn", where + "2 turn(s), none of them the assistant's: nothing to learn"),
        ("j:7", "nul_byte", "field 'messages[0]' holds a NUL byte at character 2"),
        ("j:8", "bad_value", where + "null, not an array of turns ({role, content} or {from, value})"),
        ("j:9", "missing_field", "no value for column 'messages'"),
        ("p:1", "turn_order", where + "turn 0 is assistant's where user's was due (a system turn only first, then "
                                      "user and assistant alternating from the user)")]


SHIFTED_ROWS = (10, 4_289)  # rows as declared, rows that gained a column


def test_a_source_mostly_quarantined_fails_collect_naming_it(tmp_path):
    good, shifted = SHIFTED_ROWS
    (tmp_path / "shifted.csv").write_text("sentence,label\n" + "".join(f"row {i},1\n" for i in range(good))
                                          + "".join(f"row {i},1,new column\n" for i in range(shifted)))
    (tmp_path / "fine.csv").write_text("sentence,label\na fine row,1\nshort\nanother fine row,0\n")
    task, failed = make_task(SST, LABELS), tmp_path / "raw.quarantine-failed.jsonl"
    declared = [source("fine", "fine.csv", columns=SST), source("shifted", "shifted.csv", columns=SST)]
    with pytest.raises(StageError) as err:
        collect.run(config(*declared), task, tmp_path, tmp_path / "raw")
    assert str(err.value) == (
        "source 'shifted' (shifted.csv): 4,289 of 4,299 rows (99.8%) quarantined, over "
        "collect.max_quarantined_share (0.5): field_count 4,289 (first: shifted.csv:12: expected 2 fields, found 3); "
        "fix the source or its declaration (columns, format, quoting), or raise collect.max_quarantined_share if so "
        f"many bad rows are expected. The quarantined rows are in {failed}")
    assert not (tmp_path / "raw").exists()  # nothing that looks like a result
    assert [q["id"] for q in read_jsonl(failed)] == ["fine:3", *(f"shifted:{n}" for n in range(12, 4_301))]

    # A source may allow itself more (or less) than the stage does; the message names its key.
    declared[1]["max_quarantined_share"] = 1.0
    stats = collect.run(config(*declared), task, tmp_path, tmp_path / "raw")
    assert stats.per_source["shifted"]["quarantine_reasons"] == {"field_count": 4_289}
    assert not failed.exists()  # a success removes the last failure's rows
    declared[0]["max_quarantined_share"] = 0.25
    with pytest.raises(StageError, match=r"^source 'fine' \(fine\.csv\): 1 of 3 rows \(33\.3%\) quarantined, over "
                                         r"collect\.sources\.t\.0\.max_quarantined_share \(0\.25\): field_count 1 "
                                         r"\(first: fine\.csv:3: expected 2 fields, found 1\); .* or raise "
                                         r"collect\.sources\.t\.0\.max_quarantined_share if"):
        collect.run(config(*declared), task, tmp_path, tmp_path / "raw2")
    (tmp_path / "half.csv").write_text("sentence,label\ngood,1\nshort\nfine,0\nalso short\n")
    assert collect.run(config(source("half", "half.csv", columns=SST)), task, tmp_path,
                       tmp_path / "raw3").quarantined == 2  # 2 of 4: at the limit is within it


QUOTES_CSV = (b'sentence,label\n'
              b'good one,1\n'
              b'"unclosed on line 3,0\n'
              b'swallowed no more,1\n'
              b'"a quoted field\n'
              b'over two lines",0\n'
              b'"closed"then more,1\n'
              b'"opens here,1\n'
              b'fine again,0\n'
              b'and ends",1,2\n'
              b'after,1\n'
              b'"runs to the end,0\n'
              b'last good,1\n')


def test_an_unclosed_quote_costs_its_own_line_only(tmp_path):
    (tmp_path / "quotes.csv").write_bytes(QUOTES_CSV)
    stats = collect.run(config(source("q", "quotes.csv", columns=SST)), make_task(SST, LABELS), tmp_path,
                        tmp_path / "raw")
    records = read_jsonl(tmp_path / "raw" / "records.jsonl")
    assert [(r["id"], r["location"], r["sentence"]) for r in records] == [
        ("q:2", "quotes.csv:2", "good one"), ("q:4", "quotes.csv:4", "swallowed no more"),
        ("q:6", "quotes.csv:6", "a quoted field\nover two lines"),  # a quote that closes may span lines
        ("q:9", "quotes.csv:9", "fine again"), ("q:11", "quotes.csv:11", "after"),
        ("q:13", "quotes.csv:13", "last good")]
    alone = "an unclosed quote? line {0} is quarantined alone and reading resumes at line {1}"
    assert [(q["id"], q["reason"], q["detail"], q["fields"], q["raw"])
            for q in read_jsonl(tmp_path / "raw" / "quarantine.jsonl")] == [
        ("q:3", "malformed_row", "a quoted field opened on line 3 runs to line 5, where: ',' expected after '\"'; "
         + alone.format(3, 4), None, '"unclosed on line 3,0'),
        ("q:7", "malformed_row", "',' expected after '\"'", None, '"closed"then more,1'),
        ("q:8", "field_count", "expected 2 fields, found 3 in the row that a quoted field opened on line 8 makes "
         "with the lines up to 10; " + alone.format(8, 9), None, '"opens here,1'),
        ("q:10", "field_count", "expected 2 fields, found 3", {"sentence": 'and ends"', "label": "1", "_extra": ["2"]},
         'and ends",1,2'),
        ("q:12", "truncated_row", "the file ends inside a quoted field that starts at line 12; " + alone.format(12, 13),
         None, '"runs to the end,0')]
    # every data line is in exactly one row: 12 lines, one record spanning two
    assert stats.per_source["q"] == {"rows": 11, "records": 6, "quarantined": 5, "skipped": {},
                                     "quarantine_reasons": {"field_count": 2, "malformed_row": 2, "truncated_row": 1}}


def test_a_quote_running_past_max_record_bytes_costs_its_own_line_only(tmp_path):
    (tmp_path / "runaway.csv").write_text('sentence,label\n"never closed,1\n'
                                          + "".join(f"row {i},0\n" for i in range(20)))
    stats = collect.run(config(source("r", "runaway.csv", columns=SST), max_record_bytes=64),
                        make_task(SST, LABELS), tmp_path, tmp_path / "raw")
    assert [r["id"] for r in read_jsonl(tmp_path / "raw" / "records.jsonl")] == [f"r:{n}" for n in range(3, 23)]
    [q] = read_jsonl(tmp_path / "raw" / "quarantine.jsonl")
    assert (q["id"], q["reason"], q["detail"], q["raw"]) == (
        "r:2", "too_large", "a quoted field opened on line 2 runs past collect.max_record_bytes (64) by line 9; an "
        "unclosed quote? line 2 is quarantined alone and reading resumes at line 3", '"never closed,1')
    assert (stats.records, stats.quarantined) == (20, 1)


def test_wrong_labels_are_collected_then_removed_by_clean_as_bad_label(bad_corpus):
    root, cfg = bad_corpus
    task = make_task(SST, LABELS)
    collect.run(cfg, task, root, root / "raw")
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["clean"]
    # With the shipped limit, losing 2 of its 3 records to one step fails the stage, before
    # it writes anything; the other sources are fine.
    with pytest.raises(StageError, match=r"^clean: source 'labels', step 'label': 2 of 3 records removed \(66\.7%\), "
                                         r"more than clean\.max_removed_share = 0\.5; top reasons: bad_label 2 \(e\.g\. "
                                         r"labels:2: label '2' not in \['0', '1'\]\); if that is right, [^|]*$"):
        clean.run(CleanConfig.model_validate(shipped), task, root / "raw", root / "clean")
    assert not (root / "clean").exists()
    clean.run(CleanConfig.model_validate({**shipped, "max_removed_share": 1.0}), task, root / "raw", root / "clean")
    removed = read_jsonl(root / "clean" / "removed" / "bad_label.jsonl")
    assert sorted((r["id"], r["label"]) for r in removed) == [("labels:2", "2"), ("labels:3", "positive")]


def _unreadable(path):
    path.write_text("sentence,label\na,1\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: a file that no one can read instead
        path.unlink()
        path.symlink_to("/proc/self/mem")


MALFORMED_XML = ('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
                 '  <row Id="1" PostTypeId="1" AcceptedAnswerId="2" Title="t" Body="q" />\n'
                 '  <row Id="2" PostTypeId="2" Body="unclosed <b> tag" />\n</posts>\n')

ERROR_CASES = {  # name -> (files, source, task fields, message pattern)
    "empty file": ({"empty.csv": b""}, source("empty", "empty.csv", columns=SST), SST,
                   r"^empty\.csv: empty file \(source 'empty'\)"),
    "missing columns": ({"cols.csv": b"sentence,score\na,1\n"}, source("cols", "cols.csv", columns=SST), SST,
                        r"^cols\.csv:1: source 'cols' lacks column\(s\) \['label'\]; header is \['sentence', 'score'\]"),
    "malformed XML": ({"Posts.xml": MALFORMED_XML.encode()}, source("se", "Posts.xml", columns=QA), QA,
                      r"^Posts\.xml:4: malformed XML \(source 'se'\): Unescaped '<' not allowed in attributes"),
    "XML not UTF-8": ({"Posts.xml": MALFORMED_XML.replace("t\"", "caf\xe9\"", 1).encode("latin-1")},
                      source("se", "Posts.xml", columns=QA), QA,
                      r"^Posts\.xml:3: malformed XML \(source 'se'\): Invalid bytes in character encoding"),
    "unreadable file": ({"locked.csv": _unreadable}, source("locked", "locked.csv", columns=SST), SST,
                        r"^locked\.csv: cannot read \(source 'locked'\): \w"),
    "corrupt parquet": ({"t.parquet": b"PAR1 not really"}, source("pq", "t.parquet", columns=SST), SST,
                        r"^t\.parquet: not a readable Parquet file \(source 'pq'\)"),
    "no such file": ({}, source("gone", "gone.csv", columns=SST), SST, r"^gone\.csv: no such file \(source 'gone'\)"),
    "hub dataset offline": ({}, source("hub", "hf:nobody/no-such-dataset", columns=SST), SST,
                            r"^hf:nobody/no-such-dataset: cannot load the Hugging Face dataset \(source 'hub', "
                            r"split 'train'\) \(HF_HUB_OFFLINE is set"),
    "pinned file changed": ({"a.csv": b"sentence,label\na,1\n"},
                            source("pinned", "a.csv", columns=SST, sha256="0" * 64), SST,
                            r"^a\.csv: sha256 mismatch \(source 'pinned'\): expected 0{64}, got [0-9a-f]{64}"),
    "header only": ({"h.csv": b"sentence,label\n"}, source("h", "h.csv", columns=SST), SST,
                    r"^h\.csv: source 'h' holds no rows"),
    # Excel's "Unicode text" export: each line was quarantined as invalid UTF-8, or the header unreadable
    "UTF-16 TSV": ({"u.tsv": "sentence\tlabel\na\t1\n".encode("utf-16")}, source("x", "u.tsv", columns=SST, format="tsv"),
                   SST, r"^u\.tsv: UTF-16 text \(source 'x'\): it opens with a UTF-16 byte-order mark, and sources are "
                        r"read as UTF-8; convert it first \(iconv -f UTF-16 -t UTF-8\)"),
    "UTF-16 JSONL": ({"u.jsonl": '{"sentence": "a", "label": 1}\n'.encode("utf-16")},
                     source("x", "u.jsonl", columns=SST, format="jsonl"), SST, r"^u\.jsonl: UTF-16 text \(source 'x'\)"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_unusable_sources_are_errors_naming_source_and_place(tmp_path, case):
    files, declared, fields, message = ERROR_CASES[case]
    for name, data in files.items():
        data(tmp_path / name) if callable(data) else (tmp_path / name).write_bytes(data)
    with pytest.raises(StageError, match=message):
        collect.run(config(declared), make_task(fields), tmp_path, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # no partial output left behind


def test_http_404_and_checksum_mismatch_are_errors_naming_the_url(tmp_path):
    body = b"sentence,label\na,1\n"
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.csv").write_bytes(body)
    wrong = "0" * 64
    with serve(tmp_path / "served") as url:
        with pytest.raises(StageError, match=rf"^{url}/missing\.csv: HTTP 404 File not found \(source 'web'\)"):
            collect.run(config(source("web", f"{url}/missing.csv", columns=SST, sha256=wrong)), make_task(SST),
                        tmp_path, tmp_path / "raw")
        with pytest.raises(StageError, match=rf"^{url}/a\.csv: sha256 mismatch \(source 'web'\): expected {wrong}, "
                                             rf"got {hashlib.sha256(body).hexdigest()}"):
            collect.run(config(source("web", f"{url}/a.csv", columns=SST, sha256=wrong)), make_task(SST),
                        tmp_path, tmp_path / "raw")
    assert list((tmp_path / ".ptune" / "downloads").iterdir()) == []  # nothing unverified is kept


def _cli_project(tmp_path, declared: dict) -> list[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["task"]["name"] = "sst2"
    params["collect"]["sources"]["sst2"] = [declared]
    write_params(tmp_path, params)
    return ["--params", str(tmp_path / "params.yaml"), "stage", "collect", "--out", "data/raw",
            "--stats", "data/metrics/collect.json"]


def test_cli_prints_one_line_and_exits_1_on_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cols.csv").write_text("sentence,score\na,1\n")
    assert cli.main(_cli_project(tmp_path, source("cols", "cols.csv", columns=SST))) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("ptune stage collect: error: cols.csv:1: source 'cols' lacks column(s) ['label']; "
                   "header is ['sentence', 'score']")


def test_cli_writes_quarantine_counts_as_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.csv").write_bytes(b"sentence,label\ngood,1\nbad\xff,0\nshort\nalso good,0\nfine,1\n")
    assert cli.main(_cli_project(tmp_path, source("a", "a.csv", columns=SST))) == 0
    metrics = read_json(tmp_path / "data" / "metrics" / "collect.json")
    assert (metrics["records"], metrics["quarantined"]) == (3, 2)
    assert metrics["quarantine_reasons"] == {"field_count": 1, "invalid_utf8": 1}


def test_cli_fails_in_one_line_when_most_of_a_source_is_quarantined(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.csv").write_text("sentence,label\ngood,1\nshort\nalso short\n")
    assert cli.main(_cli_project(tmp_path, source("a", "a.csv", columns=SST))) == 1
    assert capsys.readouterr().err.strip() == (
        "ptune stage collect: error: source 'a' (a.csv): 2 of 3 rows (66.7%) quarantined, over "
        "collect.max_quarantined_share (0.5): field_count 2 (first: a.csv:3: expected 2 fields, found 1); fix the "
        "source or its declaration (columns, format, quoting), or raise collect.max_quarantined_share if so many bad "
        "rows are expected. The quarantined rows are in data/raw.quarantine-failed.jsonl")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw.quarantine-failed.jsonl"]  # no output, no metrics


def _clean_args(project_args: list[str]) -> list[str]:
    return [*project_args[:2], "stage", "clean", "--raw", "data/raw", "--out", "data/clean",
            "--stats", "data/metrics/clean.json"]


def test_a_source_clean_removes_most_of_fails_the_stage_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.csv").write_text("sentence,label\na fine film,1\na dull film,0\nnot bad at all,1\n")
    # labelled in words where the task has 0/1: collected as they are, then removed by clean
    (tmp_path / "words.csv").write_text("sentence,label\nan instant classic,positive\nnever again,negative\n"
                                        "a waste of time,negative\nsolid work,1\n")
    args = _cli_project(tmp_path, source("good", "good.csv", columns=SST))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["collect"]["sources"]["sst2"].append(source("words", "words.csv", columns=SST))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(_clean_args(args)) == 1
    assert capsys.readouterr().err.strip() == (
        "ptune stage clean: error: clean: source 'words', step 'label': 3 of 4 records removed (75.0%), more than "
        "clean.max_removed_share = 0.5; top reasons: bad_label 3 (e.g. words:2: label 'positive' not in "
        "['0', '1']); if that is right, raise clean.max_removed_share or set clean.filters.label.max_removed_share "
        "for this step alone. Check the source first: removing most of it points at a wrong column mapping, format "
        "or label set, or a copy of another source")
    # nothing that looks like a result: no output, no metrics, no scratch
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["metrics", "raw"]
    assert [p.name for p in (tmp_path / "data" / "metrics").iterdir()] == ["collect.json"]
    params["clean"]["filters"]["label"] = {"max_removed_share": 0.75}  # the removals are right: allowed for this step
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert cli.main(_clean_args(args)) == 0
    metrics = read_json(tmp_path / "data" / "metrics" / "clean.json")
    assert metrics["per_source"]["words"]["steps"] == {"label": {"in": 4, "removed": 3}}
    assert (metrics["records_in"], metrics["records_out"]) == (7, 4)


KILLED_IN_PASS_2 = """
import os, signal, sys
from pathlib import Path
from pipelines import clean
from pipelines.config import CleanConfig
from tests.collect_fixtures import make_task

def killed(*args):  # as SIGKILL from outside would: no except, finally or atexit runs
    os.kill(os.getpid(), signal.SIGKILL)

clean._pass2 = killed
cfg = CleanConfig.model_validate({"filters": {"length": {"min_chars": 3}, "label": {}}})
clean.run(cfg, make_task(("sentence", "label"), {"0": "negative", "1": "positive"}), Path(sys.argv[1]),
          Path(sys.argv[2]))
"""


def test_a_killed_clean_leaves_scratch_git_ignores_and_the_next_run_removes(tmp_path):
    (tmp_path / "s.csv").write_text("sentence,label\na fine film,1\na dull film,0\nnot bad at all,1\nbad,0\n")
    task, data = make_task(SST, LABELS), tmp_path / "data"
    collect.run(config(source("s", "s.csv", columns=SST)), task, tmp_path, data / "raw")
    cfg = CleanConfig.model_validate({"filters": {"length": {"min_chars": 3}, "label": {}}})
    first = clean.run(cfg, task, data / "raw", data / "clean")
    published = {p.name: p.read_bytes() for p in (data / "clean").glob("*.jsonl")}
    live = subprocess.Popen(["sleep", "60"])  # stands for a run still going: its scratch stays
    try:
        (data / f".clean.{live.pid}.abcd1234").mkdir()
        (data / ".clean.k3j4h5g6").mkdir()  # named before scratch names carried the PID
        killed = subprocess.Popen([sys.executable, "-c", KILLED_IN_PASS_2, data / "raw", data / "clean"], cwd=ROOT)
        assert killed.wait(timeout=120) == -signal.SIGKILL
        left = {p.name for p in data.iterdir() if p.name.startswith(f".clean.{killed.pid}.")}
        (index,) = {n for n in left if n.startswith(f".clean.{killed.pid}.index-")}
        (staging,) = left - {index}
        assert (data / staging / "removed").is_dir() and (data / index / "kept.tsv").is_file()
        assert {p.name: p.read_bytes() for p in (data / "clean").glob("*.jsonl")} == published  # untouched
        for name in [staging, index, "models/.adapter.4242.abcd1234"]:  # git never lists a stage's scratch
            assert subprocess.run(["git", "check-ignore", "-q", f"data/{name}/x"], cwd=ROOT).returncode == 0, name

        assert clean.run(cfg, task, data / "raw", data / "clean") == first
        assert sorted(p.name for p in data.iterdir()) == [f".clean.{live.pid}.abcd1234", "clean", "raw"]
        assert {p.name: p.read_bytes() for p in (data / "clean").glob("*.jsonl")} == published
        # Every stage's output goes through the same helper: tokenize's, say.
        (data / f".shards.{killed.pid}.abcd1234").mkdir()
        with atomic_dir(data / "shards") as staging:
            (staging / "manifest.json").write_text("{}")
        assert sorted(p.name for p in data.iterdir()) == [f".clean.{live.pid}.abcd1234", "clean", "raw", "shards"]
    finally:
        live.kill()
        live.wait()


# tokenize, tune, evaluate: values that are not text, the base model directory, the shards'
# manifest, --out, and what a stage prints.

def _e2e_params(tmp_path) -> list[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["task"]["name"] = "e2e"
    write_params(tmp_path, params)
    return ["--params", str(tmp_path / "params.yaml")]


def test_tokenize_refuses_a_null_where_the_task_reads_text_in_one_line(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_clean(tmp_path / "data" / "clean", {**ROWS, "validation": [{"mr": None, "ref": "Aromi is a pub."}]})
    argv = [*_e2e_params(tmp_path), "stage", "tokenize", "--clean", "data/clean", "--base", str(tiny_base),
            "--out", "data/shards"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == ("ptune stage tokenize: error: data/clean/validation.jsonl:1: record "
                                       "validation:0: field 'mr' holds JSON null, not text; re-run the clean stage "
                                       "(`dvc repro clean`)\n")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["clean"]  # no shards, no scratch directory


def test_an_incomplete_or_damaged_base_model_is_one_line_naming_it(tmp_path, tiny_base):
    import torch

    from pipelines import tune
    from serving.engine import Engine
    from tests.test_tune import tune_cfg

    clean = write_clean(tmp_path / "clean", ROWS)
    tokenize.run(tokenize_cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    loads = {"tokenize": lambda: tokenize.run(tokenize_cfg(), E2E, clean, base, tmp_path / "shards2"),
             "tune": lambda: tune.run(tune_cfg("lora"), tmp_path / "shards", base, tmp_path / "adapter",
                                      tmp_path / "live"),
             "evaluate": lambda: Engine(base, max_batch=1, device="cpu", dtype=torch.float32)}  # evaluate's loader
    (base / "tokenizer.json").unlink()
    for stage, load in loads.items():
        with pytest.raises(StageError, match=re.escape(f"{base}: no tokenizer.json (the directory is incomplete); "
                                                       "rerun `dvc repro base_model`") + "$"):
            load()
    shutil.copy(tiny_base / "tokenizer.json", base)
    (base / "model.safetensors").write_bytes((tiny_base / "model.safetensors").read_bytes()[:1000])
    for stage in ("tune", "evaluate"):
        with pytest.raises(StageError, match=re.escape(f"{base}: cannot load the model (SafetensorError: ")
                           + r"[^\n]*\); rerun `dvc repro base_model`$"):
            loads[stage]()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "clean", "shards"]  # nothing written


def test_a_truncated_manifest_is_one_line_naming_it_in_tune_and_evaluate(tmp_path, tiny_base, monkeypatch, capsys):
    from pipelines import evaluate, tune
    from pipelines.base_model import load_tokenizer
    from tests.test_tune import tune_cfg

    tokenize.run(tokenize_cfg(), E2E, write_clean(tmp_path / "clean", ROWS), tiny_base, tmp_path / "shards")
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    says = re.escape(f"{manifest}: not valid JSON (") + r"[^\n]*\): truncated or edited; rerun `dvc repro tokenize`$"
    with pytest.raises(StageError, match=says):
        tune.run(tune_cfg("lora"), tmp_path / "shards", tiny_base, tmp_path / "adapter", tmp_path / "live")
    for check in (True, False):  # False: a registered version's manifest, fetched alone
        with pytest.raises(StageError, match=says):
            evaluate.TunedPrompts.from_dir(E2E, load_tokenizer(tiny_base), tmp_path / "shards", tiny_base, check)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*_e2e_params(tmp_path), "stage", "tune", "--shards", "shards", "--base", str(tiny_base),
                     "--out", "adapter", "--live", "live"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ptune stage tune: error: shards/manifest.json: not valid JSON") and err.count("\n") == 1


# Each stage command's other arguments (from the catalog): never read, the outputs are checked first.
STAGE_INPUTS = {name: [a for o in (*s.inputs, *s.extra) for a in (f"--{o.name}", o.name)]
                for name, s in CATALOG.items() if s.out_is_dir}
FILE_THERE = "taken: exists and is not a directory; the stage writes a directory there"
OUTPUT_CASES = {  # name -> (stage command, error)
    **{f"{stage} --out": ([stage, *args, "--out", "taken"], FILE_THERE) for stage, args in STAGE_INPUTS.items()},
    "tune --live": (["tune", "--shards", "s", "--base", "b", "--out", "adapter", "--live", "taken"], FILE_THERE),
    "register --out": (["register", "--metrics", "m.json", "--details", "d.json", "--out", "folder"],
                       "folder: exists and is a directory; the stage writes a file there"),
    "--stats": (["collect", "--out", "raw", "--stats", "folder"], "folder: exists and is a directory"),
    "under a file": (["collect", "--out", "taken/raw"], "taken: is a file, so taken/raw cannot be created"),
    # a directory output is replaced whole: never the project a user works in
    "--out .": (["collect", "--out", "."], ".: is the current directory, and the output directory is replaced whole"),
    "--out ..": (["tokenize", "--clean", "c", "--base", "b", "--out", ".."], "..: is a parent of the current directory"),
    "--out a repository": (["collect", "--out", "folder/repo"], "folder/repo: is a git repository"),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, case):
    argv, message = OUTPUT_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file\n")
    (tmp_path / "folder").mkdir()
    if case == "--out a repository":
        (tmp_path / "folder/repo/.git").mkdir(parents=True)
    monkeypatch.setattr(cli, "load_params", lambda path: pytest.fail("the stage started"))  # every stage's first step
    assert cli.main(["stage", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ptune stage {argv[0]}: error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "taken"]
    assert (tmp_path / "taken").read_text() == "a file\n"
    assert [p.name for p in (tmp_path / "folder").rglob("*")] == (["repo", ".git"] if "repository" in case else [])


def test_a_stage_run_with_out_on_a_file_leaves_no_hidden_output_beside_it(tmp_path, tiny_base):
    clean = write_clean(tmp_path / "clean", ROWS)
    (tmp_path / "shards").write_text("a file\n")
    with pytest.raises(StageError, match=re.escape(f"{tmp_path / 'shards'}: exists and is not a directory")):
        tokenize.run(tokenize_cfg(), E2E, clean, tiny_base, tmp_path / "shards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "shards"]


def _ptune(cwd, *argv) -> subprocess.CompletedProcess:
    """A fresh process, so the CLI configures logging as it does for a person (pytest's
    own log capture would keep it from configuring anything in this one)."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.mark.slow
def test_a_stage_prints_its_own_summary_and_no_library_chatter(tmp_path, tiny_base):
    # `ptune stage collect` printed 218 lines, 214 of them Great Expectations' INFO bookkeeping.
    (tmp_path / "a.csv").write_bytes(b"sentence,label\ngood,1\nbad\xff,0\nalso good,0\nfine,1\n")
    argv = _cli_project(tmp_path, source("a", "a.csv", columns=SST))
    write_clean(tmp_path / "data" / "clean", {"train": [{"sentence": "good", "label": "1"}] * 2,
                                              "validation": [{"sentence": "bad", "label": "0"}],
                                              "test": [{"sentence": "fine", "label": "1"}]})
    runs = {"collect": (_ptune(tmp_path, *argv), r"INFO pipelines\.collect: .*\b1 quarantined"),
            "tokenize": (_ptune(tmp_path, *argv[:2], "stage", "tokenize", "--clean", "data/clean", "--base",
                                str(tiny_base), "--out", "data/shards"),
                         r"INFO pipelines\.tokenize: tokenize: 4 examples \(train 2, validation 1, test 1\)")}
    for stage, (proc, summary) in runs.items():
        assert proc.returncode == 0, proc.stderr
        lines = (proc.stdout + proc.stderr).splitlines()
        assert "great_expectations" not in proc.stdout + proc.stderr, stage
        assert not [line for line in lines if re.search(r" INFO (?!pipelines\.|ptune\b)", line)], stage
        assert any(re.search(summary, line) for line in lines), (stage, lines)


@pytest.mark.parametrize("flags, said", [(["-n", "0"], "-n: must be at least 1"),
                                         (["--max-tokens", "0"], "--max-tokens: must be at least 1"),
                                         (["--top-p", "2"], "--top-p: must be in (0, 1]"),
                                         (["--num-beams", "2", "-n", "3"], "-n: must not exceed num_beams"),
                                         (["--stop", ""], "--stop: must not be an empty string (it would match "
                                                         "anywhere)"),
                                         (["--field", "mr=a", "--field", "mr=b"], "--field mr: given twice; pass each "
                                                                                  "field once"),
                                         (["--repo", "/nonexistent/project"], "--repo /nonexistent/project: no "
                                          "such directory (the project whose registry names the models)"),
                                         (["--seed", str(2**64)], "--seed: must be in [-9223372036854775808, "
                                                                  "9223372036854775807] (a signed 64-bit integer)")])
def test_generate_refuses_bad_decoding_flags_before_loading_a_model(tmp_path, capsys, flags, said):
    """No model or registry here: the flags are checked first, named as they were typed."""
    text = [] if "--field" in flags else ["x"]
    assert cli.main(["generate", "--model", "base", "--repo", str(tmp_path), *flags, *text]) == 1
    assert capsys.readouterr().err.strip() == f"ptune generate: error: {said}"


@pytest.mark.parametrize("argv, said", [
    (["serve", "--max-batch", "0"], "argument --max-batch: 0: must be at least 1"),
    (["serve", "--poll", "0"], "argument --poll: 0: must be at least 0.5"),  # was a registry read without pause
    (["serve", "--port", "70000"], "argument --port: 70000 is outside [1, 65535]"),  # was a traceback
    (["serve", "--prefill-tokens", "0"], "argument --prefill-tokens: 0: must be at least 1"),  # was a traceback
    (["serve", "--max-queue", "x"], "argument --max-queue: 'x' is not an integer"),
    (["evaluate", "--adapter", "a", "--file", "f", "--max-rows", "0"], "argument --max-rows: 0: must be at least 1"),
    (["compare", "--samples", "0"], "argument --samples: 0: must be at least 100"),  # was an IndexError
    (["server", "--port", "-1"], "argument --port: -1 is outside [1, 65535]"),
    (["serve", "--poll", "nan"], "argument --poll: 'nan' is not a finite number"),  # nan < 0.5 is False: no pause
    (["serve", "--drain-seconds", "inf"], "argument --drain-seconds: 'inf' is not a finite number"),
    (["generate", "--model", "base", "--temperature", "nan", "x"], "argument --temperature: 'nan' is not a finite"),
    (["generate", "--model", "base", "--length-penalty=-inf", "x"], "argument --length-penalty: '-inf' is not"),
])
def test_numeric_flags_out_of_range_are_refused_by_name_before_any_work(capsys, argv, said):
    """--max-rows 0 was ignored (all of evaluate.max_rows scored) and --max-rows -5 dropped the
    last 5 rows; the others failed later, or never."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and f"ptune {argv[0]}: error: {said}" in capsys.readouterr().err


def test_the_registry_listed_outside_a_project_says_so(tmp_path, monkeypatch, capsys):
    """It said "no registered versions yet (`make run` registers the first)" in any directory."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["registry"]) == 1
    assert capsys.readouterr().err == (f"ptune registry: error: no params.yaml in {tmp_path}: run `ptune registry` in "
                                       "the project, whose git tags (GTO) are the registry\n")
