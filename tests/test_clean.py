"""The clean stage and its steps, on tiny literal inputs (raw written directly, not via collect)."""
import json
from collections import Counter

import pandas as pd
import pytest
import yaml

from pipelines import clean, validation
from pipelines.common import StageError, read_jsonl
from pipelines.config import (CleanConfig, ConfigError, FiltersConfig, GopherQualityConfig, GopherRepetitionConfig,
                              LanguageConfig, LengthConfig, PiiConfig, UnicodeConfig, parse_params)
from pipelines.filters import (KEEP, SKIP, Drop, apply_steps, build_steps, gopher_quality, gopher_repetition,
                               html_to_text, language_step, length_step, pii_step, tidy_whitespace, unicode_step)
from pipelines.tasks import Task
from pipelines.validation import ValidationFailed, validate
from tests.conftest import ROOT

GEN = Task(name="t", kind="generation", fields=("mr", "ref"), group_key="mr", prompt="{{ mr }}",
           target=" {{ ref }}", zero_shot="{{ mr }}", target_field="ref", text_fields=("mr", "ref"))
CLS = Task(name="c", kind="classification", fields=("sentence", "label"), group_key="sentence",
           prompt="{{ sentence }}", target=" {{ verbalizer }}", zero_shot="{{ sentence }}", target_field="label",
           labels={"0": "negative", "1": "positive"}, text_fields=("sentence",))
SPLITS = ("train", "validation", "test")
# No language model in most stage tests: it is tested on its own below.
FAST = CleanConfig(filters=FiltersConfig.model_validate(
    {"html": {}, "unicode": {}, "whitespace": {}, "pii": {}, "length": {"min_chars": 3}, "label": {}}))

LONG_A = ("The Golden Palace is a family friendly coffee shop in the riverside area near the Rice Boat, "
          "serving cheap Italian food with an average customer rating.")
LONG_A_EDITED = LONG_A.replace("cheap", "low-priced").replace("average", "average,")  # a light edit
LONG_B = ("Browns Cambridge is an expensive French restaurant in the city centre with a low rating, "
          "and it is not family friendly; it lies close to the Crowne Plaza Hotel.")


def write_raw(root, records, sources=None):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    names = sorted({r["source"] for r in records})
    sources = sources or {n: {"train": 0.5, "test": 0.5} for n in names}
    (root / "sources.json").write_text(json.dumps({n: {"uri": f"{n}.csv", "format": "csv", "files": [],
                                                       "splits": s, "records": 0, "quarantined": 0}
                                                   for n, s in sources.items()}))
    return root


def rec(i, source="src", **fields):
    return {"id": f"{source}:{i}", "source": source, "location": f"{source}.csv:{i}", **fields}


def outputs(out):
    return {s: read_jsonl(out / f"{s}.jsonl") for s in SPLITS}


# --- steps -------------------------------------------------------------------------

def test_unicode_folds_compatibility_forms_and_drops_invisible_characters():
    step = unicode_step(UnicodeConfig(), ("mr", "ref"))
    verdict = step({"mr": "ﬁne café", "ref": "ＡＢＣ\u200b def\u00ad"})
    assert verdict.fields == {"mr": "fine café", "ref": "ABC def"}
    assert step({"mr": "plain", "ref": "text"}) is KEEP  # unchanged records are not counted as changed


def test_html_keeps_code_blocks_readable_and_latex_untouched():
    html = ('<p>Use <code>x[0]</code> &amp; see <a href="http://x.org">the docs</a>:</p>\n'
            '<pre><code>def f(a):\n    return a &lt; 2\n</code></pre>\n'
            '<ul>\n<li>one $|\\psi\\rangle$</li>\n<li>two</li>\n</ul>'
            '<blockquote><p>quoted</p><p>again</p></blockquote><img src="i.png" alt="enter image description here">')
    text = tidy_whitespace(html_to_text(html))
    assert text == ("Use `x[0]` & see the docs:\n\n```\ndef f(a):\n    return a < 2\n```\n\n"
                    "- one $|\\psi\\rangle$\n- two\n\n> quoted\n\n> again")


def test_plain_text_with_angle_brackets_is_not_taken_for_html():
    step = build_steps(FiltersConfig.model_validate({"html": {}}), GEN)[0][1]
    assert step({"mr": "What does <T> mean in List<T>?", "ref": "a < b and c > d"}) is KEEP
    assert step({"mr": "Tom &amp; Jerry", "ref": "x"}).fields == {"mr": "Tom & Jerry"}


def test_whitespace_collapses_prose_but_not_code():
    text = "a  b\t c\n\n\n\nd \n```\nif x:\n        y  =  1\n```"
    assert tidy_whitespace(text) == "a b c\n\nd\n\n```\nif x:\n        y  =  1\n```"


def test_pii_is_replaced_by_placeholders_and_counted():
    step = pii_step(PiiConfig(), ("mr", "ref"))
    verdict = step({"mr": "mail jane.doe@example.co.uk or +44 20 7946 0958",
                    "ref": "server 192.168.0.12 and 2001:db8::8a2e:370:7334, call (555) 123-4567"})
    assert verdict.fields == {"mr": "mail <EMAIL> or <PHONE>",
                              "ref": "server <IP_ADDRESS> and <IP_ADDRESS>, call <PHONE>"}
    assert verdict.counts == {"EMAIL": 1, "PHONE": 2, "IP_ADDRESS": 2}


@pytest.mark.parametrize("text", [
    "rated 5 out of 5, £20-25", "from 1990-2000 at 12:30:45", "std::vector<int> v; a[1::2]",
    "version 3.10.2 of 2018-05-02", "$|0\\rangle + e^{i\\pi/4}|1\\rangle$"])
def test_pii_leaves_numbers_dates_and_code_alone(text):
    assert pii_step(PiiConfig(), ("mr",))({"mr": text}) is KEEP


def test_length_removes_with_a_reason_and_a_detail():
    step = length_step(LengthConfig(min_chars=3, max_chars=40, min_words=1, max_words=5), ("mr", "ref"))
    assert step({"mr": "a", "ref": "b"}) == Drop("too_short", "2 < 3 (min_chars)")
    assert step({"mr": "one two three", "ref": "four five six"}) == Drop("too_long", "6 > 5 (max_words)")
    assert step({"mr": "x" * 30, "ref": "y" * 11}) == Drop("too_long", "41 > 40 (max_chars)")
    assert step({"mr": "name", "ref": ""}) == Drop("empty_field", "ref empty after cleaning")
    assert step({"mr": "bad", "ref": "!"}) is KEEP


PROSE = ("The grinder matters more than the machine. A burr grinder gives an even size, and that is what "
         "lets the water extract the coffee evenly; a blade grinder makes dust and boulders at the same time. "
         "With a good grinder even a cheap press makes a fine cup, so spend the money there first.")


def test_gopher_repetition_catches_repeated_text_and_passes_prose():
    cfg = GopherRepetitionConfig(min_words=20)
    assert gopher_repetition(PROSE, cfg) is None
    spam = "\n".join(["buy cheap coffee beans now"] * 6 + [PROSE])
    assert gopher_repetition(spam, cfg).reason == "gopher_dup_lines"
    loop = " ".join(["this blend is the best blend"] * 8)
    assert gopher_repetition(loop, cfg).reason in ("gopher_top_ngram", "gopher_dup_ngrams")


def test_gopher_quality_catches_non_prose_and_passes_prose():
    cfg = GopherQualityConfig(min_words=20)
    assert gopher_quality(PROSE, cfg) is None
    assert gopher_quality(" ".join(["#tag ..."] * 30), cfg).reason == "gopher_symbols"
    assert gopher_quality(" ".join(["coffee grinder burr espresso"] * 10), cfg).reason == "gopher_stop_words"
    assert gopher_quality(" ".join(["1234 5678 9012 3456 7890 abcd"] * 10), cfg).reason == "gopher_alpha_words"


def test_gopher_rules_skip_short_records_and_ignore_code():
    steps = dict(build_steps(FiltersConfig.model_validate({"gopher_repetition": {"min_words": 20}}), GEN))
    assert steps["gopher_repetition"]({"mr": "bad", "ref": "bad bad bad"}) is SKIP  # one-liners are not documents
    code = "```\n" + "x = 1\n" * 40 + "```"
    assert steps["gopher_repetition"]({"mr": "m", "ref": f"{PROSE}\n\n{code}"}) is KEEP


def test_language_removes_confident_other_languages_and_skips_short_texts():
    step = language_step(LanguageConfig(candidates=("english", "german", "french")), ("ref",))
    assert step({"ref": "The Wrestlers is a cheap family friendly pub near the river."}) is KEEP
    drop = step({"ref": "Das Restaurant in der Innenstadt ist sehr teuer und nicht familienfreundlich."})
    assert drop.reason == "language" and drop.detail.startswith("german (")
    assert step({"ref": "très bien"}) is SKIP  # below min_words: not judged


def test_steps_run_in_the_order_params_lists_them():
    cfg = FiltersConfig.model_validate({"whitespace": {}, "length": {"enabled": False}, "html": {}})
    assert cfg.order == ("whitespace", "length", "html")
    assert [name for name, _ in build_steps(cfg, GEN)] == ["whitespace", "html"]
    assert [name for name, _ in build_steps(FiltersConfig.model_validate({"label": {}}), GEN)] == []  # no labels
    events = Counter()
    outcome = apply_steps(build_steps(cfg, GEN), {"mr": "<p>a  b</p>", "ref": "c"}, events)
    assert outcome.fields == {"mr": "a b", "ref": "c"} and outcome.drop is None
    assert events == {("whitespace", "in"): 1, ("whitespace", "changed"): 1, ("html", "in"): 1,
                      ("html", "changed"): 1}


# --- the stage ------------------------------------------------------------------------

def test_accounting_holds_per_step_per_source_and_overall(tmp_path):
    records = [rec(1, mr="name[A]", ref="A serves Thai food."),
               rec(2, mr="name[A]", ref="Thai food is served at A."),
               rec(3, mr="name[A]", ref="a serves thai food"),  # same text, up to case and punctuation
               rec(4, mr="name[B]", ref="B<br>is by the river, mail b@b.org"),
               rec(5, mr="x", ref="y"),  # too short
               rec(1, source="other", mr="name[C]", ref="C is in the centre.")]
    raw = write_raw(tmp_path / "raw", records)
    stats = clean.run(FAST, GEN, raw, tmp_path / "clean")
    assert stats.accounting_balanced
    assert (stats.records_in, stats.records_out) == (6, 4)
    assert stats.removed == {"duplicate": 1, "too_short": 1}
    assert stats.pii_replaced == {"EMAIL": 1}
    assert stats.steps["html"] == {"in": 6, "out": 6, "removed": 0, "changed": 1}
    assert stats.steps["length"] == {"in": 6, "out": 5, "removed": 1}
    assert stats.steps["exact_dedup"] == {"in": 5, "out": 4, "removed": 1}
    assert stats.per_source["src"]["in"] == 5 and stats.per_source["src"]["out"] == 3
    assert stats.per_source["other"]["in"] == stats.per_source["other"]["out"] == 1
    assert sum(stats.per_source["other"]["splits"].values()) == 1
    rows = [r for rows in outputs(tmp_path / "clean").values() for r in rows]
    assert len(rows) == stats.records_out == sum(stats.splits.values())
    b = next(r for r in rows if r["id"] == "src:4")
    assert b["ref"] == "B\nis by the river, mail <EMAIL>" and b["group"] == "name[b]" and b["split"] in SPLITS
    report = json.loads((tmp_path / "clean" / "validation.json").read_text())
    assert report["success"] and report["index_checks"] == ["output_ids_unique", "groups_in_one_split",
                                                            "texts_in_one_split"]


def test_removed_records_are_written_whole_with_reason_and_detail(tmp_path):
    records = [rec(1, sentence="a fine film", label="1"), rec(2, sentence="A fine film!", label="0"),
               rec(3, sentence="ok", label="1"), rec(4, sentence="a dull film", label="7")]
    clean.run(FAST, CLS, write_raw(tmp_path / "raw", records), tmp_path / "clean")
    removed = {p.stem: read_jsonl(p) for p in (tmp_path / "clean" / "removed").glob("*.jsonl")}
    assert set(removed) == {"duplicate", "too_short", "bad_label"}
    assert removed["duplicate"] == [{**records[1], "sentence": "A fine film!", "group": "a fine film!",
                                     "reason": "duplicate",
                                     "detail": "same text as src:1; labels differ: '0' here, '1' kept"}]
    assert removed["bad_label"][0]["detail"] == "label '7' not in ['0', '1']"
    assert removed["too_short"][0]["id"] == "src:3" and removed["too_short"][0]["source"] == "src"


def test_near_duplicates_across_groups_go_and_a_groups_own_paraphrases_stay(tmp_path):
    records = [rec(1, mr="name[Golden Palace]", ref=LONG_A),
               rec(2, mr="name[Golden Palace] ", ref=LONG_A + " A fine place."),  # same group: kept
               rec(3, mr="name[Golden Palace], food[Italian]", ref=LONG_A_EDITED),  # another group: removed
               rec(4, mr="name[Browns Cambridge]", ref=LONG_B)]  # distinct: kept
    stats = clean.run(FAST, GEN, write_raw(tmp_path / "raw", records), tmp_path / "clean")
    (near,) = read_jsonl(tmp_path / "clean" / "removed" / "near_duplicate.jsonl")
    assert near["id"] == "src:3" and near["detail"].startswith("near-duplicate of src:1 (estimated Jaccard 0.")
    assert stats.removed == {"near_duplicate": 1} and stats.duplicate_clusters == {"exact": 0, "near": 1}
    kept = {r["id"] for rows in outputs(tmp_path / "clean").values() for r in rows}
    assert kept == {"src:1", "src:2", "src:4"}


def test_near_dedup_off_and_below_its_word_floor(tmp_path):
    records = [rec(1, mr="name[A]", ref=LONG_A), rec(2, mr="name[B]", ref=LONG_A_EDITED)]
    raw = write_raw(tmp_path / "raw", records)
    off = FAST.model_copy(update={"dedup": FAST.dedup.model_copy(update={
        "near": FAST.dedup.near.model_copy(update={"enabled": False})})})
    assert clean.run(off, GEN, raw, tmp_path / "a").records_out == 2
    floor = FAST.dedup.near.model_copy(update={"min_words": 100})
    stats = clean.run(FAST.model_copy(update={"dedup": FAST.dedup.model_copy(update={"near": floor})}),
                      GEN, raw, tmp_path / "b")
    assert stats.records_out == 2 and stats.steps["near_dedup"]["skipped"] == 2


def test_splits_are_deterministic_seeded_and_keep_groups_whole(tmp_path):
    fr = {"train": 0.8, "test": 0.2}
    groups = [f"g{i}" for i in range(500)]
    a = [clean.split_of(g, fr, 0) for g in groups]
    assert a == [clean.split_of(g, fr, 0) for g in groups]
    assert a != [clean.split_of(g, fr, 1) for g in groups]
    assert 0.7 < a.count("train") / len(a) < 0.9
    records = [rec(i, mr=f"name[G{i % 20}]", ref=f"text number {i} of group {i % 20}") for i in range(200)]
    raw = write_raw(tmp_path / "raw", records, {"src": {"train": 0.7, "validation": 0.1, "test": 0.2}})
    clean.run(FAST, GEN, raw, tmp_path / "c1")
    clean.run(FAST, GEN, raw, tmp_path / "c2")
    first = outputs(tmp_path / "c1")
    assert first == outputs(tmp_path / "c2")
    split_of_group = {}
    for split, rows in first.items():
        for r in rows:
            assert split_of_group.setdefault(r["group"], split) == split
    assert len(set(split_of_group.values())) >= 2


def test_a_group_two_sources_would_split_goes_to_the_most_held_out(tmp_path):
    records = ([rec(i, "a", mr=f"name[G{i % 20}]", ref=f"text number {i}") for i in range(100)]
               + [rec(1, "b", mr="name[G3]", ref="a held-out text")])
    raw = write_raw(tmp_path / "raw", records, {"a": {"train": 1.0}, "b": {"test": 1.0}})
    stats = clean.run(FAST, GEN, raw, tmp_path / "clean")
    out = outputs(tmp_path / "clean")
    assert {r["group"] for r in out["test"]} == {"name[g3]"} and len(out["test"]) == 6
    assert stats.groups_moved_to_held_out == 1 and stats.per_source["a"]["splits"]["test"] == 5


def test_two_workers_give_the_same_output_as_one(tmp_path):
    records = [rec(i, sentence=f"review {i} of a {'good' if i % 2 else 'bad'} film", label=str(i % 2))
               for i in range(1200)]
    raw = write_raw(tmp_path / "raw", records, {"src": {"train": 0.9, "test": 0.1}})
    one = clean.run(FAST, CLS, raw, tmp_path / "one")
    two = clean.run(FAST.model_copy(update={"workers": 2}), CLS, raw, tmp_path / "two")
    assert one == two and outputs(tmp_path / "one") == outputs(tmp_path / "two")


def test_raw_without_sources_json_or_from_an_unknown_source_is_refused(tmp_path):
    raw = write_raw(tmp_path / "raw", [rec(1, mr="a b c", ref="d e f")])
    (raw / "sources.json").unlink()
    with pytest.raises(StageError, match=r"sources\.json: missing"):
        clean.run(FAST, GEN, raw, tmp_path / "clean")
    write_raw(raw, [rec(1, mr="a b c", ref="d e f")], {"elsewhere": {"train": 1.0}})
    with pytest.raises(StageError, match=r"records\.jsonl:1: .*source 'src', which sources\.json does not list"):
        clean.run(FAST, GEN, raw, tmp_path / "clean")
    write_raw(raw, [rec(1, mr="a b c")])
    with pytest.raises(StageError, match=r"lacks text field\(s\) \['ref'\]"):
        clean.run(FAST, GEN, raw, tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


def test_an_output_with_nothing_left_is_an_error_that_points_at_removed(tmp_path):
    raw = write_raw(tmp_path / "raw", [rec(1, mr="a", ref="b"), rec(2, mr="c", ref="d")])
    with pytest.raises(StageError, match=r"every record was removed \({'too_short': 2}\); check clean\.filters"):
        clean.run(FAST.model_copy(update={"max_removed_share": 1.0}), GEN, raw, tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


FAST_STEPS = {"html": {}, "unicode": {}, "whitespace": {}, "pii": {}, "length": {"min_chars": 3}, "label": {}}
CHECK_THE_SOURCE = (". Check the source first: removing most of it points at a wrong column mapping, format or "
                    "label set, or a copy of another source")


def test_a_step_removing_most_of_a_source_fails_naming_source_step_and_reasons(tmp_path):
    records = ([rec(i, "good", mr=f"name[G{i}]", ref=f"G{i} serves food.") for i in range(4)]
               + [rec(1, "bad", mr="a", ref="b"), rec(2, "bad", mr="c", ref="d"), rec(3, "bad", mr="e", ref=""),
                  rec(4, "bad", mr="name[H]", ref="H serves food.")])
    raw = write_raw(tmp_path / "raw", records)
    with pytest.raises(StageError) as err:
        clean.run(FAST, GEN, raw, tmp_path / "clean")
    assert str(err.value) == (
        "clean: source 'bad', step 'length': 3 of 4 records removed (75.0%), more than clean.max_removed_share = "
        "0.5; top reasons: too_short 2, empty_field 1 (e.g. bad:1: 2 < 3 (min_chars)); if that is right, raise "
        "clean.max_removed_share or set clean.filters.length.max_removed_share for this step alone"
        + CHECK_THE_SOURCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing published, no scratch left
    # The step's own limit wins over clean's; 3 of 4 is not more than 0.75.
    lenient = CleanConfig(filters={**FAST_STEPS, "length": {"min_chars": 3, "max_removed_share": 0.75}})
    stats = clean.run(lenient, GEN, raw, tmp_path / "clean")
    assert stats.per_source["bad"] == {"in": 4, "out": 1, "removed": {"empty_field": 1, "too_short": 2},
                                       "steps": {"length": {"in": 4, "removed": 3}},
                                       "splits": stats.per_source["bad"]["splits"]}
    assert stats.per_source["good"]["steps"] == {} and stats.records_out == 5


def test_a_source_that_copies_another_fails_at_dedup(tmp_path):
    originals = [rec(i, "a", mr=f"name[M{i}]", ref=f"M{i} is a pub by the river.") for i in range(3)]
    copies = [{**r, "id": f"b:{i}", "source": "b"} for i, r in enumerate(originals)]
    raw = write_raw(tmp_path / "raw", originals + copies + [rec(9, "b", mr="name[N]", ref="N is new.")])
    with pytest.raises(StageError) as err:
        clean.run(FAST, GEN, raw, tmp_path / "clean")
    assert str(err.value) == (
        "clean: source 'b', step 'exact_dedup': 3 of 4 records removed (75.0%), more than clean.max_removed_share "
        "= 0.5; top reasons: duplicate 3 (e.g. b:0: same text as a:0); if that is right, raise "
        "clean.max_removed_share or set clean.dedup.max_removed_share for deduplication alone" + CHECK_THE_SOURCE)
    strict = CleanConfig(max_removed_share=0.9, filters=FAST_STEPS, dedup={"max_removed_share": 0.5})
    with pytest.raises(StageError, match=r"^clean: source 'b', step 'exact_dedup': 3 of 4 records removed \(75\.0%\), "
                                         r"more than clean\.dedup\.max_removed_share = 0\.5; .*; if that is right, "
                                         r"raise clean\.dedup\.max_removed_share\. Check the source"):
        clean.run(strict, GEN, raw, tmp_path / "clean")
    stats = clean.run(CleanConfig(filters=FAST_STEPS, dedup={"max_removed_share": 0.75}), GEN, raw,
                      tmp_path / "clean")
    assert stats.per_source["b"]["steps"] == {"exact_dedup": {"in": 4, "removed": 3}} and stats.records_out == 4


def test_config_errors_name_their_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["filters"]["length"]["max_chars"] = 0
    with pytest.raises(ConfigError, match=r"clean\.filters\.length\.max_chars: Input should be greater than 0"):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["filters"]["lenght"] = {}
    with pytest.raises(ConfigError, match=r"clean\.filters\.lenght: Extra inputs are not permitted"):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["filters"]["language"]["keep"] = ["klingon"]
    with pytest.raises(ConfigError, match=r"clean\.filters\.language\.keep\.0"):
        parse_params(raw)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["max_removed_share"] = 1.5
    raw["clean"]["filters"]["length"]["max_removed_share"] = -0.1
    raw["clean"]["filters"]["html"]["max_removed_share"] = 0.9  # it never removes a record
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value).splitlines()[1:] == [
        "  params.yaml: clean.max_removed_share: Input should be less than or equal to 1",
        "  params.yaml: clean.filters.html.max_removed_share: Extra inputs are not permitted",
        "  params.yaml: clean.filters.length.max_removed_share: Input should be greater than or equal to 0"]


def test_real_params_run_every_step_in_pipeline_order():
    cfg = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).clean
    assert cfg.filters.order == ("html", "unicode", "whitespace", "pii", "length", "label", "gopher_repetition",
                                 "gopher_quality", "language")
    assert cfg.dedup.exact and cfg.dedup.near.enabled
    assert cfg.max_removed_share == 0.5 and cfg.filters.length.max_removed_share is None


# --- validation -----------------------------------------------------------------------

def test_clean_suite_fails_on_a_bad_clean_output(tmp_path):
    bad = {"id": ["a", "a", None], "source": ["src", "src", "nowhere"], "split": ["train", "dev", "test"],
           "text_chars": [5, 2, 7], "text_words": [1, 1, 1], "label_ok": [True, False, True], "pii_left": [0, 2, 0]}
    params = {"min_rows": 1, "sources": ["src"], "min_chars": 3, "max_chars": 100, "min_words": 1,
              "max_words": None, "max_pii_left": 0}
    with pytest.raises(ValidationFailed) as err:
        validate("clean", pd.DataFrame(bad), params, tmp_path / "v.json")
    assert {(f["expectation"], f["column"]) for f in err.value.summary.failures} == {
        ("expect_column_values_to_not_be_null", "id"), ("expect_column_values_to_be_unique", "id"),
        ("expect_column_values_to_be_in_set", "source"), ("expect_column_values_to_be_in_set", "split"),
        ("expect_column_values_to_be_between", "text_chars"), ("expect_column_values_to_be_in_set", "label_ok"),
        ("expect_column_values_to_be_between", "pii_left")}


def test_properties_across_batches_are_checked_on_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "CHUNK_ROWS", 2)  # every batch alone looks fine
    records = [rec(i, mr=f"name[M{i}]", ref=f"reference text {i}") for i in range(5)]
    records.append({**records[0], "ref": "a second record under a reused id"})
    with pytest.raises(ValidationFailed) as err:
        clean.run(FAST, GEN, write_raw(tmp_path / "raw", records), tmp_path / "clean")
    (failure,) = err.value.summary.failures
    assert failure["expectation"] == "output_ids_unique" and failure["unexpected_sample"] == ["src:0"]
    assert not (tmp_path / "clean").exists()
    report = json.loads((tmp_path / "clean.validation-failed.json").read_text())
    assert report["batches"] == 3 and report["success"] is False
