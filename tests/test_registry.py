import pytest

from pipelines.config import RegisterConfig
from pipelines.registry import gate

CFG = RegisterConfig(min_margin_over_zero_shot=5.0, prod_tolerance=1.0)


def metrics(tuned, zero, task="e2e"):
    return {"task": task, "primary_metric": "bleu", "tuned": {"bleu": tuned}, "zero_shot": {"bleu": zero}}


def test_gate_passes_a_clear_winner_with_no_prod():
    d = gate(CFG, metrics(36.0, 7.0), None)
    assert d["passed"] is True
    assert d["reasons"][0] == ("pass: bleu 36.00 is +29.00 over the zero-shot prompt (7.00); "
                               "at least +5.00 required")
    assert "no version of this task in prod" in d["reasons"][1]


def test_gate_refuses_a_small_margin():
    d = gate(CFG, metrics(10.0, 7.0), None)
    assert d["passed"] is False
    assert d["reasons"][0].startswith("FAIL: bleu 10.00 is +3.00 over the zero-shot")


@pytest.mark.parametrize("prod_score, passed", [(36.5, True), (37.0, True), (37.5, False)])
def test_gate_compares_against_prod_within_tolerance(prod_score, passed):
    prod = {"version": "v0.2.0", "metrics": metrics(prod_score, 7.0)}
    d = gate(CFG, metrics(36.0, 7.0), prod)
    assert d["passed"] is passed
    assert d["prod"] == {"version": "v0.2.0", "value": prod_score}
    assert ("pass" if passed else "FAIL") + ": bleu 36.00 vs prod v0.2.0" in d["reasons"][1]
