import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines.validation import GX_ROOT, ValidationFailed, validate


def suite_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((GX_ROOT / "gx" / "expectations").glob("*.json"))}


def shards_frame(length=5, max_id=10):
    return pd.DataFrame({"length": [length, 3], "min_id": [0, 2], "max_id": [max_id, 4],
                         "label_tokens": [1, 2], "source_tokens": [3, 1], "split": ["train", "test"]})


def test_passing_frame_writes_a_passed_summary(tmp_path):
    s = validate("shards", shards_frame(), {"max_length": 10, "vocab_size": 100}, tmp_path / "v.json")
    assert s.success and s.rows == 2 and s.evaluated == s.successful == 7
    assert json.loads((tmp_path / "v.json").read_text())["success"] is True


def test_parameters_decide_the_outcome(tmp_path):
    validate("shards", shards_frame(), {"max_length": 10, "vocab_size": 100}, tmp_path / "a.json")
    with pytest.raises(ValidationFailed) as err:
        validate("shards", shards_frame(), {"max_length": 4, "vocab_size": 100}, tmp_path / "b.json")
    (failure,) = err.value.summary.failures
    assert failure["column"] == "length" and "1 unexpected, e.g. [5]" in failure["observed"]
    assert "suite 'shards'" in str(err.value) and "column 'length'" in str(err.value)
    assert json.loads((tmp_path / "b.json").read_text())["success"] is False


def test_token_id_must_be_strictly_below_the_vocabulary(tmp_path):
    validate("shards", shards_frame(max_id=99), {"max_length": 10, "vocab_size": 100}, tmp_path / "a.json")
    with pytest.raises(ValidationFailed, match="max_id"):
        validate("shards", shards_frame(max_id=100), {"max_length": 10, "vocab_size": 100}, tmp_path / "b.json")


def test_clean_suite_catches_leakage_duplicates_and_bad_labels(tmp_path):
    df = pd.DataFrame({"id": ["a", "a", "c"], "split": ["train", "test", "dev"], "text_chars": [5, 6, 7],
                       "group_splits": [1, 2, 1], "label_ok": [True, False, True]})
    with pytest.raises(ValidationFailed) as err:
        validate("clean", df, {"min_chars": 1, "max_chars": 100, "min_rows": 1}, tmp_path / "c.json")
    failed = {(f["expectation"], f["column"]) for f in err.value.summary.failures}
    assert failed == {("expect_column_values_to_be_unique", "id"),
                      ("expect_column_values_to_be_in_set", "split"),
                      ("expect_column_values_to_be_between", "group_splits"),
                      ("expect_column_values_to_be_in_set", "label_ok")}


def test_raw_suite_requires_the_task_columns(tmp_path):
    df = pd.DataFrame({"id": ["s:2"], "source": ["s"], "location": ["s.csv:2"], "mr": ["x"]})
    validate("raw", df, {"required_columns": ["id", "source", "location", "mr"]}, tmp_path / "a.json")
    with pytest.raises(ValidationFailed, match="expect_table_columns_to_match_set"):
        validate("raw", df, {"required_columns": ["id", "source", "location", "mr", "ref"]}, tmp_path / "b.json")


def test_predictions_and_tune_suites(tmp_path):
    preds = pd.DataFrame({"id": ["1", "2"], "prediction_chars": [10, 0], "score": [50.0, 120.0]})
    with pytest.raises(ValidationFailed) as err:
        validate("predictions", preds, {"expected_rows": 3}, tmp_path / "p.json")
    cols = {f["column"] for f in err.value.summary.failures}
    assert cols == {None, "prediction_chars", "score"}  # row count, emptiness, range
    validate("tune", pd.DataFrame({"step": [10, 20], "loss": [2.0, 1.5]}), {}, tmp_path / "t.json")
    with pytest.raises(ValidationFailed, match="loss"):
        validate("tune", pd.DataFrame({"step": [10], "loss": [float("nan")]}), {}, tmp_path / "t2.json")


def test_suites_are_read_only_at_run_time(tmp_path):
    before = suite_files()
    yml = (GX_ROOT / "gx" / "great_expectations.yml").read_text()
    validate("tune", pd.DataFrame({"step": [1], "loss": [1.0]}), {}, tmp_path / "t.json")
    assert suite_files() == before
    assert (GX_ROOT / "gx" / "great_expectations.yml").read_text() == yml


def test_markdown_summary_lists_failures(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("tune", pd.DataFrame({"step": [1], "loss": [500.0]}), {}, tmp_path / "t.json")
    md = err.value.summary.to_markdown()
    assert "FAILED" in md and "| expect_column_values_to_be_between | loss |" in md
