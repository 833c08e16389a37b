import pytest
import yaml

from pipelines.config import ConfigError, load_params, parse_params
from tests.conftest import ROOT


def test_real_params_file_loads():
    params = load_params(ROOT / "params.yaml")
    assert params.task.name in ("e2e", "sst2")
    assert params.tune.method in ("prompt", "prefix", "ptuning", "lora", "full")
    assert params.tokenize.max_length > 8


def _raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_bad_value_names_the_key():
    raw = _raw()
    raw["tune"]["learning_rate"] = -1
    with pytest.raises(ConfigError, match=r"tune\.learning_rate"):
        parse_params(raw)


def test_unknown_method_and_task_are_rejected():
    raw = _raw()
    raw["tune"]["method"] = "adapterdrop"
    with pytest.raises(ConfigError, match=r"tune\.method"):
        parse_params(raw)
    raw = _raw()
    raw["task"]["name"] = "squad"
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'squad'"):
        parse_params(raw)


def test_unknown_key_and_inverted_bounds_are_rejected():
    raw = _raw()
    raw["clean"]["filters"]["length"]["min_char"] = 3
    with pytest.raises(ConfigError, match=r"clean\.filters\.length\.min_char"):
        parse_params(raw)
    raw = _raw()
    raw["clean"]["filters"]["length"].update(min_chars=50, max_chars=10)
    with pytest.raises(ConfigError, match="min_chars must be smaller"):
        parse_params(raw)


def test_config_is_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(Exception):
        params.tune.learning_rate = 1.0


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
