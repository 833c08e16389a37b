"""The GX suites in gx/expectations, run through pipelines.validation on 2-4 row frames."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pipelines.common import StageError
from pipelines.validation import GX_DIR, PROJECT_ROOT, ValidationFailed, ValidationSummary, validate

SHARDS_PARAMS = {"max_length": 10, "vocab_size": 100}
CLEAN_PARAMS = {"min_chars": 2, "max_chars": 100, "min_words": 1, "max_words": None, "min_rows": 2,
                "sources": ["e2e"], "max_pii_left": 0}


def gx_files(root: Path = GX_DIR) -> dict[str, bytes | None]:
    """Every path under ``root`` that git may see: a file's bytes, None for a directory.
    (uncommitted/, GX's results and Data Docs, is ignored.)"""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*")) if not {"__pycache__", "uncommitted"} & set(p.relative_to(root).parts)}


def failed(err) -> set[tuple[str, str | None]]:
    return {(f["expectation"], f["column"]) for f in err.value.summary.failures}


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def base_model_frame(**overrides):
    row = {"parameters": 100_000, "vocab_size": 320, "tokenizer_tokens": 300, "probe_loss": 5.7, "files_ok": True}
    return pd.DataFrame([{**row, **overrides}])


def raw_frame():
    return pd.DataFrame({"id": ["e2e:2", "e2e:3"], "source": ["e2e", "e2e"], "location": ["e2e.csv:2", "e2e.csv:3"],
                         "mr": ["name[Aromi]", "name[Alimentum]"], "ref": ["Aromi is ...", "Alimentum is ..."],
                         "id_source": ["e2e", "e2e"], "empty_fields": [0, 0], "record_bytes": [40, 44]})


def raw_params(**overrides):
    return {"required_columns": ["id", "source", "location", "mr", "ref"], "sources": ["e2e"],
            "max_record_bytes": 1000, **overrides}


def clean_frame():
    return pd.DataFrame({"id": ["a", "b", "c"], "source": ["e2e"] * 3, "split": ["train", "validation", "test"],
                         "text_chars": [5, 60, 7], "text_words": [1, 9, 2], "label_ok": [True, True, True],
                         "pii_left": [0, 0, 0]})


def shards_frame(length=5, max_id=10, non_text=0):
    return pd.DataFrame({"length": [length, 3], "min_id": [0, 2], "max_id": [max_id, 4],
                         "label_tokens": [1, 2], "source_tokens": [3, 1], "non_text_values": [0, non_text],
                         "split": ["train", "test"]})


def predictions_frame():
    return pd.DataFrame({"id": ["1", "2", "3", "4"], "prediction_chars": [10, 0, 7, 12],
                         "score": [50.0, 0.0, None, 100.0]})


# One passing frame per suite; each also checks that the passing summary is written.
PASSING = {
    "base_model": (base_model_frame, {}),
    "raw": (raw_frame, raw_params()),
    "clean": (clean_frame, CLEAN_PARAMS),
    "shards": (shards_frame, SHARDS_PARAMS),
    "tune": (lambda: pd.DataFrame({"step": [0, 10], "loss": [2.0, 1.5]}), {}),
    "predictions": (predictions_frame, {"expected_rows": 4, "min_nonempty_fraction": 0.75}),
    "baselines": (lambda: pd.DataFrame({"system": ["zero_shot", "zero_shot", "few_shot", "few_shot"],
                                        "id": ["1", "2", "1", "2"], "score": [0.0, 12.5, 100.0, 40.0]}),
                  {"expected_rows": 4}),
    "package": (lambda: pd.DataFrame({"item": [f"check {i}" for i in range(15)], "ok": [True] * 15}), {}),
}


@pytest.mark.parametrize("suite", sorted(PASSING))
def test_every_suite_passes_a_good_frame(suite, tmp_path):
    make, params = PASSING[suite]
    df = make()
    summary = validate(suite, df, params, tmp_path / "out" / "validation.json")
    assert summary.success and summary.evaluated == summary.successful > 0 and summary.rows == len(df)
    assert summary.failures == []
    assert df.equals(make())  # the caller's frame is not touched
    written = report(tmp_path / "out" / "validation.json")
    assert written["success"] is True and written["suite"] == suite and written["parameters"] == params
    assert "passed" in summary.to_markdown()


def test_every_suite_file_is_covered_here():
    assert {p.stem for p in (GX_DIR / "expectations").glob("*.json")} == set(PASSING)


def test_base_model_needs_files_a_sane_probe_and_room_for_every_token(tmp_path):
    bad = base_model_frame(files_ok=False, probe_loss=float("nan"), tokenizer_tokens=400)
    with pytest.raises(ValidationFailed) as err:
        validate("base_model", bad, {}, tmp_path / "v.json")
    assert failed(err) == {("expect_column_values_to_be_in_set", "files_ok"),
                           ("expect_column_values_to_not_be_null", "probe_loss"),
                           ("expect_column_pair_values_a_to_be_greater_than_b", "vocab_size, tokenizer_tokens")}
    assert str(err.value).startswith("validation failed: suite 'base_model', 3 of 7 expectations unmet on 1 rows")
    assert "on column 'files_ok' (value_set=[True]): 1 unexpected, e.g. [False]" in str(err.value)
    assert report(tmp_path / "v.json")["success"] is False


def test_raw_needs_the_task_columns_and_unique_ids(tmp_path):
    df = pd.concat([raw_frame(), raw_frame().iloc[:1]], ignore_index=True)
    with pytest.raises(ValidationFailed) as err:
        validate("raw", df, raw_params(required_columns=["id", "source", "location", "mr", "target"]),
                 tmp_path / "v.json")
    assert failed(err) == {("expect_table_columns_to_match_set", None), ("expect_column_values_to_be_unique", "id")}
    columns = next(f for f in err.value.summary.failures if f["expectation"] == "expect_table_columns_to_match_set")
    assert columns["kwargs"]["column_set"] == ["id", "source", "location", "mr", "target"]
    assert "expect_table_columns_to_match_set (column_set=[" in str(err.value)
    assert "exact_match=False): missing ['target']" in str(err.value)
    assert "on column 'id': 2 unexpected, e.g. ['e2e:2', 'e2e:2']" in str(err.value)  # every copy counts
    assert report(tmp_path / "v.json")["failures"] == err.value.summary.failures


def test_raw_provenance_must_not_be_null(tmp_path):
    df = raw_frame().assign(location=["e2e.csv:2", None])
    with pytest.raises(ValidationFailed) as err:
        validate("raw", df, raw_params(), tmp_path / "v.json")
    # a null location also fails its file:line pattern
    assert ("expect_column_values_to_not_be_null", "location") in failed(err)


def test_raw_ids_name_their_source_and_records_fit_the_size_bound(tmp_path):
    df = raw_frame().assign(id_source=["e2e", "other"], source=["e2e", "e2e"], record_bytes=[40, 5000])
    with pytest.raises(ValidationFailed) as err:
        validate("raw", df, raw_params(), tmp_path / "v.json")
    assert failed(err) == {("expect_column_pair_values_to_be_equal", "id_source, source"),
                           ("expect_column_values_to_be_between", "record_bytes")}


def test_clean_catches_duplicates_bad_splits_labels_and_leftover_pii(tmp_path):
    # Leakage across splits is checked by the clean stage on its own index (tests/test_clean.py).
    df = clean_frame().assign(id=["a", "a", "c"], split=["train", "test", "dev"], label_ok=[True, False, True],
                              pii_left=[0, 1, 0])
    with pytest.raises(ValidationFailed) as err:
        validate("clean", df, CLEAN_PARAMS, tmp_path / "v.json")
    assert failed(err) == {("expect_column_values_to_be_unique", "id"),
                           ("expect_column_values_to_be_in_set", "split"),
                           ("expect_column_values_to_be_between", "pii_left"),
                           ("expect_column_values_to_be_in_set", "label_ok")}
    assert "on column 'split'" in str(err.value) and "e.g. ['dev']" in str(err.value)


def test_clean_limits_come_from_the_parameters(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("clean", clean_frame(), {**CLEAN_PARAMS, "min_chars": 6, "max_chars": 50, "min_rows": 4},
                 tmp_path / "v.json")
    (length,) = [f for f in err.value.summary.failures if f["column"] == "text_chars"]
    assert length["kwargs"] == {"min_value": 6, "max_value": 50} and length["unexpected_sample"] == [5, 60]
    assert ("expect_table_row_count_to_be_between", None) in failed(err)


def test_shards_max_length_parameter_decides_the_outcome(tmp_path):
    assert validate("shards", shards_frame(), {**SHARDS_PARAMS, "max_length": 10}, tmp_path / "a.json").success
    with pytest.raises(ValidationFailed) as err:
        validate("shards", shards_frame(), {**SHARDS_PARAMS, "max_length": 3}, tmp_path / "b.json")
    (failure,) = err.value.summary.failures
    assert failure["column"] == "length" and failure["unexpected_sample"] == [5]
    assert failure["observed"] == "1 unexpected, e.g. [5]"  # the readable phrase a flow artifact shows
    assert "column 'length'" in str(err.value) and "1 unexpected, e.g. [5]" in str(err.value)
    assert report(tmp_path / "a.json")["success"] is True and report(tmp_path / "b.json")["success"] is False


def test_shards_token_ids_must_be_strictly_below_the_vocabulary(tmp_path):
    validate("shards", shards_frame(max_id=99), SHARDS_PARAMS, tmp_path / "a.json")
    with pytest.raises(ValidationFailed) as err:
        validate("shards", shards_frame(max_id=100), SHARDS_PARAMS, tmp_path / "b.json")
    assert failed(err) == {("expect_column_values_to_be_between", "max_id")}


def test_shards_refuse_an_example_rendered_from_a_value_that_was_not_text(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("shards", shards_frame(non_text=1), SHARDS_PARAMS, tmp_path / "v.json")
    (failure,) = err.value.summary.failures
    assert failure["column"] == "non_text_values" and failure["unexpected_sample"] == [1]


def test_an_empty_or_misshapen_frame_names_the_missing_columns(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("shards", shards_frame().drop(columns="length"), SHARDS_PARAMS, tmp_path / "v.json")
    (missing,) = err.value.summary.failures
    assert missing["column"] == "length" and 'The column "length"' in missing["error"]
    with pytest.raises(ValidationFailed, match="expect_table_row_count_to_be_between"):
        validate("shards", pd.DataFrame(), SHARDS_PARAMS, tmp_path / "empty.json")


def test_tune_loss_must_be_finite_and_steps_non_negative(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("tune", pd.DataFrame({"step": [-1, 10], "loss": [float("nan"), 500.0]}), {}, tmp_path / "v.json")
    assert failed(err) == {("expect_column_values_to_be_between", "step"),
                           ("expect_column_values_to_not_be_null", "loss"),
                           ("expect_column_values_to_be_between", "loss")}
    json.loads((tmp_path / "v.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN


def test_predictions_nonempty_fraction_is_a_parameter(tmp_path):
    params = {"expected_rows": 4, "min_nonempty_fraction": 0.75}  # 3 of 4 predictions are non-empty
    validate("predictions", predictions_frame(), params, tmp_path / "a.json")
    with pytest.raises(ValidationFailed) as err:
        validate("predictions", predictions_frame(), {**params, "min_nonempty_fraction": 0.8}, tmp_path / "b.json")
    (failure,) = err.value.summary.failures
    assert failure["column"] == "prediction_chars" and failure["kwargs"]["mostly"] == 0.8
    assert failure["unexpected_sample"] == [0]


def test_predictions_rows_ids_and_score_range(tmp_path):
    df = predictions_frame().assign(id=["1", "1", "3", None], score=[50.0, 120.0, None, -1.0])
    with pytest.raises(ValidationFailed) as err:
        validate("predictions", df, {"expected_rows": 5, "min_nonempty_fraction": 0.5}, tmp_path / "v.json")
    assert failed(err) == {("expect_table_row_count_to_equal", None),
                           ("expect_column_values_to_not_be_null", "id"),
                           ("expect_column_values_to_be_unique", "id"),
                           ("expect_column_values_to_be_between", "score")}
    rows = next(f for f in err.value.summary.failures if f["expectation"] == "expect_table_row_count_to_equal")
    assert rows["observed_value"] == 4 and rows["kwargs"] == {"value": 5}
    assert "(value=5): observed 4" in str(err.value)


def test_package_fails_on_a_missing_card_item_a_duplicate_or_too_few(tmp_path):
    good = PASSING["package"][0]()
    bad = good.assign(ok=[True] * 14 + [False])
    with pytest.raises(ValidationFailed) as err:
        validate("package", bad, {}, tmp_path / "a.json")
    assert failed(err) == {("expect_column_values_to_be_in_set", "ok")}
    with pytest.raises(ValidationFailed) as err:
        validate("package", pd.concat([good.head(10), good.head(1)]), {}, tmp_path / "b.json")
    assert failed(err) == {("expect_table_row_count_to_be_between", None), ("expect_column_values_to_be_unique", "item")}


def test_parameters_must_match_the_suite(tmp_path):
    with pytest.raises(StageError, match=r"takes parameters \['max_length', 'vocab_size'\], got \['max_length'\]"):
        validate("shards", shards_frame(), {"max_length": 10}, tmp_path / "a.json")
    with pytest.raises(StageError, match=r"takes parameters \[\], got \['max_length'\]"):
        validate("tune", pd.DataFrame({"step": [1], "loss": [1.0]}), {"max_length": 10}, tmp_path / "b.json")
    with pytest.raises(StageError, match="GX rejected parameters"):
        validate("predictions", predictions_frame(), {"expected_rows": 4, "min_nonempty_fraction": 1.5},
                 tmp_path / "c.json")
    assert not list(tmp_path.iterdir())  # a call that never validated writes no verdict


def test_unknown_suite_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=r"gx/expectations/shard\.json: no suite 'shard' \(known: \["):
        validate("shard", shards_frame(), SHARDS_PARAMS, tmp_path / "v.json")


def test_nothing_git_sees_under_gx_changes_at_run_time(tmp_path, gx_project):
    # This session's validations use a copy of gx/ (tests/conftest.py); the checkout's is untouched.
    before = gx_files(), gx_files(gx_project / "gx")
    validate("tune", pd.DataFrame({"step": [1], "loss": [1.0]}), {}, tmp_path / "a.json")
    with pytest.raises(ValidationFailed):
        validate("shards", shards_frame(), {**SHARDS_PARAMS, "max_length": 3}, tmp_path / "b.json")
    assert (gx_files(), gx_files(gx_project / "gx")) == before
    assert (gx_project / "gx" / "uncommitted" / "validations" / "shards").is_dir()  # GX's results went there


def test_markdown_lists_each_failure(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("tune", pd.DataFrame({"step": [1], "loss": [500.0]}), {}, tmp_path / "t.json")
    md = err.value.summary.to_markdown()
    assert "FAILED" in md and "3/4 expectations met on 1 rows" in md
    assert "| expect_column_values_to_be_between | loss | min_value=0.0, max_value=100.0 | 1 unexpected, e.g. [500.0] |" in md


def test_summary_round_trips_through_its_json(tmp_path):
    with pytest.raises(ValidationFailed) as err:
        validate("tune", pd.DataFrame({"step": [1], "loss": [500.0]}), {}, tmp_path / "t.json")
    data = report(tmp_path / "t.json")
    again = ValidationSummary(**{k: data[k] for k in ValidationSummary.__dataclass_fields__})
    assert again == err.value.summary and again.to_markdown() == err.value.summary.to_markdown()


def copy_project(tmp_path: Path) -> Path:
    """The modules and the GX project, as a checkout has them (no gx/uncommitted)."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT_ROOT / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(GX_DIR, root / "gx", ignore=shutil.ignore_patterns("uncommitted", "__pycache__"))
    return root


def run_in(root: Path, script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_fresh_process_is_quiet_and_offline(tmp_path):
    root = copy_project(tmp_path)
    before = gx_files(root / "gx")
    proc = run_in(root, """
import socket
def refuse(*args, **kwargs):
    raise AssertionError(f"network call: {args}")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
import pandas as pd
import pipelines.validation as v
assert v.__file__.startswith(%r), v.__file__
v.validate("tune", pd.DataFrame({"step": [1], "loss": [1.0]}), {}, v.PROJECT_ROOT / "out" / "t.json")
""" % str(root))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert report(root / "out" / "t.json")["success"] is True
    assert gx_files(root / "gx") == before


@pytest.mark.slow
def test_declare_adds_the_asset_a_new_suite_needs(tmp_path):
    root = copy_project(tmp_path)
    suite = json.loads((root / "gx" / "expectations" / "tune.json").read_text())
    suite.update(name="tune_copy", id=str(uuid.uuid4()))
    (root / "gx" / "expectations" / "tune_copy.json").write_text(json.dumps(suite))
    run = 'validate("tune_copy", pd.DataFrame({"step": [1], "loss": [1.0]}), {}, Path("t.json"))'
    declared = run_in(root, f"""
from pathlib import Path
import pandas as pd
from pipelines.common import StageError
from pipelines.validation import main, validate
try:
    {run}
except StageError as exc:
    assert "has no dataframe asset 'tune_copy'" in str(exc), exc
else:
    raise AssertionError("an undeclared suite ran")
main(["declare", "tune_copy"])
""")
    assert declared.returncode == 0, declared.stderr
    assert "tune_copy" in (root / "gx" / "great_expectations.yml").read_text()
    again = run_in(root, f"from pathlib import Path\nimport pandas as pd\nfrom pipelines.validation import validate\n"
                         f"print({run})")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "validation tune_copy: passed (4 expectations, 1 rows)\n"
